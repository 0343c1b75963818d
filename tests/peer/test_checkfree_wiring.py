"""The CheckFree wiring of the peer (peer/recovery/rebuild.py, peer/recovery/snapshots.py,
StageHost.load_rebuilt) and of the coordinator (skip and rebuild events), without a network:
neighbours' downloads are replaced by real StageHosts of those stages."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math

import pytest
import torch

from coordinator.membership import Membership
from coordinator.messages import check_kinds, heartbeat_kinds
from optim.checkfree import LR_BOOST, canonical_keys
from peer.pipeline.stage_host import StageError, StageHost
from peer.recovery import rebuild as recovery
from peer.recovery import snapshots
from protocols.coordinator_client import Benchmark, PeerStats
from protocols.recovery_report import parse_wire_key
from protocols.runspec import RunSpec
from tests.fakes import FakePeer, FakeView, stage_infos

SPEC = RunSpec().replace(**{"model.d_model": 32, "model.n_layers": 4, "model.n_heads": 4,
                            "model.seq_len": 16, "pipeline.stages": 4, "run.seed": 3})


def rebuilding_peer(spec: RunSpec, stage: int, alive: dict[int, StageHost],
               norms: dict[int, float], snapshot_dir: str | None = None) -> FakePeer:
    """The peer rebuilding `stage` (tests/fakes.py), with the `alive` stages' holders in its
    view; the `neighbours` fixture downloads from `alive`."""
    view = FakeView(stage_infos(spec.pipeline.stages,
                                step=lambda s: alive[s].step if alive.get(s) else 40,
                                grad_norm=lambda s: norms.get(s, 0.0)),
                    {s: [f"peer-of-{s}"] for s in alive})
    d = FakePeer(spec, StageHost(spec, stage), view, snapshot_dir=snapshot_dir)
    d.alive = alive  # type: ignore[attr-defined]
    return d


def trained(spec: RunSpec, stage: int, step: int, seed: int) -> StageHost:
    """A stage host whose weights moved away from the initial ones (distinct per stage)."""
    host = StageHost(spec, stage)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in host.module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    host.step = step
    return host


@pytest.fixture
def neighbours(monkeypatch: pytest.MonkeyPatch):
    def install(d: FakePeer) -> None:
        async def fetch(daemon, stage, buffers=False):
            h = daemon.alive[stage]
            if h is None:
                raise recovery.RebuildFailed(f"stage {stage}'s holder does not answer")
            got = h.module.state_dict() if buffers else h.params()
            return {k: v.detach().clone() for k, v in got.items()}, h.step
        monkeypatch.setattr(recovery, "fetch_stage_params", fetch)
    return install


def by_position(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: state[name] for key, name in canonical_keys(state).items()}


def test_inner_stage_is_the_grad_norm_weighted_average(neighbours) -> None:
    alive = {1: trained(SPEC, 1, 40, 1), 3: trained(SPEC, 3, 41, 3), 4: trained(SPEC, 4, 41, 4)}
    d = rebuilding_peer(SPEC, 2, alive, norms={1: 0.3, 3: 0.1})
    neighbours(d)
    report = asyncio.run(recovery.rebuild_stage(d))
    assert (report.method, report.sources, report.step) == ("weighted_average", (1, 3), 41)
    a, b = 0.3 + 1e-4, 0.1 + 1e-4
    prev, nxt = by_position(alive[1].params()), by_position(alive[3].params())
    for key, got in by_position(d.host.params()).items():
        want = ((prev[key].double() * a + nxt[key].double() * b) / (a + b)).float()
        assert torch.equal(got.detach(), want), key
    assert d.host.step == 41 and d.host.lr_scale == pytest.approx(LR_BOOST)
    assert d.host.optimizer.param_groups[0]["lr"] == pytest.approx(SPEC.optim.lr * LR_BOOST)
    assert not d.host.optimizer.state  # fresh optimizer
    assert not report.degraded
    assert parse_wire_key(report.wire_key()) == ("weighted_average", (1, 3))


def test_checkfree_plus_edge_stage_copies_its_swap_partner(neighbours) -> None:
    spec = SPEC.replace(**{"pipeline.checkfree_plus": True})
    alive = {2: trained(spec, 2, 12, 2), 3: trained(spec, 3, 12, 3), 4: trained(spec, 4, 12, 4)}
    d = rebuilding_peer(spec, 1, alive, norms={2: 0.5})
    neighbours(d)
    report = asyncio.run(recovery.rebuild_stage(d))
    assert (report.method, report.sources) == ("copy_neighbor", (2,))
    src = by_position(alive[2].params())
    for key, got in by_position(d.host.params()).items():
        assert torch.equal(got.detach(), src[key]), key
    assert d.host.module.holds_edge_copy  # the stage-0 copies it keeps are its own buffers


def test_adjacent_losses_restore_the_newest_snapshot_loudly(neighbours, tmp_path, caplog) -> None:
    lost = trained(SPEC, 2, 30, 22)
    snapshots.save_snapshot(tmp_path, 2, 20, "cd" * 8, StageHost(SPEC, 2).module.state_dict())
    snapshots.save_snapshot(tmp_path, 2, 30, "cd" * 8, lost.module.state_dict())
    alive = {1: trained(SPEC, 1, 35, 1), 4: trained(SPEC, 4, 35, 4)}  # stages 2 and 3 lost
    d = rebuilding_peer(SPEC, 2, alive, norms={}, snapshot_dir=str(tmp_path))
    neighbours(d)
    with caplog.at_level(logging.ERROR, logger="shoal.recovery"):
        report = asyncio.run(recovery.rebuild_stage(d))
    assert report.method == "snapshot" and report.degraded
    assert "DEGRADED RECOVERY" in caplog.text and "(step 30)" in report.note
    for name, p in d.host.params().items():
        assert torch.equal(p.detach(), lost.params()[name].detach()), name
    assert d.host.step == 40  # the swarm's step (the view), not the snapshot's


def test_adjacent_losses_without_snapshot_copy_the_nearest_stage(neighbours) -> None:
    alive = {1: trained(SPEC, 1, 35, 1), 4: trained(SPEC, 4, 35, 4)}
    d = rebuilding_peer(SPEC, 3, alive, norms={})
    neighbours(d)
    report = asyncio.run(recovery.rebuild_stage(d))
    assert (report.method, report.sources) == ("copy_nearest", (4,)) and report.degraded


def test_snapshots_keep_the_newest_and_refuse_another_stage(tmp_path) -> None:
    host = StageHost(SPEC, 2)
    for step in (10, 20, 30):
        snapshots.save_snapshot(tmp_path, 2, step, "ef" * 8, host.module.state_dict())
    found = snapshots.list_snapshots(tmp_path, 2)
    assert [s.step for s in found] == [30, 20]  # KEEP = 2 per writer
    other = StageHost(SPEC.replace(**{"model.n_layers": 8}), 2)
    with pytest.raises(snapshots.SnapshotError, match="lacks"):
        snapshots.load_snapshot(found[0], other.params())


def test_load_rebuilt_refuses_a_state_of_the_wrong_stage() -> None:
    host = StageHost(SPEC, 2)
    with pytest.raises(StageError, match="do not match"):
        host.load_rebuilt(StageHost(SPEC, 3).params(), 5, LR_BOOST)
    bad = {k: torch.full_like(v, math.nan) for k, v in host.params().items()}
    with pytest.raises(StageError, match="NaN"):
        host.load_rebuilt(bad, 5, LR_BOOST)


def test_catch_up_only_when_no_holder_of_the_stage_stepped_meanwhile() -> None:
    d = rebuilding_peer(SPEC, 2, {1: trained(SPEC, 1, 9, 1)}, norms={})
    d.host.step, d.state_hash = 9, "h"
    assert recovery.catch_up(d, 15) and d.host.step == 15  # the sole holder
    d.view.holders[2] = ["another-replica"]
    d.view.steps["another-replica"] = 15  # same step, same hash: the stage missed them all
    assert recovery.catch_up(d, 18) and d.host.step == 18
    d.view.steps["another-replica"] = 19  # it is ahead: download instead
    assert not recovery.catch_up(d, 20) and d.host.step == 18


def test_catch_up_waits_for_a_step_in_progress_unless_the_caller_holds_the_lock() -> None:
    async def scenario() -> None:
        d = rebuilding_peer(SPEC, 2, {1: trained(SPEC, 1, 9, 1)}, norms={})
        d.host.step, d.state_hash = 9, "h"
        async with d.step_lock:  # a step (or another catch-up) holds the stage
            assert not recovery.catch_up(d, 15) and d.host.step == 9
            # the re-sync of the stage's only holder holds the lock itself
            assert recovery.catch_up(d, 15, holding_lock=True) and d.host.step == 15

    asyncio.run(scenario())


def test_coordinator_logs_skip_and_the_rebuild_the_peer_reports() -> None:
    spec = RunSpec().replace(**{"pipeline.stages": 3})
    m = Membership(spec, "swarm")
    bench = Benchmark(samples_per_s=10.0)
    for i, stage in enumerate([0, 1, 2, 3]):
        m.join(f"p{i}", b"k", f"127.0.0.1:{9000 + i}", bench, stage, 0, now=0.0)
        m.heartbeat(f"p{i}", PeerStats(state="training", step=5, grad_norm=0.2), now=1.0)
    m.sweep(now=1.0)
    m.heartbeat("p0", PeerStats(state="training", step=6), now=20.0)
    m.heartbeat("p1", PeerStats(state="training", step=6), now=20.0)
    m.heartbeat("p3", PeerStats(state="training", step=6), now=20.0)
    m.sweep(now=20.0 + spec.membership.lease_s - 1)  # p2 silent since t=1: expired
    st2 = m.stage_summaries()[2]
    assert (st2.state, st2.rebuild) == ("empty", "checkfree")
    skip = [e for e in m.events.recent() if e.kind == "skip"]
    assert [e.stage for e in skip] == [2]
    t = 30.0
    m.join("p9", b"k", "127.0.0.1:9009", bench, 2, 0, now=t)
    report = PeerStats(state="rebuilt", step=7,
                       bytes_by_kind={"activations": 100, "recovery:weighted_average:1,3": 7})
    m.heartbeat("p9", report, now=t)
    rebuild = [e for e in m.events.recent() if e.kind == "rebuild"]
    assert len(rebuild) == 1 and "weighted_average of stages 1,3 at step 7" in rebuild[0].detail
    assert m.stage_summaries()[2].rebuild == ""
    assert "recovery:weighted_average:1,3" not in m.get("p9").stats.bytes_by_kind
    assert "recovery:weighted_average:1,3" not in m.bytes_by_kind_total


def test_neighbours_weigh_by_their_post_clip_gradient_norm(neighbours) -> None:
    alive = {1: trained(SPEC, 1, 40, 1), 3: trained(SPEC, 3, 40, 3)}
    d = rebuilding_peer(SPEC, 2, alive, norms={1: 7.5, 3: 0.25})  # grad_clip 1.0
    neighbours(d)
    report = asyncio.run(recovery.rebuild_stage(d))
    a = 7.5 * SPEC.optim.grad_clip / (7.5 + 1e-6) + 1e-4  # the clipped norm, as the reference
    assert report.weights == pytest.approx((a, 0.25 + 1e-4))


# ------------------------------------------------------------------ stage 0 (CheckFree+)

PLUS = SPEC.replace(**{"pipeline.checkfree_plus": True})


def with_copy(host: StageHost, seed: int) -> StageHost:
    """An edge stage whose copy of stage 0 is distinct (as if refreshed from a trained one)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        host.module.edge_embedding.normal_(generator=gen)
        host.module.edge_norm.uniform_(0.5, 1.5, generator=gen)
    return host


