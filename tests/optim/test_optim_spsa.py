"""Shared-seed SPSA: seeds, the integer Rademacher stream, exact restore, int8 codes, integer
accumulation, ledger replay for late joiners, and that the defaults learn."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from optim import spsa
from optim.errors import LedgerError, NonFiniteValues, PrecisionError
from optim.spsa import Ledger, Message, SpsaConfig

MASK = 0xFFFFFFFF


def _fmix32_ref(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & MASK
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & MASK
    return x ^ (x >> 16)


def _rademacher_ref(seed: int, tensor_id: int | str, i: int) -> int:
    """Plain-Python twin of the generator (unbounded ints), to pin the exact bits."""
    k0, k1 = spsa._tensor_key(seed, tensor_id)
    c = i >> 5
    word = _fmix32_ref(_fmix32_ref((c & MASK) ^ k0) ^ (((c >> 32) * 0x9E3779B9) & MASK) ^ k1)
    return 1 - 2 * ((word >> (i & 31)) & 1)


def _params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(33, 7, generator=g) * 0.05, torch.randn(129, generator=g) * 0.05]


def test_seed_for_is_a_stable_64_bit_hash_of_every_field() -> None:
    s = spsa.seed_for("run", 5, "peer-a", 0)
    assert s == spsa.seed_for("run", 5, "peer-a", 0) and 0 <= s < 2**64
    others = {spsa.seed_for("run", 6, "peer-a", 0), spsa.seed_for("run", 5, "peer-b", 0),
              spsa.seed_for("run", 5, "peer-a", 1), spsa.seed_for("run2", 5, "peer-a", 0),
              spsa.seed_for("ru", 5, "npeer-a", 0)}
    assert s not in others and len(others) == 5


def test_rademacher_matches_the_reference_and_slices_concatenate() -> None:
    seed = spsa.seed_for("run", 3, "p", 0)
    full = spsa.rademacher(seed, "layers.0.w", 5000)
    assert full.dtype == torch.int8 and set(full.tolist()) == {-1, 1}
    assert full.tolist() == [_rademacher_ref(seed, "layers.0.w", i) for i in range(5000)]
    far = 2**38 + 12345
    assert spsa.rademacher(seed, 7, 70, start=far).tolist() == [
        _rademacher_ref(seed, 7, far + d) for d in range(70)]
    cuts = [0, 1, 31, 32, 33, 137, 1000, 4096, 5000]
    parts = [spsa.rademacher(seed, "layers.0.w", b - a, start=a)
             for a, b in itertools.pairwise(cuts)]
    assert torch.equal(torch.cat(parts), full)


def test_rademacher_looks_random() -> None:
    z = spsa.rademacher(12345, 0, 320_000).to(torch.float64)
    assert abs(z.mean().item()) < 0.01
    for lag in (1, 2, 31, 32, 33):
        assert abs((z[lag:] * z[:-lag]).mean().item()) < 0.01
    per_bit = z.reshape(-1, 32).mean(dim=0)  # no bit position of the hash word is biased
    assert per_bit.abs().max().item() < 0.04  # 4 sigma for 10k samples
    other = spsa.rademacher(12345, 1, 320_000).to(torch.float64)
    assert abs((z * other).mean().item()) < 0.01
    assert not torch.equal(spsa.rademacher(1, 0, 64), spsa.rademacher(2, 0, 64))


def test_perturb_restore_is_exact_after_200_cycles_and_in_place_is_not() -> None:
    params = _params()
    original = [p.clone() for p in params]
    for cycle in range(200):
        seed = spsa.seed_for("run", cycle, "p")
        with spsa.perturbed(params, seed, 1e-3, +1):
            assert not torch.equal(params[0], original[0])
        with spsa.perturbed(params, seed, 1e-3, -1):
            pass
    assert all(torch.equal(p, o) for p, o in zip(params, original, strict=True))
    drift = [p.clone() for p in original]  # negative control: MeZO's +eps, -2eps, +eps
    for cycle in range(200):
        z = spsa.rademacher(spsa.seed_for("run", cycle, "p"), 0, drift[0].numel())
        z = z.to(torch.float32).reshape(drift[0].shape)
        for c in (1e-3, -2e-3, 1e-3):
            drift[0].add_(z * c)
    assert not torch.equal(drift[0], original[0])


def test_bf16_master_weights_are_refused() -> None:
    with pytest.raises(PrecisionError, match="float32 master"):
        spsa.perturb([torch.zeros(4, dtype=torch.bfloat16)], 1, 1e-3, 1)
    with pytest.raises(PrecisionError):
        spsa.apply([torch.zeros(4, dtype=torch.float16)], [(1, 3)], 1e-3, 1.0)
    master = spsa.fp32_master([torch.zeros(4, dtype=torch.bfloat16)])
    spsa.apply(master, [(1, 3)], 1e-3, 1.0)
    assert master[0].dtype == torch.float32


def test_encode_decode_is_a_linear_int8_code() -> None:
    assert spsa.encode(0.5, 1.0) == 64  # round(63.5) half-to-even
    assert spsa.encode(-0.25, 1.0) == -32
    assert spsa.encode(10.0, 1.0) == 127 and spsa.encode(-10.0, 1.0) == -127
    assert spsa.decode(127, 2.0) == 2.0
    with pytest.raises(NonFiniteValues):
        spsa.encode(float("nan"), 1.0)
    codes = [spsa.encode(0.3, 1.0, spsa.dither_for(s)) for s in range(4000)]
    mean = sum(spsa.decode(c, 1.0) for c in codes) / len(codes)
    assert abs(mean - 0.3) < 1e-3  # stochastic rounding is unbiased


def test_replicas_are_bit_identical_whatever_the_message_order() -> None:
    updates = [(spsa.seed_for("run", 0, f"peer-{i}"), code)
               for i, code in enumerate([127, -127, 3, -45, 88, 1, -1, 60])]
    hashes = set()
    for order in range(6):
        params = _params()
        shuffled = updates[:]
        random.Random(order).shuffle(shuffled)
        spsa.apply(params, shuffled, lr=1e-3, scale=0.7)
        hashes.add(spsa.state_hash(params))
    assert len(hashes) == 1


def test_float_accumulation_of_the_same_messages_depends_on_order() -> None:
    """The wrong way (theta -= lr*g*z message by message) drifts apart; the int path does not."""
    g = torch.Generator().manual_seed(3)
    gs = (torch.randn(8, generator=g) * 10).tolist()
    seeds = [spsa.seed_for("run", 0, f"peer-{i}") for i in range(8)]
    float_hashes, int_hashes = set(), set()
    for order in range(6):
        perm = list(range(8))
        random.Random(order).shuffle(perm)
        wrong = _params()
        for i in perm:
            for tid, p in enumerate(wrong):
                z = spsa.rademacher(seeds[i], tid, p.numel()).to(torch.float32).reshape(p.shape)
                p.sub_(1e-3 * gs[i] * z)
        float_hashes.add(spsa.state_hash(wrong))
        right = _params()
        spsa.apply(right, [(seeds[i], spsa.encode(gs[i], 30.0)) for i in perm], 1e-3, 30.0)
        int_hashes.add(spsa.state_hash(right))
    assert len(float_hashes) > 1 and len(int_hashes) == 1


def _peer_losses(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, seed: int,
                 eps: float, kind: str = "rademacher") -> float:
    def loss() -> float:
        return float(((x @ params[0] - y) ** 2).mean())

    with spsa.perturbed(params, seed, eps, +1, None, kind):
        plus = loss()
    with spsa.perturbed(params, seed, eps, -1, None, kind):
        minus = loss()
    return spsa.projected_gradient(plus, minus, eps)


def _train(steps: int, peers: int, ledger: Ledger, replicas: list[list[torch.Tensor]],
           snapshot_at: int | None = None) -> list[torch.Tensor] | None:
    """Every peer computes one message per step from replica 0's params; all replicas apply."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(256, 16, generator=g)
    y = x @ torch.randn(16, generator=g)
    snapshot = None
    for step in range(steps):
        if step == snapshot_at:
            snapshot = [p.clone() for p in replicas[0]]
        scale = ledger.scale_at(step)
        messages = []
        for i in range(peers):
            peer = f"peer-{i}"
            rows = torch.randint(0, 256, (32,), generator=g)
            seed = spsa.seed_for(ledger.run_id, step, peer)
            grad = _peer_losses(replicas[0], x[rows], y[rows], seed, ledger.config.eps,
                                ledger.config.perturbation)
            messages.append(Message(step, peer, spsa.encode(grad, scale)))
        random.Random(step).shuffle(messages)
        ledger.record(step, messages)
        for r, params in enumerate(replicas):
            updates = ledger.updates(step)
            random.Random(step * 10 + r).shuffle(updates)
            spsa.apply(params, updates, ledger.config.lr, ledger.scale_at(step), None,
                       ledger.config.perturbation)
    return snapshot


