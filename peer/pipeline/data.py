"""Byte-level training data for stage 0: a corpus, disjoint shards of it, a holdout, batches.

The model reads raw bytes, so a corpus is just bytes: by default the Python standard library's
own ``.py`` sources (present wherever Shoal runs), or the files and directories a user names.

Invariants:

- A corpus is one read-only uint8 tensor: files read in sorted path order, joined with
  ``FILE_SEPARATOR``, cut at ``max_bytes``. The same inputs give the same bytes and the same
  ``fingerprint`` (stage-0 replicas compare it; the stdlib differs between Python versions).
- The corpus is cut into blocks of ``block_len`` bytes (a function of the corpus size and the
  window only). Every ``HOLDOUT_EVERY``-th block is holdout; the other blocks are dealt round
  robin to the ``count`` shards. A window (``seq_len + 1`` bytes) always lies inside one block,
  so shards never share a byte and no holdout byte is ever trained on.
- A batch is a pure function of (shard, seed, step): a replica that restarts, or one that must
  redraw a lost microbatch, gets the same bytes again.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MAX_BYTES = 32 * 2**20  # the stdlib's non-test sources are ~13 MB on CPython 3.11
FILE_SEPARATOR = b"\n\n"
HOLDOUT_EVERY = 20  # 1 block in 20 (5 %) is held out for evaluation
MAX_BLOCK_LEN = 16 * 2**10
MIN_BLOCKS = 256  # small corpora get shorter blocks (never shorter than a window)
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


class CorpusError(ValueError):
    """The named data cannot make a corpus (missing, unreadable, empty, or too small)."""


@dataclass(frozen=True)
class Corpus:
    data: torch.Tensor  # uint8 [n_bytes]
    sources: tuple[str, ...]  # the files read, in order
    truncated: bool  # True when max_bytes cut the last file short (later files left out)

    @property
    def fingerprint(self) -> str:
        """sha256 of the bytes: equal on two machines iff they train on the same corpus."""
        return hashlib.sha256(self.data.numpy().tobytes()).hexdigest()

    def __len__(self) -> int:
        return self.data.numel()


def stdlib_sources() -> list[Path]:
    """The standard library's ``.py`` files, sorted; test suites and site-packages left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return _walk(root, lambda p: p.suffix == ".py", skip_dirs=_STDLIB_SKIP)


def load_corpus(
    paths: Sequence[str | os.PathLike[str]] | None = None, max_bytes: int = DEFAULT_MAX_BYTES
) -> Corpus:
    """Read a corpus: the stdlib's sources when ``paths`` is None, else the given files and
    directories (recursively; hidden entries and files that look binary are skipped inside
    directories, a file named explicitly is always read)."""
    if max_bytes < 1:
        raise CorpusError(f"max_bytes must be positive, got {max_bytes}")
    if paths is None:
        files = stdlib_sources()
        where = f"the standard library at {sysconfig.get_paths()['stdlib']}"
    else:
        files = []
        for raw in paths:
            path = Path(raw)
            if path.is_dir():
                files += _walk(path, _looks_like_text, skip_dirs=set())
            elif path.is_file():
                files.append(path)
            else:
                raise CorpusError(f"data path {path} does not exist; pass files or directories "
                                  "of text")
        where = ", ".join(str(p) for p in paths) or "an empty list of paths"

    chunks: list[bytes] = []
    sources: list[str] = []
    size, truncated = 0, False
    for path in files:
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise CorpusError(f"cannot read {path}: {exc.strerror}; fix its permissions or "
                              "leave it out of the data paths") from exc
        if not content:
            continue
        piece = (FILE_SEPARATOR if chunks else b"") + content
        if size + len(piece) > max_bytes:
            chunks.append(piece[: max_bytes - size])
            sources.append(str(path))
            truncated = True
            break
        chunks.append(piece)
        sources.append(str(path))
        size += len(piece)
    if not chunks:
        raise CorpusError(f"no text found in {where}: it is empty or holds only hidden, empty "
                          "or binary files; pass files or directories of text")
    data = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
    return Corpus(data=data, sources=tuple(sources), truncated=truncated)