def stage_zero_peer(spec: RunSpec, alive: dict[int, StageHost | None], rebuild: str,
                    snapshot_dir: str | None = None) -> FakePeer:
    d = rebuilding_peer(spec, 0, {s: h for s, h in alive.items()}, norms={},
                        snapshot_dir=snapshot_dir)
    d.view.stages = [dataclasses.replace(i, rebuild=rebuild) if i.stage == 0 else i
                     for i in d.view.stages]
    return d


def test_stage_zero_lost_is_rebuilt_from_stage_ones_copy(neighbours) -> None:
    alive = {1: with_copy(trained(PLUS, 1, 50, 1), 11), 2: trained(PLUS, 2, 50, 2),
             4: with_copy(trained(PLUS, 4, 50, 4), 44)}
    d = stage_zero_peer(PLUS, alive, "checkfree+")
    neighbours(d)
    # the daemon's path: no replica of stage 0 is live and the view marks it for a rebuild
    report = asyncio.run(recovery.take_state(d, None, 0))  # type: ignore[arg-type]
    assert report is not None
    assert (report.method, report.sources, report.step) == ("edge_copy", (1,), 50)
    assert not report.degraded and parse_wire_key(report.wire_key()) == ("edge_copy", (1,))
    zero = d.host.params()
    assert torch.equal(zero["embedding.weight"].detach(), alive[1].module.edge_embedding)
    assert torch.equal(zero["norm.weight"].detach(), alive[1].module.edge_norm)
    assert d.host.step == 50 and d.host.lr_scale == pytest.approx(LR_BOOST)


