"""bench/byzantine.py's own logic at a tiny size: the attacker really sends its update
sign-flipped x10 in each mode, the whole bench runs and ends on its last line in the right
format, the plain mean is wrecked by the attacker while the robust rule is not, and the stage's
replicas stay bit-identical. No timing is asserted."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from bench import byzantine
from optim import demo
from peer.pipeline.stage_host import StageHost
from peer.sync.diloco import delta_from_wire
from peer.sync.registry import make_sync_mode
from peer.sync.rounds import LOCAL_STEP

LAST_LINE = re.compile(r"^byzantine: worst loss gap = (\d+\.\d\d|nan)%$")


def _trained(spec, steps: int = 1):
    """A block replica of `spec` that trained `steps` local steps' worth and has a part ready."""
    host, mode = StageHost(spec, 1), make_sync_mode(spec)
    g = torch.Generator().manual_seed(3)
    d, t = spec.model.d_model, spec.model.seq_len
    for step in range(1, steps + 1):
        x = torch.randn(2, t, d, generator=g)
        out = host.forward(f"mb{step}", x, step)
        host.backward(f"mb{step}", torch.randn(out.shape, generator=g))
        if step < steps:
            mode.apply(host, {}, dict(LOCAL_STEP))
    return host, mode


def test_allreduce_attacker_sends_its_gradient_sums_times_minus_ten() -> None:
    spec = byzantine.spec_for("allreduce", "trimmed_mean", 4, 1, 2, 2, 8)
    host, mode = _trained(spec)
    arrays, meta = mode.contribution(host)
    hostile = byzantine.sign_flip_x10(mode, spec, arrays)
    assert sorted(hostile) == sorted(arrays) and meta["samples"] == "2"
    for k, v in arrays.items():
        assert hostile[k].dtype == np.float32
        np.testing.assert_array_equal(hostile[k], np.float32(-10.0) * v)
    assert any(np.abs(v).max() > 0 for v in arrays.values())


@pytest.mark.parametrize("sign_bits", [False, True])
def test_demo_attacker_sends_its_packets_times_minus_ten(sign_bits: bool) -> None:
    spec = byzantine.spec_for("demo", "trimmed_mean", 4, 1, 2, 2, 8).replace(
        **{"sync.demo.sign_bits": sign_bits})
    host, mode = _trained(spec)
    arrays, _ = mode.contribution(host)
    hostile = byzantine.sign_flip_x10(mode, spec, arrays)
    shapes = [tuple(p.shape) for p in host.module.parameters()]
    for i, shape in enumerate(shapes):
        honest_pk = mode._packet(arrays, f"{i}.", shape)
        hostile_pk = mode._packet(hostile, f"{i}.", shape)  # still a valid packet
        assert torch.equal(hostile_pk.indices, honest_pk.indices)
        torch.testing.assert_close(hostile_pk.decoded(), -10.0 * honest_pk.decoded(),
                                   rtol=1e-6, atol=0)
        demo.validate_packet(hostile_pk, shape, mode.config)


def test_diloco_attacker_sends_its_pseudo_gradient_times_minus_ten() -> None:
    spec = byzantine.spec_for("diloco", "trimmed_mean", 4, 1, 2, 2, 8)
    host, mode = _trained(spec, steps=2)
    assert mode.exchanges(2)
    arrays, _ = mode.contribution(host)
    hostile = byzantine.sign_flip_x10(mode, spec, arrays)
    assert hostile["data"].dtype == np.int8  # the run's int8 wire, re-quantized
    honest_delta = delta_from_wire(arrays, mode.outer.int8_block)
    assert float(honest_delta.abs().max()) > 0
    torch.testing.assert_close(delta_from_wire(hostile, mode.outer.int8_block),
                               -10.0 * honest_delta, rtol=1e-5, atol=1e-7)


def test_gap_and_worst() -> None:
    assert byzantine.gap_percent(2.0, 2.1) == pytest.approx(5.0)
    assert byzantine.gap_percent(2.0, 1.9) == pytest.approx(-5.0)
    assert math.isnan(byzantine.gap_percent(2.0, float("nan")))
    assert byzantine.worst([0.5, -1.5, 1.0]) == 1.5
    assert math.isnan(byzantine.worst([0.5, float("nan")]))


@pytest.fixture(scope="module")
def tiny_bench() -> tuple[float, list, list[str]]:
    lines: list[str] = []
    torch.set_num_threads(1)
    p, rows = byzantine.run(byzantine.MODES, steps=4, seed=1, replicas=4, diloco_h=2,
                            microbatch=4, target_batch=16, out=lines.append)
    return p, rows, lines


def test_the_bench_runs_and_ends_on_its_last_line(tiny_bench) -> None:
    p, rows, lines = tiny_bench
    match = LAST_LINE.match(lines[-1])
    assert match, lines[-1]
    assert match.group(1) == byzantine.TARGET.figure(p)
    assert lines[-2].startswith("targets: worst loss gap = ")
    assert [(r.mode, r.rule) for r in rows] == [(m, rule) for m in byzantine.MODES
                                                for rule in ("trimmed_mean", "mean")]
    robust = [abs(r.gap) for r in rows if r.rule == "trimmed_mean"]
    assert p == pytest.approx(max(robust))
    for r in rows:  # every run ended with the block replicas bit-identical
        assert r.honest.same_hash and r.attacked.same_hash, (r.mode, r.rule)
        assert math.isfinite(r.honest.eval_loss)


def test_the_attacker_wrecks_the_plain_mean_but_not_the_robust_rule(tiny_bench) -> None:
    _, rows, _ = tiny_bench
    by = {(r.mode, r.rule): r for r in rows}
    for mode in byzantine.MODES:
        plain, robust = by[(mode, "mean")], by[(mode, "trimmed_mean")]
        assert plain.gap > 5.0, (mode, plain.gap)  # the attack is real: loss goes up
        assert abs(robust.gap) < plain.gap / 3, (mode, robust.gap, plain.gap)
