"""A stage's durable checkpoint, the peer's side (peer/recovery/durable.py): the file a replica
uploads holds its whole state, a new replica loaded from it continues exactly (the optimizer's
moments included), and a file that fails a check is refused with a message."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save as save_safetensors

from peer.pipeline.stage_host import StageHost
from peer.recovery.durable import DurableCheckpoints, designated, load_stage, serialize_stage
from protocols import checkpoint_index as ci
from protocols.coordinator_client import Benchmark, CoordinatorClient
from protocols.identity import Identity
from protocols.runspec import RunSpec
from tests.fakes import FakePeer, FakeView, stage_infos
from tests.sim_peer import CoordinatorProcess

SPEC = RunSpec().replace(**{"model.d_model": 16, "model.n_layers": 2, "model.n_heads": 2,
                            "model.seq_len": 8, "pipeline.stages": 2})


def trained(stage: int, steps: int, seed: int = 0) -> StageHost:
    host = StageHost(SPEC, stage)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        step(host, gen)
    return host


def step(host: StageHost, gen: torch.Generator) -> None:
    host.apply_gradient({n: torch.randn(p.shape, generator=gen) for n, p in
                         host.params().items()})


def write_checkpoint(folder: Path, step_no: int, files: dict[int, bytes],
                     spec: RunSpec = SPEC) -> None:
    """The layout the coordinator writes (coordinator/checkpoints.py), for one complete step."""
    sub = folder / ci.step_dir_name(step_no)
    sub.mkdir(parents=True)
    entries = {}
    for stage, data in files.items():
        ci.write_atomic(sub / ci.stage_file_name(stage), data)
        entries[stage] = ci.StageEntry(ci.stage_file_name(stage), ci.sha256_hex(data), len(data))
    index = ci.Index(step_no, ci.spec_hash(spec), entries, sub)
    ci.write_atomic(sub / ci.INDEX_FILE, index.to_json().encode())
    ci.write_atomic(folder / ci.INDEX_FILE, index.to_json(root=True).encode())


def checkpoint_of(tmp_path: Path, steps: int = 3) -> dict[int, StageHost]:
    hosts = {s: trained(s, steps, seed=s) for s in range(SPEC.pipeline.stages + 1)}
    write_checkpoint(tmp_path, steps, {s: serialize_stage(h, ci.spec_hash(SPEC), "ab" * 8)
                                       for s, h in hosts.items()})
    return hosts


def test_a_resumed_stage_equals_the_checkpointed_one_and_steps_the_same(tmp_path: Path) -> None:
    hosts = checkpoint_of(tmp_path)
    for stage, old in hosts.items():
        new = StageHost(SPEC, stage)
        assert load_stage(new, str(tmp_path)) == 3 and new.step == 3
        a, b = old.state_arrays(), new.state_arrays()
        assert set(a) == set(b) and any(k.startswith("optim.") for k in a)
        for k in a:
            assert np.array_equal(a[k], b[k]), k
        assert new.state_hash() == old.state_hash()
        # the next update: bit-equal to the original's, and not what a fresh optimizer does
        fresh = StageHost(SPEC, stage)
        fresh.load_state_arrays({k: v for k, v in old.state_arrays().items()
                                 if not k.startswith("optim.")})
        for h in (old, new, fresh):
            step(h, torch.Generator().manual_seed(99))
        assert new.state_hash() == old.state_hash()
        gap = max(float((p - q).detach().abs().max()) for p, q in zip(
            old.params().values(), fresh.params().values(), strict=True))
        print(f"stage {stage}: a fresh optimizer moves a weight by {gap:.2e}")
        assert gap > 1e-4, gap  # the checkpoint's AdamW moments matter; they are in it


def test_a_file_whose_hash_differs_is_refused(tmp_path: Path) -> None:
    checkpoint_of(tmp_path)
    f = tmp_path / ci.step_dir_name(3) / ci.stage_file_name(1)
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x40  # one bit of one weight
    f.write_bytes(bytes(data))
    with pytest.raises(ci.CheckpointError, match=r"stage-1\.safetensors hashes to"):
        load_stage(StageHost(SPEC, 1), str(tmp_path))
    load_stage(StageHost(SPEC, 2), str(tmp_path))  # the other stages are intact


def test_a_missing_stage_or_another_spec_is_refused(tmp_path: Path) -> None:
    checkpoint_of(tmp_path)
    (tmp_path / ci.step_dir_name(3) / ci.stage_file_name(2)).unlink()
    with pytest.raises(ci.CheckpointError, match="is missing"):
        load_stage(StageHost(SPEC, 2), str(tmp_path))
    other = SPEC.replace(**{"optim.lr": 1e-2})
    with pytest.raises(ci.CheckpointError, match="another run spec"):
        load_stage(StageHost(other, 1), str(tmp_path))
    with pytest.raises(ci.CheckpointError, match="holds no complete checkpoint"):
        load_stage(StageHost(SPEC, 1), str(tmp_path / "elsewhere"))


def test_non_finite_values_or_a_mislabelled_file_are_refused(tmp_path: Path) -> None:
    host = trained(1, 2)
    arrays = host.state_arrays()
    name = next(k for k in arrays if k.startswith("model."))
    arrays[name] = arrays[name].copy()
    arrays[name].flat[0] = np.nan
    meta = {"stage": "1", "step": "2"}
    write_checkpoint(tmp_path / "nan", 2, {s: save_safetensors(arrays, metadata=meta)
                                           for s in range(3)})
    with pytest.raises(ci.CheckpointError, match=f"{name} holds NaN or inf"):
        load_stage(StageHost(SPEC, 1), str(tmp_path / "nan"))
    good = serialize_stage(host, ci.spec_hash(SPEC), "ab" * 8)
    write_checkpoint(tmp_path / "label", 2, {0: good, 1: good, 2: good})
    with pytest.raises(ci.CheckpointError, match="says stage '1' step '2'"):
        load_stage(StageHost(SPEC, 2), str(tmp_path / "label"))


def test_the_file_is_safetensors_with_the_stage_and_step_in_its_header(tmp_path: Path) -> None:
    data = serialize_stage(trained(0, 1), ci.spec_hash(SPEC), "ab" * 8)
    meta = ci.safetensors_metadata(data)
    assert meta["stage"] == "0" and meta["step"] == "1" and meta["format"] == ci.FORMAT
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    assert "meta.step" in header and any(k.startswith("optim.") for k in header)


def resume_into(stage: int, directory: Path, view: FakeView, checkpoints: DurableCheckpoints
                ) -> StageHost:
    host = StageHost(SPEC, stage)
    peer = FakePeer(SPEC, host, view)
    asyncio.run(checkpoints.take_state(peer, None, stage, None))
    return host


def test_take_state_resumes_once_and_only_while_no_live_peer_is_past_it(tmp_path: Path,
                                                                      caplog) -> None:
    hosts = checkpoint_of(tmp_path)
    nobody = FakeView(stages=stage_infos(2, step=40))  # the coordinator remembers step 40
    ckpt = DurableCheckpoints(str(tmp_path))
    host = resume_into(1, tmp_path, nobody, ckpt)
    assert host.step == 3 and host.state_hash() == hosts[1].state_hash()
    # a later stage this peer takes (a move) is taken as usual, never from the checkpoint
    assert resume_into(2, tmp_path, nobody, ckpt).step == 0
    # only stage 1 was lost and stage 2 trains on past the checkpoint: CheckFree's business
    ahead = FakeView(stages=stage_infos(2), holders={2: ["cd" * 8]}, steps={"cd" * 8: 40})
    host = resume_into(1, tmp_path, ahead, DurableCheckpoints(str(tmp_path)))
    assert host.step == 0 and "past the checkpoint" in caplog.text


def test_take_state_stops_the_peer_on_a_refused_checkpoint(tmp_path: Path) -> None:
    checkpoint_of(tmp_path)
    f = tmp_path / ci.step_dir_name(3) / ci.stage_file_name(2)
    f.write_bytes(f.read_bytes()[:-1])  # a torn copy
    with pytest.raises(SystemExit, match=r"cannot resume stage 2 from .*: .*stage-2\.safetensors "
                       r"hashes to"):
        resume_into(2, tmp_path, FakeView(stages=stage_infos(2)),
                    DurableCheckpoints(str(tmp_path)))


def test_the_designated_replica_is_the_smallest_live_peer_id() -> None:
    view = FakeView(stages=stage_infos(2), holders={1: ["cd" * 8, "ef" * 8]})
    assert not designated(FakePeer(SPEC, StageHost(SPEC, 1), view, peer_id="ef" * 8))
    assert designated(FakePeer(SPEC, StageHost(SPEC, 1), view, peer_id="ab" * 8))


def test_a_stage_served_from_the_coordinators_checkpoint_init(tmp_path: Path) -> None:
    """The run spec's checkpoint.init: a real coordinator process reads and serves the stage's
    file (Checkpoints.Get) to the member that holds the stage, which loads it."""
    hosts = checkpoint_of(tmp_path / "ckpt")
    config = tmp_path / "run.toml"
    config.write_text(SPEC.replace(**{"checkpoint.init": str(tmp_path / "ckpt"),
                                      "membership.lease_s": 30.0}).to_toml())
    with CoordinatorProcess(tmp_path / "state", config=config,
                            extra=["--trust-stage-hints"]) as coord:
        async def scenario() -> StageHost:
            client = CoordinatorClient(coord.grpc_address, Identity.generate(), coord.token)
            try:
                joined = await client.join(Benchmark(samples_per_s=5.0), "127.0.0.1:9001",
                                           stage_hint=1)
                host = StageHost(joined.spec, 1)
                peer = FakePeer(joined.spec, host, FakeView(stages=stage_infos(2, step=40)))
                peer.client = client
                await DurableCheckpoints().take_state(peer, None, 1, None)
                return host
            finally:
                await client.close()
        host = asyncio.run(scenario())
    assert host.step == 3 and host.state_hash() == hosts[1].state_hash()
    a, b = hosts[1].state_arrays(), host.state_arrays()
    assert all(np.array_equal(a[k], b[k]) for k in a) and set(a) == set(b)