def test_stage_zero_takes_the_last_stages_copy_when_stage_one_fails(neighbours) -> None:
    alive = {1: None, 4: with_copy(trained(PLUS, 4, 50, 4), 44)}
    d = stage_zero_peer(PLUS, alive, "checkfree+")
    neighbours(d)
    report = asyncio.run(recovery.rebuild_stage(d))
    assert (report.method, report.sources) == ("edge_copy", (4,))
    assert torch.equal(d.host.params()["embedding.weight"].detach(),
                       alive[4].module.edge_embedding)


def test_stage_zero_without_copies_restores_its_own_snapshot_loudly(neighbours, tmp_path,
                                                                    caplog) -> None:
    old = trained(SPEC, 0, 30, 7)
    old_d = FakePeer(SPEC, old, snapshot_dir=str(tmp_path))
    assert asyncio.run(recovery.snapshot_if_due(old_d, 0)) == 30  # stage 0 is snapshotted too
    d = stage_zero_peer(SPEC, {1: trained(SPEC, 1, 35, 1)}, "snapshot",
                        snapshot_dir=str(tmp_path))
    neighbours(d)
    with caplog.at_level(logging.ERROR, logger="shoal.recovery"):
        report = asyncio.run(recovery.rebuild_stage(d))
    assert report.method == "snapshot" and report.degraded and "DEGRADED" in caplog.text
    for name, p in d.host.params().items():
        assert torch.equal(p.detach(), old.params()[name].detach()), name


