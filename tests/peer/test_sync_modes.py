"""The sync modes of peer/sync/ (allreduce, demo, diloco) on StageHost objects, no network.

Rounds are run by hand the way peer/sync/rounds.py's SyncRounds runs them (contribution on every
replica, aggregate of the parts by peer id, apply of the same bytes everywhere). Checked: replicas
end bit-identical; an aggregate does not depend on the order parts arrived in; a NaN or huge
replica is dropped or bounded by the robust rules; DiLoCo exchanges only every H steps, its
shared state travels with a state download, and its int8 upload is ~1 byte per parameter.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from peer.pipeline.stage_host import StageHost
from peer.sync.allreduce import AllreduceMode, RobustAllreduceMode
from peer.sync.base import trim_count
from peer.sync.demo import DemoMode
from peer.sync.diloco import DilocoMode
from peer.sync.registry import make_sync_mode
from peer.sync.rounds import LOCAL_STEP
from protocols.runspec import RunSpec

BASE = {"model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4, "model.seq_len": 8,
        "pipeline.stages": 1, "pipeline.microbatch": 2, "pipeline.target_batch": 4}


def spec_with(**changes: object) -> RunSpec:
    return RunSpec().replace(**{**BASE, **changes})


def train_microbatch(host: StageHost, seed: int, step: int) -> None:
    """One forward + backward through a block stage with random activations and gradients."""
    g = torch.Generator().manual_seed(seed)
    d = host.spec.model.d_model
    x = torch.randn(2, host.spec.model.seq_len, d, generator=g)
    out = host.forward(f"mb{seed}", x, step)
    host.backward(f"mb{seed}", torch.randn(out.shape, generator=g))


def run_round(mode_of: dict[str, object], hosts: dict[str, StageHost], step: int,
              order: list[str] | None = None) -> tuple[dict, dict]:
    """contribution on each replica, aggregate on the first (by id), apply everywhere."""
    parts = {}
    for pid in order or sorted(hosts):
        arrays, meta = mode_of[pid].contribution(hosts[pid])
        parts[pid] = (meta, arrays)
    leader = sorted(hosts)[0]
    result, meta = mode_of[leader].aggregate(parts)
    for pid in sorted(hosts):
        mode_of[pid].apply(hosts[pid], result, meta)
    return result, meta


def replicas(spec: RunSpec, ids: tuple[str, ...] = ("a", "b")) -> tuple[dict, dict]:
    hosts = {pid: StageHost(spec, 1) for pid in ids}
    modes = {pid: make_sync_mode(spec) for pid in ids}
    return hosts, modes


def params_equal(a: StageHost, b: StageHost) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.module.parameters(), b.module.parameters(),
                                                 strict=True))


def same_arrays(x: dict, y: dict) -> bool:
    return sorted(x) == sorted(y) and all(
        x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes() for k in x)


# ---------------------------------------------------------------------------------- factory


def test_make_sync_mode_picks_each_mode() -> None:
    assert type(make_sync_mode(spec_with())) is AllreduceMode
    assert isinstance(make_sync_mode(spec_with(**{"sync.allreduce.aggregator": "trimmed_mean"})),
                      RobustAllreduceMode)
    assert isinstance(make_sync_mode(spec_with(**{"sync.mode": "demo"})), DemoMode)
    mode = make_sync_mode(spec_with(**{"sync.mode": "diloco", "sync.diloco.inner_steps": 5}))
    assert isinstance(mode, DilocoMode)
    assert [s for s in range(1, 16) if mode.exchanges(s)] == [5, 10, 15]
    assert AllreduceMode().exchanges(7) and DemoMode(spec_with()).exchanges(7)
    assert [trim_count(0.25, n) for n in (2, 3, 4, 8)] == [1, 1, 1, 2]
    assert trim_count(0.0, 8) == 0


# ---------------------------------------------------------------------------------- DeMo


@pytest.mark.parametrize("sign_bits", [False, True])
def test_demo_replicas_end_bit_identical(sign_bits: bool) -> None:
    spec = spec_with(**{"sync.mode": "demo", "sync.demo.sign_bits": sign_bits,
                        "sync.demo.weight_decay": 0.01})
    hosts, modes = replicas(spec)
    before = [p.detach().clone() for p in hosts["a"].module.parameters()]
    for step in range(1, 4):
        for i, pid in enumerate(sorted(hosts)):
            train_microbatch(hosts[pid], 100 * step + i, step)
        _, meta = run_round(modes, hosts, step)
        assert meta["included"] == "a,b" and not meta["dropped"]
        assert params_equal(hosts["a"], hosts["b"])
        assert hosts["a"].state_hash() == hosts["b"].state_hash()
        assert hosts["a"].step == hosts["b"].step == step
    moved = [not torch.equal(p, q) for p, q in zip(before, hosts["a"].module.parameters(),
                                                   strict=True)]
    assert all(moved)
    # DeMo replaces AdamW: the stage's AdamW never stepped
    assert not hosts["a"].optimizer.state


def test_demo_packets_are_small() -> None:
    spec = spec_with(**{"sync.mode": "demo", "sync.demo.sign_bits": True})
    host, mode = StageHost(spec, 1), DemoMode(spec)
    train_microbatch(host, 1, 1)
    arrays, _ = mode.contribution(host)
    dense = sum(p.numel() * 4 for p in host.module.parameters())
    sent = sum(a.nbytes for a in arrays.values())
    assert arrays["1.i"].dtype == np.uint16 and arrays["1.b"].dtype == np.uint8
    assert dense / sent > 50, (dense, sent)  # 64x64 chunks, k=32: 64+4+4 bytes vs 16 KiB


def test_demo_aggregate_is_order_independent_and_drops_a_nan_replica() -> None:
    spec = spec_with(**{"sync.mode": "demo"})
    hosts, modes = replicas(spec, ("a", "b", "c"))
    for i, pid in enumerate(sorted(hosts)):
        train_microbatch(hosts[pid], i, 1)
    parts = {pid: tuple(reversed(modes[pid].contribution(hosts[pid]))) for pid in hosts}
    bad_meta, bad_arrays = parts["b"]
    bad_arrays = dict(bad_arrays)
    bad_arrays["0.v"] = np.full_like(bad_arrays["0.v"], np.nan)
    parts["b"] = (bad_meta, bad_arrays)
    r1, m1 = modes["a"].aggregate(dict(sorted(parts.items())))
    r2, m2 = modes["a"].aggregate(dict(sorted(parts.items(), reverse=True)))
    assert same_arrays(r1, r2) and m1 == m2
    assert m1["included"] == "a,c" and "b: bad packet" in m1["dropped"]
    for pid in sorted(hosts):
        modes[pid].apply(hosts[pid], r1, m1)
    assert params_equal(hosts["a"], hosts["b"]) and params_equal(hosts["a"], hosts["c"])


def test_demo_replica_with_no_momentum_yet_does_not_vote() -> None:
    spec = spec_with(**{"sync.mode": "demo"})
    hosts, modes = replicas(spec)
    train_microbatch(hosts["a"], 1, 1)  # b saw nothing this step
    _, meta = run_round(modes, hosts, 1)
    assert meta["included"] == "a" and "b: zero momentum" in meta["dropped"]
    assert params_equal(hosts["a"], hosts["b"])
    train_microbatch(hosts["b"], 2, 2)
    run_round(modes, hosts, 2)
    _, meta = run_round(modes, hosts, 3)  # nobody saw a sample; both still hold momentum
    assert meta["included"] == "a,b"
    assert params_equal(hosts["a"], hosts["b"])


# ---------------------------------------------------------------------------------- DiLoCo


def diloco_spec(**changes: object) -> RunSpec:
    return spec_with(**{"sync.mode": "diloco", "sync.diloco.inner_steps": 3,
                        "sync.diloco.inner_lr": 1e-2, **changes})


@pytest.mark.parametrize("quant", ["int8", "fp16", "fp32"])
def test_diloco_inner_steps_then_outer_step_makes_replicas_identical(quant: str) -> None:
    spec = diloco_spec(**{"sync.diloco.quant": quant})
    hosts, modes = replicas(spec)
    start = [p.detach().clone() for p in hosts["a"].module.parameters()]
    for step in (1, 2):
        assert not modes["a"].exchanges(step)
        for i, pid in enumerate(sorted(hosts)):
            train_microbatch(hosts[pid], 10 * step + i, step)
            modes[pid].apply(hosts[pid], {}, dict(LOCAL_STEP))
        # replicas drift apart locally, yet agree on the shared state the hash covers
        assert not params_equal(hosts["a"], hosts["b"])
        assert hosts["a"].state_hash() == hosts["b"].state_hash()
    assert modes["a"].exchanges(3)
    for i, pid in enumerate(sorted(hosts)):
        train_microbatch(hosts[pid], 30 + i, 3)
    result, meta = run_round(modes, hosts, 3)
    assert meta["included"] == "a,b"
    assert params_equal(hosts["a"], hosts["b"])
    assert hosts["a"].state_hash() == hosts["b"].state_hash()
    assert hosts["a"].step == 3 and hosts["a"].mode_state["shared.outer.steps"].item() == 1
    after = list(hosts["a"].module.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(start, after, strict=True))
    for p, s in zip(after, DilocoMode.shared_params(hosts["a"]), strict=True):
        assert torch.equal(p, s)
    if quant == "int8":  # ~1 byte per parameter each way, not 4
        n = sum(p.numel() for p in hosts["a"].module.parameters())
        assert sum(a.nbytes for a in result.values()) < 1.001 * n + 64


def test_diloco_outer_state_travels_with_a_state_download() -> None:
    spec = diloco_spec()
    hosts, modes = replicas(spec)
    for step in (1, 2, 3, 4):
        for i, pid in enumerate(sorted(hosts)):
            train_microbatch(hosts[pid], 7 * step + i, step)
            if step % 3:
                modes[pid].apply(hosts[pid], {}, dict(LOCAL_STEP))
        if step % 3 == 0:
            run_round(modes, hosts, step)
    joiner = StageHost(spec, 1)
    joiner.load_state_arrays(hosts["a"].state_arrays())
    assert joiner.state_hash() == hosts["a"].state_hash()
    assert "shared.outer.momentum.0" in joiner.mode_state and joiner.step == 4
    # the joiner takes part in the next round like any replica and ends identical
    hosts["c"], modes["c"] = joiner, make_sync_mode(spec)
    for step in (5, 6):
        for i, pid in enumerate(sorted(hosts)):
            train_microbatch(hosts[pid], 11 * step + i, step)
            if step == 5:
                modes[pid].apply(hosts[pid], {}, dict(LOCAL_STEP))
    _, meta = run_round(modes, hosts, 6)
    assert meta["included"] == "a,b,c"
    assert params_equal(hosts["a"], hosts["c"]) and params_equal(hosts["a"], hosts["b"])


def _diloco_parts(spec: RunSpec, n: int) -> tuple[dict, dict, dict]:
    hosts, modes = replicas(spec, tuple("abcde"[:n]))
    for i, pid in enumerate(sorted(hosts)):
        for step in (1, 2):
            train_microbatch(hosts[pid], 5 * i + step, step)
            modes[pid].apply(hosts[pid], {}, dict(LOCAL_STEP))
        train_microbatch(hosts[pid], 50 + i, 3)
    parts = {pid: tuple(reversed(modes[pid].contribution(hosts[pid]))) for pid in hosts}
    return hosts, modes, parts


def test_diloco_drops_a_nan_replica_and_aggregate_is_order_independent() -> None:
    hosts, modes, parts = _diloco_parts(diloco_spec(**{"sync.diloco.quant": "fp32"}), 3)
    meta, arrays = parts["b"]
    arrays = dict(arrays)
    arrays["data"] = arrays["data"].copy()
    arrays["data"][5] = np.nan
    parts["b"] = (meta, arrays)
    r1, m1 = modes["a"].aggregate(dict(sorted(parts.items())))
    r2, m2 = modes["c"].aggregate(dict(sorted(parts.items(), reverse=True)))
    assert same_arrays(r1, r2) and m1 == m2
    assert m1["included"] == "a,c" and "b:" in m1["dropped"]
    for pid in sorted(hosts):
        modes[pid].apply(hosts[pid], r1, m1)
    assert params_equal(hosts["a"], hosts["b"]) and params_equal(hosts["a"], hosts["c"])
    assert all(torch.isfinite(p).all() for p in hosts["b"].module.parameters())


def test_diloco_refuses_a_pseudo_gradient_with_foreign_blocks() -> None:
    _, modes, parts = _diloco_parts(diloco_spec(), 2)
    meta, arrays = parts["b"]
    parts["b"] = (meta, {**arrays, "block": np.asarray([1 << 40], dtype=np.int64)})
    _, m = modes["a"].aggregate(parts)  # no 1 TiB of padding allocated
    assert m["included"] == "a" and "b: bad pseudo-gradient" in m["dropped"]


@pytest.mark.parametrize("aggregator", ["trimmed_mean", "clipped_mean"])
def test_diloco_robust_aggregation_bounds_a_huge_replica(aggregator: str) -> None:
    spec = diloco_spec(**{"sync.diloco.quant": "fp32", "sync.diloco.aggregator": aggregator,
                          "sync.diloco.clip_norm": 0.0})
    _, modes, parts = _diloco_parts(spec, 3)
    honest = [np.asarray(parts[p][1]["data"]) for p in ("a", "c")]
    meta, arrays = parts["b"]
    parts["b"] = (meta, {**arrays, "data": np.asarray(arrays["data"]) * np.float32(1e6)})
    result, _ = modes["a"].aggregate(parts)
    bound = max(float(np.abs(h).max()) for h in honest)
    assert float(np.abs(result["data"]).max()) <= 2 * bound
    plain = diloco_spec(**{"sync.diloco.quant": "fp32"})
    mean_result, _ = DilocoMode(plain).aggregate(parts)
    assert float(np.abs(mean_result["data"]).max()) > 1e3 * bound  # what it protects against


def test_diloco_round_with_nothing_usable_resets_to_the_shared_weights() -> None:
    hosts, modes, parts = _diloco_parts(diloco_spec(), 2)
    result, meta = modes["a"].aggregate({p: ({"samples": "0"}, a) for p, (_, a) in
                                         parts.items()})
    assert meta["skip"] == "1" and result == {}
    for pid in sorted(hosts):
        modes[pid].apply(hosts[pid], result, meta)
    assert params_equal(hosts["a"], hosts["b"]) and hosts["a"].step == 3
    assert "shared.outer.steps" not in hosts["a"].mode_state


# ---------------------------------------------------------------------------------- allreduce


def _allreduce_parts(spec: RunSpec, n: int) -> tuple[dict, dict, dict]:
    hosts, modes = replicas(spec, tuple("abcde"[:n]))
    for i, pid in enumerate(sorted(hosts)):
        train_microbatch(hosts[pid], i, 1)
    return hosts, modes, {p: tuple(reversed(modes[p].contribution(hosts[p]))) for p in hosts}


@pytest.mark.parametrize("aggregator", ["trimmed_mean", "clipped_mean"])
def test_robust_allreduce_drops_nan_and_bounds_huge(aggregator: str) -> None:
    spec = spec_with(**{"sync.allreduce.aggregator": aggregator, "sync.allreduce.clip_norm": 0.0})
    hosts, modes, parts = _allreduce_parts(spec, 4)
    name = sorted(parts["a"][1])[0]
    meta, arrays = parts["b"]
    parts["b"] = (meta, {**arrays, name: np.full_like(arrays[name], np.nan)})
    meta, arrays = parts["c"]
    parts["c"] = (meta, {k: v * np.float32(1e6) for k, v in arrays.items()})
    r1, m1 = modes["a"].aggregate(dict(sorted(parts.items())))
    r2, m2 = modes["d"].aggregate(dict(sorted(parts.items(), reverse=True)))
    assert same_arrays(r1, r2) and m1 == m2
    assert "b" not in m1["included"].split(",") and "b: tensor" in m1["dropped"]
    honest = max(float(np.abs(parts[p][1][k]).max()) / 2 for p in "ad" for k in parts[p][1])
    assert max(float(np.abs(v).max()) for v in r1.values()) <= 2 * honest
    for pid in sorted(hosts):
        modes[pid].apply(hosts[pid], r1, m1)
    assert params_equal(hosts["a"], hosts["c"])
    assert all(math.isfinite(float(p.detach().sum())) for p in hosts["a"].module.parameters())
