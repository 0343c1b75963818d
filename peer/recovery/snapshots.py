"""Local safetensors snapshots of a stage: the last resort of recovery (ALGORITHMS.md §3).

CheckFree rebuilds a lost stage from its two neighbours; when a neighbour was lost too (two
adjacent stages gone), nothing live can rebuild it, and the new holder falls back to the newest
snapshot in its own `--snapshot-dir`. Peers started with `--snapshot-dir DIR` write one every
`SNAPSHOT_EVERY_STEPS` optimizer steps of the stage they hold; a folder shared by several peers
(the same disk, or a synced one) therefore holds snapshots of every stage they served.

Files: `stage<S>-step<N>-<peer id prefix>.safetensors` (the stage's parameters and persistent
buffers; metadata: stage, step, layers, peer id), written to a temporary name and renamed, so a
reader never sees half a file. Each writer keeps its newest `KEEP` files per stage and deletes
its older ones. Loading trusts nothing on disk: safetensors only (no pickle), names and shapes
checked against the stage that asks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

log = logging.getLogger("shoal.snapshots")
SNAPSHOT_EVERY_STEPS = 10
KEEP = 2
_NAME = re.compile(r"^stage(\d+)-step(\d+)-([0-9a-f]{1,16})\.safetensors$")


class SnapshotError(RuntimeError):
    """A snapshot file is unreadable or does not fit the stage that asked for it."""


@dataclass(frozen=True)
class Snapshot:
    path: Path
    stage: int
    step: int
    writer: str


def list_snapshots(directory: str | Path, stage: int) -> list[Snapshot]:
    """Snapshots of `stage` in `directory`, newest (highest step) first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for f in d.iterdir():
        m = _NAME.match(f.name)
        if m and int(m.group(1)) == stage:
            found.append(Snapshot(f, stage, int(m.group(2)), m.group(3)))
    return sorted(found, key=lambda s: (-s.step, s.writer))


def save_snapshot(directory: str | Path, stage: int, step: int, peer_id: str,
                  state: Mapping[str, torch.Tensor]) -> Path:
    """Write `state` (a stage's state dict) atomically; prune this writer's older snapshots."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    writer = peer_id[:16].lower()
    path = d / f"stage{stage}-step{step:09d}-{writer}.safetensors"
    tmp = d / f".{path.name}.{os.getpid()}.tmp"
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(tmp), metadata={"stage": str(stage), "step": str(step),
                                           "peer_id": peer_id})
    os.replace(tmp, path)
    mine = [s for s in list_snapshots(d, stage) if s.writer == writer]
    for old in mine[KEEP:]:
        with contextlib.suppress(FileNotFoundError):
            old.path.unlink()
    return path


def load_snapshot(snap: Snapshot, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of `snap` named in `like` (the stage's parameters), shapes checked."""
    try:
        with safe_open(str(snap.path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("stage") != str(snap.stage):
                raise SnapshotError(f"{snap.path} says stage {meta.get('stage')!r}, its name "
                                    f"says {snap.stage}")
            keys = set(f.keys())
            missing = sorted(set(like) - keys)
            if missing:
                raise SnapshotError(f"{snap.path} lacks {missing[:3]}: it is not a snapshot of "
                                    "this stage's layers (another run or model shape?)")
            out = {k: f.get_tensor(k) for k in like}
    except (SafetensorError, OSError) as exc:
        raise SnapshotError(f"cannot read snapshot {snap.path}: {exc}") from exc
    for k, ref in like.items():
        if tuple(out[k].shape) != tuple(ref.shape):
            raise SnapshotError(f"{snap.path}: {k} has shape {tuple(out[k].shape)}, the stage "
                                f"needs {tuple(ref.shape)}")
    return out
