"""Shared-seed SPSA (MeZO + "Just One Byte"): one byte per (peer, step), forward passes only.

Per step each peer p evaluates L(theta + eps*z) and L(theta - eps*z) on its own batch, with z a
Rademacher vector drawn from seed = seed_for(run, step, p, j), and sends the one-byte code of
g = (L+ - L-) / (2 eps). Every replica applies every message of the step, regenerating z.
ALGORITHMS.md §4; every trap listed there is handled here:

- z is not torch.randn: optim/spsa_z.py draws it from a counter-based integer hash of (seed,
  tensor id, flat element index), as Rademacher +-1 (`rademacher`, the default) or as a Gaussian
  in fixed point (`gaussian_fixed`, Box-Muller without libm; `sync.spsa.perturbation`). Same
  values on CPU and CUDA, for any layout, and a stage can generate only its slice via `start`.
- Perturbation is undone by restoring saved copies (`perturb` returns them, `restore` copies
  them back), never by subtracting: +eps, -2eps, +eps does not return fp32 to the same bits.
- The byte is a linear int8 code on a scale every replica derives from the ledger:
  decode(code) = code * scale / 127. `Ledger.scale_at(step)` starts at `initial_scale` and after
  every recorded step with messages moves to
      clamp((1 - scale_ema) * scale + scale_ema * scale_factor * rms(decoded g of that step))
  using only Python float +, -, *, / and sqrt, which IEEE 754 rounds exactly, so every
  platform computes the same scale from the same ledger.
- `apply` sums code * z over all messages of the step in int32 (exact, order-free), then does
  ONE float multiply and ONE subtraction per element, kept as separate kernels (no FMA):
      theta <- theta - fl32(lr * scale / 127) * float32(acc)
  lr is per message, as in theta <- theta - lr*g*z of the papers (n-SPSA's linear scaling): with
  more peers per step, each step moves further; lower lr if that is too much.
- Master weights must be float32: `perturb` and `apply` refuse bf16/fp16 (an lr*g of 1e-6 is
  below half an ulp of a 0.05 weight there). Keep an fp32 copy and cast it for the forward.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from optim.errors import ConfigError, LedgerError, NonFiniteValues, PrecisionError
from optim.schedule import lr_factor
from optim.spsa_z import (
    GAUSS_ONE,
    MASK32,
    PERTURBATIONS,
    TensorId,
    check_perturbation,
    direction,
    direction_int,
    gaussian_fixed,
    rademacher,
    unit,
)
from optim.spsa_z import tensor_key as _tensor_key

__all__ = ["GAUSS_ONE", "MASK32", "PERTURBATIONS", "_tensor_key", "direction", "direction_int",
           "gaussian_fixed", "rademacher"]

BLOCK = 1 << 20  # elements generated at once: bounds the int64 scratch to ~8 MiB per buffer
CODE_MAX = 127


def seed_for(run_id: str, step: int, peer: str, j: int = 0) -> int:
    """The 64-bit seed of peer `peer`'s j-th direction at `step` (blake2b, unambiguous framing)."""
    h = hashlib.blake2b(digest_size=8, person=b"shoal-spsa-seed")
    for part in (run_id.encode(), peer.encode()):
        h.update(len(part).to_bytes(4, "little"))
        h.update(part)
    h.update(step.to_bytes(8, "little", signed=True))
    h.update(j.to_bytes(4, "little", signed=True))
    return int.from_bytes(h.digest(), "little")


def _ids(params: Sequence[Tensor], tensor_ids: Sequence[TensorId] | None) -> Sequence[TensorId]:
    if tensor_ids is None:
        return range(len(params))
    if len(tensor_ids) != len(params):
        raise ConfigError(f"{len(tensor_ids)} tensor ids for {len(params)} parameters")
    return tensor_ids


def _require_fp32(params: Sequence[Tensor]) -> None:
    for i, p in enumerate(params):
        if p.dtype != torch.float32:
            raise PrecisionError(
                f"parameter {i} is {p.dtype}; SPSA updates vanish below half an ulp of bf16/fp16. "
                "Keep float32 master weights (fp32_master) and cast a copy for the forward"
            )
        if not p.is_contiguous():
            raise ConfigError(f"parameter {i} is not contiguous; z is defined on the flat index")


