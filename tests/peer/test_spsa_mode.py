"""peer/sync/spsa.py on StageHost objects and coordinator/ledger.py, without a network.

Checked: the perturbed forward of a block stage restores its fp32 weights bit for bit and runs
h+ and h- under opposite perturbations; replicas applying the same closed sets (peers listed in
any order) end bit-identical; the ledger scale travels with a state download so a snapshot plus
the later steps replays to the live replica's hash; checkpoints are taken every K steps and do
not alias the live weights; malformed offers are refused; the coordinator's ledger closes steps
when every expected replica posted or at the deadline, in order, and answers late posts with
the closed set.
"""

from __future__ import annotations

import pytest
import torch

from coordinator.ledger import LedgerRefused, SpsaLedger
from optim import spsa
from peer.pipeline.stage_host import StageError, StageHost
from peer.sync.registry import make_sync_mode
from peer.sync.rounds import LOCAL_STEP
from peer.sync.spsa import SCALE_KEY, SpsaMode, from_codes, tensor_ids
from protocols.runspec import RunSpec

SPEC = RunSpec().replace(**{"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 4,
                            "model.seq_len": 8, "pipeline.stages": 1, "pipeline.microbatch": 2,
                            "pipeline.target_batch": 4, "sync.mode": "spsa",
                            "sync.spsa.lr": 1e-2, "sync.spsa.hash_every": 3})


def step_all(hosts: list[StageHost], modes: list[SpsaMode], step: int, peers: list[str],
             codes: list[int]) -> None:
    for host, mode in zip(hosts, modes, strict=True):
        mode.offer(step, peers, from_codes(codes))
        mode.apply(host, {}, dict(LOCAL_STEP))


def test_make_sync_mode_picks_spsa_and_it_exchanges_nothing() -> None:
    mode = make_sync_mode(SPEC)
    assert isinstance(mode, SpsaMode) and not mode.exchanges(1)


def test_block_pair_perturbs_only_inside_and_restores_exact_bytes() -> None:
    host, mode = StageHost(SPEC, 1), SpsaMode(SPEC)
    before = [p.detach().clone() for p in host.module.parameters()]
    x = torch.randn(2, 8, 32)
    seed = mode.seed(1, "peer-a", 0)
    out = mode.block_pair(host, seed, torch.cat([x, x]))
    assert all(torch.equal(a, b) for a, b in zip(before, host.module.parameters(), strict=True))
    plus, minus = out[:2], out[2:]
    assert not torch.equal(plus, minus)
    params = list(host.module.parameters())
    with spsa.perturbed(params, seed, SPEC.sync.spsa.eps, 1, tensor_ids(host)), torch.no_grad():
        expect = host.module(x)
    assert torch.allclose(plus, expect, atol=1e-6)
    with pytest.raises(StageError):
        mode.block_pair(host, seed, torch.randn(3, 8, 32))  # not [h+; h-]


def test_replicas_stay_bit_identical_whatever_the_peer_order() -> None:
    hosts = [StageHost(SPEC, 1) for _ in range(2)]
    modes = [SpsaMode(SPEC) for _ in range(2)]
    for step in range(1, 6):
        peers, codes = ["p1", "p2", "p3"], [37 * step % 127, -90, 5]
        modes[0].offer(step, peers, from_codes(codes))
        modes[1].offer(step, peers[::-1], from_codes(codes[::-1]))
        for h, m in zip(hosts, modes, strict=True):
            m.apply(h, {}, dict(LOCAL_STEP))
    assert hosts[0].state_hash() == hosts[1].state_hash()
    assert hosts[0].step == 5
    fresh = StageHost(SPEC, 1)
    assert fresh.state_hash() != hosts[0].state_hash()
    scale = float(hosts[0].mode_state[SCALE_KEY][0])
    assert scale != SPEC.sync.spsa.initial_scale  # the ledger adapted the scale


def test_snapshot_plus_replay_reaches_the_live_hash_and_checkpoints_do_not_alias() -> None:
    live, mode = StageHost(SPEC, 1), SpsaMode(SPEC)
    history = [(s, ["a", "b"], [s * 11 % 100 - 50, 127]) for s in range(1, 9)]
    for step, peers, codes in history[:3]:
        step_all([live], [mode], step, peers, codes)
    assert mode.checkpoint is not None and mode.checkpoint[0] == 3  # hash_every = 3
    ck_step, ck_arrays, ck_hash = mode.checkpoint
    for step, peers, codes in history[3:]:
        step_all([live], [mode], step, peers, codes)
    assert mode.checkpoint[0] == 6
    joiner, jmode = StageHost(SPEC, 1), SpsaMode(SPEC)
    joiner.load_state_arrays(ck_arrays)  # the step-3 checkpoint, untouched by later steps
    assert joiner.state_hash() == ck_hash and joiner.step == ck_step
    for step, peers, codes in history[3:]:
        step_all([joiner], [jmode], step, peers, codes)
    assert joiner.state_hash() == live.state_hash()


def test_offers_are_checked_and_apply_needs_one() -> None:
    host, mode = StageHost(SPEC, 1), SpsaMode(SPEC)
    with pytest.raises(StageError, match="code bytes"):
        mode.offer(1, ["a", "b"], b"\x01")
    with pytest.raises(StageError, match="no closed message set"):
        mode.apply(host, {}, dict(LOCAL_STEP))
    mode.offer(1, [], b"")  # everyone abstained: the step still counts
    mode.apply(host, {}, dict(LOCAL_STEP))
    assert host.step == 1


