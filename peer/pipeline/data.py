"""Training data for stage 0: a corpus of token ids, disjoint shards of it, a holdout, batches.

A corpus is the token ids of the run's data (peer/pipeline/data_sources.py reads text, JSONL and
Parquet, tokenizes with the model's tokenizer or as bytes, and writes a token file the corpus
maps read-only): by default the Python standard library's own ``.py`` sources as bytes (present
wherever Shoal runs, ~13 MB on CPython 3.11, read whole), or the files and folders a user names
(``--data`` / the run spec's ``data.path``).

Invariants:

- A corpus is one read-only 1-D array of ids (a ``numpy.memmap``): files read in sorted path
  order, documents joined with ``FILE_SEPARATOR``, cut only at a cap the caller sets (logged).
  The same inputs and tokenizer give the same ids and the same ``fingerprint`` (the coordinator
  refuses a peer whose fingerprint differs from the run's; the stdlib differs between Python
  versions).
- The corpus is cut into blocks of ``block_len`` ids (a function of the corpus size and the
  window only). Every ``HOLDOUT_EVERY``-th block is holdout; the other blocks are dealt round
  robin to the ``count`` shards. A window (``seq_len + 1`` ids) always lies inside one block,
  so shards never share an id and no holdout id is ever trained on.
- A batch is a pure function of (shard, seed, step): a replica that restarts, or one that must
  redraw a lost microbatch, gets the same ids again.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from peer.pipeline.data_sources import (
    FILE_SEPARATOR,
    ByteTokenizer,
    CorpusError,
    Tokenizer,
    build_tokens,
    default_cache_dir,
    fingerprint,
    list_sources,
    stdlib_sources,
    tokenizer_for,
)

if TYPE_CHECKING:
    from protocols.runspec import RunSpec

__all__ = ["FILE_SEPARATOR", "HOLDOUT_EVERY", "Corpus", "CorpusError", "Shard",
           "data_fingerprint_for", "data_paths", "holdout", "inputs_targets", "load_corpus",
           "load_corpus_for", "shard", "stdlib_sources"]

log = logging.getLogger("shoal.data")
HOLDOUT_EVERY = 20  # 1 block in 20 (5 %) is held out for evaluation
MAX_BLOCK_LEN = 16 * 2**10
MIN_BLOCKS = 256  # small corpora get shorter blocks (never shorter than a window)


@dataclass(frozen=True)
class Corpus:
    data: np.ndarray  # [n_tokens] ids, read-only (a memmap of the token file)
    sources: tuple[str, ...]  # the files read, in order
    truncated: bool  # True when a cap cut the ids short (later files left out)
    fingerprint: str  # sha256 of inputs + tokenizer + cap (data_sources.fingerprint)
    tokenizer: str = "bytes"  # the tokenizer's identity

    def __len__(self) -> int:
        return int(self.data.shape[0])


def load_corpus(paths: Sequence[str | os.PathLike[str]] | None = None,
                max_bytes: int | None = None, *, tokenizer: Tokenizer | None = None,
                max_tokens: int = 0, cache_dir: Path | None = None) -> Corpus:
    """The corpus of ``paths`` (files and folders; None: the stdlib's sources), tokenized by
    ``tokenizer`` (default: bytes) into the token cache (``cache_dir``, default
    ``default_cache_dir()``) or read back from it. ``max_tokens`` (``max_bytes`` is its old
    name) caps the ids; 0 or None: no cap. CorpusError for data that cannot make a corpus."""
    cap = max_tokens or max_bytes or 0
    if cap < 0 or (max_bytes is not None and max_bytes < 1):
        raise CorpusError(f"the token cap must be positive, got {max_bytes or max_tokens}")
    tok = tokenizer or ByteTokenizer()
    files, where = list_sources(paths)
    key = fingerprint(files, tok, cap)
    tokens = build_tokens(files, tok, key, cache_dir or default_cache_dir(), cap, where)
    if tokens.truncated:
        log.warning("the data were CUT at %d tokens (the cap set by data.max_tokens or the "
                    "caller): %d of %d files read, the last one in part", cap,
                    len(tokens.sources), len(files))
    return Corpus(tokens.map(), tokens.sources, tokens.truncated, key, tok.identity)


def data_paths(spec: RunSpec, data: str | None) -> list[str] | None:
    """The data a peer reads: its ``--data``, else the run spec's ``data.path``, else None (the
    stdlib)."""
    path = data or spec.data.path
    return [path] if path else None


_loaded: dict[tuple, Corpus] = {}  # load_corpus_for's results in this process


def load_corpus_for(spec: RunSpec, data: str | None) -> Corpus:
    """The run's corpus on this peer (see data_paths), in the run's tokenizer and cap. Kept per
    (paths, tokenizer, cap) for the process's life: the daemon loads it in a thread before it
    makes a driver, whose own call then returns at once (peer/daemon.py)."""
    tok = tokenizer_for(spec.model.hf, spec.model.vocab)
    paths = data_paths(spec, data)
    key = (tuple(paths or ()), tok.identity, spec.data.max_tokens)
    if key not in _loaded:
        _loaded.clear()  # one corpus per process
        _loaded[key] = load_corpus(paths, tokenizer=tok, max_tokens=spec.data.max_tokens)
    return _loaded[key]


def data_fingerprint_for(spec: RunSpec, data: str | None) -> str:
    """The fingerprint ``load_corpus_for`` would give, without tokenizing (reads the files)."""
    tok = tokenizer_for(spec.model.hf, spec.model.vocab)
    return fingerprint(list_sources(data_paths(spec, data))[0], tok, spec.data.max_tokens)


# --------------------------------------------------------------------------- shards and batches


@dataclass(frozen=True)
class Shard:
    """Some blocks of a corpus, and the windows that fit inside them."""

    name: str
    data: np.ndarray  # the whole corpus; only [starts[i], ends[i]) ranges are ever read
    starts: torch.Tensor  # int64 block starts
    ends: torch.Tensor  # int64 block ends (exclusive)
    window: int  # seq_len + 1

    @property
    def n_tokens(self) -> int:
        return int((self.ends - self.starts).sum())

    n_bytes = n_tokens  # its name when every id was a byte

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
        """int64 ids [batch_size, seq_len + 1]; a pure function of (shard, seed, step)."""
        starts = self.window_starts(batch_size, seed, step).numpy()
        ids = self.data[starts[:, None] + np.arange(self.window)]  # a copy, off the memmap
        return torch.from_numpy(ids.astype(np.int64))

    def batches(self, batch_size: int, seed: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        step = start_step
        while True:
            yield self.batch(batch_size, seed, step)
            step += 1


def block_len(n_tokens: int, window: int) -> int:
    return max(window, min(MAX_BLOCK_LEN, n_tokens // MIN_BLOCKS))


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
        raise CorpusError(f"a corpus of {len(corpus)} tokens has {starts.numel()} training "
                          f"blocks of {seq_len + 1}+ tokens, too few for {count} shards; add "
                          "data or use fewer stage-0 replicas")
    mine = torch.arange(starts.numel()) % count == index
    return Shard(f"shard {index}/{count}", corpus.data, starts[mine], ends[mine], window)


def holdout(corpus: Corpus, seq_len: int) -> Shard:
    """The evaluation blocks, which no shard ever trains on."""
    starts, ends, window = _blocks(corpus, seq_len)
    held = torch.arange(starts.numel()) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    if not held.any():
        raise CorpusError(f"a corpus of {len(corpus)} tokens is too small for a holdout of "
                          f"{seq_len + 1}-token windows: it needs at least {HOLDOUT_EVERY} "
                          f"windows ({HOLDOUT_EVERY * (seq_len + 1)} tokens); add data")
    return Shard("holdout", corpus.data, starts[held], ends[held], window)


def inputs_targets(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a [B, T+1] batch into inputs [:, :-1] and next-token targets [:, 1:]."""
    return batch[:, :-1], batch[:, 1:]
