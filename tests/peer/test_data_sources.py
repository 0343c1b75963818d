"""Stage 0's data beyond plain bytes: JSONL and Parquet read as streams, a model folder's
tokenizer.json, the data fingerprint, the token cache on disk, and shards over token ids."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from peer.pipeline import data_sources
from peer.pipeline.data import (
    FILE_SEPARATOR,
    CorpusError,
    data_fingerprint_for,
    holdout,
    load_corpus,
    load_corpus_for,
    shard,
)
from peer.pipeline.data_sources import HFTokenizer, tokenizer_for
from protocols.runspec import RunSpec

pq = pytest.importorskip("pyarrow.parquet")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    where = tmp_path / "cache"
    monkeypatch.setenv("SHOAL_DATA_CACHE", str(where))
    yield where


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), 12)) for _ in range(n)]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs)))
    return path


def write_parquet(path: Path, docs: list[str | None]) -> Path:
    import pyarrow as pa

    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path,
                   row_group_size=7)  # several row groups: read back in record batches
    return path


def word_tokenizer(folder: Path, extra: int = 0) -> Path:
    """A WordLevel tokenizer.json over WORDS (+ `extra` filler words) in `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    vocab |= {f"filler{i}": len(vocab) + i for i in range(extra)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def joined_bytes(docs: list[str]) -> list[int]:
    return list(FILE_SEPARATOR.join(d.encode() for d in docs))


def test_jsonl_documents_become_their_bytes_joined(tmp_path: Path) -> None:
    docs = texts(30)
    corpus = load_corpus([write_jsonl(tmp_path / "c.jsonl", docs)])
    assert corpus.data.tolist() == joined_bytes(docs)
    assert isinstance(corpus.data, np.memmap) and corpus.data.dtype == np.uint8
    assert corpus.sources == (str(tmp_path / "c.jsonl"),) and not corpus.truncated


def test_parquet_is_read_in_record_batches_and_skips_null_rows(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    docs = texts(30)
    path = write_parquet(tmp_path / "c.parquet", [*docs[:10], None, *docs[10:]])
    assert pq.ParquetFile(path).num_row_groups > 1
    with caplog.at_level(logging.WARNING, "shoal.data"):
        corpus = load_corpus([path])
    assert corpus.data.tolist() == joined_bytes(docs)
    assert "1 rows have a null text" in caplog.text


def test_a_folder_mixes_text_jsonl_and_parquet_in_sorted_order(tmp_path: Path) -> None:
    docs = texts(9)
    write_jsonl(tmp_path / "b.jsonl", docs[3:6])
    write_parquet(tmp_path / "c.parquet", docs[6:])
    (tmp_path / "a.txt").write_text(docs[0] + "\n" + docs[1] + "\n" + docs[2])
    corpus = load_corpus([tmp_path])
    assert [Path(s).name for s in corpus.sources] == ["a.txt", "b.jsonl", "c.parquet"]
    expect = [docs[0] + "\n" + docs[1] + "\n" + docs[2], *docs[3:]]
    assert corpus.data.tolist() == joined_bytes(expect)


def test_a_bad_jsonl_line_is_named_by_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"text": oops}\n')
    with pytest.raises(CorpusError, match=r"c\.jsonl, line 4: not valid JSON"):
        load_corpus([path])
    path.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(CorpusError, match=r"c\.jsonl, line 2: no string \"text\" field"):
        load_corpus([path])
    bad = write_parquet(tmp_path / "d.parquet", ["x"]).with_name("e.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"body": ["no text column"]}), bad)
    with pytest.raises(CorpusError, match=r"e\.parquet: no \"text\" column \(columns: body\)"):
        load_corpus([bad])


def test_a_models_tokenizer_json_gives_its_ids(tmp_path: Path) -> None:
    model = word_tokenizer(tmp_path / "model", extra=300)  # > 256 ids: stored as uint16
    docs = texts(20)
    spec = RunSpec().replace(**{"model.hf": str(model), "model.vocab": 320,
                                "data.path": str(write_jsonl(tmp_path / "c.jsonl", docs))})
    corpus = load_corpus_for(spec, None)
    theirs = tokenizers.Tokenizer.from_file(str(model / "tokenizer.json"))
    expect = [i for d in docs for i in theirs.encode(d).ids]  # "\n\n" has no word ids
    assert corpus.data.tolist() == expect and corpus.data.dtype == np.uint16
    assert 0 not in expect and max(expect) <= len(WORDS)
    assert corpus.tokenizer.startswith("sha256:")
    # --data overrides the spec's data.path
    other = write_jsonl(tmp_path / "d.jsonl", texts(5, seed=1))
    assert load_corpus_for(spec, str(other)).sources == (str(other),)


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(tmp_path: Path) -> None:
    model = word_tokenizer(tmp_path / "model", extra=300)
    with pytest.raises(CorpusError, match=r"has 309 token ids but the model's vocabulary is "
                                          r"260"):
        tokenizer_for(str(model), 260)
    assert tokenizer_for(str(tmp_path / "no-tokenizer-here"), 260).identity == "bytes"
    with pytest.raises(CorpusError, match="byte-level data has 256 token ids"):
        tokenizer_for("", 128)


def test_the_fingerprint_follows_the_data_the_tokenizer_and_the_cap(tmp_path: Path) -> None:
    docs = texts(20)
    path = write_jsonl(tmp_path / "c.jsonl", docs)
    model = word_tokenizer(tmp_path / "model")
    base = RunSpec().replace(**{"data.path": str(path)})
    with_tok = base.replace(**{"model.hf": str(model), "model.vocab": 260})
    prints = {
        "bytes": data_fingerprint_for(base, None),
        "tokenizer": data_fingerprint_for(with_tok, None),
        "cap": data_fingerprint_for(base.replace(**{"data.max_tokens": 100}), None),
    }
    assert len(set(prints.values())) == 3
    assert load_corpus_for(base, None).fingerprint == prints["bytes"]  # the same without reading
    word_tokenizer(tmp_path / "model", extra=1)  # another tokenizer.json in the same folder
    assert data_fingerprint_for(with_tok, None) != prints["tokenizer"]
    write_jsonl(path, [*docs[:-1], docs[-1] + " alpha"])  # one word more
    assert data_fingerprint_for(base, None) != prints["bytes"]
    write_jsonl(path, docs)
    assert data_fingerprint_for(base, None) == prints["bytes"]


def test_the_token_file_is_reused_and_rebuilt_when_damaged(
        tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", texts(40))
    first = load_corpus([path])
    ids = first.data.tolist()  # a copy: the damage below is written into the mapped file
    files = sorted(p.name for p in cache.iterdir())
    assert files == [f"{first.fingerprint}.json", f"{first.fingerprint}.tokens"]  # no temp left
    meta = json.loads((cache / f"{first.fingerprint}.json").read_text())
    assert meta["n_tokens"] == len(first) and meta["sha256"]

    def no_reading(path: Path) -> Iterator:
        raise AssertionError("the token file should have been reused")
        yield

    with monkeypatch.context() as mp:
        mp.setattr(data_sources, "documents", no_reading)
        again = load_corpus([path])
    assert again.data.tolist() == ids

    tokens = cache / f"{first.fingerprint}.tokens"
    raw = bytearray(tokens.read_bytes())
    raw[5] ^= 0xFF
    tokens.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, "shoal.data"):
        healed = load_corpus([path])
    assert "is damaged (sha256); tokenizing again" in caplog.text
    assert healed.data.tolist() == ids


def test_a_cap_is_kept_only_when_set_and_said_loudly(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", texts(40))
    whole = load_corpus([path])
    spec = RunSpec().replace(**{"data.path": str(path), "data.max_tokens": 500})
    with caplog.at_level(logging.WARNING, "shoal.data"):
        cut = load_corpus_for(spec, None)
    assert len(cut) == 500 and cut.truncated and not whole.truncated
    assert cut.data.tolist() == whole.data[:500].tolist()
    assert "CUT at 500 tokens" in caplog.text


def test_token_shards_are_disjoint_and_deterministic(tmp_path: Path) -> None:
    model = word_tokenizer(tmp_path / "model")
    spec = RunSpec().replace(**{"model.hf": str(model), "model.vocab": 260,
                                "data.path": str(write_jsonl(tmp_path / "c.jsonl", texts(400)))})
    corpus = load_corpus_for(spec, None)
    seq_len, count = 16, 3
    owner = np.full(len(corpus), -1)
    for i, part in enumerate([*(shard(corpus, i, count, seq_len) for i in range(count)),
                              holdout(corpus, seq_len)]):
        for a, b in zip(part.starts.tolist(), part.ends.tolist(), strict=True):
            assert (owner[a:b] == -1).all()
            owner[a:b] = i
    again = shard(load_corpus([tmp_path / "c.jsonl"], tokenizer=HFTokenizer(
        model / "tokenizer.json")), 1, count, seq_len)
    batch = shard(corpus, 1, count, seq_len).batch(4, seed=3, step=7)
    assert torch.equal(batch, again.batch(4, seed=3, step=7))
    assert batch.dtype == torch.int64 and int(batch.max()) <= len(WORDS)


def test_a_hugging_face_model_trains_on_its_tokenized_jsonl(tmp_path: Path) -> None:
    """A Llama folder with its own tokenizer.json: its stages (weights from the config's seed;
    tests/shoal/test_data_demo.py runs one in a swarm) learn the tokenized JSONL."""
    from peer.pipeline.data import inputs_targets
    from peer.pipeline.hf import build_stage

    vocab = 260  # a run spec's model.vocab is >= 256 with model.hf
    model = word_tokenizer(tmp_path / "model", extra=vocab - len(WORDS) - 1)
    (model / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "tie_word_embeddings": True, "hidden_act": "silu"}))
    spec = RunSpec().replace(**{"model.hf": str(model), "model.vocab": vocab,
                                "data.path": str(write_jsonl(tmp_path / "c.jsonl", texts(200)))})
    part = shard(load_corpus_for(spec, None), 0, 1, 16)
    stage0, block = (build_stage(model, s, 1, weights=False) for s in (0, 1))
    params = [*stage0.parameters(), *block.parameters()]
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend (10x slower here)
    try:
        for step in range(30):  # plain SGD: torch.optim's first use imports dynamo (~5 s)
            x, y = inputs_targets(part.batch(8, seed=0, step=step))
            loss, _ = stage0.head_loss(block(stage0.embed(x)), y)
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p -= 0.5 * g
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    assert int(x.max()) <= len(WORDS) and losses[-1] < losses[0] - 0.3, losses
