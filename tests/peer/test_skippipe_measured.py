"""SkipPipe fed with what the driver measures (peer/pipeline/links.py) and kept at run time:
per-replica compute, latency, bandwidth and queue from real replies' figures; the plan prefers
the near replica; the driver sends each hop to the planned replica unless it fails. No network:
the wire call is replaced by a fake that answers as a replica would."""

from __future__ import annotations

import asyncio
import math
import random
import time
from types import SimpleNamespace

import grpc
import pytest
import torch

from peer.pipeline import hops as hops_module
from peer.pipeline.driver import Driver
from peer.pipeline.links import COMPUTE_S, QUEUED, SERVER_S, LinkEstimates
from peer.pipeline.router import Router
from protocols import shoal_pb2 as pb
from protocols.runspec import RunSpec
from tests.fakes import FakePeer, FakeView, stage_infos


def _meta(compute: float, server: float, queued: int = 0) -> dict[str, str]:
    return {COMPUTE_S: str(compute), SERVER_S: str(server), QUEUED: str(queued)}


def test_latency_bandwidth_and_compute_apart() -> None:
    links = LinkEstimates()
    links.record_round_trip("r", wall_s=0.10, server_s=0.06)  # 40 ms there and back
    links.record_call("r", "forward", 4, wall_s=0.50, meta=_meta(0.1, 0.2, queued=2),
                      nbytes=1_000_000)
    t = links.timing("r", 8)
    assert t.latency_s == pytest.approx(0.02)
    assert t.forward_s == pytest.approx(0.2)  # 0.1 s for 4 samples -> 8 samples
    # network 0.5 - 0.2 (time there) - 0.04 (two latencies) = 0.26 s for 1 MB
    assert t.bandwidth_Bps == pytest.approx(1_000_000 / 0.26)
    assert t.queued == 2


def test_a_backward_measures_the_link_not_the_forward_compute() -> None:
    links = LinkEstimates()
    links.record_call("r", "backward", 4, wall_s=1.0, meta=_meta(0.6, 0.6), nbytes=400)
    t = links.timing("r", 4)
    assert t.forward_s is None and t.bandwidth_Bps == pytest.approx(400 / 0.4)


def test_unmeasured_or_malformed_figures_change_nothing() -> None:
    links = LinkEstimates()
    assert links.timing("r", 4).forward_s is None
    assert links.timing("r", 4).bandwidth_Bps == math.inf
    for bad in ({}, {COMPUTE_S: "x", SERVER_S: "1"}, _meta(float("nan"), 1.0),
                _meta(0.5, 0.2),  # compute longer than the time there
                _meta(0.1, 5.0)):  # longer there than the whole call
        links.record_call("r", "forward", 4, wall_s=1.0, meta=bad, nbytes=100)
    links.record_round_trip("r", 1.0, float("inf"))
    t = links.timing("r", 4)
    assert t.forward_s is None and t.latency_s == 0.0 and t.bandwidth_Bps == math.inf


def test_a_fast_link_has_no_measurable_transfer() -> None:
    links = LinkEstimates()
    links.record_round_trip("r", 0.002, 0.001)
    links.record_call("r", "forward", 4, wall_s=0.101, meta=_meta(0.1, 0.1), nbytes=10_000)
    assert links.timing("r", 4).bandwidth_Bps == math.inf


def test_forgets_replicas_that_left() -> None:
    links = LinkEstimates()
    links.record_round_trip("a", 0.1, 0.0)
    links.record_round_trip("b", 0.1, 0.0)
    links.keep_only({"b"})
    assert links.timing("a", 1).latency_s == 0.0 and links.timing("b", 1).latency_s > 0


def test_router_books_the_preferred_replica_while_it_is_usable() -> None:
    r = Router(random.Random(0))
    r.update_replicas(1, {"a": 100.0, "b": 1.0})
    assert r.choose(1, 4, now=0.0, prefer="b") == "b"  # "a" is faster, the plan said "b"
    assert r.estimate("b").outstanding == 4
    r.ban("b", until=10.0)
    assert r.choose(1, 4, now=1.0, prefer="b") == "a"
    assert r.choose(1, 4, now=1.0, prefer="gone") in {"a"}


