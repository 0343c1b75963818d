"""Checkpoints.Put and Checkpoints.Get over the wire, against a real coordinator process
(coordinator/checkpoints.py): signed calls from joined members; a stage's own replica may upload
it, nobody else; a torn or mislabelled upload is refused with a status that says why; the
checkpoint `checkpoint.init` names is served stage by stage to the stage's replicas."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

from protocols import checkpoint_index as ci
from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg
from protocols.coordinator_client import Benchmark, CoordinatorClient
from protocols.identity import Identity
from protocols.runspec import RunSpec
from tests.coordinator.test_checkpoints import stage_bytes
from tests.sim_peer import CoordinatorProcess

BENCH = Benchmark(samples_per_s=5.0, device="test")


async def stub_of(client: CoordinatorClient) -> pbg.CheckpointsStub:
    await client._stub_async()
    return pbg.CheckpointsStub(client._channel)


async def put(client: CoordinatorClient, step: int, stage: int, data: bytes, spec: RunSpec,
              sha: str | None = None) -> pb.CheckpointAck:
    async def chunks():
        yield pb.CheckpointChunk(step=step, stage=stage, sha256=sha or ci.sha256_hex(data),
                                 size=len(data), spec_hash=ci.spec_hash(spec), data=data[:10])
        yield pb.CheckpointChunk(data=data[10:])
    return await (await stub_of(client)).Put(chunks(), timeout=10)


async def get(client: CoordinatorClient, stage: int) -> tuple[pb.CheckpointChunk, bytes]:
    call = (await stub_of(client)).Get(pb.CheckpointRequest(stage=stage), timeout=10)
    chunks = [c async for c in call]
    return chunks[0], b"".join(c.data for c in chunks)


def test_put_and_get_over_the_wire(tmp_path: Path) -> None:
    spec = RunSpec().replace(**{"pipeline.stages": 2, "membership.lease_s": 30.0})
    init = tmp_path / "init"  # a checkpoint of step 20, as an earlier run's coordinator left it
    (init / "step-000000020").mkdir(parents=True)
    entries = {}
    for s in range(3):
        data = stage_bytes(s, 20)
        ci.write_atomic(init / "step-000000020" / ci.stage_file_name(s), data)
        entries[s] = ci.StageEntry(ci.stage_file_name(s), ci.sha256_hex(data), len(data))
    index = ci.Index(20, ci.spec_hash(spec), entries, init / "step-000000020")
    ci.write_atomic(init / "index.json", index.to_json(root=True).encode())
    config = tmp_path / "run.toml"
    config.write_text(spec.replace(**{"checkpoint.init": str(init)}).to_toml())
    out = tmp_path / "ckpt"
    with CoordinatorProcess(tmp_path / "state", config=config, extra=[
            "--trust-stage-hints", "--checkpoint-every", "5", "--checkpoint-dir", str(out)]
            ) as coord:
        async def scenario() -> None:
            clients = [CoordinatorClient(coord.grpc_address, Identity.generate(), coord.token)
                       for _ in range(3)]
            for s, c in enumerate(clients):
                await c.join(BENCH, f"127.0.0.1:{9000 + s}", stage_hint=s)
            one = clients[1]
            ack = await put(one, 5, 1, stage_bytes(1, 5), spec)
            assert ack.stored and "stored" in ack.detail
            cases = [(clients[2], 5, 1, stage_bytes(1, 5), None,
                      grpc.StatusCode.PERMISSION_DENIED, "no live replica of stage 1"),
                     (one, 10, 1, stage_bytes(1, 10), "0" * 64, grpc.StatusCode.DATA_LOSS,
                      "upload it again"),
                     (one, 10, 1, stage_bytes(2, 10), None, grpc.StatusCode.INVALID_ARGUMENT,
                      "header says stage '2'"),
                     (one, 7, 1, stage_bytes(1, 7), None, grpc.StatusCode.INVALID_ARGUMENT,
                      "not a checkpoint step")]
            for client, step, stage, data, sha, code, why in cases:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await put(client, step, stage, data, spec, sha)
                assert err.value.code() == code and why in err.value.details(), err.value
            assert not (await put(one, 5, 1, stage_bytes(1, 5), spec)).stored  # a duplicate
            for s in (0, 2):
                ack = await put(clients[s], 5, s, stage_bytes(s, 5), spec)
            assert ack.complete_step == 5 and "complete" in ack.detail
            written = json.loads((out / "index.json").read_text())
            assert written["step"] == 5 and written["dir"] == "step-000000005"

            first, data = await get(one, 1)
            assert (first.step, first.stage, data) == (20, 1, stage_bytes(1, 20))
            assert first.sha256 == ci.sha256_hex(data) and first.size == len(data)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await get(one, 2)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            (init / "step-000000020" / ci.stage_file_name(2)).write_bytes(b"torn")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await get(clients[2], 2)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "corrupt or from another checkpoint" in err.value.details()
            for c in clients:
                await c.close()
        asyncio.run(scenario())
