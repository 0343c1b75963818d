"""The learning rate an optimizer of this run uses at a step: its base rate times its schedule's
factor (optim/schedule.py; the schedules are keyed in the run spec, e.g. "optim.schedule")."""

from __future__ import annotations

from optim.schedule import lr_factor
from protocols.runspec import RunSpec


def factor(spec: RunSpec, key: str, step: int) -> float:
    """The schedule `key`'s multiplier at optimizer step `step` (1-based): the same float on
    every replica, so replicas that apply the same update stay bit-identical."""
    sched, total = spec.schedule(key)
    return lr_factor(step, sched.warmup_steps, sched.decay, total, sched.final)