def fp32_master(params: Sequence[Tensor]) -> list[Tensor]:
    """float32 copies of `params` to serve as SPSA master weights."""
    return [p.detach().to(torch.float32).contiguous().clone() for p in params]


@torch.no_grad()
def perturb(
    params: Sequence[Tensor],
    seed: int,
    eps: float,
    sign: int,
    tensor_ids: Sequence[TensorId] | None = None,
    perturbation: str = "rademacher",
) -> list[Tensor]:
    """theta <- theta + sign*eps*z in place; returns exact copies of the old values (`restore`)."""
    if sign not in (1, -1):
        raise ConfigError(f"sign must be +1 or -1, got {sign}")
    _require_fp32(params)
    saved = [p.detach().clone() for p in params]
    step = float(sign * eps)
    for p, tid in zip(params, _ids(params, tensor_ids), strict=True):
        flat = p.view(-1)
        for start in range(0, flat.numel(), BLOCK):
            n = min(BLOCK, flat.numel() - start)
            z = direction(perturbation, seed, tid, n, start, flat.device)
            flat[start : start + n].add_(z * step)
    return saved


@torch.no_grad()
def restore(params: Sequence[Tensor], saved: Sequence[Tensor]) -> None:
    """Copy the saved values back: the parameters get exactly their old bits."""
    for p, s in zip(params, saved, strict=True):
        p.copy_(s)


@contextmanager
def perturbed(
    params: Sequence[Tensor],
    seed: int,
    eps: float,
    sign: int,
    tensor_ids: Sequence[TensorId] | None = None,
    perturbation: str = "rademacher",
) -> Iterator[None]:
    """`with perturbed(params, seed, eps, +1): loss = f()` perturbs, then restores exactly."""
    saved = perturb(params, seed, eps, sign, tensor_ids, perturbation)
    try:
        yield
    finally:
        restore(params, saved)


def projected_gradient(loss_plus: float, loss_minus: float, eps: float) -> float:
    """g = (L+ - L-) / (2 eps): the directional derivative along z."""
    g = (float(loss_plus) - float(loss_minus)) / (2.0 * eps)
    if not math.isfinite(g):
        raise NonFiniteValues(f"projected gradient is {g} (losses {loss_plus}, {loss_minus}); "
                              "do not send this step's message")
    return g


def dither_for(seed: int) -> float:
    """A uniform [0, 1) dither derived from the seed, for auditable stochastic rounding."""
    d = hashlib.blake2b(seed.to_bytes(8, "little"), digest_size=8, person=b"shoal-spsa-dith")
    return (int.from_bytes(d.digest(), "little") >> 11) / float(1 << 53)


def encode(g: float, scale: float, dither: float | None = None) -> int:
    """One-byte linear code of g: round(g * 127 / scale) clamped to [-127, 127].

    With `dither` (e.g. `dither_for(seed)`), rounding is floor(x + dither): unbiased.
    """
    if not math.isfinite(g):
        raise NonFiniteValues(f"cannot encode non-finite g={g}")
    if not scale > 0.0:
        raise ConfigError(f"scale must be > 0, got {scale}")
    x = g * CODE_MAX / scale
    q = round(x) if dither is None else math.floor(x + dither)
    return max(-CODE_MAX, min(CODE_MAX, int(q)))


def decode(code: int, scale: float) -> float:
    """The value a code stands for: code * scale / 127."""
    return code * scale / CODE_MAX


