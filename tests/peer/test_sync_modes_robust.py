"""One hostile replica cannot wreck a stage under the demo sync mode (bounded values).

allreduce (trimmed / clipped mean) and diloco (robust aggregators) have their NaN-and-huge tests
in tests/test_sync_modes.py; SPSA's bound (one int8 code moves a weight by at most lr x scale)
is in tests/test_spsa_mode.py. Here DeMo: a packet with a value above `sync.demo.value_bound`
is dropped by the leader and named, and one inside the bound still moves every weight by at
most lr per step, because DeMo steps with the sign of the aggregate.
"""

from __future__ import annotations

import math

import numpy as np

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