def test_coordinator_marks_a_lost_stage_zero_for_a_checkfree_plus_rebuild() -> None:
    spec = RunSpec().replace(**{"pipeline.stages": 3, "pipeline.checkfree_plus": True})
    m = Membership(spec, "swarm")
    bench = Benchmark(samples_per_s=10.0)
    for i, stage in enumerate([0, 1, 2, 3]):
        m.join(f"p{i}", b"k", f"127.0.0.1:{9000 + i}", bench, stage, 0, now=0.0)
        m.heartbeat(f"p{i}", PeerStats(state="training", step=5, grad_norm=0.2), now=1.0)
    for p in ("p1", "p2", "p3"):
        m.heartbeat(p, PeerStats(state="training", step=6), now=20.0)
    m.sweep(now=20.0 + spec.membership.lease_s - 1)  # p0, stage 0's only replica, expired
    st0 = m.stage_summaries()[0]
    assert (st0.state, st0.rebuild) == ("empty", "checkfree+")
    assert not [e for e in m.events.recent() if e.kind == "skip"]  # stage 0 is never bypassed
    m.join("p9", b"k", "127.0.0.1:9009", bench, 0, 0, now=30.0)
    assert m.get("p9").stage == 0
    # the heartbeat's gate lets the report through (it refused it, and so the peer, before)
    check_kinds({"recovery:edge_copy:1": 6}, heartbeat_kinds("allreduce"), 4)
    m.heartbeat("p9", PeerStats(state="rebuilt", step=6,
                                bytes_by_kind={"recovery:edge_copy:1": 6}), now=30.0)
    rebuild = [e for e in m.events.recent() if e.kind == "rebuild"]
    assert len(rebuild) == 1 and rebuild[0].stage == 0
    assert "stage rebuilt (checkfree+): edge_copy of stages 1 at step 6" in rebuild[0].detail
    assert "DEGRADED" not in rebuild[0].detail
