"""Rows 12 and 13 of issue #12 against real processes: hostile tensors, silent streams, idle
sockets, and a fuzz pass over the peer's request messages.

One swarm for the module (a coordinator and three `shoal peer` processes on 127.0.0.1: stage 0,
1 and 2 of the tiny model). The attacker is an admitted *observer* (what `shoal export` joins
as): the only Stage call an observer may make is an inference Forward, so that is what it sends,
to the stage-1 replica, and that is how the payload reaches the decoder once calls are
authorized (peer/authz.py). Each attack must get its status (INVALID_ARGUMENT for hostile
tensors, a clear status after the first-message deadline for a silent stream) and the swarm must
keep training meanwhile. The data plane (bench.transport's server, a real process) must serve a
fetch while 64 idle sockets are open to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols import auth, codec, dataplane, interceptors, tensor_stream
from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg
from protocols.coordinator_client import OBSERVER_STAGE, READY_STATES, Benchmark, CoordinatorClient
from protocols.digest import payload_digest
from protocols.identity import Identity
from shoal.swarm import Swarm
from tests.security.test_fuzz import message, mutant
from tests.swarm.local_swarm import spec_with, step_of, wait_for

FORWARD = "/shoal.v1.Stage/Forward"
# UNAVAILABLE is not here: a replica answers it on purpose ("this peer holds stage 1: refresh
# your view"); a crashed peer shows in the training check and the process poll instead.
BAD = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
                 grpc.StatusCode.DEADLINE_EXCEEDED})


# ------------------------------------------------------------------ the swarm and the observer


@pytest.fixture(scope="module")
def swarm(tmp_path_factory) -> Swarm:
    s = Swarm(tmp_path_factory.mktemp("wire-attacks"), spec_with(), 0, None, "cpu")
    try:
        s.start(0)
        for i, stage in enumerate([0, 1, 2]):
            s.add_peer(i, ["--stage", str(stage), "--grace", "10"])
        wait_for("3 steps", lambda: step_of(s) >= 3, 180, s)
        yield s
    finally:
        s.stop(grace=5)


def keeps_training(swarm: Swarm, steps: int = 2) -> None:
    start = step_of(swarm)
    wait_for(f"{steps} more steps after step {start}", lambda: step_of(swarm) >= start + steps,
             120, swarm)


class Observer:
    """An identity admitted as an observer, with a signed channel to one replica of `stage`."""

    def __init__(self, swarm: Swarm, stage: int = 1) -> None:
        self.swarm, self.stage = swarm, stage
        self.identity = Identity.generate()
        self.client = CoordinatorClient(f"127.0.0.1:{swarm.port}", self.identity,
                                        token=swarm.token_file.read_text().strip())
        self.signer = auth.CallSigner(self.identity, lambda: self.client.certificate)
        self.address = ""
        self.channels: list[grpc.aio.Channel] = []

    async def __aenter__(self) -> Observer:
        await self.client.join(Benchmark(declared=True), "", stage_hint=OBSERVER_STAGE)
        view = await self.client.view()
        live = [p for p in view.replicas(self.stage) if p.state in READY_STATES]
        assert live, f"stage {self.stage} has no live replica"
        self.address = live[0].address
        return self

    async def __aexit__(self, *exc: object) -> None:
        for channel in self.channels:
            await channel.close()
        with contextlib.suppress(Exception):
            await self.client.leave("attack done")
        await self.client.close()

    def channel(self, signed: bool = True) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(
            self.address, options=tensor_stream.grpc_options(),
            interceptors=auth.client_interceptors(self.signer) if signed else None)
        self.channels.append(channel)
        return channel

    def header(self, **fields) -> pb.CallHeader:
        header = pb.CallHeader(kind="forward", microbatch_id="attack", stage=self.stage,
                               sender=self.identity.peer_id, **fields)
        header.meta["mode"] = "inference"
        return header

    async def forward(self, chunks: list[pb.TensorChunk], timeout: float = 30
                      ) -> tuple[grpc.StatusCode, str, list[pb.TensorChunk]]:
        call = pbg.StageStub(self.channel()).Forward(iter(chunks), timeout=timeout)
        try:
            replies = [chunk async for chunk in call]
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or "", []
        return grpc.StatusCode.OK, "", replies


def run(coro) -> object:
    return asyncio.run(asyncio.wait_for(coro, 120))


def hostile(observer: Observer, tensors: list[pb.TensorHeader], payload: bytes
            ) -> list[pb.TensorChunk]:
    header = observer.header(total_bytes=len(payload), sha256=payload_digest(payload))
    header.tensors.extend(tensors)
    return list(tensor_stream.chunks(header, payload))


# ------------------------------------------------------------------ row 12: hostile tensors


def test_int8_blocks_of_2_pow_20_over_one_value_are_invalid_argument(swarm) -> None:
    one = np.float32(1.0).tobytes() + b"\x01"  # one scale, one int8 value

    async def attack() -> list[tuple[grpc.StatusCode, str]]:
        async with Observer(swarm) as observer:
            single = hostile(observer, [pb.TensorHeader(
                name="x", dtype="float32", shape=[1], encoding=pb.INT8_BLOCKWISE,
                payload_bytes=5, block_size=1 << 20)], one)
            many = hostile(observer, [pb.TensorHeader(
                name=f"t{i}", dtype="float32", shape=[1], encoding=pb.INT8_BLOCKWISE,
                payload_bytes=5, block_size=1 << 20) for i in range(2000)], one * 2000)
            return [(await observer.forward(c))[:2] for c in (single, many)]

    for code, details in run(attack()):
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert "block_size 1048576 not in 1..1" in details, details
    keeps_training(swarm)


@pytest.mark.parametrize("shape", [[0, 2**62, 2**62], [2**31, 2**31, 2**31]])
def test_huge_shapes_are_invalid_argument(swarm, shape: list[int]) -> None:
    async def attack() -> tuple[grpc.StatusCode, str]:
        async with Observer(swarm) as observer:
            chunks = hostile(observer, [pb.TensorHeader(
                name="x", dtype="float32", shape=shape, encoding=pb.RAW, payload_bytes=0)], b"")
            return (await observer.forward(chunks))[:2]

    code, details = run(attack())
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "larger than this receiver accepts" in details, details
    keeps_training(swarm)


# ------------------------------------------------------------------ row 13: silent streams


async def silent() -> AsyncIterator[pb.TensorChunk]:
    await asyncio.Event().wait()  # opens the stream, never sends a message
    yield pb.TensorChunk()


def test_a_stream_that_never_sends_its_first_message_ends_after_the_deadline(swarm) -> None:
    """Signed over the CallHeader it then never sends: UNAUTHENTICATED once the first-message
    deadline passed (before: the call hung until the client gave up). Meanwhile and after, the
    replica answers an honest inference Forward and the swarm trains."""
    spec = swarm.spec

    async def attack() -> tuple[tuple[grpc.StatusCode, str], grpc.StatusCode, list]:
        async with Observer(swarm) as observer:
            first = pb.TensorChunk(header=observer.header()).SerializeToString()
            metadata = observer.signer.metadata(FORWARD, first)
            calls = [pbg.StageStub(observer.channel(signed=False)).Forward(
                silent(), metadata=metadata, timeout=interceptors.FIRST_MESSAGE_TIMEOUT_S * 4)
                for _ in range(4)]

            async def outcome(call) -> tuple[grpc.StatusCode, str]:
                try:
                    async for _ in call:
                        pass
                except grpc.aio.AioRpcError as exc:
                    return exc.code(), exc.details() or ""
                return grpc.StatusCode.OK, ""

            pending = [asyncio.ensure_future(outcome(c)) for c in calls]
            # an honest inference Forward while the four silent streams are held
            x = np.random.default_rng(0).standard_normal(
                (2, spec.model.seq_len, spec.model.d_model)).astype(np.float32)
            encoded = codec.encode({"x": x})
            honest = list(tensor_stream.chunks(codec.fill_header(observer.header(), encoded),
                                               encoded.payload))
            code, details, replies = await observer.forward(honest)
            assert code == grpc.StatusCode.OK, (code, details)
            ends = await asyncio.gather(*pending)  # before the client's own deadline (4x)
            return ends[0], code, replies

    (code, details), honest_code, replies = run(attack())
    assert code == grpc.StatusCode.UNAUTHENTICATED, (code, details)
    assert honest_code == grpc.StatusCode.OK and replies and replies[0].HasField("header")
    keeps_training(swarm)


# ------------------------------------------------------------------ row 13: the data plane


def _serve(ready: mp.Queue) -> None:
    from bench.transport import serve

    serve(ready, 1.0, "127.0.0.1", None)


def test_64_idle_sockets_do_not_block_a_data_plane_fetch(tmp_path: Path) -> None:
    """bench.transport's server (grpc.aio State.Download answered over the data plane) in its
    own process; 64 sockets open to its data plane and say nothing; a fetch is still served."""
    ctx = mp.get_context("spawn")
    ready: mp.Queue = ctx.Queue()
    server = ctx.Process(target=_serve, args=(ready,), daemon=True)
    server.start()
    idle: list[socket.socket] = []
    try:
        ports = ready.get(timeout=60)
        limits = codec.Limits(max_total_bytes=ports["bytes"])

        async def download() -> pb.CallHeader:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['project']}") as channel:
                call = pbg.StateStub(channel).Download(pb.StateRequest(stage=1), timeout=30)
                chunks = [c async for c in call]
            assert len(chunks) == 1 and dataplane.is_dataplane(chunks[0].header)
            return chunks[0].header

        header = asyncio.run(download())
        host, port, _ = dataplane.endpoint(header)
        for _ in range(64):
            idle.append(socket.create_connection((host, port), timeout=5))
        time.sleep(0.3)
        arrays = dataplane.fetch(header, limits, timeout=20)
        assert arrays["weights"].nbytes == ports["bytes"]
        again = dataplane.fetch(asyncio.run(download()), limits, timeout=20)
        assert again["weights"].nbytes == ports["bytes"]
    finally:
        for sock in idle:
            sock.close()
        server.kill()
        server.join(10)


# ------------------------------------------------------------------ fuzz: the peer's requests

FUZZ_PEER = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(HealthCheck))


def test_fuzzed_peer_requests_get_clean_statuses(swarm) -> None:
    """StateRequest, StepEnd and TensorChunk streams (Forward, Backward, Exchange) of random
    fields (and one-field mutants of honest ones), sent by an observer to a real block replica:
    a clean status every time, and the swarm keeps training."""
    seen: dict[str, set[str]] = {}

    async def fuzz_all(observer: Observer, draws: list[tuple[str, object]]) -> None:
        stage = pbg.StageStub(observer.channel())
        state = pbg.StateStub(observer.channel())
        sync = pbg.SyncStub(observer.channel())
        for kind, request in draws:
            try:
                if kind == "download":
                    async for _ in state.Download(request, timeout=30):
                        pass
                elif kind == "endstep":
                    await stage.EndStep(request, timeout=30)
                else:
                    stub = sync if kind == "Exchange" else stage
                    async for _ in getattr(stub, kind)(iter(request), timeout=30):
                        pass
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                assert code not in BAD, (kind, request, code, exc.details())
            seen.setdefault(kind, set()).add(code.name)

    honest_step = pb.StepEnd(step=1, microbatches=4, samples=16)

    @FUZZ_PEER
    @given(st.data())
    def collect(data) -> None:
        draws: list[tuple[str, object]] = [
            ("download", data.draw(st.one_of(message(pb.StateRequest),
                                              mutant(pb.StateRequest(stage=1))))),
            ("endstep", data.draw(st.one_of(message(pb.StepEnd), mutant(honest_step)))),
        ]
        header = data.draw(message(pb.CallHeader))
        header.meta["mode"] = data.draw(st.sampled_from(["inference", "training", ""]))
        payload = data.draw(st.binary(max_size=64))
        if data.draw(st.booleans()):
            header.total_bytes, header.sha256 = len(payload), payload_digest(payload)
        stream = [pb.TensorChunk(header=header), pb.TensorChunk(data=payload)]
        draws.append((data.draw(st.sampled_from(["Forward", "Backward", "Exchange"])),
                      stream[: data.draw(st.integers(0, 2))]))
        batches.append(draws)

    batches: list[list[tuple[str, object]]] = []
    collect()

    async def main() -> None:
        async with Observer(swarm) as observer:
            for draws in batches:
                await fuzz_all(observer, draws)

    run(main())
    assert set(seen) == {"download", "endstep", "Forward", "Backward", "Exchange"}, seen
    keeps_training(swarm)


def test_swarm_still_trains_after_every_attack(swarm) -> None:
    keeps_training(swarm, 3)
    assert all(p.poll() is None for p in swarm.peers)

