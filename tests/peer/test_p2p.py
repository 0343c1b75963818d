"""peer/pipeline/p2p.py's pieces that need no network: the driver's inbox of deliveries, the
route an ack names, and who may send a graph's backward once it went on peer to peer."""

from __future__ import annotations

import asyncio

import pytest
import torch

from peer.pipeline import p2p
from peer.pipeline.stage_host import NotYours, StageHost
from tests.swarm.local_swarm import spec_with


def test_the_inbox_takes_only_what_it_awaits() -> None:
    async def main() -> None:
        inbox = p2p.Inbox()
        fwd = inbox.expect("mb", "forward", "n1", stages=frozenset({1, 2}))
        bwd = inbox.expect("mb", "backward", "n1", senders=frozenset({"r1"}))
        with pytest.raises(p2p.NotExpected, match="no forward delivery of microbatch other"):
            inbox.check("other", "forward", "r2", 2, "n1")
        with pytest.raises(p2p.NotExpected, match="stage"):
            inbox.check("mb", "forward", "r3", 3, "n1")  # a replica of a stage off the route
        with pytest.raises(p2p.NotExpected, match="another replica"):
            inbox.check("mb", "backward", "r1b", 1, "n1")
        for wrong in ("", "n2", "n1" * 2):  # a peer off the route does not know the nonce
            with pytest.raises(p2p.NotExpected, match="nonce"):
                inbox.check("mb", "forward", "r2", 2, wrong)
        x = torch.ones(2, 3)
        inbox.deliver("mb", "forward", "r2", 2, "n1", x, [(1, "r1"), (2, "r2")])
        assert fwd.done() and fwd.result()[1] == "r2"
        with pytest.raises(p2p.NotExpected):  # delivered once; a second is refused
            inbox.deliver("mb", "forward", "r2b", 2, "n1", x, [])
        inbox.drop("mb", "backward")
        assert bwd.cancelled()
        with pytest.raises(p2p.NotExpected):
            inbox.check("mb", "backward", "r1", 1, "n1")
        inbox.drop("mb", "forward")
        assert len(inbox) == 0

    asyncio.run(main())


def test_the_route_an_ack_names() -> None:
    taken = [(1, "aa"), (2, "bb")]
    assert p2p.parse_taken(p2p.format_taken(taken)) == taken
    assert p2p.parse_taken("") == []
    for bad in ("1", "x:aa", "1:", ":aa"):
        with pytest.raises(ValueError, match="malformed"):
            p2p.parse_taken(bad)


def test_a_graph_handed_on_takes_its_backward_from_the_next_replica_only() -> None:
    spec = spec_with(**{"pipeline.hops": "p2p"})
    host = StageHost(spec, 1)
    d = spec.model.d_model
    x = torch.randn(2, spec.model.seq_len, d)
    y = host.forward("mb", x, 1, owner="r1")
    assert host.handed_to("mb", "r2") == "r1"  # the gradient goes back to r1
    assert host.handed_to("mb", "r2b") == "r1"  # a retry: sent to another replica too
    with pytest.raises(NotYours):
        host.backward("mb", torch.ones_like(y), owner="stranger")
    g = host.backward("mb", torch.ones_like(y), owner="r2b")
    assert g.shape == x.shape
    assert host.handed_to("mb", "r2") is None  # gone once its backward ran
    host.forward("mb2", x, 1, owner="r1")  # the hub: only the sender
    with pytest.raises(NotYours):
        host.backward("mb2", torch.ones_like(y), owner="r2")
    assert host.backward("mb2", torch.ones_like(y), owner="r1").shape == x.shape
    host.close()


def test_the_run_spec_keeps_spsa_hub_shaped() -> None:
    with pytest.raises(Exception, match=r"pipeline\.hops"):
        spec_with(**{"pipeline.hops": "p2p", "sync.mode": "spsa"})
    with pytest.raises(Exception, match=r"pipeline\.hops"):
        spec_with(**{"pipeline.hops": "ring"})
    assert not spec_with(**{"pipeline.hops": "auto", "sync.mode": "spsa"}).peer_to_peer
    assert spec_with(**{"pipeline.hops": "auto", "sync.mode": "demo"}).peer_to_peer
    assert not spec_with(**{"pipeline.hops": "hub"}).peer_to_peer


class _HeadFails:
    """A stage-0 host whose head raises what the driver does not expect (not a dropped
    microbatch): the error goes up, and nothing of the microbatch's route may stay behind."""

    def __init__(self) -> None:
        self.embed = self.embed_backward = object()
        self.head = object()

    async def run(self, fn, mb_id, *args):
        if fn is self.head:
            raise RuntimeError("the head broke")
        return torch.zeros(1, 4, 8)

    def forget(self, mb_id: str) -> None:
        pass


def test_a_microbatch_that_fails_unexpectedly_leaves_no_nonce_behind() -> None:
    from peer.pipeline.driver import Driver
    from tests.fakes import FakePeer, FakeView, stage_infos

    spec = spec_with(**{"pipeline.stages": 1, "pipeline.hops": "p2p"})
    d = FakePeer(spec, host=_HeadFails(), view=FakeView(stage_infos(1), {1: ["r1"]}))
    driver = Driver(d)

    async def route_forward(step, mb_id, planned, h, has_trained):
        driver._nonces[mb_id] = "secret"  # as the real one does once the route delivered
        return h, [1], [(1, "r1")]

    driver.route_forward = route_forward  # type: ignore[method-assign]
    batch = torch.zeros(2, spec.model.seq_len + 1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="the head broke"):
        asyncio.run(driver._microbatch(1, 0, batch, [(1, "r1")]))
    assert driver._nonces == {} and driver._inflight == 0
