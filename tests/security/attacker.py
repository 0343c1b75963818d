"""An admitted identity that misbehaves: what the security tests attack real peers with.

`Attacker` joins a real coordinator with the swarm's token, as an *observer* (stage_hint
OBSERVER_STAGE, what `shoal export` does: a certificate and no stage) or as a *member* of a
stage, and then calls peers directly over signed channels (protocols.auth's client
interceptors, its own certificate), with whatever headers it likes. Every call returns an
`Outcome` (the gRPC status code and details, and the reply when there is one) instead of
raising, so a test asserts the status.

A member keeps its lease with `keep_alive` (heartbeats in the background, with the stats the
attacker chooses: a "syncing" member is listed at its stage but is no live replica, so the
honest drivers neither route to it nor wait for it).

Loopback only: the channels are plaintext, as peers serve on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from peer.pipeline import wire
from protocols import auth, tensor_stream
from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg
from protocols.coordinator_client import (
    OBSERVER_STAGE,
    Benchmark,
    CoordinatorClient,
    PeerStats,
    SwarmView,
)
from protocols.identity import Identity

BIG = 1 << 31


@dataclass
class Outcome:
    """What one call got: OK with a reply, or a status code and its details."""

    code: grpc.StatusCode
    details: str = ""
    reply: object = None

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK


def identity_at(path: Path, sorts_before: str | None = None) -> Identity:
    """A fresh identity at `path`; with `sorts_before`, ground until its peer id sorts before
    that string (the attacker of row 7 wants the id that used to win ties)."""
    for i in range(10_000):
        p = path.with_name(f"{path.stem}{i}{path.suffix}") if i else path
        ident = Identity.load_or_create(str(p))
        if sorts_before is None or ident.peer_id < sorts_before:
            return ident
    raise RuntimeError(f"no key sorting before {sorts_before[:8]} in 10,000 tries")


class Attacker:
    """An admitted identity calling peers directly (see the module docstring)."""

    def __init__(self, coordinator: str, token: str, identity: Identity) -> None:
        self.identity = identity
        self.peer_id = identity.peer_id
        self.client = CoordinatorClient(coordinator, identity, token=token)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._alive: asyncio.Task | None = None
        self.stats = PeerStats(state="syncing")
        self.stage = OBSERVER_STAGE

    async def join(self, stage: int = OBSERVER_STAGE, address: str = "127.0.0.1:9") -> int:
        """Join as an observer (default) or as a member asking for `stage`; returns the stage
        the coordinator gave."""
        observer = stage == OBSERVER_STAGE
        bench = (Benchmark(declared=True) if observer
                 else Benchmark(samples_per_s=100.0, bandwidth_mbps=100.0, declared=True))
        joined = await self.client.join(bench, "" if observer else address, stage_hint=stage)
        self.stage = joined.stage
        return joined.stage

    def keep_alive(self, stats: Callable[[], PeerStats] | None = None) -> None:
        """Heartbeat in the background (a member keeps its lease) with `stats()` (default
        `self.stats`)."""
        async def loop() -> None:
            while True:
                with contextlib.suppress(Exception):
                    await self.client.heartbeat(stats() if stats else self.stats)
                await asyncio.sleep(0.4)

        self._alive = asyncio.ensure_future(loop())

    async def view(self) -> SwarmView:
        return await self.client.view()

    def channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            signer = auth.CallSigner(self.identity, lambda: self.client.certificate)
            ch = self._channels[address] = grpc.aio.insecure_channel(
                address, options=tensor_stream.grpc_options(),
                interceptors=auth.client_interceptors(signer))
        return ch

    # ------------------------------------------------------------------ raw calls

    async def tensor_call(self, address: str, method: str, header: pb.CallHeader,
                          x: np.ndarray, timeout: float = 30.0) -> Outcome:
        """Stage.Forward / Stage.Backward / Sync.Exchange (`method`) with one tensor "x"."""
        ch = self.channel(address)
        call = {"Forward": lambda: pbg.StageStub(ch).Forward,
                "Backward": lambda: pbg.StageStub(ch).Backward,
                "Exchange": lambda: pbg.SyncStub(ch).Exchange}[method]()
        return await self._tensors(call, header, {"x": x}, timeout)

    async def exchange(self, address: str, header: pb.CallHeader,
                       arrays: Mapping[str, np.ndarray], timeout: float = 30.0) -> Outcome:
        return await self._tensors(pbg.SyncStub(self.channel(address)).Exchange, header,
                                   arrays, timeout)

    async def _tensors(self, method, header: pb.CallHeader, arrays: Mapping[str, np.ndarray],
                       timeout: float) -> Outcome:
        try:
            reply, out = await wire.call_tensors(
                method, header, arrays, encoding=pb.RAW, limits=wire.limits_for(BIG),
                counter=wire.ByteCounter(), kind="attack", timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            return Outcome(exc.code(), exc.details() or "")
        return Outcome(grpc.StatusCode.OK, "", (reply, out))

    async def forward(self, address: str, *, stage: int, step: int, x: np.ndarray,
                      mb: str = "evil", sender: str = "", mode: str = "",
                      backward: bool = False) -> Outcome:
        header = pb.CallHeader(kind="backward" if backward else "forward", microbatch_id=mb,
                               step=step, stage=stage, sender=sender, sent_at=time.time())
        if mode:
            header.meta["mode"] = mode
        return await self.tensor_call(address, "Backward" if backward else "Forward", header, x)

    async def deliver(self, address: str, header: pb.CallHeader, x: np.ndarray,
                      timeout: float = 30.0) -> Outcome:
        """Stage.Deliver (peer-to-peer hops' last activation or input gradient) with "x"."""
        chunks = wire.encode_chunks(header, {"x": x}, pb.RAW)
        try:
            reply = await pbg.StageStub(self.channel(address)).Deliver(iter(chunks),
                                                                        timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            return Outcome(exc.code(), exc.details() or "")
        return Outcome(grpc.StatusCode.OK, "", reply)

    async def end_step(self, address: str, request: pb.StepEnd, timeout: float = 30.0
                       ) -> Outcome:
        try:
            reply = await pbg.StageStub(self.channel(address)).EndStep(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            return Outcome(exc.code(), exc.details() or "")
        return Outcome(grpc.StatusCode.OK, "", reply)

    async def download(self, address: str, stage: int, timeout: float = 60.0) -> Outcome:
        call = pbg.StateStub(self.channel(address)).Download(
            pb.StateRequest(stage=stage, include_optimizer=False), timeout=timeout)
        try:
            header, arrays = await wire.receive(call.__aiter__(), wire.limits_for(BIG),
                                                wire.ByteCounter(), "attack")
        except grpc.aio.AioRpcError as exc:
            return Outcome(exc.code(), exc.details() or "")
        return Outcome(grpc.StatusCode.OK, "", (header, arrays))

    async def close(self, leave: bool = True) -> None:
        if self._alive is not None:
            self._alive.cancel()
            with contextlib.suppress(BaseException):
                await self._alive
        for ch in self._channels.values():
            await ch.close()
        if leave:
            with contextlib.suppress(Exception):
                await self.client.leave("attack over")
        await self.client.close()


def activations(batch: int, seq: int, d_model: int, value: float = 0.1) -> np.ndarray:
    """An activation (or gradient) tensor of the run's shape."""
    return np.full((batch, seq, d_model), value, dtype=np.float32)
