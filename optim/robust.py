"""Deterministic, optionally robust averaging of the replicas' contributions to one sync round.

Used by the `allreduce` mode (dense gradients) and the `diloco` mode (pseudo-gradients); DeMo
reuses `Aggregate` to report its own decode. A contribution is one replica's list of tensors,
one per parameter of the stage, keyed by replica id.

Invariants:
- Bit-identical on every replica and every device: contributions are screened and combined in
  sorted replica-id order, the sum over replicas is a sequence of elementwise float64 adds (no
  reduction kernel whose order depends on threads or hardware), and norms are summed with a
  fixed pairwise tree of elementwise adds (`deterministic_sum`). The result is cast back to
  float32 once.
- Aggregation runs on the CPU (contributions arrive from the wire there); callers move the
  result to their device.
- Nothing is dropped silently: `Aggregate` lists the replicas it contains and, for each one it
  left out, why (non-finite values, wrong shapes, wrong tensor count, non-float dtype).
- Robust rules: `clipped_mean` bounds each replica's whole update to a global L2 norm (a fixed
  `max_norm`, or by default the median of the replicas' norms, so one huge sender cannot set
  the bound); `trimmed_mean` drops the `trim` largest and `trim` smallest values of every
  coordinate before averaging.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from optim.errors import ConfigError, NoContributions

Method = Literal["mean", "clipped_mean", "trimmed_mean"]
Shapes = tuple[tuple[int, ...], ...]


@dataclass
class Aggregate:
    """The combined update of one round and exactly which replicas it contains.

    Attributes:
        tensors: one tensor per parameter, float32 unless the caller's contract says otherwise
            (DeMo returns float64 decodes).
        included: replica ids that went into `tensors`, sorted.
        dropped: replica id -> reason, for every contribution that was screened out.
        method: the rule used ("mean", "clipped_mean", "trimmed_mean", "demo", ...).
        detail: parameters of the rule as applied (e.g. the clip norm or the trim actually used).
    """

    tensors: list[Tensor]
    included: tuple[str, ...]
    dropped: dict[str, str] = field(default_factory=dict)
    method: str = "mean"
    detail: str = ""

    @property
    def count(self) -> int:
        """How many replicas the aggregate actually contains."""
        return len(self.included)


def deterministic_sum(x: Tensor) -> float:
    """Sum all elements in float64 with a fixed pairwise tree; same bits on every device.

    Built only from elementwise adds of the two halves, so no thread split or vector width can
    change the order of summation.
    """
    v = x.detach().reshape(-1).to(torch.float64)
    if v.numel() == 0:
        return 0.0
    size = 1 << (v.numel() - 1).bit_length()
    if size != v.numel():
        v = torch.cat([v, v.new_zeros(size - v.numel())])
    while v.numel() > 1:
        half = v.numel() // 2
        v = v[:half] + v[half:]
    return float(v.item())


def global_norm(tensors: Sequence[Tensor]) -> float:
    """L2 norm over all tensors together (float64, deterministic; fp32 squares are exact)."""
    total = 0.0
    for t in tensors:
        t64 = t.detach().to(torch.float64)
        total += deterministic_sum(t64 * t64)
    return math.sqrt(total)


def mean(stack: Tensor) -> Tensor:
    """Mean over dim 0 of a [W, ...] stack, summed in index order in float64."""
    if stack.shape[0] == 0:
        raise NoContributions("mean of an empty stack; at least one contribution is needed")
    acc = stack[0].to(torch.float64).clone()
    for i in range(1, stack.shape[0]):
        acc += stack[i].to(torch.float64)
    return (acc / stack.shape[0]).to(stack.dtype)


def trimmed_mean(stack: Tensor, trim: int) -> Tensor:
    """Coordinate-wise mean of a [W, ...] stack after dropping `trim` values at each end.

    Needs W > 2*trim; `aggregate` lowers the trim for small groups and reports it.
    """
    w = stack.shape[0]
    if trim < 0 or w <= 2 * trim:
        raise ConfigError(
            f"trimmed_mean with trim={trim} needs more than {2 * trim} contributions, got {w}; "
            "lower the trim or wait for more replicas"
        )
    ordered = torch.sort(stack, dim=0).values
    return mean(ordered[trim : w - trim])


def clip_by_norm(tensors: Sequence[Tensor], max_norm: float) -> list[Tensor]:
    """Scale all tensors together so their global L2 norm is at most `max_norm` (copies)."""
    if not max_norm > 0.0:
        raise ConfigError(f"max_norm must be > 0, got {max_norm}")
    norm = global_norm(tensors)
    if norm <= max_norm:
        return [t.detach().clone() for t in tensors]
    factor = max_norm / norm
    return [t.detach() * factor for t in tensors]


def screen(
    contributions: Mapping[str, Sequence[Tensor]],
    shapes: Sequence[Sequence[int]] | None = None,
) -> tuple[list[str], list[Tensor], dict[str, str]]:
    """Validate contributions; return (ids, one [W, ...] float32 stack per tensor, dropped).

    Without `shapes`, the expected shapes are the most common signature among the
    contributions (ties go to the signature of the smallest replica id), so one bad replica
    cannot define them. Pass the stage's own shapes whenever they are known.
    """
    ids = sorted(contributions)
    if shapes is None:
        sigs = {rid: _signature(contributions[rid]) for rid in ids}
        counts = Counter(sigs.values())
        best = max(counts.values(), default=0)
        expected: Shapes = next((sigs[r] for r in ids if counts[sigs[r]] == best), ())
    else:
        expected = tuple(tuple(int(d) for d in s) for s in shapes)
    kept: list[str] = []
    dropped: dict[str, str] = {}
    for rid in ids:
        reason = _check(contributions[rid], expected)
        if reason:
            dropped[rid] = reason
        else:
            kept.append(rid)
    stacks = [
        torch.stack([contributions[rid][i].detach().to("cpu", torch.float32) for rid in kept])
        if kept
        else torch.zeros((0, *shape))
        for i, shape in enumerate(expected)
    ]
    return kept, stacks, dropped


def aggregate(
    contributions: Mapping[str, Sequence[Tensor]],
    method: Method = "mean",
    *,
    trim: int = 1,
    max_norm: float | None = None,
    shapes: Sequence[Sequence[int]] | None = None,
) -> Aggregate:
    """Combine the replicas' contributions with `method`; see the module docstring.

    Args:
        contributions: replica id -> list of tensors (one per parameter). Not mutated.
        method: "mean", "clipped_mean" or "trimmed_mean".
        trim: per side, for "trimmed_mean"; lowered to (W - 1) // 2 for small groups (reported
            in `detail`).
        max_norm: for "clipped_mean"; None means the median of the valid replicas' norms.
        shapes: the expected shape of each tensor; see `screen`.

    Raises:
        NoContributions: no contribution survived screening.
        ConfigError: unknown method or an invalid trim / max_norm.
    """
    if method not in ("mean", "clipped_mean", "trimmed_mean"):
        raise ConfigError(
            f"unknown aggregation method {method!r}; use mean|clipped_mean|trimmed_mean"
        )
    kept, stacks, dropped = screen(contributions, shapes)
    if not kept:
        raise NoContributions(
            f"no valid contribution among {len(contributions)} replicas "
            f"(dropped: {dropped}); skip this round and keep the current parameters"
        )
    if method == "mean":
        return Aggregate([mean(s) for s in stacks], tuple(kept), dropped, method)
    if method == "trimmed_mean":
        if trim < 0:
            raise ConfigError(f"trim must be >= 0, got {trim}")
        used = min(trim, (len(kept) - 1) // 2)
        tensors = [trimmed_mean(s, used) for s in stacks]
        return Aggregate(tensors, tuple(kept), dropped, method, f"trim={used} of {trim}")
    norms = [global_norm([s[i] for s in stacks]) for i in range(len(kept))]
    bound = _median(norms) if max_norm is None else max_norm
    if bound <= 0.0:  # the median update is zero: clipping to it leaves nothing
        tensors = [torch.zeros_like(s[0]) for s in stacks]
    else:
        rows = [clip_by_norm([s[i] for s in stacks], bound) for i in range(len(kept))]
        tensors = [mean(torch.stack([row[j] for row in rows])) for j in range(len(stacks))]
    return Aggregate(tensors, tuple(kept), dropped, method, f"max_norm={bound:.6g}")


def _signature(tensors: Sequence[Tensor]) -> Shapes:
    return tuple(tuple(t.shape) for t in tensors)


def _check(tensors: Sequence[Tensor], expected: Shapes) -> str:
    if len(tensors) != len(expected):
        return f"sent {len(tensors)} tensors, expected {len(expected)}"
    for i, (t, shape) in enumerate(zip(tensors, expected, strict=True)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            return f"tensor {i} is not a floating-point tensor"
        if tuple(t.shape) != shape:
            return f"tensor {i} has shape {tuple(t.shape)}, expected {shape}"
        if not bool(torch.isfinite(t).all()):
            return f"tensor {i} holds non-finite values"
    return ""


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    mid = n // 2
    return ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
