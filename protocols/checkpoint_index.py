"""The on-disk format of durable checkpoints, shared by their writer (the coordinator, which never
imports torch) and their readers (peers started with `--resume`; docs/checkpoints.md).

    DIR/step-000000020/stage-0.safetensors     one file per stage (0..S): the stage's whole state
    DIR/step-000000020/stage-1.safetensors     as `StageHost.state_arrays` names it (weights,
    ...                                        optimizer and sync-mode state, meta.step)
    DIR/step-000000020/index.json              written once every stage file is in place
    DIR/index.json                             a copy of the newest complete step's index, plus
                                               "dir": "step-000000020"; written last

An index names the step, the run spec's hash (`spec_hash`), and each stage's file, size and
SHA-256. Files are written to a temporary name, flushed and renamed (`write_atomic`), the index
after the files it names, so an index only ever names complete files; a crash at any moment
leaves the previous index valid. Readers trust nothing: the index's fields are checked, file
names must be the ones this module makes (no path leaves the folder), and a stage's bytes are
read once, hashed, and refused unless they match the index (`read_stage_bytes`). The files are
safetensors: nothing on disk is ever unpickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from protocols.runspec import RunSpec

FORMAT = "shoal-checkpoint"
VERSION = 1
INDEX_FILE = "index.json"
CHUNK_BYTES = 512 * 1024  # under the coordinator's 1 MiB per-message limit
MAX_HEADER_BYTES = 100 << 20
_STEP_DIR = re.compile(r"^step-(\d{9,})$")
_STAGE_FILE = re.compile(r"^stage-(\d+)\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says which file and what to do."""


def spec_hash(spec: RunSpec) -> str:
    """SHA-256 of what a stage's state depends on: the model, the pipeline's cut, the optimizer,
    the sync mode and the seed. Leases, run length, names and the checkpoint section may differ
    between the run that wrote a checkpoint and the one that resumes it."""
    whole = dataclasses.asdict(spec)
    part = {"model": whole["model"], "pipeline": whole["pipeline"], "optim": whole["optim"],
            "sync": whole["sync"], "seed": whole["run"]["seed"]}
    return hashlib.sha256(tomli_w.dumps(part).encode()).hexdigest()


def step_dir_name(step: int) -> str:
    return f"step-{step:09d}"


def stage_file_name(stage: int) -> str:
    return f"stage-{stage}.safetensors"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class StageEntry:
    file: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Index:
    """A complete checkpoint: `folder` holds the stage files the entries name."""

    step: int
    spec_hash: str
    stages: dict[int, StageEntry]
    folder: Path
    run: str = ""

    def to_json(self, *, root: bool = False) -> str:
        body = {"format": FORMAT, "version": VERSION, "step": self.step,
                "spec_hash": self.spec_hash, "run": self.run,
                "stages": {str(s): {"file": e.file, "sha256": e.sha256, "size": e.size}
                           for s, e in sorted(self.stages.items())}}
        if root:
            body["dir"] = self.folder.name
        return json.dumps(body, indent=2) + "\n"


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` under a temporary name, flush it to disk, rename it into place.
    Raises OSError (full disk, permissions) with nothing left under `path`'s name changed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # the rename itself durable (not on every filesystem)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_index(path: str | os.PathLike[str]) -> Index:
    """The checkpoint at `path`: a checkpoint folder (its index.json names the newest complete
    step) or one step's folder. Raises CheckpointError naming what is wrong."""
    folder = Path(path)
    f = folder / INDEX_FILE
    try:
        raw = json.loads(f.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{f} does not exist: {folder} holds no complete checkpoint "
                              "(give the coordinator's --checkpoint-dir, or a copy of it)"
                              ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{f} is not readable JSON ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{f} is not a Shoal checkpoint index (format != {FORMAT!r})")
    if raw.get("version") != VERSION:
        raise CheckpointError(f"{f} has version {raw.get('version')!r}; this Shoal reads "
                              f"version {VERSION}")
    step, digest, stages = raw.get("step"), raw.get("spec_hash"), raw.get("stages")
    if not isinstance(step, int) or step < 0 or not isinstance(digest, str) or not isinstance(
            stages, dict) or not stages:
        raise CheckpointError(f"{f}: step, spec_hash or stages missing or malformed")
    if "dir" in raw:
        sub = raw["dir"]
        if not isinstance(sub, str) or not _STEP_DIR.match(sub):
            raise CheckpointError(f"{f}: dir {sub!r} is not a step folder name")
        folder = folder / sub
    entries: dict[int, StageEntry] = {}
    for key, e in stages.items():
        ok = (isinstance(key, str) and key.isdigit() and isinstance(e, dict)
              and isinstance(e.get("file"), str) and _STAGE_FILE.match(e["file"])
              and isinstance(e.get("sha256"), str) and len(e["sha256"]) == 64
              and isinstance(e.get("size"), int) and e["size"] > 0)
        if not ok:
            raise CheckpointError(f"{f}: stage entry {key!r} is malformed")
        entries[int(key)] = StageEntry(e["file"], e["sha256"], e["size"])
    if missing := sorted(set(range(max(entries) + 1)) - set(entries)):
        raise CheckpointError(f"{f} lacks stages {missing}: the checkpoint is incomplete")
    return Index(step, digest, entries, folder, str(raw.get("run", "")))


def check_for_run(index: Index, spec: RunSpec, stage: int) -> StageEntry:
    """The entry of `stage` if `index` is a checkpoint of this run (same spec hash, same number
    of stages), else CheckpointError."""
    if len(index.stages) != spec.pipeline.stages + 1:
        raise CheckpointError(f"the checkpoint in {index.folder} has {len(index.stages)} stages, "
                              f"this run has {spec.pipeline.stages + 1}")
    want = spec_hash(spec)
    if index.spec_hash != want:
        raise CheckpointError(
            f"the checkpoint in {index.folder} (step {index.step}) is of another run spec (hash "
            f"{index.spec_hash[:12]}, this run's is {want[:12]}): its model, pipeline, optim, "
            "sync or seed differ; resume with the run spec that wrote it")
    if stage not in index.stages:
        raise CheckpointError(f"the checkpoint in {index.folder} lacks stage {stage}")
    return index.stages[stage]


def read_stage_bytes(index: Index, stage: int) -> bytes:
    """The bytes of `stage`'s file, read once and checked against the index's size and SHA-256
    (CheckpointError otherwise: a torn copy, a corrupted disk, a file from another checkpoint)."""
    if stage not in index.stages:
        raise CheckpointError(f"the checkpoint in {index.folder} lacks stage {stage}")
    e = index.stages[stage]
    path = index.folder / e.file
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint of step {index.step} is "
                              "incomplete (copy the whole step folder)") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror}") from exc
    got = sha256_hex(data)
    if len(data) != e.size or got != e.sha256:
        raise CheckpointError(f"{path} hashes to {got[:12]} ({len(data)} bytes), its index says "
                              f"{e.sha256[:12]} ({e.size} bytes): the file is corrupt or from "
                              "another checkpoint; refusing it")
    return data


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's header (8-byte little-endian length, then
    JSON), read without torch. Raises CheckpointError when `data` is no safetensors file."""
    if len(data) < 8:
        raise CheckpointError("not a safetensors file (shorter than its header length)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(MAX_HEADER_BYTES, len(data) - 8):
        raise CheckpointError(f"not a safetensors file (header of {n} bytes)")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"not a safetensors file (header: {exc})") from exc
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError("not a safetensors file (malformed __metadata__)")
    return meta
