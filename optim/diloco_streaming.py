"""Streaming DiLoCo (Douillard et al. 2025, ALGORITHMS.md §6b): the model's parameters split in
P fragments that sync in turn, each overlapped with the next inner steps, then merged.

Exactly, with H inner steps between two syncs of one fragment and steps counted from 1:
- Fragments are P contiguous, near-equal ranges of the stage's flattened parameters (in
  `named_parameters` order; `fragment_ranges`). The paper groups whole layers; a block stage
  of two layers cannot make four equal groups, and every operation below is elementwise, so
  only which values sync when differs, and equal ranges make the peak bytes per sync 1/P of
  the model exactly.
- Schedule: fragment p syncs after inner step t when t % H == ((p + 1) * H / P) % H, so one
  fragment syncs every H / P steps and each fragment every H steps (`Schedule.fragment_at`).
  H must be a multiple of P (as in torchft's DiLoCo).
- At its sync step t, fragment p's pseudo-gradient delta_p = theta_global_p - theta_local_p is
  quantized and sent; its round runs while the next tau = `delay` inner steps compute
  (0 <= tau < H / P, so a fragment's round is merged before the next fragment's starts).
- After inner step t + tau, with the round's average avg_p:
      theta_global_p <- outer_step(theta_global_p, avg_p)      (SGD Nesterov, per-fragment state)
      theta_local_p  <- (1 - alpha) * theta_local_p + alpha * theta_global_p
  (`FragmentOuter.step`, `merge`). alpha = 1 is plain DiLoCo per fragment (the local copy
  restarts from the global one); the paper uses alpha = 0.5. torchft's `fragment_update_alpha`
  weighs the *local* side: theirs = 1 - ours.

Invariants: `FragmentOuter.step` on the same average from the same state leaves the global
fragment and its momentum bit-identical on every replica (torch ops in a fixed order; the same
bytes as `optim.diloco.OuterOptimizer` on those values); `merge` with alpha = 1 copies exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from optim.diloco import OuterConfig, OuterOptimizer
from optim.errors import ConfigError, ShapeMismatch

#: (parameter index, start, end) of a fragment within one flattened parameter
Piece = tuple[int, int, int]


@dataclass(frozen=True)
class Schedule:
    """When each of P fragments syncs (every H steps, staggered by H / P) and merges (tau later)."""

    inner_steps: int  # H
    fragments: int  # P
    delay: int = 1  # tau, inner steps between a fragment's sync and its merge
    alpha: float = 0.5  # weight of the global fragment in the merge

    def __post_init__(self) -> None:
        if self.fragments < 1:
            raise ConfigError(f"streaming fragments must be >= 1, got {self.fragments}")
        if self.inner_steps < self.fragments or self.inner_steps % self.fragments:
            raise ConfigError(f"inner_steps (H = {self.inner_steps}) must be a multiple of the "
                              f"fragments (P = {self.fragments}): one fragment syncs every H/P "
                              "steps")
        if not 0 <= self.delay < self.stride:
            raise ConfigError(f"streaming delay (tau = {self.delay}) must be in [0, H/P = "
                              f"{self.stride}): a fragment merges before the next one syncs")
        if not 0.0 < self.alpha <= 1.0:
            raise ConfigError(f"streaming alpha must be in (0, 1], got {self.alpha}; the "
                              "paper uses 0.5, 1 is plain DiLoCo per fragment")

    @property
    def stride(self) -> int:
        """Inner steps between two consecutive fragment syncs (H / P)."""
        return self.inner_steps // self.fragments

    def fragment_at(self, step: int) -> int | None:
        """The fragment that syncs after inner step `step` (>= 1), or None."""
        k = step % self.inner_steps
        if step < 1 or k % self.stride:
            return None
        return (k // self.stride - 1) % self.fragments

    def merge_at(self, step: int) -> int | None:
        """The step whose fragment round is merged after inner step `step`, or None."""
        start = step - self.delay
        return start if self.fragment_at(start) is not None else None


def fragment_ranges(numel: int, fragments: int) -> list[tuple[int, int]]:
    """P contiguous ranges [start, end) of a flat vector of `numel` values, sizes differing by at
    most one (the first `numel % P` ranges one longer)."""
    if fragments < 1 or numel < fragments:
        raise ConfigError(f"cannot split {numel} parameters into {fragments} fragments")
    base, extra = divmod(numel, fragments)
    out, start = [], 0
    for p in range(fragments):
        end = start + base + (1 if p < extra else 0)
        out.append((start, end))
        start = end
    return out


def pieces(sizes: Sequence[int], start: int, end: int) -> list[Piece]:
    """The parts of the flat range [start, end) in each parameter, as (index, a, b) with a, b
    offsets within that parameter's flattened values."""
    out: list[Piece] = []
    offset = 0
    for i, n in enumerate(sizes):
        a, b = max(start, offset), min(end, offset + n)
        if a < b:
            out.append((i, a - offset, b - offset))
        offset += n
    return out


def views(params: Sequence[Tensor], frag: Sequence[Piece]) -> list[Tensor]:
    """1-D views of `params` covering a fragment (in place: writing them writes the params)."""
    return [params[i].view(-1)[a:b] for i, a, b in frag]


def gather(params: Sequence[Tensor], frag: Sequence[Piece]) -> Tensor:
    """A fragment's values as one flat float32 tensor (a copy)."""
    return torch.cat([v.detach().to(torch.float32) for v in views(params, frag)])


class FragmentOuter:
    """The outer optimizer of one fragment: `OuterOptimizer` over the fragment's pieces, with
    its own momentum and step count (exported with `state_dict`)."""

    def __init__(self, frag: Sequence[Piece], config: OuterConfig | None = None) -> None:
        self.frag = list(frag)
        self.numel = sum(b - a for _, a, b in self.frag)
        self.outer = OuterOptimizer([torch.empty(b - a) for _, a, b in self.frag], config)

    @torch.no_grad()
    def step(self, global_params: Sequence[Tensor], avg: Tensor) -> None:
        """theta_global_p <- outer step with grad = `avg` (flat, the fragment's length)."""
        if avg.numel() != self.numel:
            raise ShapeMismatch(f"fragment average has {avg.numel()} values, the fragment "
                                f"{self.numel}")
        targets = views(global_params, self.frag)
        grads = list(torch.split(avg.reshape(-1), [t.numel() for t in targets]))
        self.outer.step(targets, grads)

    def state_dict(self) -> dict[str, Tensor]:
        return self.outer.state_dict()

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.outer.load_state_dict(state)


@torch.no_grad()
def merge(local_params: Sequence[Tensor], global_params: Sequence[Tensor],
          frag: Sequence[Piece], alpha: float) -> None:
    """theta_local_p <- (1 - alpha) * theta_local_p + alpha * theta_global_p, in place
    (alpha = 1: an exact copy)."""
    for loc, glob in zip(views(local_params, frag), views(global_params, frag), strict=True):
        g = glob.to(device=loc.device, dtype=loc.dtype)
        if alpha == 1.0:
            loc.copy_(g)
        else:
            loc.lerp_(g, alpha)
