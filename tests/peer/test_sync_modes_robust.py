"""One hostile replica cannot wreck a stage under the demo sync mode (bounded values).

allreduce (trimmed / clipped mean) and diloco (robust aggregators) have their NaN-and-huge tests
in tests/test_sync_modes.py; SPSA's bound (one int8 code moves a weight by at most lr x scale)
is in tests/test_spsa_mode.py. Here DeMo: a packet with a value above `sync.demo.value_bound`
is dropped by the leader and named, and one inside the bound still moves every weight by at
most lr per step, because DeMo steps with the sign of the aggregate. With
`sync.demo.aggregator = "trimmed_mean"` a replica sending its packets sign-flipped x10 no longer
sets the signs of the step (the chooser mean lets it; bench/byzantine.py measures the loss).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from peer.sync.demo import DemoMode
from protocols.runspec import RunSpec, RunSpecError
from tests.peer.test_sync_modes import params_equal, replicas, spec_with, train_microbatch


def _demo_parts(spec, n: int = 3):
    hosts, modes = replicas(spec, tuple("abcde"[:n]))
    for i, pid in enumerate(sorted(hosts)):
        train_microbatch(hosts[pid], i, 1)
    return hosts, modes, {p: tuple(reversed(modes[p].contribution(hosts[p]))) for p in hosts}


def test_demo_drops_a_replica_whose_values_exceed_the_bound() -> None:
    spec = spec_with(**{"sync.mode": "demo", "sync.demo.value_bound": 1e3})
    hosts, modes, parts = _demo_parts(spec)
    meta, arrays = parts["b"]
    parts["b"] = (meta, {k: (v * np.float32(1e9) if k.endswith(".v") else v)
                         for k, v in arrays.items()})
    result, m = modes["a"].aggregate(parts)
    assert m["included"] == "a,c" and "value_bound" in m["dropped"]
    before = [p.detach().clone() for p in hosts["a"].module.parameters()]
    for pid in sorted(hosts):
        modes[pid].apply(hosts[pid], result, m)
    assert params_equal(hosts["a"], hosts["b"]) and params_equal(hosts["a"], hosts["c"])
    lr = spec.sync.demo.lr
    moved = max(float((p.detach() - b).abs().max())
                for p, b in zip(hosts["a"].module.parameters(), before, strict=True))
    assert 0 < moved <= lr + 1e-6  # (+ fp32 rounding of the weight)


def test_demo_hostile_values_inside_the_bound_move_weights_by_at_most_lr() -> None:
    spec = spec_with(**{"sync.mode": "demo", "sync.demo.value_bound": 1e3})
    hosts, modes, parts = _demo_parts(spec)
    meta, arrays = parts["b"]
    parts["b"] = (meta, {k: (np.sign(v) * np.float32(999.0) if k.endswith(".v") else v)
                         for k, v in arrays.items()})
    result, m = modes["a"].aggregate(parts)
    assert m["included"] == "a,b,c"
    before = [p.detach().clone() for p in hosts["c"].module.parameters()]
    for pid in sorted(hosts):
        modes[pid].apply(hosts[pid], result, m)
    after = [p.detach() for p in hosts["c"].module.parameters()]
    assert all(math.isfinite(float(a.sum())) for a in after)
    moved = max(float((a - b).abs().max()) for a, b in zip(after, before, strict=True))
    assert moved <= spec.sync.demo.lr + 1e-6


# ------------------------------------------------- sync.demo.aggregator: DeMo's robust rules


def test_demo_aggregator_is_validated_and_defaults_to_the_chooser_mean() -> None:
    assert RunSpec().sync.demo.aggregator == "mean"
    spec = spec_with(**{"sync.mode": "demo", "sync.demo.aggregator": "trimmed_mean",
                        "sync.demo.trim": 0.25})
    assert RunSpec.from_toml(spec.to_toml()) == spec
    assert DemoMode(spec).aggregator == "trimmed_mean"
    with pytest.raises(RunSpecError, match=r"sync\.demo\.aggregator"):
        spec_with(**{"sync.demo.aggregator": "median"})
    with pytest.raises(RunSpecError, match=r"sync\.demo\.trim"):
        spec_with(**{"sync.demo.trim": 0.5})


def _correlated_round(spec: RunSpec, n: int = 4):
    """n DeMo replicas that trained on nearly the same data (as a stage's replicas do), and
    their parts; the last replica's part is also returned sign-flipped x10."""
    hosts, modes = replicas(spec, tuple(f"r{i}" for i in range(n)))
    g = torch.Generator().manual_seed(7)
    d, t = spec.model.d_model, spec.model.seq_len
    x, grad = torch.randn(4, t, d, generator=g), torch.randn(4, t, d, generator=g)
    for pid in sorted(hosts):
        out = hosts[pid].forward("mb", x + 0.3 * torch.randn(x.shape, generator=g), 1)
        hosts[pid].backward("mb", grad + 0.3 * torch.randn(out.shape, generator=g))
    parts = {p: tuple(reversed(modes[p].contribution(hosts[p]))) for p in sorted(hosts)}
    hostile = sorted(hosts)[-1]
    meta, arrays = parts[hostile]
    flipped = {k: (np.float32(-10.0) * v if k.endswith(".v") else v) for k, v in arrays.items()}
    return hosts, modes, parts, {**parts, hostile: (meta, flipped)}


def _step_signs(spec: RunSpec, parts) -> list[torch.Tensor]:
    """The sign of the step one DeMo round's result makes (fresh replica, same start)."""
    hosts, modes = replicas(spec, ("x",))
    before = [p.detach().clone() for p in hosts["x"].module.parameters()]
    modes["x"]._shapes = [tuple(p.shape) for p in before]
    result, meta = modes["x"].aggregate(parts)
    modes["x"].apply(hosts["x"], result, meta)
    return [torch.sign(b - p.detach()) for p, b in zip(hosts["x"].module.parameters(), before,
                                                       strict=True)]


def _agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return (sum(int((x == y).sum()) for x, y in zip(a, b, strict=True))
            / sum(x.numel() for x in a))


def test_demo_trimmed_mean_bounds_a_sign_flipped_x10_replica() -> None:
    plain = spec_with(**{"sync.mode": "demo"})
    robust = spec_with(**{"sync.mode": "demo", "sync.demo.aggregator": "trimmed_mean"})
    hosts, modes, honest, attacked = _correlated_round(robust)
    # all four replicas apply the same relayed bytes and stay bit-identical
    result, meta = modes["r0"].aggregate(attacked)
    assert meta["included"] == "r0,r1,r2,r3"
    for pid in sorted(hosts):
        modes[pid].apply(hosts[pid], result, meta)
    assert all(params_equal(hosts["r0"], hosts[p]) for p in ("r1", "r2", "r3"))
    # the direction the three honest replicas agree on (the paper's chooser mean of theirs)
    reference = _step_signs(plain, {p: v for p, v in honest.items() if p != "r3"})
    assert _agreement(_step_signs(plain, attacked), reference) < 0.6  # the mean is taken over
    robust_honest = _agreement(_step_signs(robust, honest), reference)
    robust_attacked = _agreement(_step_signs(robust, attacked), reference)
    assert robust_attacked > 0.75 and robust_honest - robust_attacked < 0.05