@torch.no_grad()
def apply(
    params: Sequence[Tensor],
    updates: Sequence[tuple[int, int]],
    lr: float,
    scale: float,
    tensor_ids: Sequence[TensorId] | None = None,
    perturbation: str = "rademacher",
) -> None:
    """Apply one step's N messages, given as (seed, code) pairs, in place: theta -= lr times the
    mean of g*z over them (1/N); order does not matter."""
    _require_fp32(params)
    if not (math.isfinite(scale) and scale > 0.0):
        raise ConfigError(f"scale must be finite and > 0, got {scale}; take it from the ledger")
    for _, code in updates:
        if not -CODE_MAX <= code <= CODE_MAX:
            raise ConfigError(f"code {code} is outside [-127, 127]")
    if not updates:
        return
    acc_dtype = torch.int32 if check_perturbation(perturbation) == "rademacher" else torch.int64
    coeff = torch.tensor(lr * scale / CODE_MAX / len(updates) / unit(perturbation),
                         dtype=torch.float32)
    for p, tid in zip(params, _ids(params, tensor_ids), strict=True):
        flat = p.view(-1)
        for start in range(0, flat.numel(), BLOCK):
            n = min(BLOCK, flat.numel() - start)
            acc = torch.zeros(n, dtype=acc_dtype, device=flat.device)
            for seed, code in updates:
                acc += direction_int(perturbation, seed, tid, n, start, flat.device
                                     ).to(acc_dtype) * code
            delta = acc.to(torch.float32) * coeff.to(flat.device)
            flat[start : start + n].sub_(delta)