def test_a_hostile_code_moves_each_weight_by_at_most_lr_times_scale() -> None:
    host, mode = StageHost(SPEC, 1), SpsaMode(SPEC)
    before = [p.detach().clone() for p in host.module.parameters()]
    step_all([host], [mode], 1, ["evil"], [-127])
    bound = SPEC.sync.spsa.lr * SPEC.sync.spsa.initial_scale * 1.0001
    after = [p.detach() for p in host.module.parameters()]
    moved = max(float((a - b).abs().max()) for a, b in zip(after, before, strict=True))
    assert 0 < moved <= bound


# ---------------------------------------------------------------------------------- ledger


def test_ledger_closes_when_every_expected_replica_posted() -> None:
    led = SpsaLedger(directions=1, timeout_s=5.0)
    led.post(1, "b", b"\x05", ["a", "b"], now=0.0)
    assert led.next_step == 1
    led.post(1, "a", b"\xfb", ["a", "b"], now=0.1)
    assert led.next_step == 2
    (c,) = led.steps(1)
    assert c.peers == ("a", "b") and c.codes == b"\xfb\x05"


def test_ledger_closes_at_the_deadline_and_answers_late_posts() -> None:
    led = SpsaLedger(directions=1, timeout_s=5.0)
    led.post(1, "a", b"\x01", ["a", "b"], now=0.0)
    led.close_due(4.9)
    assert led.next_step == 1
    led.close_due(5.0)
    assert led.next_step == 2 and led.steps(1)[0].peers == ("a",)
    led.post(1, "b", b"\x02", ["a", "b"], now=6.0)  # too late: step 1 stays as closed
    assert led.steps(1)[0].peers == ("a",)
    led.post(2, "a", b"", ["a"], now=7.0)  # abstains
    assert led.steps(2)[0].peers == () and led.next_step == 3


def test_ledger_refuses_bad_posts_and_keeps_a_bounded_history() -> None:
    led = SpsaLedger(directions=2, timeout_s=1.0, keep_steps=5)
    with pytest.raises(LedgerRefused):
        led.post(1, "a", b"\x01", ["a"], now=0.0)
    with pytest.raises(LedgerRefused):
        led.post(0, "a", b"\x01\x02", ["a"], now=0.0)
    led.post(7, "a", b"\x01\x02", ["a"], now=0.0)  # first post: the ledger starts there
    assert led.base_step == 7 and led.next_step == 8
    for s in range(8, 20):
        led.post(s, "a", b"\x01\x02", ["a"], now=0.0)
    assert led.base_step == 15 and [c.step for c in led.steps(0)] == list(range(15, 20))
    assert [c.step for c in led.steps(16, 18)] == [16, 17]


def test_several_directions_per_peer_apply_identically() -> None:
    spec = SPEC.replace(**{"sync.spsa.samples_per_step": 2})
    hosts = [StageHost(spec, 1) for _ in range(2)]
    modes = [SpsaMode(spec) for _ in range(2)]
    step_all(hosts, modes, 1, ["a", "b"], [10, -20, 30, -40])  # a: j=0,1; b: j=0,1
    assert hosts[0].state_hash() == hosts[1].state_hash()
    one = StageHost(spec, 1)
    mode = SpsaMode(spec)
    mode.offer(1, ["a", "b"], from_codes([10, 0, 30, 0]))  # only the j=0 directions
    mode.apply(one, {}, dict(LOCAL_STEP))
    assert one.state_hash() != hosts[0].state_hash()
    with pytest.raises(StageError):
        mode.offer(2, ["a"], from_codes([1]))  # J = 2 codes per peer


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_a_verifier_recomputes_the_contributors_stream_bit_for_bit(kind: str) -> None:
    """Verified SPSA: a block replica serving a verifier's Forward with meta of=X perturbs with
    X's seed, so the verifier gets exactly the [h+; h-] X got (and any other seed differs)."""
    from protocols import shoal_pb2 as pb

    spec = SPEC.replace(**{"sync.spsa.perturbation": kind})
    host, mode = StageHost(spec, 1), SpsaMode(spec)
    x = torch.randn(2, 8, 32)
    x2 = torch.cat([x, x])
    own = pb.CallHeader(kind="forward", step=4, stage=1, sender="peer-x")
    own.meta.update({"mode": "spsa", "j": "0"})
    check = pb.CallHeader(kind="forward", step=4, stage=1, sender="peer-v")
    check.meta.update({"mode": "spsa", "j": "0", "of": "peer-x"})
    plain = pb.CallHeader(kind="forward", step=4, stage=1, sender="peer-v")
    plain.meta.update({"mode": "spsa", "j": "0"})
    got_own = mode.serve_forward(host, own, x2)
    assert torch.equal(mode.serve_forward(host, check, x2), got_own)
    assert not torch.equal(mode.serve_forward(host, plain, x2), got_own)
    check.meta["of"] = "x" * 129
    with pytest.raises(StageError, match="not a peer id"):
        mode.serve_forward(host, check, x2)
