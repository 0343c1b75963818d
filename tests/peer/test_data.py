"""The byte corpus: stdlib default, user files, disjoint shards, holdout, seeded batches.

(JSONL, Parquet, tokenizers, the fingerprint and the token cache: tests/peer/test_data_sources.py)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from peer.pipeline.data import (
    FILE_SEPARATOR,
    HOLDOUT_EVERY,
    Corpus,
    CorpusError,
    holdout,
    inputs_targets,
    load_corpus,
    shard,
)


@pytest.fixture(autouse=True, scope="module")
def _token_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHOAL_DATA_CACHE", str(tmp_path_factory.mktemp("tokens")))
        yield


@pytest.fixture(scope="module")
def stdlib(_token_cache: None) -> Corpus:
    return load_corpus(max_bytes=4 * 2**20)


def test_stdlib_corpus_is_python_source_without_tests_or_site_packages(stdlib: Corpus) -> None:
    assert len(stdlib) == 4 * 2**20 and stdlib.truncated
    assert all(s.endswith(".py") for s in stdlib.sources)
    parts = {part for s in stdlib.sources for part in Path(s).parts}
    assert not parts & {"site-packages", "test", "tests", "idle_test"}
    assert stdlib.sources == tuple(sorted(stdlib.sources, key=lambda s: Path(s).as_posix()))
    assert b"def " in bytes(stdlib.data[:100_000].tolist())


def test_stdlib_corpus_is_deterministic(stdlib: Corpus) -> None:
    again = load_corpus(max_bytes=4 * 2**20)
    assert again.fingerprint == stdlib.fingerprint
    assert again.sources == stdlib.sources


def test_shards_and_holdout_are_disjoint_and_cover_the_corpus(stdlib: Corpus) -> None:
    seq_len, count = 64, 3
    shards = [shard(stdlib, i, count, seq_len) for i in range(count)]
    held = holdout(stdlib, seq_len)
    owner = torch.full((len(stdlib),), -1)
    for i, part in enumerate([*shards, held]):
        for a, b in zip(part.starts.tolist(), part.ends.tolist(), strict=True):
            assert (owner[a:b] == -1).all(), f"part {i} overlaps another"
            owner[a:b] = i
    assert (owner >= 0).float().mean() > 0.99  # only a short tail block may be left out
    assert 0.03 < held.n_bytes / len(stdlib) < 0.07  # ~1 block in HOLDOUT_EVERY
    assert HOLDOUT_EVERY == 20

    # Every sampled window lies inside blocks of its own shard.
    for i, part in enumerate(shards):
        starts = part.window_starts(256, seed=1, step=0)
        assert (owner[starts] == i).all() and (owner[starts + seq_len] == i).all()


def test_batches_are_seeded_id_windows_with_shifted_targets(stdlib: Corpus) -> None:
    part = shard(stdlib, 0, 2, seq_len=32)
    batch = part.batch(4, seed=5, step=9)
    assert batch.shape == (4, 33) and batch.dtype == torch.int64
    starts = part.window_starts(4, seed=5, step=9)
    assert batch[2].tolist() == stdlib.data[int(starts[2]):int(starts[2]) + 33].tolist()
    assert torch.equal(batch, part.batch(4, seed=5, step=9))
    assert not torch.equal(batch, part.batch(4, seed=5, step=10))
    assert not torch.equal(batch, part.batch(4, seed=6, step=9))
    stream = part.batches(4, seed=5, start_step=9)
    assert torch.equal(next(stream), batch)
    x, y = inputs_targets(batch)
    assert torch.equal(x[:, 1:], y[:, :-1]) and x.shape == y.shape == (4, 32)
    # The same seed on another shard draws other bytes.
    assert not torch.equal(batch, shard(stdlib, 1, 2, seq_len=32).batch(4, seed=5, step=9))


def test_user_files_and_directories_make_a_corpus(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_text("second file " * 100)
    (tmp_path / "a.md").write_text("first file " * 100)
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01" * 100)  # binary: skipped inside a directory
    (tmp_path / ".hidden").write_text("hidden")
    (tmp_path / "empty.txt").write_text("")
    single = tmp_path / "single.txt"
    corpus = load_corpus([tmp_path / "b", tmp_path])
    names = [Path(s).name for s in corpus.sources]
    assert names == ["two.txt", "a.md", "two.txt"]  # each path's files in sorted order
    text = bytes(corpus.data.tolist())
    assert text.startswith(b"second file") and FILE_SEPARATOR + b"first file" in text
    single.write_bytes(b"\x00explicit files are always read")
    assert bytes(load_corpus([single]).data.tolist()) == b"\x00explicit files are always read"


def test_max_bytes_caps_a_user_corpus(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text("x" * 1000)
    corpus = load_corpus([tmp_path], max_bytes=1500)
    assert len(corpus) == 1500 and corpus.truncated and len(corpus.sources) == 2


def test_empty_or_missing_data_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match=r"no text found in .*pass files or directories"):
        load_corpus([tmp_path])
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus([tmp_path / "nope"])


def test_unreadable_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked.txt"
    locked.write_text("secret")

    real_open = Path.open

    def refuse(self: Path, *args: object, **kwargs: object):  # chmod 0 does not stop root
        if self.name == "locked.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(CorpusError, match=r"cannot read .*locked.txt: Permission denied"):
        load_corpus([tmp_path])


def test_a_small_corpus_still_shards_and_a_tiny_one_is_refused(tmp_path: Path) -> None:
    (tmp_path / "small.txt").write_text("0123456789abcdef" * 400)  # 6400 bytes
    corpus = load_corpus([tmp_path])
    parts = [shard(corpus, i, 2, seq_len=16) for i in range(2)]
    assert all(p.n_bytes > 0 for p in parts) and holdout(corpus, 16).n_bytes > 0
    tiny = load_corpus([tmp_path / "small.txt"], max_bytes=200)
    with pytest.raises(CorpusError, match="too small for a holdout"):
        holdout(tiny, 16)
    with pytest.raises(CorpusError, match="too few for 64 shards"):
        shard(tiny, 0, 64, 16)
