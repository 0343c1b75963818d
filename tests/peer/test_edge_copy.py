"""CheckFree+: stage 1's and stage S's copy of stage 0 is kept current (peer/recovery/edge_copy.py).

The download is the real one (State.Download's chunks from a real stage-0 StageHost's agreed
arrays, decoded by the peer's wire code); only the gRPC channel is replaced by a stub that
yields those chunks.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from peer.pipeline import wire
from peer.pipeline.stage_host import StageHost
from peer.recovery import edge_copy, transfer
from protocols import shoal_pb2 as pb
from protocols.runspec import RunSpec
from tests.fakes import FakePeer, FakeView, stage_infos
from tests.peer.test_checkfree_wiring import trained

SPEC = RunSpec().replace(**{"model.d_model": 32, "model.n_layers": 4, "model.n_heads": 4,
                            "model.seq_len": 16, "pipeline.stages": 3, "run.seed": 3,
                            "pipeline.checkfree_plus": True})


def trained_zero(step: int, seed: int) -> StageHost:
    return trained(SPEC, 0, step, seed)


class Stub:
    """State.Download of one stage-0 host; `lie` sends a claim that does not match."""

    def __init__(self, zero: StageHost, lie: bool = False) -> None:
        self.zero, self.lie, self.requests = zero, lie, []

    def Download(self, request, timeout=None):
        self.requests.append(request)
        arrays, state_hash = self.zero.agreed_arrays()
        header = pb.CallHeader(kind="state", step=self.zero.step, stage=0, sender="zero")
        header.meta["state_hash"] = "0" * 64 if self.lie else state_hash
        chunks = wire.encode_chunks(header, arrays, pb.RAW)

        async def it():
            for c in chunks:
                yield c
        return it()


def edge_peer(stage: int, zero: StageHost, monkeypatch, *, lie: bool = False,
              attest: str = "", spec: RunSpec = SPEC) -> tuple[FakePeer, Stub]:
    view = FakeView(stage_infos(spec.pipeline.stages, step=zero.step), {0: ["zero"]})
    if attest:
        view.stages = [dataclasses.replace(i, attested_hash=attest, attested_step=zero.step)
                       if i.stage == 0 else i for i in view.stages]
    d = FakePeer(spec, StageHost(spec, stage), view)
    stub = Stub(zero, lie)
    d.channel = lambda address: None  # type: ignore[method-assign]
    d.address_of = lambda pid: "127.0.0.1:9"  # type: ignore[method-assign]
    monkeypatch.setattr(transfer.pbg, "StateStub", lambda channel: stub)  # the one download
    return d, stub


def test_refresh_installs_stage_zeros_current_weights(monkeypatch) -> None:
    zero = trained_zero(17, 1)
    d, stub = edge_peer(3, zero, monkeypatch)  # stage S keeps a copy too
    copies = edge_copy.EdgeCopies()
    assert copies.due(d)
    assert asyncio.run(copies.refresh(d))
    assert torch.equal(d.host.module.edge_embedding, zero.params()["embedding.weight"].detach())
    assert torch.equal(d.host.module.edge_norm, zero.params()["norm.weight"].detach())
    assert copies.copy_step == 17 and copies.last_step == d.host.step
    assert not stub.requests[0].include_optimizer  # the small, agreed weights only
    assert stub.requests[0].accept_dataplane  # made as every peer download is (receive_state)
    hash_before = d.host.state_hash()
    assert d.host.state_hash() == hash_before == StageHost(SPEC, 3).state_hash()  # not hashed


def test_refresh_is_due_every_few_steps_of_an_edge_stage_only(monkeypatch) -> None:
    zero = trained_zero(5, 1)
    d, _ = edge_peer(1, zero, monkeypatch)
    copies = edge_copy.EdgeCopies(every=5)
    assert asyncio.run(copies.refresh(d))
    for step, due in ((4, False), (5, True), (9, True)):
        d.host.step = step
        assert copies.due(d) == due, step
    d.state = "syncing"
    assert not copies.due(d)
    middle, _ = edge_peer(2, zero, monkeypatch)
    assert not edge_copy.holds_copy(middle.host) and not edge_copy.EdgeCopies().due(middle)
    off = SPEC.replace(**{"pipeline.checkfree_plus": False})
    plain, _ = edge_peer(1, zero, monkeypatch, spec=off)
    assert not edge_copy.EdgeCopies().due(plain)


@pytest.mark.parametrize("case", ["lying claim", "against the attestation"])
def test_a_copy_that_does_not_check_out_is_refused_and_the_old_one_kept(monkeypatch,
                                                                         case) -> None:
    zero = trained_zero(9, 2)
    if case == "lying claim":
        d, _ = edge_peer(1, zero, monkeypatch, lie=True)
    else:
        d, _ = edge_peer(1, zero, monkeypatch, attest="f" * 64)
    before = d.host.module.edge_embedding.clone()
    assert not asyncio.run(edge_copy.EdgeCopies().refresh(d))
    assert torch.equal(d.host.module.edge_embedding, before)


def test_install_refuses_a_wrong_shape_or_nan() -> None:
    host = StageHost(SPEC, 1)
    before = host.module.edge_embedding.clone()
    good = {k: v.detach() for k, v in StageHost(SPEC, 0).params().items()}
    with pytest.raises(ValueError, match="shape"):
        edge_copy.install_copy(host, {**good, "norm.weight": torch.ones(7)})
    with pytest.raises(ValueError, match="NaN"):
        edge_copy.install_copy(host, {**good, "embedding.weight":
                                      torch.full_like(good["embedding.weight"], float("nan"))})
    assert torch.equal(host.module.edge_embedding, before)
