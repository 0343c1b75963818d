"""The coordinator's checkpoint writer and the index format (coordinator/checkpoints.py,
protocols/checkpoint_index.py): an index only ever names complete, hash-checked files; old
checkpoints are pruned; a failing write keeps the run and the previous checkpoint; readers refuse
a file whose hash differs, a missing stage, another run's spec, a path out of the folder."""

from __future__ import annotations

import asyncio
import errno
import json
from pathlib import Path

import pytest

from coordinator import checkpoints
from coordinator.checkpoints import CheckpointService, CheckpointWriter
from protocols import checkpoint_index as ci
from protocols import shoal_pb2 as pb
from protocols.runspec import RunSpec

SPEC = RunSpec().replace(**{"pipeline.stages": 2, "checkpoint.every": 5,
                            "checkpoint.dir": "/unused"})


def stage_bytes(stage: int, step: int) -> bytes:
    """A small safetensors file as a peer would send (header with stage and step)."""
    header = json.dumps({"__metadata__": {"stage": str(stage), "step": str(step)},
                         "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    return len(header).to_bytes(8, "little") + header + bytes([stage, step % 256]) * 4


def store(w: CheckpointWriter, step: int, stages=(0, 1, 2)) -> list[tuple[bool, str]]:
    async def go():
        return [await w.store(step, s, stage_bytes(s, step), ci.sha256_hex(stage_bytes(s, step)))
                for s in stages]
    return asyncio.run(go())


def test_index_written_last_and_names_complete_files(tmp_path: Path) -> None:
    w = CheckpointWriter(tmp_path, SPEC)
    assert [ok for ok, _ in store(w, 5, (0, 1))] == [True, True]
    assert not (tmp_path / "index.json").exists()  # two of three stages: no index yet
    assert not (tmp_path / "step-000000005" / "index.json").exists()
    _, detail = store(w, 5, (2,))[0]
    assert "complete" in detail and w.complete_step == 5
    index = ci.read_index(tmp_path)
    assert index.step == 5 and index.folder == tmp_path / "step-000000005"
    assert index.spec_hash == ci.spec_hash(SPEC)
    for s in (0, 1, 2):
        assert ci.read_stage_bytes(index, s) == stage_bytes(s, 5)
    assert ci.read_index(tmp_path / "step-000000005").step == 5  # the step's own index
    assert not list(tmp_path.rglob("*.tmp"))
    # a duplicate (two replicas that both thought they were designated) is not stored again
    assert store(w, 5, (1,))[0][0] is False
    # a restarted coordinator knows its last complete checkpoint
    assert CheckpointWriter(tmp_path, SPEC).complete_step == 5


def test_old_checkpoints_pruned_unfinished_newer_kept(tmp_path: Path) -> None:
    w = CheckpointWriter(tmp_path, SPEC.replace(**{"checkpoint.keep": 2}))
    for step in (5, 10, 15):
        store(w, step)
    store(w, 20, (0,))  # still being uploaded
    assert sorted(d.name for d in tmp_path.iterdir() if d.is_dir()) == [
        "step-000000010", "step-000000015", "step-000000020"]
    assert ci.read_index(tmp_path).step == 15
    store(w, 20, (1, 2))
    assert sorted(d.name for d in tmp_path.iterdir() if d.is_dir()) == [
        "step-000000015", "step-000000020"]


def test_steps_that_never_complete_do_not_fill_the_disk(tmp_path: Path) -> None:
    w = CheckpointWriter(tmp_path, SPEC.replace(**{"checkpoint.keep": 2}))
    store(w, 5)
    for step in (10, 15, 20, 25):  # stage 2's upload never comes
        store(w, step, (0, 1))
    assert sorted(d.name for d in tmp_path.iterdir() if d.is_dir()) == [
        "step-000000005", "step-000000020", "step-000000025"]
    assert sorted(w.partial) == [20, 25] and ci.read_index(tmp_path).step == 5
    store(w, 25, (2,))
    assert ci.read_index(tmp_path).step == 25 and not w.partial


def test_full_disk_logs_and_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch,
                                                          caplog) -> None:
    w = CheckpointWriter(tmp_path, SPEC)
    store(w, 5)
    real = ci.write_atomic

    def full(path: Path, data: bytes) -> None:
        if "step-000000010" in str(path) and path.name == "stage-1.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(ci, "write_atomic", full)
    results = store(w, 10)
    assert [ok for ok, _ in results] == [True, False, True]
    assert "No space left" in results[1][1]
    assert "writing stage 1" in caplog.text and "stays valid" in caplog.text
    assert ci.read_index(tmp_path).step == 5 and w.complete_step == 5 and w.errors == 1
    monkeypatch.setattr(ci, "write_atomic", real)  # space again: the next checkpoint completes
    store(w, 15)
    assert ci.read_index(tmp_path).step == 15


def test_unwritable_folder_refuses_the_upload_without_raising(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    w = CheckpointWriter(blocker / "checkpoints", SPEC)  # mkdir under a file: a real OSError
    ok, detail = store(w, 5, (0,))[0]
    assert not ok and "could not write" in detail and w.errors == 1


def test_write_atomic_leaves_the_old_file_when_it_fails(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "index.json"
    ci.write_atomic(target, b"old")

    def fail(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(ci.os, "fsync", fail)
    with pytest.raises(OSError):
        ci.write_atomic(target, b"new")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [
        "index.json"]


def complete(tmp_path: Path) -> ci.Index:
    w = CheckpointWriter(tmp_path, SPEC)
    store(w, 5)
    return ci.read_index(tmp_path)


def test_reader_refuses_a_file_whose_hash_differs(tmp_path: Path) -> None:
    index = complete(tmp_path)
    f = index.folder / "stage-1.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(ci.CheckpointError, match="corrupt or from another checkpoint"):
        ci.read_stage_bytes(index, 1)
    assert ci.read_stage_bytes(index, 0) == stage_bytes(0, 5)


def test_reader_refuses_a_missing_stage(tmp_path: Path) -> None:
    index = complete(tmp_path)
    (index.folder / "stage-2.safetensors").unlink()
    with pytest.raises(ci.CheckpointError, match=r"stage-2\.safetensors is missing"):
        ci.read_stage_bytes(index, 2)
    raw = json.loads((tmp_path / "index.json").read_text())
    del raw["stages"]["1"]
    (tmp_path / "index.json").write_text(json.dumps(raw))
    with pytest.raises(ci.CheckpointError, match=r"lacks stages \[1\]"):
        ci.read_index(tmp_path)


def test_reader_refuses_another_run_and_paths_out_of_the_folder(tmp_path: Path) -> None:
    index = complete(tmp_path)
    assert ci.check_for_run(index, SPEC, 1).file == "stage-1.safetensors"
    # leases, run length and the checkpoint section may change; the model may not
    same = SPEC.replace(**{"run.steps": 99, "membership.lease_s": 30.0, "checkpoint.every": 0})
    ci.check_for_run(index, same, 1)
    with pytest.raises(ci.CheckpointError, match="another run spec"):
        ci.check_for_run(index, SPEC.replace(**{"model.d_model": 64}), 1)
    with pytest.raises(ci.CheckpointError, match="has 3 stages, this run has 4"):
        ci.check_for_run(index, SPEC.replace(**{"pipeline.stages": 3}), 1)
    for bad in ("../../etc/passwd", "stage-1.bin"):
        raw = json.loads((tmp_path / "index.json").read_text())
        raw["stages"]["1"]["file"] = bad
        (tmp_path / "index.json").write_text(json.dumps(raw))
        with pytest.raises(ci.CheckpointError, match="stage entry '1' is malformed"):
            ci.read_index(tmp_path)
    with pytest.raises(ci.CheckpointError, match="does not exist"):
        ci.read_index(tmp_path / "nothing-here")


def test_safetensors_header_is_read_without_torch() -> None:
    assert ci.safetensors_metadata(stage_bytes(2, 10)) == {"stage": "2", "step": "10"}
    for junk in (b"", b"\xff" * 16, (5).to_bytes(8, "little") + b"{nope"):
        with pytest.raises(ci.CheckpointError, match="not a safetensors file"):
            ci.safetensors_metadata(junk)


def test_uploads_are_refused_unless_from_the_stage_at_a_checkpoint_step(tmp_path: Path) -> None:
    spec = SPEC.replace(**{"checkpoint.dir": str(tmp_path)})
    svc = CheckpointService(spec, CheckpointWriter(tmp_path, spec),
                            lambda pid: {"aa" * 16: 1}.get(pid))
    data = stage_bytes(1, 10)
    good = dict(step=10, stage=1, sha256=ci.sha256_hex(data), size=len(data),
                spec_hash=ci.spec_hash(spec))
    me = "aa" * 16
    assert svc._refusal(pb.CheckpointChunk(**good), me) == ""
    cases = {"no live replica of stage 1": ({}, "bb" * 16),
             "stage must be in 0..2": ({"stage": 3}, me),
             "not a checkpoint step": ({"step": 7}, me),
             "size must be in": ({"size": svc.max_bytes + 1}, me),
             "sha256 must be 64": ({"sha256": "x" * 64}, me),
             "this run's is": ({"spec_hash": "0" * 64}, me)}
    for why, (change, who) in cases.items():
        assert why in svc._refusal(pb.CheckpointChunk(**{**good, **change}), who), why
    assert CheckpointService(spec, None, lambda pid: None).writer is None


def test_flags_override_the_spec_and_are_validated(tmp_path: Path) -> None:
    spec = checkpoints.with_flags(RunSpec(), 7, str(tmp_path))
    assert spec.checkpoint.every == 7 and spec.checkpoint.dir == str(tmp_path.resolve())
    assert checkpoints.with_flags(spec, None, None) == spec
    with pytest.raises(ValueError, match=r"checkpoint\.dir must be a folder"):
        checkpoints.with_flags(RunSpec(), 5, None)
    with pytest.raises(ValueError, match=r"checkpoint\.every must be an integer >= 0"):
        checkpoints.with_flags(RunSpec(), -1, str(tmp_path))
