"""Overlapped DeMo's timing in the peer: the packets of step t's round land at step t+1, and
applying them then gives what the synchronous mode gave one step earlier."""

from __future__ import annotations

import asyncio

import torch

from peer.pipeline.stage_host import StageHost
from peer.sync.demo import DemoMode
from peer.sync.demo_delayed import DelayedDemoMode
from peer.sync.registry import make_sync_mode
from peer.sync.rounds import SyncFailed
from protocols.runspec import RunSpec

SPEC = RunSpec().replace(**{"pipeline.stages": 2, "model.d_model": 32, "model.n_heads": 4,
                            "model.n_layers": 2, "model.seq_len": 8, "sync.mode": "demo",
                            "run.steps": 3, "sync.demo.lr": 1e-2, "sync.demo.topk": 8,
                            "sync.demo.delayed": True})


def _backward(host: StageHost, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, 32, generator=gen)
    y = host.forward(f"m{seed}", x, host.step + 1)
    host.backward(f"m{seed}", torch.randn(y.shape, generator=gen))


def _params(host: StageHost) -> list[torch.Tensor]:
    return [p.detach().clone() for p in host.module.parameters()]


def test_the_spec_picks_the_delayed_mode() -> None:
    assert type(make_sync_mode(SPEC)) is DelayedDemoMode
    assert type(make_sync_mode(SPEC.replace(**{"sync.demo.delayed": False}))) is DemoMode


def test_round_t_is_applied_at_step_t_plus_one() -> None:
    sync_host, late_host = StageHost(SPEC, 1), StageHost(SPEC, 1)
    late_host.load_state_arrays(sync_host.state_arrays())
    sync_mode, late_mode = DemoMode(SPEC), DelayedDemoMode(SPEC)
    theta0 = _params(late_host)
    # step 1: both compress the same gradient; sync applies it, delayed applies nothing
    for host in (sync_host, late_host):
        _backward(host, 1)
    r1_sync = sync_mode.aggregate({"a": sync_mode.contribution(sync_host)[::-1]})
    r1_late = late_mode.aggregate({"a": late_mode.contribution(late_host)[::-1]})
    sync_mode.apply(sync_host, *r1_sync)
    late_mode.apply_rounds(late_host, [])
    assert late_host.step == sync_host.step == 1
    assert all(torch.equal(a, b) for a, b in zip(_params(late_host), theta0, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(_params(sync_host), theta0, strict=True))
    # step 2: the delayed replica applies round 1's packets now: the weights sync had after 1
    _backward(late_host, 2)
    late_mode.contribution(late_host)
    late_mode.apply_rounds(late_host, [r1_late])
    assert late_host.step == 2
    for a, b in zip(_params(late_host), _params(sync_host), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    sync_host.close()
    late_host.close()


class _Rounds:
    """SyncRounds' surface round_step uses: each round answers with its own parts, or fails."""

    def __init__(self, mode: DelayedDemoMode, fail_at: int = 0) -> None:
        self.mode, self.fail_at, self.last_included = mode, fail_at, 1
        self.started: list[int] = []

    async def run(self, step, part):
        self.started.append(step)
        await asyncio.sleep(0)
        if step == self.fail_at:
            raise SyncFailed(f"round {step} lost")
        meta, arrays = part
        return self.mode.aggregate({"me": (meta, arrays)})


class _Ctx:
    def __init__(self, host: StageHost) -> None:
        self.host, self.peer_id, self.state_hash = host, "me", ""
        self.behind: list[str] = []

    def fall_behind(self, why: str) -> None:
        self.behind.append(why)


def test_round_step_overlaps_flushes_at_the_last_step_and_falls_behind_on_a_lost_round() -> None:
    modes: list[DelayedDemoMode] = []

    async def run(fail_at: int) -> tuple[_Ctx, _Rounds, list]:
        host = StageHost(SPEC, 1)
        mode = DelayedDemoMode(SPEC)
        modes.append(mode)
        ctx, rounds, done = _Ctx(host), _Rounds(mode, fail_at), []
        for step in (1, 2, 3):
            _backward(host, step)
            done.append(await mode.round_step(ctx, rounds, step))
            if not done[-1].stepped:
                break
        host.close()
        return ctx, rounds, done

    ctx, rounds, done = asyncio.run(run(fail_at=0))
    assert [d.stepped for d in done] == [True, True, True] and not ctx.behind
    assert rounds.started == [1, 2, 3]
    assert modes[0].pending is None  # step 3 = run.steps: round 3 applied too (the flush)
    ctx, rounds, done = asyncio.run(run(fail_at=1))  # round 1 is found lost at step 2
    assert [d.stepped for d in done] == [True, False]
    assert ctx.behind and "DeMo round of step 1" in ctx.behind[0]
    assert modes[1].pending is None  # round 2, started at step 2, was cancelled