def _walk(root: Path, keep: Callable[[Path], bool], skip_dirs: set[str]) -> list[Path]:
    """Files under ``root`` in sorted path order (deterministic on every OS and filesystem)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if not name.startswith(".") and path.is_file() and keep(path):
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _looks_like_text(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return b"\x00" not in f.read(8192)
    except OSError:
        return True  # keep it, so load_corpus reports the read error by name


# --------------------------------------------------------------------------- shards and batches


@dataclass(frozen=True)
class Shard:
    """Some blocks of a corpus, and the windows that fit inside them."""

    name: str
    data: torch.Tensor  # the whole corpus; only [starts[i], ends[i]) ranges are ever read
    starts: torch.Tensor  # int64 block starts
    ends: torch.Tensor  # int64 block ends (exclusive)
    window: int  # seq_len + 1

    @property
    def n_bytes(self) -> int:
        return int((self.ends - self.starts).sum())

    def window_starts(self, batch_size: int, seed: int, step: int) -> torch.Tensor:
        """Start offsets of batch ``step``'s windows, uniform over every window in the shard."""
        per_block = self.ends - self.starts - self.window + 1
        cumulative = per_block.cumsum(0)
        digest = hashlib.blake2b(f"{self.name}:{seed}:{step}".encode(), digest_size=8).digest()
        gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") >> 1)
        pick = torch.randint(0, int(cumulative[-1]), (batch_size,), generator=gen)
        block = torch.searchsorted(cumulative, pick, right=True)
        return self.starts[block] + pick - (cumulative[block] - per_block[block])

    def batch(self, batch_size: int, seed: int, step: int) -> torch.Tensor:
        """uint8 [batch_size, seq_len + 1]; a pure function of (shard, seed, step)."""
        starts = self.window_starts(batch_size, seed, step)
        return self.data[starts[:, None] + torch.arange(self.window)]

    def batches(self, batch_size: int, seed: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        step = start_step
        while True:
            yield self.batch(batch_size, seed, step)
            step += 1


def block_len(n_bytes: int, window: int) -> int:
    return max(window, min(MAX_BLOCK_LEN, n_bytes // MIN_BLOCKS))


def _blocks(corpus: Corpus, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    window = seq_len + 1
    if seq_len < 1:
        raise CorpusError(f"seq_len must be positive, got {seq_len}")
    length = block_len(len(corpus), window)
    starts = torch.arange(0, len(corpus), length, dtype=torch.int64)
    ends = torch.clamp(starts + length, max=len(corpus))
    full = ends - starts >= window  # a short tail block holds no window: drop it
    return starts[full], ends[full], window


def shard(corpus: Corpus, index: int, count: int, seq_len: int) -> Shard:
    """Shard ``index`` of ``count``: the training blocks dealt to this stage-0 replica."""
    if not 0 <= index < count:
        raise CorpusError(f"shard index {index} is not in 0..{count - 1}")
    starts, ends, window = _blocks(corpus, seq_len)
    train = torch.arange(starts.numel()) % HOLDOUT_EVERY != HOLDOUT_EVERY - 1
    starts, ends = starts[train], ends[train]
    if starts.numel() < count:
        raise CorpusError(f"a corpus of {len(corpus)} bytes has {starts.numel()} training blocks "
                          f"of {seq_len + 1}+ bytes, too few for {count} shards; add data or "
                          "use fewer stage-0 replicas")
    mine = torch.arange(starts.numel()) % count == index
    return Shard(f"shard {index}/{count}", corpus.data, starts[mine], ends[mine], window)


def holdout(corpus: Corpus, seq_len: int) -> Shard:
    """The evaluation blocks, which no shard ever trains on."""
    starts, ends, window = _blocks(corpus, seq_len)
    held = torch.arange(starts.numel()) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    if not held.any():
        raise CorpusError(f"a corpus of {len(corpus)} bytes is too small for a holdout of "
                          f"{seq_len + 1}-byte windows: it needs at least {HOLDOUT_EVERY} "
                          f"windows ({HOLDOUT_EVERY * (seq_len + 1)} bytes); add data")
    return Shard("holdout", corpus.data, starts[held], ends[held], window)


def inputs_targets(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a [B, T+1] batch into inputs [:, :-1] and next-byte targets [:, 1:]."""
    return batch[:, :-1], batch[:, 1:]
