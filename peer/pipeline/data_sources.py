"""Where stage 0's token ids come from: input files, their documents, a tokenizer, a token file.

A data path is a file or a folder (walked in sorted order) of plain text, JSONL (one JSON object
per line with a string ``text`` field; ``.jsonl``/``.ndjson``) or Parquet (a ``text`` column,
read in record batches through pyarrow). Documents are read as a stream and tokenized into a
token file on disk (raw ids: uint8 for a vocabulary of at most 256, else uint16 or uint32),
which the corpus maps read-only (``numpy.memmap``): nothing holds the whole corpus in memory.

Invariants:

- The tokenizer is the built-in byte-level one (ids 0-255 are the bytes; text files are read as
  raw bytes) unless the run's Hugging Face model folder has a ``tokenizer.json``, which is then
  used through Hugging Face ``tokenizers``; its ids must fit the model's vocabulary.
- ``fingerprint`` is sha256 over a version tag, the tokenizer's identity (``bytes`` or the
  sha256 of tokenizer.json), the token cap, and every input file's kind, size and bytes in the
  deterministic order they are read: equal on two machines iff they feed the same ids.
- The token file is named by the fingerprint in the cache directory, written under a temporary
  name and renamed into place with a ``.json`` beside it (written last) that holds the ids'
  count, dtype and sha256; it is reused only when that sha256 still matches.
- Documents are joined with ``FILE_SEPARATOR`` encoded by the tokenizer; a cap (``max_tokens``)
  is applied only when a caller sets one, and is logged as a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sysconfig
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("shoal.data")

FILE_SEPARATOR = b"\n\n"
FORMAT = "shoal-tokens-v1"
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
TEXT_PIECE = 2**20  # text files are read and tokenized in pieces of about this many bytes
ENCODE_BATCH = 256  # pieces handed to tokenizers' encode_batch at once
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


class CorpusError(ValueError):
    """The named data cannot make a corpus (missing, unreadable, malformed, empty, too small)."""


# --------------------------------------------------------------------------- input files


def kind_of(path: Path) -> str:
    suffix = path.suffix.lower()
    return "jsonl" if suffix in JSONL_SUFFIXES else "parquet" if suffix in PARQUET_SUFFIXES \
        else "text"


def stdlib_sources() -> list[Path]:
    """The standard library's ``.py`` files, sorted; test suites and site-packages left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return _walk(root, lambda p: p.suffix == ".py", skip_dirs=_STDLIB_SKIP)


def list_sources(paths: Sequence[str | os.PathLike[str]] | None) -> tuple[list[Path], str]:
    """The input files in reading order, and a description of where they came from. Inside a
    folder: hidden entries are skipped, and files that look binary unless JSONL or Parquet; a
    file named explicitly is always read."""
    if paths is None:
        return stdlib_sources(), f"the standard library at {sysconfig.get_paths()['stdlib']}"
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += _walk(path, lambda p: kind_of(p) != "text" or _looks_like_text(p), set())
        elif path.is_file():
            files.append(path)
        else:
            raise CorpusError(f"data path {path} does not exist; pass files or directories of "
                              "text, JSONL or Parquet")
    return files, ", ".join(str(p) for p in paths) or "an empty list of paths"


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
        return True  # keep it, so reading it reports the error by name


def _unreadable(path: Path, exc: OSError) -> CorpusError:
    return CorpusError(f"cannot read {path}: {exc.strerror or exc}; fix its permissions or leave "
                       "it out of the data paths")


def documents(path: Path) -> Iterator[tuple[bool, bytes | str]]:
    """(starts a new document, piece) in file order. A text file is one document read in pieces
    of about TEXT_PIECE bytes cut after a newline; JSONL and Parquet give one piece per record."""
    kind = kind_of(path)
    try:
        if kind == "jsonl":
            yield from _jsonl(path)
        elif kind == "parquet":
            yield from _parquet(path)
        else:
            with path.open("rb") as f:
                first = True
                while piece := f.read(TEXT_PIECE):
                    piece += f.readline()  # end the piece at a line end
                    yield first, piece
                    first = False
    except OSError as exc:
        raise _unreadable(path, exc) from exc


def _jsonl(path: Path) -> Iterator[tuple[bool, str]]:
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise CorpusError(f"{path}, line {number}: not valid JSON ({exc}); each line of "
                                  "a JSONL file must be one JSON object with a text field") \
                    from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise CorpusError(f"{path}, line {number}: no string \"text\" field in "
                                  f"{line[:80].decode(errors='replace').strip()!r}; each line "
                                  "must be a JSON object with a text field")
            if text:
                yield True, text


