"""CheckFree / CheckFree+ recovery math (Blagoev et al. 2025; ALGORITHMS.md §3).

A block stage with no live replica left is rebuilt from its neighbours' weights:
    W[s] = (w_prev * W[s-1] + w_next * W[s+1]) / (w_prev + w_next)
with w the neighbour's most recent gradient norm *after clipping* (`post_clip_norm`: the
reference measures each stage's norm after clipping it at max-norm 1.0, so the rule is a uniform
average while norms exceed the clip) plus `norm_floor` (1e-4, as the reference code does so the
weights never sum to zero). The rebuilt stage gets a fresh optimizer state and its learning rate
multiplied by `lr_boost` (1.1; the paper used 1.1-1.2) for the rest of the run.
CheckFree+ stages that the odd-microbatch swaps train to stand in for each other are copies of
their swap partner instead (peer/pipeline/paths.py's `checkfree_swap_pairs` is the rule: 1<->2
and S-1<->S; at S = 3 both edge stages swap with stage 2 on alternate odd microbatches, so stage
1 or 3 is a copy of stage 2, and stage 2, trained in by both, is their weighted average, or a
copy of the one left). Stage 0 (embedding, final norm, tied head) is rebuilt from the copy of it
that the first and last block stages keep under CheckFree+ (`EDGE_COPY_KEYS`,
`stage_zero_from_edge_copy`). `plan_recovery` says which rule applies to a loss.

Key mapping. Stage s-1 and s+1 name their layers differently ("layers.3.attn.wq.weight" vs
"layers.7.attn.wq.weight"). `canonical_keys` replaces the first purely numeric component of a
name by the layer's position within the stage (its rank among the stage's layer indices), so
both become "layers.0.attn.wq.weight"; names without a numeric component (e.g. a stage-level
"norm.weight") are kept as they are. Two states match when their canonical keys and shapes
match; the result is keyed by the lost stage's own names when `like` gives them.

Invariants: neighbours are never mutated; averaging is elementwise in float64, cast once to the
target dtype (same bits on every machine); non-finite or negative gradient norms fall back to
the uniform average and say so in `Recovery.note`; non-finite neighbour weights are refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from optim.errors import ConfigError, NonFiniteValues, ShapeMismatch, StateMismatch

StageState = Mapping[str, Tensor]
Like = Mapping[str, Tensor] | Iterable[str] | None


def post_clip_norm(norm: float, max_norm: float | None) -> float:
    """The gradient norm after `torch.nn.utils.clip_grad_norm_(…, max_norm)` scaled the gradient
    whose pre-clip norm is `norm` (which is what that call returns, and what a peer records):
    norm * min(1, max_norm / (norm + 1e-6)). `max_norm` None or <= 0: no clipping. NaN stays NaN
    (weighted_average then falls back to uniform)."""
    norm = float(norm)
    if max_norm is None or max_norm <= 0 or not math.isfinite(norm) or norm < 0:
        return norm
    return norm * min(1.0, max_norm / (norm + 1e-6))


@dataclass(frozen=True)
class CheckFreeConfig:
    """Recovery constants: the LR boost of a rebuilt stage and the floor added to norms."""

    lr_boost: float = 1.1
    norm_floor: float = 1e-4

    def __post_init__(self) -> None:
        if not 1.0 <= self.lr_boost <= 2.0:
            raise ConfigError(f"lr_boost must be in [1.0, 2.0], got {self.lr_boost}; "
                              "CheckFree used 1.1-1.2")
        if self.norm_floor < 0.0:
            raise ConfigError(f"norm_floor must be >= 0, got {self.norm_floor}")


LR_BOOST = CheckFreeConfig().lr_boost


def boosted_lr(lr: float, config: CheckFreeConfig | None = None) -> float:
    """The learning rate a rebuilt stage uses from now on."""
    return lr * (config or CheckFreeConfig()).lr_boost


@dataclass
class Recovery:
    """A rebuilt stage state and how it was made.

    Attributes:
        state: name -> tensor, keyed by the lost stage's names (or canonical keys).
        method: "weighted", "uniform", "copy" or "random".
        weights: (w_prev, w_next) actually used, for averages.
        note: why a fallback happened; empty when the requested rule applied.
    """

    state: dict[str, Tensor]
    method: str
    weights: tuple[float, float] | None = None
    note: str = ""


def canonical_keys(names: Iterable[str]) -> dict[str, str]:
    """canonical key -> original name, with layer indices replaced by in-stage positions."""
    names = list(names)
    split = [n.split(".") for n in names]
    first = [next((i for i, part in enumerate(p) if part.isdigit()), None) for p in split]
    layers = sorted({int(p[i]) for p, i in zip(split, first, strict=True) if i is not None})
    position = {layer: pos for pos, layer in enumerate(layers)}
    out: dict[str, str] = {}
    for name, parts, i in zip(names, split, first, strict=True):
        key = name if i is None else ".".join([*parts[:i], str(position[int(parts[i])]),
                                               *parts[i + 1:]])
        if key in out:
            raise StateMismatch(f"{name!r} and {out[key]!r} map to the same key {key!r}")
        out[key] = name
    return out


def weighted_average(
    prev_state: StageState,
    next_state: StageState,
    w_prev: float,
    w_next: float,
    like: Like = None,
    config: CheckFreeConfig | None = None,
) -> Recovery:
    """CheckFree: gradient-norm weighted average of the two neighbours' states.

    Args:
        prev_state, next_state: stage s-1 and s+1 (not mutated).
        w_prev, w_next: their last gradient norms; NaN/inf/negative falls back to uniform.
        like: the lost stage's own state dict (names, shapes, dtypes) or just its names.

    Raises:
        StateMismatch: the neighbours (or `like`) do not have the same layers.
        ShapeMismatch: a tensor's shape differs between them.
        NonFiniteValues: a neighbour's weights hold NaN/inf.
    """
    cfg = config or CheckFreeConfig()
    note = ""
    ws = (float(w_prev), float(w_next))
    if all(math.isfinite(w) and w >= 0.0 for w in ws):
        a, b = ws[0] + cfg.norm_floor, ws[1] + cfg.norm_floor
        method = "weighted"
        if a + b <= 0.0:
            a, b, method, note = 1.0, 1.0, "uniform", "both gradient norms are zero"
    else:
        a, b, method, note = 1.0, 1.0, "uniform", f"unusable gradient norms {ws}"
    prev_c, next_c = _canonical(prev_state), _canonical(next_state)
    if set(prev_c) != set(next_c):
        raise StateMismatch(
            f"neighbours differ in layers: only in s-1 {sorted(set(prev_c) - set(next_c))}, "
            f"only in s+1 {sorted(set(next_c) - set(prev_c))}; they cannot be averaged, "
            "use copy_neighbor or a snapshot"
        )
    total = a + b
    out: dict[str, Tensor] = {}
    for key, p in prev_c.items():
        n = next_c[key]
        if p.shape != n.shape:
            raise ShapeMismatch(f"{key}: s-1 has {tuple(p.shape)}, s+1 has {tuple(n.shape)}")
        if not p.is_floating_point():
            out[key] = p.detach().clone()
            continue
        if not (bool(torch.isfinite(p).all()) and bool(torch.isfinite(n).all())):
            raise NonFiniteValues(f"{key}: a neighbour's weights hold NaN/inf; "
                                  "rebuild from a snapshot instead")
        mixed = (p.detach().to(torch.float64) * a + n.detach().to(torch.float64) * b) / total
        out[key] = mixed.to(p.dtype)
    return Recovery(_rename(out, like), method, (a, b), note)


def uniform_average(prev_state: StageState, next_state: StageState, like: Like = None) -> Recovery:
    """The 0.5/0.5 average of the neighbours (CheckFree's ablation; also the fallback)."""
    rec = weighted_average(prev_state, next_state, 1.0, 1.0, like, CheckFreeConfig(norm_floor=0))
    rec.method = "uniform"
    return rec


def copy_neighbor(state: StageState, like: Like = None) -> Recovery:
    """A copy of one neighbour (CheckFree+ edge stages; adjacent losses without a snapshot)."""
    out = {k: v.detach().clone() for k, v in _canonical(state).items()}
    return Recovery(_rename(out, like), "copy")


def default_init(name: str, t: Tensor, gen: torch.Generator) -> None:
    """Matrices ~ N(0, 0.02) (GPT-style); vectors keep the template's values (norm gains)."""
    if t.is_floating_point() and t.dim() >= 2:
        t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32) * 0.02)


