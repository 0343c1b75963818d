"""The SkipPipe planner as the stage-0 driver uses it (Driver.plan), and the lockstep of replicas
that no path visited: no network, the router and the sync mode are the real ones."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from peer.pipeline.driver import Driver
from peer.pipeline.links import LinkEstimates
from peer.pipeline.router import NoReplicaAvailable, Router
from peer.pipeline.stage_host import StageHost
from peer.sync.allreduce import AllreduceMode
from protocols.runspec import RunSpec
from tests.fakes import FakePeer, FakeView, stage_infos


def driver(stages: int, skip: float = 0.0, plus: bool = False, replicas: int = 2,
           trained: bool = True, own_step: int = 0) -> Driver:
    spec = RunSpec().replace(**{"pipeline.stages": stages, "pipeline.skip_ratio": skip,
                                "pipeline.checkfree_plus": plus, "pipeline.microbatch": 4})
    view = FakeView(stage_infos(stages, step=7 if trained else 0))
    drv = Driver.__new__(Driver)
    drv.d = FakePeer(spec, SimpleNamespace(step=own_step), view, peer_id="0f" * 8)
    drv.router = Router(rng=random.Random(0))
    drv._stage0_s = 0.01
    drv.links = LinkEstimates()
    drv._start_wait = None
    for s in range(1, stages + 1):
        drv.router.update_replicas(s, {f"s{s}r{i}": 10.0 * (i + 1) for i in range(replicas)})
    return drv


def plan(drv: Driver, step: int, n: int) -> list[tuple[int, ...]]:
    return [tuple(s for s, _ in route) for route in asyncio.run(drv.plan(step, n))]


def test_skip_ratio_zero_is_the_plain_pipeline() -> None:
    assert plan(driver(4), 3, 8) == [(1, 2, 3, 4)] * 8


def test_skip_half_balanced_and_full_depth_every_tenth() -> None:
    drv = driver(4, skip=0.5)
    paths = plan(drv, 3, 8)
    assert all(len(p) == 2 and len(set(p)) == 2 for p in paths)
    visits = Counter(s for p in paths for s in p)
    assert set(visits.values()) == {4}  # 8 microbatches x 2 stages over 4 stages
    assert plan(drv, 10, 8) == [(1, 2, 3, 4)] * 8


def test_checkfree_plus_swaps_the_edge_pairs_on_odd_microbatches() -> None:
    paths = plan(driver(4, plus=True), 3, 6)
    assert paths[0::2] == [(1, 2, 3, 4)] * 3 and paths[1::2] == [(2, 1, 4, 3)] * 3


def test_a_lost_stage_is_bypassed_and_a_never_trained_one_waited_for() -> None:
    drv = driver(3)
    for r in drv.router.replicas(2):
        drv.router.ban(r, until=1e18)
    assert plan(drv, 5, 4) == [(1, 3)] * 4
    fresh = driver(3, trained=False)
    for r in fresh.router.replicas(2):
        fresh.router.ban(r, until=1e18)
    with pytest.raises(NoReplicaAvailable):
        plan(fresh, 1, 4)
    # The view's steps can be stale (0 in a swarm whose membership never changed); a driver that
    # has stepped itself knows every stage trained.
    stale = driver(3, trained=False, own_step=40)
    for r in stale.router.replicas(2):
        stale.router.ban(r, until=1e18)
    assert plan(stale, 41, 4) == [(1, 3)] * 4


def _grads(host: StageHost, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, host.spec.model.d_model, generator=gen)
    host.forward("mb", x, host.step + 1)
    host.backward("mb", torch.randn(2, 8, host.spec.model.d_model, generator=gen))


@pytest.mark.parametrize("visited", [(), (0,), (0, 1)])
def test_replicas_step_in_lockstep_whether_or_not_a_path_visited_them(visited) -> None:
    spec = RunSpec().replace(**{"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 4,
                                "model.seq_len": 8, "pipeline.stages": 2})
    hosts = [StageHost(spec, 1), StageHost(spec, 1)]
    mode = AllreduceMode()
    for i in visited:
        _grads(hosts[i], seed=i)
    parts = {f"r{i}": tuple(reversed(mode.contribution(h))) for i, h in enumerate(hosts)}
    result, meta = mode.aggregate(parts)
    for h in hosts:
        mode.apply(h, result, meta)
    assert [h.step for h in hosts] == [1, 1]
    assert hosts[0].state_hash() == hosts[1].state_hash()
    if not visited:
        assert meta.get("skip") == "1"  # a stage no path visited: step without an update
