"""Learning-rate schedules: linear warm-up, then constant, cosine or linear decay.

`lr_factor(step, ...)` is the multiplier of an optimizer's base learning rate at optimizer step
`step` (1 for the first step; a DiLoCo outer optimizer counts its outer rounds). It is pure float
arithmetic on integers, so every replica computes the same factor bit for bit, whatever its
device, and a replica that replays or re-downloads lands on the same value as the others.

- warm-up: `warmup` steps rising linearly, step/warmup (so the first step is not at zero);
- then `decay` over the rest of `total` steps: "constant" (1), "cosine" (from 1 down to
  `final` along half a cosine), or "linear" (from 1 down to `final`); past `total`, `final`.

The usual LLM recipe is warm-up then cosine to 10 % (`final` = 0.1); DiLoCo keeps its outer
learning rate constant and schedules the inner one. The run spec validates the parameters
(protocols/runspec.py `ScheduleSection`); the peer reads them through peer/pipeline/lr.py.
"""

from __future__ import annotations

import math


def lr_factor(step: int, warmup: int = 0, decay: str = "constant", total: int = 0,
              final: float = 0.1) -> float:
    """The base learning rate's multiplier at optimizer step `step` (1-based)."""
    step = max(1, step)
    if step <= warmup:
        return step / warmup
    if decay == "constant":
        return 1.0
    span = total - warmup
    done = min(1.0, (step - warmup) / span)
    if decay == "cosine":
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * done))
    return 1.0 - (1.0 - final) * done
