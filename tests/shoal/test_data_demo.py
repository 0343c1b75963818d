"""`shoal demo --data` on JSONL and Parquet: the swarm trains (the Parquet run on a tiny random
Llama that has its own tokenizer.json), the run spec carries the data's fingerprint, and a
`shoal peer` started with other data is refused at join with a message naming both
fingerprints, and exits. (Against the first peer's fingerprint when the spec has none, and
across a coordinator restart: tests/peer/test_data_join.py, with light clients.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from peer.pipeline.data import data_fingerprint_for
from protocols.runspec import RunSpec
from shoal.swarm import Swarm
from tests.shoal.entry import shoal

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
transformers = pytest.importorskip("transformers")

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven",
         "wizards", "hex", "jolly", "zebras"]
VOCAB = 260


def docs(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), 50)) for _ in range(n)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def tiny_llama_with_tokenizer(folder: Path) -> Path:
    """A random 2-layer Llama (save_pretrained) whose tokenizer.json is a WordLevel over WORDS,
    padded to VOCAB ids."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    vocab |= {f"unused{i}": i for i in range(len(vocab), VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=128)
    transformers.LlamaForCausalLM(config).save_pretrained(str(folder))
    tok.save(str(folder / "tokenizer.json"))
    return folder


def demo(out: Path, *args: str | Path) -> tuple[dict, RunSpec]:
    done = shoal("demo", *args, "--stages", "1", "--peers", "2", "--steps", "5", "--out", out,
                 timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    spec = RunSpec.load(out / "run.toml")
    assert f"fingerprint {spec.data.fingerprint}" in done.stdout
    return json.loads((out / "summary.json").read_text()), spec


def refused(swarm: Swarm, i: int, data: Path) -> str:
    """Start peer `i` with `data`; it must exit non-zero by itself. Its log."""
    swarm.data = str(data)
    peer = swarm.add_peer(i)
    peer.wait(timeout=120)  # refused once: no retrying forever
    assert peer.returncode not in (0, None)
    return (swarm.logs / f"peer{i}.log").read_text()


@pytest.mark.slow
def test_demo_trains_on_jsonl_and_parquet_and_refuses_other_data(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_DATA_CACHE", str(tmp_path / "cache"))  # this process's Swarm
    texts = docs(300, seed=0)
    jsonl = write_jsonl(tmp_path / "corpus.jsonl", texts)
    parquet = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": texts}), parquet, row_group_size=50)
    other = write_jsonl(tmp_path / "other.jsonl", docs(300, seed=1))

    # bytes, from JSONL
    summary, spec = demo(tmp_path / "run-jsonl", "--data", jsonl)
    assert summary["final_loss"] < summary["initial_loss"] - 0.5, summary["loss_by_step"]
    assert spec.data.path == str(jsonl) and spec.data.fingerprint == data_fingerprint_for(
        spec, None)

    # a Hugging Face model with its own tokenizer.json, from Parquet
    model = tiny_llama_with_tokenizer(tmp_path / "llama")
    summary, hf_spec = demo(tmp_path / "run-parquet", "--model", model, "--data", parquet)
    assert summary["final_loss"] < summary["initial_loss"] - 0.2, summary["loss_by_step"]
    assert hf_spec.model.hf == str(model) and hf_spec.data.path == str(parquet)
    assert hf_spec.data.fingerprint == data_fingerprint_for(hf_spec, None)
    assert hf_spec.data.fingerprint != data_fingerprint_for(spec, str(parquet))  # tokenizer

    # a peer whose data differ from the spec's fingerprint is refused at join
    swarm = Swarm(tmp_path / "refuse", spec, 0, None, "cpu")
    try:
        swarm.start(0)
        theirs = data_fingerprint_for(spec, str(other))
        log = refused(swarm, 0, other)
        assert (f"this peer's data fingerprint {theirs} differs from the run spec's "
                f"data.fingerprint {spec.data.fingerprint}") in log, log[-2000:]
    finally:
        swarm.stop()