def state_hash(params: Sequence[Tensor]) -> str:
    """sha256 over every tensor's dtype, shape and exact bytes, in the order given."""
    h = hashlib.sha256()
    for t in params:
        c = t.detach().cpu().contiguous()
        h.update(f"{c.dtype}{tuple(c.shape)}".encode())
        h.update(c.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class SpsaConfig:
    """SPSA hyperparameters and the ledger's scale rule.

    MeZO's LLM fine-tuning used eps 1e-3 and lr 1e-6..1e-7; the default lr here is sized for
    small models (it visibly learns a toy regression) and should come from the run spec.
    """

    lr: float = 1e-3
    eps: float = 1e-3
    initial_scale: float = 1.0
    scale_ema: float = 0.1
    scale_factor: float = 3.0
    min_scale: float = 1e-6
    max_scale: float = 1e6
    perturbation: str = "rademacher"  # or "gaussian" (optim/spsa_z.py)
    # lr's schedule (optim/schedule.py): (warmup, decay, total, final); step t applies
    # lr x lr_factor(t, ...), the same float on every replica and in every replay
    schedule: tuple[int, str, int, float] = (0, "constant", 0, 0.1)

    def lr_at(self, step: int) -> float:
        return self.lr * lr_factor(step, *self.schedule)

    def __post_init__(self) -> None:
        check_perturbation(self.perturbation)
        if not (self.lr > 0 and self.eps > 0):
            raise ConfigError(f"lr and eps must be > 0, got {self.lr}, {self.eps}")
        if not 0 < self.min_scale <= self.initial_scale <= self.max_scale:
            raise ConfigError("need 0 < min_scale <= initial_scale <= max_scale")
        if not (0.0 <= self.scale_ema <= 1.0 and self.scale_factor > 0):
            raise ConfigError("scale_ema must be in [0, 1] and scale_factor > 0")


@dataclass(frozen=True)
class Message:
    """One ledger entry: peer `peer`'s code for its j-th direction at `step`."""

    step: int
    peer: str
    code: int
    j: int = 0


class Ledger:
    """The ordered record of every closed step's messages, and the scale derived from it.

    Steps are recorded whole (the coordinator fixes each step's message set) and in increasing
    order; a step never recorded counts as empty and leaves the scale unchanged. `compact(s)`
    forgets steps before s but keeps the scale they led to, so a snapshot taken at step s plus
    the compacted ledger (or `Ledger(run_id, config, base_step=s, base_scale=...)` rebuilt from
    the wire) reproduces every later step.
    """

    def __init__(self, run_id: str, config: SpsaConfig | None = None, base_step: int = 0,
                 base_scale: float | None = None) -> None:
        self.run_id = run_id
        self.config = config or SpsaConfig()
        self.base_step = base_step
        self.base_scale = self.config.initial_scale if base_scale is None else base_scale
        self._order: list[int] = []  # recorded steps, increasing
        self._steps: dict[int, tuple[Message, ...]] = {}
        self._scale: dict[int, float] = {}  # scale the codes of a recorded step use
        self._after: dict[int, float] = {}  # scale once that step is recorded
        self._next_step = base_step

    @property
    def next_step(self) -> int:
        """The first step not yet recorded."""
        return self._next_step

    def record(self, step: int, messages: Sequence[Message]) -> None:
        """Record the complete message set of `step` (may be empty)."""
        if step < self._next_step:
            raise LedgerError(f"step {step} is already closed (next is {self._next_step}); "
                              "a step's message set cannot change once recorded")
        seen: set[tuple[str, int]] = set()
        for m in messages:
            if m.step != step:
                raise LedgerError(f"message for step {m.step} recorded under step {step}")
            if not -CODE_MAX <= m.code <= CODE_MAX:
                raise LedgerError(f"code {m.code} from {m.peer} is outside [-127, 127]")
            if (m.peer, m.j) in seen:
                raise LedgerError(f"duplicate message from {m.peer} (j={m.j}) at step {step}")
            seen.add((m.peer, m.j))
        scale = self.scale_at(self._next_step)
        new = scale
        if messages:
            cfg = self.config
            mean_sq = sum(decode(m.code, scale) ** 2 for m in messages) / len(messages)
            target = cfg.scale_factor * math.sqrt(mean_sq)
            new = (1.0 - cfg.scale_ema) * scale + cfg.scale_ema * target
            new = min(cfg.max_scale, max(cfg.min_scale, new))
        self._order.append(step)
        self._steps[step] = tuple(sorted(messages, key=lambda m: (m.peer, m.j)))
        self._scale[step], self._after[step] = scale, new
        self._next_step = step + 1

    def scale_at(self, step: int) -> float:
        """The scale the codes of `step` use; needs every earlier step recorded."""
        if step < self.base_step:
            raise LedgerError(f"step {step} is before the ledger's base step {self.base_step}")
        if step > self._next_step:
            raise LedgerError(f"scale of step {step} needs steps up to {step - 1} recorded; "
                              f"the ledger has up to {self._next_step - 1}: catch up first")
        if step in self._scale:
            return self._scale[step]
        i = bisect.bisect_left(self._order, step)  # latest recorded step before `step`
        return self._after[self._order[i - 1]] if i else self.base_scale

    def messages(self, step: int) -> tuple[Message, ...]:
        """The recorded messages of `step`, sorted by (peer, j); empty if none."""
        return self._steps.get(step, ())

    def updates(self, step: int) -> list[tuple[int, int]]:
        """(seed, code) pairs of `step`, ready for `apply`."""
        return [(seed_for(self.run_id, m.step, m.peer, m.j), m.code) for m in self.messages(step)]

    def apply_step(self, params: Sequence[Tensor], step: int,
                   tensor_ids: Sequence[TensorId] | None = None) -> None:
        """Apply the recorded messages of `step` with the ledger's lr (as scheduled at `step`)
        and scale."""
        apply(params, self.updates(step), self.config.lr_at(step), self.scale_at(step), tensor_ids,
              self.config.perturbation)

    def replay(self, params: Sequence[Tensor], from_step: int, to_step: int | None = None,
               tensor_ids: Sequence[TensorId] | None = None) -> None:
        """Apply recorded steps [from_step, to_step) to a snapshot taken at `from_step`."""
        end = self._next_step if to_step is None else to_step
        if from_step < self.base_step or end > self._next_step:
            raise LedgerError(f"replay [{from_step}, {end}) is outside the ledger's "
                              f"[{self.base_step}, {self._next_step})")
        for step in self._order:
            if from_step <= step < end:
                self.apply_step(params, step, tensor_ids)

    def compact(self, before_step: int) -> None:
        """Forget steps < before_step (a snapshot at `before_step` now stands in for them)."""
        if not self.base_step <= before_step <= self._next_step:
            raise LedgerError(f"cannot compact to {before_step}: the ledger covers "
                              f"[{self.base_step}, {self._next_step}]")
        self.base_scale = self.scale_at(before_step)
        self.base_step = before_step
        self._order = [s for s in self._order if s >= before_step]
        keep = set(self._order)
        self._steps = {s: v for s, v in self._steps.items() if s in keep}
        self._scale = {s: v for s, v in self._scale.items() if s in keep}
        self._after = {s: v for s, v in self._after.items() if s in keep}