def _driver(skip: float) -> Driver:
    spec = RunSpec().replace(**{"pipeline.stages": 2, "pipeline.skip_ratio": skip,
                                "pipeline.microbatch": 4, "pipeline.full_depth_every": 1000,
                                "model.seq_len": 16, "model.d_model": 32})
    drv = Driver.__new__(Driver)
    drv.d = FakePeer(spec, SimpleNamespace(step=0), FakeView(stage_infos(2, step=7)),
                     peer_id="0f" * 8)
    drv.d.channel = lambda address: None  # the fake call below never uses it
    drv.router = Router(rng=random.Random(0))
    drv.links = LinkEstimates()
    drv._stage0_s = 0.01
    drv._start_wait = None
    for s in (1, 2):
        drv.router.update_replicas(s, {f"s{s}near": 10.0, f"s{s}far": 10.0})
    return drv


def test_the_plan_takes_the_near_replica_when_compute_is_equal() -> None:
    drv = _driver(skip=0.5)
    for s in (1, 2):
        for pid, rtt in ((f"s{s}near", 0.002), (f"s{s}far", 0.4)):
            drv.links.record_round_trip(pid, rtt, 0.0)
            drv.links.record_call(pid, "forward", 4, wall_s=rtt + 0.05, meta=_meta(0.05, 0.05),
                                  nbytes=1000)
    routes = asyncio.run(drv.plan(3, 2))  # two microbatches, one stage each: both free
    assert [peer for route in routes for _, peer in route] == ["s1near", "s2near"] or \
        [peer for route in routes for _, peer in route] == ["s2near", "s1near"]


@pytest.mark.parametrize("skip, planned_first", [(0.5, True), (0.0, False)])
def test_the_driver_sends_to_the_planned_replica_unless_it_fails(monkeypatch, skip,
                                                                 planned_first) -> None:
    """SkipPipe keeps the plan's replica (the router, left alone, would take the faster one);
    the plain SWARM pipeline keeps choosing at run time. A failed planned hop goes elsewhere,
    and every reply's figures reach the link estimates."""
    drv = _driver(skip)
    drv.router.update_replicas(1, {"s1near": 1.0, "s1far": 1000.0})
    drv.router.choose(1, 100, time.monotonic(), prefer="s1near")  # near: busy for 100 s
    sent: list[str] = []

    async def fake_call(method, header, arrays, **kw):
        target = method.target
        sent.append(target)
        if target == "broken":
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None, "down")
        await asyncio.sleep(0.03)  # longer than the 0.02 s the reply says it spent there
        reply = pb.CallHeader(kind=header.kind, total_bytes=arrays["x"].nbytes)
        reply.meta.update(_meta(0.01, 0.02))
        return reply, {"x": arrays["x"]}

    class Stub:
        def __init__(self, channel) -> None:
            pass

        def __getattr__(self, name):
            return SimpleNamespace(target=drv._target)

    monkeypatch.setattr(hops_module.wire, "call_tensors", fake_call)
    monkeypatch.setattr(hops_module.pbg, "StageStub", Stub)
    drv.d.address_of = lambda pid: setattr(drv, "_target", pid) or pid
    x = torch.zeros(4, 16, 32)
    _, peer = asyncio.run(drv._hop("forward", 1, 1, "mb", [1], 0, x,
                                   prefer="s1near" if skip else None))
    assert (peer == "s1near") is planned_first
    assert drv.links.timing(peer, 4).forward_s == pytest.approx(0.01)
    drv.router.update_replicas(1, {"broken": 1000.0, "s1near": 1.0})
    _, peer = asyncio.run(drv._hop("forward", 1, 1, "mb2", [1], 0, x, prefer="broken"))
    assert sent[-2:] == ["broken", "s1near"] and peer == "s1near"
