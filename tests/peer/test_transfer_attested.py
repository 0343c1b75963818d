"""A downloaded stage is verified against the hash the coordinator attests, never only against
what its sender claims (peer/recovery/transfer.py, shoal/export.py's check).

A real gRPC State service on 127.0.0.1 (no auth: this is about the downloader's checks) serves a
chosen state with a chosen claim; the downloader's view carries a chosen attestation.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from peer.pipeline import wire
from peer.pipeline.stage_host import StageError, StageHost
from peer.pipeline.stage_state import hash_of_arrays
from peer.recovery import transfer
from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg
from protocols.runspec import RunSpec
from tests.fakes import FakeView

SPEC = RunSpec().replace(**{"pipeline.stages": 2, "model.d_model": 32, "model.n_heads": 4,
                            "model.n_layers": 2})


class AttestedStage:
    def __init__(self, stage: int, step: int, h: str) -> None:
        self.stage, self.step, self.rebuild, self.grad_norm = stage, step, "", 0.0
        self.attested_step, self.attested_hash = step, h


class Serves(pbg.StateServicer):
    """Serves `host`'s state at step `step`, claiming `claim` (default: its true hash)."""

    def __init__(self, host: StageHost, step: int, claim: str | None = None) -> None:
        self.host, self.step, self.claim = host, step, claim
        self.calls = 0

    async def Download(self, request, context):
        self.calls += 1
        self.host.step = self.step
        arrays = self.host.state_arrays(True)
        header = pb.CallHeader(kind="state", step=self.step, stage=self.host.stage, sender="s")
        header.meta["state_hash"] = self.claim or self.host.state_hash()
        for chunk in wire.encode_chunks(header, arrays, pb.RAW):
            yield chunk


class Ctx:
    """What fetch_state uses of a peer: a view (with an attestation that `refreshes` may move),
    channels, limits, a byte counter."""

    def __init__(self, address: str, attest: list[tuple[int, str]]) -> None:
        self.address = address
        self.attest = attest  # the attestation of each successive refresh (the last repeats)
        self.view = self._view(attest[0])
        self.refreshes = 0
        self.counter = wire.ByteCounter()
        self._ch: grpc.aio.Channel | None = None

    def _view(self, at: tuple[int, str]) -> FakeView:
        v = FakeView([], {1: ["s"]})
        v.stages = [AttestedStage(1, *at)] if at[1] else []
        return v

    async def refresh_view(self) -> None:
        self.refreshes += 1
        self.view = self._view(self.attest[min(self.refreshes, len(self.attest) - 1)])

    def channel(self, address: str) -> grpc.aio.Channel:
        if self._ch is None:
            self._ch = grpc.aio.insecure_channel(address)
        return self._ch

    def address_of(self, pid: str) -> str:
        return self.address

    def state_limits(self):
        return wire.state_limits(SPEC)


def fetch(served: StageHost, step: int, attest: list[tuple[int, str]], *,
          claim: str | None = None, strict: bool = False) -> tuple[str, Ctx, Serves]:
    """Run fetch_state against a server of `served`; returns (hash, ctx, servicer)."""
    async def scenario():
        server = grpc.aio.server()
        svc = Serves(served, step, claim)
        pbg.add_StateServicer_to_server(svc, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ctx = Ctx(f"127.0.0.1:{port}", attest)
        into = StageHost(SPEC, 1)
        try:
            got = await transfer.fetch_state(ctx, "s", into, strict=strict)
            return got, ctx, svc
        finally:
            into.close()
            await ctx.channel("").close()
            await server.stop(0)

    return asyncio.run(scenario())


@pytest.fixture(autouse=True)
def quick(monkeypatch) -> None:
    monkeypatch.setattr(transfer, "ATTEST_POLL_S", 0.01)


def honest_and_liar() -> tuple[StageHost, StageHost]:
    honest, liar = StageHost(SPEC, 1), StageHost(SPEC, 1)
    with torch.no_grad():
        next(iter(liar.params().values())).add_(1.0)  # other weights, its own true hash
    return honest, liar


def test_a_sender_whose_state_is_not_the_attested_one_is_refused_whatever_it_claims() -> None:
    honest, liar = honest_and_liar()
    attested = (7, honest.state_hash())
    with pytest.raises(StageError, match="attests"):
        fetch(liar, 7, [attested])  # claims its own (true) hash: the claim check passes
    got, _, _ = fetch(honest, 7, [attested])
    assert got == attested[1]
    honest.close()
    liar.close()


def test_a_claim_that_does_not_match_the_state_is_refused() -> None:
    honest, _ = honest_and_liar()
    with pytest.raises(StageError, match="claimed"):
        fetch(honest, 7, [(7, honest.state_hash())], claim="0" * 64)
    honest.close()


def test_an_attestation_that_trails_the_sender_is_waited_for() -> None:
    honest, _ = honest_and_liar()
    h = honest.state_hash()
    got, ctx, svc = fetch(honest, 7, [(6, "older"), (6, "older"), (7, h)])
    assert got == h and ctx.refreshes == 2 and svc.calls == 1
    honest.close()


def test_a_swarm_that_moved_on_means_another_download_and_strict_refuses_in_the_end() -> None:
    honest, _ = honest_and_liar()
    with pytest.raises(transfer.Unverified):
        fetch(honest, 7, [(8, "newer")], strict=True)
    got, _, svc = fetch(honest, 7, [(8, "newer")])  # a joining replica takes it, and says so
    assert got == honest.state_hash() and svc.calls == transfer.ATTEST_TRIES
    honest.close()


def test_without_any_attestation_the_claim_is_all_there_is() -> None:
    honest, _ = honest_and_liar()
    got, _, _ = fetch(honest, 7, [(0, "")])
    assert got == honest.state_hash()
    honest.close()


def test_sources_reporting_the_attested_state_go_first() -> None:
    v = FakeView([], {1: ["a", "b", "c"]}, {"a": 6, "b": 7, "c": 7})
    v.stages = [AttestedStage(1, 7, "h")]  # FakeView's replicas report hash "h"
    assert transfer.attested_first(v, 1, ["a", "b", "c"]) == ["b", "c", "a"]


def test_export_hashes_what_it_uses_the_way_replicas_do() -> None:
    """The export's check (shoal/export.py `_verified`) against the attested hash."""
    from shoal.export import _verified

    honest, liar = honest_and_liar()
    arrays, h = honest.agreed_arrays()
    assert hash_of_arrays(arrays) == h == honest.state_hash()
    v = FakeView([], {1: ["s"]})
    v.stages = [AttestedStage(1, 3, h)]
    header = pb.CallHeader(step=3)
    header.meta["state_hash"] = h
    state, error, moved = _verified(v, 1, "s", header, arrays)
    assert state is not None and not error and not moved
    bad, bad_hash = liar.agreed_arrays()
    header.meta["state_hash"] = bad_hash
    state, error, moved = _verified(v, 1, "s", header, bad)
    assert state is None and "attests" in error and not moved
    header.step, header.meta["state_hash"] = 4, h
    _, error, moved = _verified(v, 1, "s", header, arrays)
    assert moved
    honest.close()
    liar.close()
