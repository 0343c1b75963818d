"""Placement by memory (no sockets, no torch): protocols/memory.py's estimate of each stage's
bytes, and the coordinator placing a stage only on a peer whose device has room for it
(coordinator/placement.py, assignment.py, membership.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.assignment import StageLoad, assign_stage
from coordinator.membership import Membership
from coordinator.placement import TooSmall, check_fits_some, fits, only_fits
from protocols.coordinator_client import Benchmark, PeerStats
from protocols.memory import (
    MARGIN,
    RUNTIME_BYTES,
    activation_bytes,
    layers_per_stage,
    shape_of,
    stage_bytes,
    stage_params,
)
from protocols.runspec import RunSpec

T0 = 1_000_000.0
MIB = 1 << 20


def test_the_estimate_of_the_default_run_by_hand() -> None:
    """d=128, 4 layers, 2 block stages, microbatch 8, target batch 32, seq 64, allreduce."""
    spec = RunSpec()
    layer = 4 * 128 * 128 + 3 * 128 * 384 + 2 * 128  # attention, SwiGLU (width 384), 2 norms
    assert stage_params(spec) == [256 * 128 + 128, 2 * layer, 2 * layer]
    pending = 2 * 32 + 8  # samples of forward graphs a block replica may hold
    assert activation_bytes(spec, 0) == 4 * 64 * (pending * 128 + 3 * 8 * 256)
    assert activation_bytes(spec, 1) == 4 * pending * 64 * (12 * 128 + 4 * 384) * 2
    per_param = 4 + 4 + 8 + 2  # weights, grads, AdamW's moments, bf16 copies
    want = [(n * per_param + activation_bytes(spec, i) + RUNTIME_BYTES) * (1 + MARGIN)
            for i, n in enumerate(stage_params(spec))]
    assert stage_bytes(spec) == [pytest.approx(w, abs=1) for w in want]
    # the sync mode's state: DiLoCo keeps the most, SPSA (no gradient, no AdamW) and DeMo
    # (a gradient and one momentum) the least
    modes = {m: stage_bytes(spec.replace(**{"sync.mode": m}))[1]
             for m in ("allreduce", "demo", "diloco", "spsa")}
    assert modes["spsa"] <= modes["demo"] < modes["allreduce"] < modes["diloco"]


def test_layers_are_cut_as_the_peers_cut_them() -> None:
    assert layers_per_stage(8, 3) == [3, 3, 2]
    assert layers_per_stage(4, 4) == [1, 1, 1, 1]
    spec = RunSpec().replace(**{"model.n_layers": 5, "pipeline.stages": 3})
    needs = stage_bytes(spec)
    assert needs[1] == needs[2] > needs[3]


def test_a_hugging_face_model_is_counted_from_its_config(tmp_path: Path) -> None:
    config = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 1000, "hidden_size": 64,
              "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    keys = {"model.hf": str(tmp_path), "model.d_model": 64, "model.n_layers": 2,
            "model.n_heads": 4, "model.vocab": 1000, "pipeline.stages": 2}
    spec = RunSpec().replace(**keys)
    shape = shape_of(spec)
    assert (shape.n_kv_heads, shape.intermediate, shape.tied, shape.qkv_bias) == (2, 96, True,
                                                                                   True)
    q, kv = 64, 2 * 16
    layer = 64 * q + 2 * 64 * kv + q * 64 + (q + 2 * kv) + 3 * 64 * 96 + 2 * 64
    assert stage_params(spec) == [1000 * 64 + 64, layer, layer]
    # the folder unreadable here: the spec's numbers, a Llama-like MLP and an untied head
    gone = spec.replace(**{"model.hf": str(tmp_path / "elsewhere")})
    assert shape_of(gone).source.startswith("run spec")
    assert stage_params(gone)[0] == 2 * 1000 * 64 + 64


def test_a_peer_too_small_for_every_stage_is_refused_with_the_figures() -> None:
    needs = [300 * MIB, 900 * MIB, 700 * MIB]
    assert check_fits_some(needs, 800 * MIB, "cpu") == [0, 2]
    assert check_fits_some(needs, 0, "cpu") == [0, 1, 2]  # an older peer reports nothing
    with pytest.raises(TooSmall, match=r"\(cuda:0 Tiny\) has 100 MiB available, and the smallest "
                                       r"stage of this run \(stage 0\) needs about 300 MiB"):
        check_fits_some(needs, 100 * MIB, "cuda:0 Tiny")
    assert fits(10, 0) and fits(10, 10) and not fits(11, 10)
    assert only_fits(needs, 1 << 40, [800 * MIB, 0]) == set()  # an unreported peer fits all
    assert only_fits(needs, 1 << 40, [800 * MIB]) == {1}


def test_an_empty_stage_only_this_peer_fits_goes_first() -> None:
    loads = {i: StageLoad({}) for i in range(3)}
    assert assign_stage(loads, 5.0) == 0
    assert assign_stage(loads, 5.0, allowed=[1, 2]) == 1
    assert assign_stage(loads, 5.0, prefer={2}) == 2
    loads[2] = StageLoad({"a": 1.0})  # a stage with a replica is not "empty": capacity rules
    assert assign_stage(loads, 5.0, prefer={2}) == 0


# ---------------------------------------------------------------- the coordinator's membership

SPEC = RunSpec().replace(**{"model.d_model": 512, "model.n_heads": 8, "model.n_layers": 3,
                            "pipeline.stages": 2})  # stages 1 and 2 hold 2 and 1 layers


def bench(available: int, sps: float = 10.0) -> Benchmark:
    return Benchmark(samples_per_s=sps, device="test", memory_bytes=available,
                     memory_available_bytes=available)


def test_membership_places_stages_only_where_they_fit() -> None:
    m = Membership(SPEC, "swarm-test")
    needs = m.stage_needs
    assert needs[0] < needs[2] < needs[1]
    small, roomy = (needs[2] + needs[1]) // 2, 4 * needs[1]  # small fits stages 0 and 2
    epoch = m.epoch
    with pytest.raises(TooSmall, match="smallest stage of this run"):
        m.join("tiny", b"\x01" * 32, "127.0.0.1:9001", bench(needs[0] // 2), -1, 0, T0)
    assert m.epoch == epoch and m.get("tiny") is None
    refused = m.events.recent()[-1]
    assert refused.kind == "refuse" and refused.peer_id == "tiny"
    assert "has" in refused.detail and "needs about" in refused.detail

    assert m.join("r1", b"\x02" * 32, "127.0.0.1:9002", bench(roomy), -1, 0, T0).stage == 0
    # stage 1 is the next empty stage, but it does not fit: the small peer takes stage 2
    assert m.join("s1", b"\x03" * 32, "127.0.0.1:9003", bench(small), -1, 0, T0).stage == 2
    # a stage hint to a stage that does not fit is not honoured either
    assert m.join("s2", b"\x04" * 32, "127.0.0.1:9004", bench(small), 1, 0, T0).stage == 0
    m.leave("r1", "test", T0 + 1)
    m.leave("s2", "test", T0 + 1)  # stages 0 and 1 empty; the small s1 could hold 0, nobody else 1
    assert m.join("r2", b"\x05" * 32, "127.0.0.1:9005", bench(roomy), -1, 0, T0 + 2).stage == 1
    # an older peer that reports no memory is placed as before (the first empty stage)
    assert m.join("old", b"\x06" * 32, "127.0.0.1:9006", bench(0), -1, 0, T0 + 2).stage == 0


def test_rebalance_moves_only_a_peer_that_fits_where_it_goes() -> None:
    m = Membership(SPEC, "swarm-test")
    needs = m.stage_needs
    small, roomy = (needs[2] + needs[1]) // 2, 4 * needs[1]
    for pid, avail, want in (("r-big", roomy, 0), ("s-one", small, 2), ("r-two", roomy, 1),
                             ("a-small", small, 0)):
        assert m.join(pid, pid.encode().ljust(32, b"_"), "127.0.0.1:9000", bench(avail), -1, 0,
                      T0).stage == want
    for pid, sps in (("r-big", 50.0), ("a-small", 50.0), ("s-one", 50.0), ("r-two", 1.0)):
        m.heartbeat(pid, PeerStats(state="training", samples_per_s=sps), T0 + 1)
    move = m.rebalance(T0 + 2, min_gain=0.0)
    # a-small sorts first and is as fast, but stage 1 does not fit it: r-big goes
    assert move is not None and (move.peer_id, move.to_stage) == ("r-big", 1)