def _parquet(path: Path) -> Iterator[tuple[bool, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError(f"{path} is Parquet, which needs pyarrow: pip install "
                          "'shoal[data]'") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid for a bad file
        raise CorpusError(f"{path}: not a readable Parquet file ({exc})") from None
    if "text" not in table.schema_arrow.names:
        raise CorpusError(f"{path}: no \"text\" column (columns: "
                          f"{', '.join(table.schema_arrow.names)}); name the documents' column "
                          "text")
    nulls = 0
    for batch in table.iter_batches(columns=["text"], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is None:
                nulls += 1
            elif not isinstance(text, str):
                raise CorpusError(f"{path}: the text column holds {type(text).__name__}, not "
                                  "strings")
            elif text:
                yield True, text
    if nulls:
        log.warning("%s: %d rows have a null text and were skipped", path, nulls)


# --------------------------------------------------------------------------- tokenizers


class ByteTokenizer:
    """The built-in model's tokenizer: a byte is its id (0-255)."""

    identity = "bytes"
    vocab_size = 256

    def encode(self, pieces: list[bytes | str]) -> list[np.ndarray]:
        return [np.frombuffer(p.encode() if isinstance(p, str) else p, dtype=np.uint8)
                for p in pieces]


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` package; its identity is
    the file's sha256, so another tokenizer gives another data fingerprint. No special tokens
    are added (the documents are joined with FILE_SEPARATOR's own ids)."""

    def __init__(self, path: Path) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise CorpusError(f"{path} needs the tokenizers package: pip install "
                              "'shoal[hf]'") from None
        try:
            raw = path.read_bytes()
            self._tok = Tokenizer.from_str(raw.decode())
        except Exception as exc:  # OSError, or tokenizers' own error for a malformed file
            raise CorpusError(f"cannot load the tokenizer {path}: {exc}") from None
        self.path = path
        self.identity = "sha256:" + hashlib.sha256(raw).hexdigest()
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values(), default=-1) + 1

    def encode(self, pieces: list[bytes | str]) -> list[np.ndarray]:
        texts = [p.decode(errors="replace") if isinstance(p, bytes) else p for p in pieces]
        return [np.asarray(e.ids, dtype=np.int64)
                for e in self._tok.encode_batch(texts, add_special_tokens=False)]


Tokenizer = ByteTokenizer | HFTokenizer


def tokenizer_for(model_hf: str, vocab: int) -> Tokenizer:
    """The run's tokenizer: ``tokenizer.json`` of the Hugging Face folder ``model_hf`` when it
    has one, else bytes. CorpusError when its ids do not fit the model's ``vocab``."""
    path = Path(model_hf) / "tokenizer.json" if model_hf else None
    tok: Tokenizer = HFTokenizer(path) if path is not None and path.is_file() else ByteTokenizer()
    if tok.vocab_size > vocab:
        if isinstance(tok, HFTokenizer):
            raise CorpusError(f"the tokenizer {path} has {tok.vocab_size} token ids but the "
                              f"model's vocabulary is {vocab} (model.vocab / vocab_size): ids "
                              f"past {vocab - 1} have no embedding; use the model's own "
                              "tokenizer.json")
        why = f"the folder {model_hf} has no tokenizer.json, so " if model_hf else ""
        raise CorpusError(f"byte-level data has 256 token ids but the model's vocabulary is "
                          f"{vocab}: {why}the data are fed as bytes (ids 0-255); add the "
                          "model's tokenizer.json")
    return tok


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint8 if vocab_size <= 2**8 else np.uint16 if vocab_size <= 2**16
                    else np.uint32)


# --------------------------------------------------------------------------- fingerprint, cache


_fingerprints: dict[tuple, str] = {}  # this process's, by (files' path, size, mtime; tokenizer)


def fingerprint(files: Sequence[Path], tokenizer: Tokenizer, max_tokens: int = 0) -> str:
    """sha256 of what the ids are made from (see the module docstring); reads every file once,
    without parsing it. Kept in this process while no file's size or mtime changes (a peer
    computes it before it joins and again when it starts driving)."""
    try:
        stats = tuple((str(p), st.st_size, st.st_mtime_ns) for p in files
                      for st in (p.stat(),))
    except OSError as exc:
        raise _unreadable(Path(exc.filename or "?"), exc) from exc
    key = (stats, tokenizer.identity, max_tokens)
    if key in _fingerprints:
        return _fingerprints[key]
    h = hashlib.sha256(f"{FORMAT}\n{tokenizer.identity}\n{max_tokens}\n".encode())
    for path in files:
        try:
            h.update(f"{kind_of(path)} {path.stat().st_size}\n".encode())
            with path.open("rb") as f:
                while chunk := f.read(2**20):
                    h.update(chunk)
        except OSError as exc:
            raise _unreadable(path, exc) from exc
    _fingerprints.clear()
    _fingerprints[key] = h.hexdigest()
    return _fingerprints[key]


@dataclass(frozen=True)
class TokenFile:
    path: Path
    dtype: np.dtype
    n_tokens: int
    sources: tuple[str, ...]  # the files that gave ids, in order
    truncated: bool  # max_tokens cut the ids short

    def map(self) -> np.ndarray:
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))


def default_cache_dir() -> Path:
    env = os.environ.get("SHOAL_DATA_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "shoal" / "tokens"


def cached_tokens(cache_dir: Path, key: str) -> TokenFile | None:
    """The token file for fingerprint ``key`` when present and its sha256 is right."""
    meta_path, path = cache_dir / f"{key}.json", cache_dir / f"{key}.tokens"
    try:
        meta = json.loads(meta_path.read_text())
        dtype, n = np.dtype(meta["dtype"]), int(meta["n_tokens"])
        if meta.get("format") != FORMAT or path.stat().st_size != n * dtype.itemsize:
            raise ValueError("size")
        if _file_sha256(path) != meta["sha256"]:
            raise ValueError("sha256")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("token cache %s is damaged (%s); tokenizing again", path, exc)
        return None
    return TokenFile(path, dtype, n, tuple(meta["sources"]), bool(meta["truncated"]))


def build_tokens(files: Sequence[Path], tokenizer: Tokenizer, key: str, cache_dir: Path,
                 max_tokens: int = 0, where: str = "the data") -> TokenFile:
    """Tokenize ``files`` as a stream into ``cache_dir/<key>.tokens`` (atomically), or reuse it.
    CorpusError for a file that cannot be read or parsed, or when no ids result."""
    if (found := cached_tokens(cache_dir, key)) is not None:
        return found
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CorpusError(f"cannot create the token cache {cache_dir}: {exc.strerror}; set "
                          "SHOAL_DATA_CACHE to a writable folder") from exc
    dtype = token_dtype(tokenizer.vocab_size)
    separator = tokenizer.encode([FILE_SEPARATOR])[0].astype(dtype)
    tmp = cache_dir / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    digest, n, sources, truncated = hashlib.sha256(), 0, [], False
    try:
        with tmp.open("wb") as out:
            def write(ids: np.ndarray) -> bool:
                """Append ids; False once the cap is reached."""
                nonlocal n, truncated
                if max_tokens and n + ids.size > max_tokens:
                    ids, truncated = ids[: max_tokens - n], True
                raw = np.ascontiguousarray(ids, dtype=dtype).tobytes()
                out.write(raw)
                digest.update(raw)
                n += ids.size
                return not truncated

            def flush(batch: list[tuple[bool, bytes | str]]) -> bool:
                for (new_doc, _), ids in zip(batch, tokenizer.encode([p for _, p in batch]),
                                             strict=True):
                    if new_doc and n and not write(separator):
                        return False
                    if not write(ids):
                        return False
                return True

            for path in files:
                batch: list[tuple[bool, bytes | str]] = []
                before = n
                for item in documents(path):
                    batch.append(item)
                    if len(batch) >= ENCODE_BATCH:
                        going, batch = flush(batch), []
                        if not going:
                            break
                else:
                    flush(batch)
                if n > before:
                    sources.append(str(path))
                if truncated:
                    break
        if n == 0:
            raise CorpusError(f"no text found in {where}: it is empty or holds only hidden, "
                              "empty or binary files; pass files or directories of text, JSONL "
                              "or Parquet")
        meta = {"format": FORMAT, "dtype": dtype.name, "n_tokens": n,
                "sha256": digest.hexdigest(), "sources": sources, "truncated": truncated,
                "tokenizer": tokenizer.identity, "max_tokens": max_tokens}
        tmp_meta = tmp.with_suffix(".json.tmp")
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp, cache_dir / f"{key}.tokens")
        os.replace(tmp_meta, cache_dir / f"{key}.json")  # last: it marks the file complete
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".json.tmp").unlink(missing_ok=True)
    return TokenFile(cache_dir / f"{key}.tokens", dtype, n, tuple(sources), truncated)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 * 2**20):
            h.update(chunk)
    return h.hexdigest()