@pytest.mark.parametrize("kind", ["rademacher", pytest.param("gaussian", marks=pytest.mark.slow)])
def test_defaults_learn_a_tiny_linear_regression(kind: str) -> None:
    """4 peers per step; lr 4e-3 on their mean is the old 1e-3 per message (1/N scaling)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(256, 16, generator=g)
    y = x @ torch.randn(16, generator=g)
    replicas = [[torch.zeros(16)] for _ in range(3)]
    loss0 = float(((x @ replicas[0][0] - y) ** 2).mean())
    _train(300, 4, Ledger("run", SpsaConfig(lr=4e-3, perturbation=kind)), replicas)
    loss = float(((x @ replicas[0][0] - y) ** 2).mean())
    assert loss < 0.05 * loss0
    assert len({spsa.state_hash(p) for p in replicas}) == 1


def test_late_joiner_replays_the_ledger_to_the_same_bits() -> None:
    ledger = Ledger("run")
    live = [[torch.zeros(16)]]
    snapshot = _train(40, 3, ledger, live, snapshot_at=25)
    assert snapshot is not None
    joiner = [p.clone() for p in snapshot]
    ledger.replay(joiner, from_step=25)
    assert spsa.state_hash(joiner) == spsa.state_hash(live[0])
    compacted = Ledger("run", ledger.config, base_step=25, base_scale=ledger.scale_at(25))
    for step in range(25, 40):
        compacted.record(step, ledger.messages(step))
    joiner2 = [p.clone() for p in snapshot]
    compacted.replay(joiner2, from_step=25)
    assert spsa.state_hash(joiner2) == spsa.state_hash(live[0])
    ledger.compact(25)
    joiner3 = [p.clone() for p in snapshot]
    ledger.replay(joiner3, from_step=25)
    assert spsa.state_hash(joiner3) == spsa.state_hash(live[0])
    with pytest.raises(LedgerError):
        ledger.replay(joiner3, from_step=10)


def test_ledger_rules_and_scale_determinism() -> None:
    cfg = SpsaConfig()
    a, b = Ledger("run", cfg), Ledger("run", cfg)
    msgs = [Message(0, "p1", 127), Message(0, "p2", -100), Message(0, "p3", 5)]
    a.record(0, msgs)
    b.record(0, list(reversed(msgs)))
    assert a.scale_at(1) == b.scale_at(1) > cfg.initial_scale  # saturated codes grow the scale
    with pytest.raises(LedgerError, match="already closed"):
        a.record(0, [])
    with pytest.raises(LedgerError, match="duplicate"):
        a.record(1, [Message(1, "p1", 1), Message(1, "p1", 2)])
    with pytest.raises(LedgerError, match="catch up"):
        a.scale_at(5)
    a.record(3, [Message(3, "p1", 1)])  # steps 1 and 2 had no messages
    assert a.scale_at(2) == a.scale_at(1) == a.scale_at(3)
    assert a.scale_at(4) < a.scale_at(3)  # small codes shrink it
    assert a.messages(2) == () and a.next_step == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_draws_and_applies_the_same_bits_as_cpu() -> None:
    seed = spsa.seed_for("run", 1, "p")
    for start in (0, 12_345, 2**33):
        cpu = spsa.rademacher(seed, "w", 300_000, start)
        assert torch.equal(spsa.rademacher(seed, "w", 300_000, start, "cuda").cpu(), cpu)
    updates = [(spsa.seed_for("run", 1, f"p{i}"), c) for i, c in enumerate([5, -127, 64])]
    for kind in spsa.PERTURBATIONS:
        on_cpu, on_gpu = _params(), [p.cuda() for p in _params()]
        spsa.apply(on_cpu, updates, 1e-3, 0.37, None, kind)
        spsa.apply(on_gpu, updates, 1e-3, 0.37, None, kind)
        assert spsa.state_hash(on_gpu) == spsa.state_hash(on_cpu), kind
    for start in (0, 12_345, 2**33 + 1):
        cpu = spsa.gaussian_fixed(seed, "w", 300_001, start)
        assert torch.equal(spsa.gaussian_fixed(seed, "w", 300_001, start, "cuda").cpu(), cpu)


def test_a_step_is_the_mean_of_its_messages_not_the_sum() -> None:
    """1/N: the same direction posted by 4 peers moves theta as far as posted once; 4 distinct
    directions move it by their mean; the coefficient is the same fp32 on every replica."""
    seed = spsa.seed_for("run", 1, "p")
    once, four = _params(), _params()
    spsa.apply(once, [(seed, 50)], 1e-2, 2.0)
    spsa.apply(four, [(seed, 50)] * 4, 1e-2, 2.0)
    assert spsa.state_hash(once) == spsa.state_hash(four)
    base, mean = _params(), _params()
    updates = [(spsa.seed_for("run", 1, f"p{i}"), c) for i, c in enumerate([5, -127, 64, 9])]
    spsa.apply(mean, updates, 1e-2, 2.0)
    want = [b.clone() for b in base]
    for s, c in updates:
        for tid, p in enumerate(want):
            z = spsa.rademacher(s, tid, p.numel()).to(torch.float64).reshape(p.shape)
            p.sub_((1e-2 * spsa.decode(c, 2.0) / 4 * z).to(torch.float32))
    for got, w in zip(mean, want, strict=True):
        torch.testing.assert_close(got, w, rtol=0, atol=1e-6)


def test_gaussian_is_reproducible_sliceable_and_standard_normal() -> None:
    seed = spsa.seed_for("run", 3, "p", 0)
    full = spsa.gaussian_fixed(seed, "layers.0.w", 200_001)
    assert full.dtype == torch.int32
    assert torch.equal(full, spsa.gaussian_fixed(seed, "layers.0.w", 200_001))
    cuts = [0, 1, 2, 3, 137, 1000, 4097, 200_001]  # odd starts split a Box-Muller pair
    parts = [spsa.gaussian_fixed(seed, "layers.0.w", b - a, start=a)
             for a, b in itertools.pairwise(cuts)]
    assert torch.equal(torch.cat(parts), full)
    far = 2**36 + 5
    tail = spsa.gaussian_fixed(seed, 7, 64, start=far - 11)
    assert torch.equal(spsa.gaussian_fixed(seed, 7, 53, start=far), tail[11:])
    z = full.to(torch.float64) / spsa.GAUSS_ONE
    n = z.numel()
    assert abs(z.mean().item()) < 5 / n**0.5  # 5 sigma
    assert abs(z.var().item() - 1) < 0.01
    assert abs((z**3).mean().item()) < 0.03
    assert abs((z**4).mean().item() - 3) < 0.06  # Gaussian kurtosis (Rademacher has 1)
    assert abs(((z > 1.96).double().mean().item()) - 0.025) < 0.002  # tail mass
    assert abs((z[1:] * z[:-1]).mean().item()) < 0.01  # pairs (cos, sin) are uncorrelated
    other = spsa.gaussian_fixed(seed, "layers.1.w", 200_001).to(torch.float64)
    assert abs((z * other).mean().item() / spsa.GAUSS_ONE) < 0.01
    assert z.abs().max().item() < 6.7


def test_gaussian_elements_match_a_plain_python_box_muller() -> None:
    """The libm-free polynomials agree with math.log/cos/sin to the fixed-point grid."""
    import math

    seed = spsa.seed_for("run", 9, "q", 1)
    k0, k1 = spsa._tensor_key(seed, "w")
    from optim.spsa_z import GAUSS_KEY
    got = spsa.gaussian_fixed(seed, "w", 2000).tolist()
    for i in range(0, 2000, 2):
        c = i  # counters 2k, 2k+1 of pair k = i // 2
        w1, w2 = (_fmix32_ref(_fmix32_ref((x & MASK) ^ k0) ^ (k1 ^ GAUSS_KEY))
                  for x in (c, c + 1))
        r = math.sqrt(-2 * math.log((w1 + 1) / 2**32))
        theta = 2 * math.pi * w2 / 2**32
        for d, v in ((0, r * math.cos(theta)), (1, r * math.sin(theta))):
            assert abs(got[i + d] - v * spsa.GAUSS_ONE) <= 0.5 + 1e-6, (i + d, got[i + d], v)


def test_gaussian_apply_is_order_free_and_matches_the_perturbation() -> None:
    updates = [(spsa.seed_for("run", 2, f"p{i}"), c) for i, c in enumerate([5, -127, 64, 1])]
    hashes = set()
    for order in range(4):
        params = _params()
        perm = list(updates)
        random.Random(order).shuffle(perm)
        spsa.apply(params, perm, 1e-2, 3.0, None, "gaussian")
        hashes.add(spsa.state_hash(params))
    assert len(hashes) == 1
    params = _params()
    seed = updates[0][0]
    saved = spsa.perturb(params, seed, 1.0, +1, None, "gaussian")
    for tid, (p, s) in enumerate(zip(params, saved, strict=True)):
        z = spsa.gaussian_fixed(seed, tid, p.numel()).to(torch.float32) / spsa.GAUSS_ONE
        torch.testing.assert_close(p.reshape(-1) - s.reshape(-1), z, rtol=0, atol=1e-6)
    with pytest.raises(Exception, match="perturbation"):
        spsa.SpsaConfig(perturbation="uniform")