def random_reinit(
    like: Mapping[str, Tensor],
    init: Callable[[str, Tensor, torch.Generator], None] = default_init,
    seed: int = 0,
) -> Recovery:
    """A fresh random stage shaped like `like` (the baseline CheckFree beats: ppl 121 vs 22.6).

    `init(name, tensor, generator)` fills each copied tensor in place, in sorted-name order.
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for name in sorted(like):
        t = like[name].detach().clone()
        init(name, t, gen)
        out[name] = t
    return Recovery(out, "random")


# CheckFree+ copies of stage 0 on the edge block stages (peer/pipeline/model.py's EDGE_COPY_KEYS)
# and the stage-0 parameters they stand for.
EDGE_COPY_OF = {"edge_embedding": "embedding.weight", "edge_norm": "norm.weight"}


def stage_zero_from_edge_copy(edge_state: StageState, like: Like = None) -> Recovery:
    """CheckFree+: stage 0's parameters from an edge block stage's copy of them (its
    `edge_embedding` and `edge_norm` buffers), checked against stage 0's own (`like`).

    Raises:
        StateMismatch: the state holds no copy of stage 0 (not an edge stage, or CheckFree+ off).
        ShapeMismatch: a copy's shape differs from stage 0's.
        NonFiniteValues: a copy holds NaN/inf.
    """
    missing = sorted(k for k in EDGE_COPY_OF if k not in edge_state)
    if missing:
        raise StateMismatch(f"the stage holds no copy of stage 0 (no {missing}): only the first "
                            "and last block stages keep one, under CheckFree+")
    out: dict[str, Tensor] = {}
    for key, name in EDGE_COPY_OF.items():
        t = edge_state[key].detach()
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteValues(f"{key}: the copy of stage 0 holds NaN/inf")
        if isinstance(like, Mapping):
            if name not in like:
                raise StateMismatch(f"stage 0 has no {name!r}: {sorted(like)}")
            if like[name].shape != t.shape:
                raise ShapeMismatch(f"{name}: the copy has {tuple(t.shape)}, stage 0 has "
                                    f"{tuple(like[name].shape)}")
            t = t.to(like[name].dtype)
        out[name] = t.clone()
    return Recovery(out, "copy")


Method = Literal["copy_replica", "weighted_average", "copy_neighbor", "edge_copy", "snapshot"]


@dataclass(frozen=True)
class RecoveryPlan:
    """Which rule rebuilds a lost stage and from which stages (block stages are 1..S)."""

    method: Method
    sources: tuple[int, ...] = ()
    lr_boost: bool = False
    note: str = ""


def plan_recovery(
    stage: int,
    n_stages: int,
    alive: Collection[int],
    replica_alive: bool = False,
    checkfree_plus: bool = True,
) -> RecoveryPlan:
    """Choose the recovery rule for lost stage `stage` (0..S) given the block stages alive.

    A surviving replica is copied (ordinary state transfer). Stage 0 (CheckFree+ only) is the
    copy of it kept by stage 1, else by stage S ("edge_copy"). With CheckFree+, a stage the swaps
    trained one partner to stand in for copies it (1<->2, S-1<->S; at S = 3, 1 and 3 copy 2);
    a stage with two such partners (stage 2 at S = 3) averages them, or copies the one left;
    other stages average s-1 and s+1. When the sources are gone too (adjacent losses), the
    plan is "snapshot" and `sources` names the nearest live neighbour to copy if there is none.
    """
    if stage == 0 and n_stages >= 1:
        if replica_alive:
            return RecoveryPlan("copy_replica")
        holders = tuple(s for s in dict.fromkeys((1, n_stages)) if s in alive)
        if checkfree_plus and holders:
            return RecoveryPlan("edge_copy", holders, True)
        why = ("CheckFree+ is off, so no block stage keeps a copy of it" if not checkfree_plus
               else f"stages {sorted({1, n_stages})}, which keep its copy, were lost too")
        return RecoveryPlan("snapshot", (), False,
                            f"stage 0: {why}; restore the newest snapshot, else initial weights")
    if not 1 <= stage <= n_stages:
        raise ConfigError(f"stage {stage} is not a stage of 0..{n_stages}")
    if replica_alive:
        return RecoveryPlan("copy_replica")
    partners = checkfree_stand_ins(stage, n_stages) if checkfree_plus else ()
    live_partners = tuple(p for p in partners if p in alive)
    if len(partners) == 1 and live_partners:
        return RecoveryPlan("copy_neighbor", live_partners, True)
    if len(partners) == 2 and len(live_partners) == 1:
        return RecoveryPlan("copy_neighbor", live_partners, True)
    if len(partners) != 1 and 1 < stage < n_stages and {stage - 1, stage + 1} <= set(alive):
        return RecoveryPlan("weighted_average", (stage - 1, stage + 1), True)
    partner = partners[0] if partners else None
    nearest = sorted((s for s in alive if 1 <= s <= n_stages and s != stage),
                     key=lambda s: (abs(s - stage), s))
    why = ("an edge stage cannot be averaged (CheckFree+ is off)"
           if partner is None and stage in (1, n_stages)
           else "its neighbours were lost too, so it cannot be rebuilt from them")
    return RecoveryPlan("snapshot", tuple(nearest[:1]), bool(nearest),
                        f"stage {stage}: {why}; restore the newest snapshot, else copy "
                        f"{nearest[:1] or 'nothing: no stage alive'}")


def checkfree_swap_pairs(n_stages: int, microbatch: int) -> tuple[tuple[int, int], ...]:
    """CheckFree+: the (s, s+1) block-stage pairs run swapped on `microbatch`.

    Even microbatches: none. Odd ones: (1, 2) and (S-1, S) for S >= 4; alternately (1, 2) and
    (2, 3) for S = 3; (1, 2) for S = 2; none for S < 2. The one rule: the planner swaps by it
    (peer/pipeline/paths.py), recovery here pairs the stages it trains to stand in for each
    other, and the coordinator (coordinator/assignment.py, which cannot import optim/) follows
    it too (tests/peer/test_checkfree_pairing.py holds all three to it).
    """
    if microbatch % 2 == 0 or n_stages < 2:
        return ()
    if n_stages == 2:
        return ((1, 2),)
    if n_stages == 3:
        return ((1, 2),) if microbatch % 4 == 1 else ((2, 3),)
    return ((1, 2), (n_stages - 1, n_stages))


def checkfree_stand_ins(stage: int, n_stages: int) -> tuple[int, ...]:
    """The block stages that the CheckFree+ swaps train to run in `stage`'s place (sorted): the
    stages it is swapped with on some microbatch. Empty for stages that are never swapped."""
    pairs = {p for mb in (1, 3) for p in checkfree_swap_pairs(n_stages, mb)}
    return tuple(sorted({b if a == stage else a for a, b in pairs if stage in (a, b)}))


def _canonical(state: StageState) -> dict[str, Tensor]:
    return {key: state[name] for key, name in canonical_keys(state).items()}


def _rename(state: dict[str, Tensor], like: Like) -> dict[str, Tensor]:
    if like is None:
        return state
    target = canonical_keys(like)
    if set(target) != set(state):
        raise StateMismatch(
            f"the lost stage's layers do not match its neighbours': missing "
            f"{sorted(set(target) - set(state))}, extra {sorted(set(state) - set(target))}"
        )
    out: dict[str, Tensor] = {}
    for key, name in target.items():
        t = state[key]
        if isinstance(like, Mapping):
            ref = like[name]
            if ref.shape != t.shape:
                raise ShapeMismatch(f"{name}: rebuilt {tuple(t.shape)}, stage has "
                                    f"{tuple(ref.shape)}")
            t = t.to(ref.dtype)
        out[name] = t
    return out
