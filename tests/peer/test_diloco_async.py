"""Async DiLoCo's timing in the peer: round r's average lands at the end of round r+1."""

from __future__ import annotations

import torch

from optim import diloco
from peer.pipeline.stage_host import StageHost
from peer.sync.diloco import DilocoMode, delta_to_wire
from peer.sync.diloco_delayed import SKIPPED, DelayedDilocoMode
from protocols.runspec import RunSpec

SPEC = RunSpec().replace(**{"pipeline.stages": 2, "model.d_model": 32, "model.n_heads": 4,
                            "model.n_layers": 2, "sync.mode": "diloco", "run.steps": 20,
                            "sync.diloco.inner_steps": 5, "sync.diloco.quant": "fp32",
                            "sync.diloco.delayed": True})


def _round(mode: DilocoMode, host: StageHost, seed: int):
    """One fake round of inner drift; returns the leader's aggregate of this replica alone."""
    gen = torch.Generator().manual_seed(seed)
    mode.shared_params(host)
    with torch.no_grad():
        for p in host.module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 1e-2)
    delta = diloco.pseudo_gradient(mode.shared_params(host), list(host.module.parameters()))
    flat = torch.cat([d.reshape(-1) for d in delta])
    arrays = delta_to_wire(diloco.quantize(flat, "fp32", mode.outer.int8_block))
    return mode.aggregate({"a": ({"samples": "4"}, arrays)})


def test_the_average_of_round_r_is_applied_one_round_late() -> None:
    sync_host, async_host = StageHost(SPEC, 1), StageHost(SPEC, 1)
    sync_mode, async_mode = DilocoMode(SPEC), DelayedDilocoMode(SPEC)
    r0_sync, r0_async = _round(sync_mode, sync_host, 0), _round(async_mode, async_host, 0)
    sync_mode.apply(sync_host, *r0_sync)  # synchronous: theta_1 = outer(theta_0, avg_0)
    async_mode.apply_rounds(async_host, [SKIPPED])  # delayed: theta_1 = theta_0
    theta0 = [s.clone() for s in async_mode.shared_params(async_host)]
    assert not all(torch.equal(a, b) for a, b in zip(
        sync_mode.shared_params(sync_host), theta0, strict=True))
    for p, s in zip(async_host.module.parameters(), theta0, strict=True):
        assert torch.equal(p.detach(), s)
    # end of round 1: the delayed replica applies round 0's average now
    _round(async_mode, async_host, 1)
    async_mode.apply_rounds(async_host, [r0_async])
    assert all(torch.equal(a, b) for a, b in zip(
        sync_mode.shared_params(sync_host), async_mode.shared_params(async_host), strict=True))
    sync_host.close()
    async_host.close()


def test_flush_only_at_the_last_outer_step() -> None:
    mode = DelayedDilocoMode(SPEC)
    assert [s for s in (5, 10, 15, 20) if mode.is_last_outer_step(s)] == [20]
