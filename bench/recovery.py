"""`python -m bench.recovery`: how well each rule rebuilds a lost stage: stage 0 and a middle one.

CheckFree (ALGORITHMS.md §3) rebuilds a block stage that lost every replica from its two
neighbours, weighted by their last (post-clip) gradient norms; CheckFree+ rebuilds stage 0 (the
embedding, final norm and tied head) from the copy of it that block stages 1 and S keep,
refreshed every `REFRESH_EVERY_STEPS` (5) steps (peer/recovery/edge_copy.py). This bench measures
recovery *quality*, not transport, so it runs in one process: the real model
(peer/pipeline/model.py, cut by ``split``), the real corpus loader (peer/pipeline/data.py) and the
real recovery math (optim/checkfree.py: ``plan_recovery``, ``weighted_average``,
``post_clip_norm``, ``uniform_average``, ``copy_neighbor``, ``stage_zero_from_edge_copy``,
``random_reinit``, ``boosted_lr``).

What one seed does:

1. The trunk trains the pipeline (stage 0 plus S block stages, one AdamW per stage with the
   peer's betas, each stage's gradient clipped on its own and its pre-clip norm recorded, as
   ``StageHost.apply_gradient`` does; stage 0's copy refreshed every 5 steps, as an edge stage
   does) for ``--steps`` steps. Batch ``i`` is a pure function of (shard, seed, i), so every arm
   sees the same bytes in the same order. The trunk itself is the **no-failure** arm.
2. At ``--fail-at`` F the trunk is snapshotted just before step F's first microbatch: the moment
   the lost stage's weights and optimizer state vanish.
3. For each lost stage in ``--lost`` and each rule, an arm starts from a copy of that snapshot,
   replaces the lost stage's weights, gives it a fresh AdamW at ``boosted_lr`` (x1.1, every arm
   alike, so the arms differ only in the weights), and trains steps F..N-1 on the same batches:
   - a middle block stage s: ``checkfree`` (``weighted_average`` of s-1 and s+1 by their step
     F-1 post-clip gradient norms), ``uniform`` (``uniform_average``), ``copy`` (of s-1: the
     reference code's naive baseline), ``random`` (``random_reinit``: matrices ~ N(0, 0.02));
   - stage 0: ``checkfree+`` (the edge stages' copy, up to 4 steps old at F) and ``random``
     (a fresh embedding, norm gains 1: what a holder with nothing to recover from gets).
   ``none`` (not run by default) branches from the snapshot and replaces nothing: it must end
   bit-identical to the no-failure trunk, which checks that branching changes nothing by itself.
4. Every arm is evaluated on the same held-out batches (mean loss over ``--eval-batches``) right
   after the rebuild (the jump), ``--early`` steps later, and at the end, each as a gap to the
   no-failure arm at the same step, averaged over the seeds. A reference row gives the jump of
   skipping a lost middle stage altogether (SkipPipe's way round a missing stage).

Default setting, and why (issue #16: make it faithful to the paper at a size a shared 2-core
machine runs). The paper's stages hold 2-4 layers of a model trained for thousands of steps
before stages fail; its random re-init is destructive at d_model 1024+. Here: d_model 64,
**12 layers in 4 block stages of 3** (the old default had 2 per stage: a lost stage held less of
the model, and at this width a fresh block is close to the identity, so "random" cost about what
skipping a thin stage does); the failure at **step 304 of 450**, when the held-out loss has come
down most of the way (the printout shows it at step 0 and at the failure), and 4 steps after
the last refresh of stage 0's copy (the oldest the copy gets; at step 300 it would be exact);
**3 seeds**; seq 64,
batch 16, AdamW lr 3e-3 (the run spec's); the last 100 steps decaying linearly to 0.1x lr (a
warm-up-free WSD schedule, the same in every arm), because with a constant lr the arms' end losses
wander by +-0.01 nats after the rebuild, as large as the gaps compared. Lost stages: 0 and 3 (a
middle stage whose neighbours 2 and 4 both hold deep layers; ``--lost 0 2 3`` adds stage 2, whose
neighbour stage 1 holds layer 0 and the largest gradient norms).

Last lines: ``stage 0: random/checkfree+ = R0`` and ``recovery: random/checkfree = R``, each the
ratio of the two arms' mean final gaps to the no-failure arm, rounded down (bench/report.py); R is
over the middle stage (the smallest over them when several are lost). When CheckFree's gap is
<= 0 (it caught up with the no-failure run entirely, or the noise put it ahead) the ratio means
nothing, and the line says so and gives both gaps: ``recovery: random/checkfree = undefined
(checkfree gap -0.0003 <= 0: ratio undefined; random gap +0.0012)``.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from dataclasses import dataclass, field

import torch

from bench.recovery_model import Trainee
from bench.report import rounded
from optim.checkfree import (
    CheckFreeConfig,
    Recovery,
    boosted_lr,
    copy_neighbor,
    plan_recovery,
    post_clip_norm,
    random_reinit,
    stage_zero_from_edge_copy,
    uniform_average,
    weighted_average,
)
from peer.pipeline.data import Shard, holdout, load_corpus, shard
from peer.pipeline.model import ModelConfig
from peer.pipeline.stages import BlockStage, StageZero, init_block_stage

MIDDLE_ARMS = ("checkfree", "uniform", "copy", "random")
ZERO_ARMS = ("checkfree+", "random")
RECOVERY_ARMS = MIDDLE_ARMS  # the middle stage's rules, in table order
ARMS = ("no_failure", "checkfree", "uniform", "copy", "random", "checkfree+")
CONTROL_ARM = "none"  # branches from the snapshot, rebuilds nothing
DECAY_TO = 0.1
NO_LOSS = -1  # the `lost` key of the no-failure arm


@dataclass(frozen=True)
class Setting:
    d_model: int = 64
    n_layers: int = 12
    n_heads: int = 4
    seq_len: int = 64
    stages: int = 4  # block stages; stage 0 holds the embedding, final norm and head
    lost: tuple[int, ...] = (0, 3)  # stage 0 and/or middle block stages (two live neighbours)
    batch: int = 16
    steps: int = 450
    fail_at: int = 304  # 4 steps after a refresh of stage 0's copy: the oldest it gets
    decay: int = 100  # the last `decay` steps decay the lr linearly to DECAY_TO of it
    early: int = 25  # steps after the rebuild at which the recovery is also evaluated
    lr: float = 3e-3
    grad_clip: float = 1.0
    eval_batches: int = 8
    corpus_bytes: int = 8 * 2**20
    arms: tuple[str, ...] = ARMS

    def __post_init__(self) -> None:
        if isinstance(self.lost, int):
            object.__setattr__(self, "lost", (self.lost,))
        for lost in self.lost:
            if lost != 0 and not 1 < lost < self.stages:
                raise SystemExit(f"--lost {lost}: stage 0 or a middle block stage "
                                 f"(2..{self.stages - 1}) is needed, CheckFree averages both "
                                 "neighbours")
        if self.n_layers % self.stages:
            raise SystemExit(f"--layers {self.n_layers} must split evenly into --stages "
                             f"{self.stages}: neighbours must hold as many layers as the lost one")
        if not 0 < self.fail_at < self.steps:
            raise SystemExit(f"--fail-at {self.fail_at} must lie in 1..{self.steps - 1}")
        if not 0 <= self.decay <= self.steps:
            raise SystemExit(f"--decay {self.decay} must lie in 0..{self.steps}")
        if not 0 < self.early <= self.steps - self.fail_at:
            raise SystemExit(f"--early {self.early} must lie in 1..{self.steps - self.fail_at}")
        if unknown := sorted(set(self.arms) - {*ARMS, CONTROL_ARM}):
            raise SystemExit(f"unknown arms {unknown}; choose from {[*ARMS, CONTROL_ARM]}")
        if "no_failure" not in self.arms:
            raise SystemExit("the no_failure arm is the baseline every gap is measured against")

    def arms_for(self, lost: int) -> list[str]:
        """The arms run for a loss of `lost`, in table order (the control arm last)."""
        rules = ZERO_ARMS if lost == 0 else MIDDLE_ARMS
        return [a for a in (*rules, CONTROL_ARM) if a in self.arms]

    def schedule(self, step: int) -> float:
        """Warm-up-free WSD: 1 until the decay phase, then linearly down to DECAY_TO."""
        start = self.steps - self.decay
        if step < start:
            return 1.0
        return 1.0 - (1.0 - DECAY_TO) * (step - start + 1) / self.decay

    def model(self, seed: int) -> ModelConfig:
        return ModelConfig(d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                           seq_len=self.seq_len, seed=seed)


def rebuild(arm: str, trainee: Trainee, setting: Setting, config: ModelConfig,
            seed: int, lost: int | None = None) -> Recovery:
    """Rebuild stage ``lost`` (default: the setting's first middle stage) in ``trainee`` by
    ``arm``'s rule; the old stage is gone."""
    s, n = (lost if lost is not None else next(x for x in setting.lost if x)), setting.stages
    cfg = CheckFreeConfig()
    if s == 0:
        fresh_zero = StageZero(config)
        like = {k: v.clone() for k, v in fresh_zero.state_dict().items()}
        plan = plan_recovery(0, n, alive=set(range(1, n + 1)), checkfree_plus=True)
        assert plan.method == "edge_copy", plan
        if arm == "checkfree+":
            rec = stage_zero_from_edge_copy(trainee.edge_copy, like)
        elif arm == "random":
            rec = random_reinit(like, seed=seed * 100003 + setting.fail_at)
        else:
            raise ValueError(f"arm {arm!r} does not rebuild stage 0")
        trainee.replace(0, rec.state, fresh_zero, boosted_lr(1.0, cfg))
        return rec
    plan = plan_recovery(s, n, alive=set(range(1, n + 1)) - {s}, checkfree_plus=False)
    if plan.method != "weighted_average":
        raise SystemExit(f"stage {s} of {n} cannot be averaged: {plan.note}")
    prev_i, next_i = plan.sources
    old = trainee.modules[s]
    assert isinstance(old, BlockStage)
    fresh = init_block_stage(config, old.layer_indices)  # names and shapes only: no lost state
    like = {k: v.clone() for k, v in fresh.state_dict().items()}
    prev_state, next_state = (trainee.modules[i].state_dict() for i in (prev_i, next_i))
    if arm == "checkfree":
        rec = weighted_average(prev_state, next_state,
                               post_clip_norm(trainee.last_norms[prev_i], trainee.grad_clip),
                               post_clip_norm(trainee.last_norms[next_i], trainee.grad_clip),
                               like, cfg)
    elif arm == "uniform":
        rec = uniform_average(prev_state, next_state, like)
    elif arm == "copy":
        rec = copy_neighbor(prev_state, like)
    elif arm == "random":
        rec = random_reinit(like, seed=seed * 100003 + setting.fail_at)
    else:
        raise ValueError(f"arm {arm!r} rebuilds nothing")
    trainee.replace(s, rec.state, fresh, boosted_lr(1.0, cfg))
    return rec


@dataclass
class ArmResult:
    arm: str
    seed: int
    after_rebuild: float  # held-out loss right after the rebuild (the jump)
    early: float  # held-out loss `early` steps after the rebuild
    final: float
    train_losses: list[float]  # steps fail_at..steps-1
    weights: tuple[float, float] | None = None
    skipped: dict[int, float] = field(default_factory=dict)  # no_failure: loss, stage skipped
    lost: int = NO_LOSS


def run_seed(setting: Setting, seed: int, log: bool = True) -> dict[tuple[int, str], ArmResult]:
    """Train the trunk (the no-failure arm) and branch every other arm at ``fail_at``; keyed
    by (lost stage, arm), the no-failure arm by (NO_LOSS, "no_failure")."""
    torch.manual_seed(seed)
    config = setting.model(seed)
    corpus = load_corpus(max_bytes=setting.corpus_bytes)
    train: Shard = shard(corpus, 0, 1, setting.seq_len)
    held = holdout(corpus, setting.seq_len)
    evals = [held.batch(setting.batch, seed, i) for i in range(setting.eval_batches)]
    batches = [train.batch(setting.batch, seed, i) for i in range(setting.steps)]
    early_step = setting.fail_at + setting.early

    trunk = Trainee.build(config, setting.stages, setting.lr, setting.grad_clip)
    initial = trunk.evaluate(evals)
    t0 = time.perf_counter()
    for step in range(setting.fail_at):
        trunk.train_step(batches[step], setting.schedule(step))
    snapshot = copy.deepcopy(trunk)
    skipped = {s: trunk.evaluate(evals, skip=s) for s in setting.lost if s}
    if log:
        print(f"  seed {seed}: held-out loss {initial:.4f} at step 0, "
              f"{trunk.evaluate(evals):.4f} at the failure (step {setting.fail_at}, "
              f"{time.perf_counter() - t0:.0f} s); "
              + "".join(f"{v:.4f} with stage {s} skipped; " for s, v in skipped.items())
              + "last gradient norms by stage " + " ".join(f"{n:.3f}" for n in trunk.last_norms),
              flush=True)

    def finish(lost: int, arm: str, trainee: Trainee, weights) -> ArmResult:
        after = trainee.evaluate(evals)
        losses, early = [], math.nan
        for step in range(setting.fail_at, setting.steps):
            if step == early_step:
                early = trainee.evaluate(evals)
            losses.append(trainee.train_step(batches[step], setting.schedule(step)))
        final = trainee.evaluate(evals)
        early = final if math.isnan(early) else early  # early == steps - fail_at
        result = ArmResult(arm, seed, after, early, final, losses, weights, lost=lost)
        if log:
            print(f"  seed {seed} stage {lost if lost >= 0 else '-'} {arm:<10} after rebuild "
                  f"{after:.4f}  final {result.final:.4f}", flush=True)
        return result

    results = {(NO_LOSS, "no_failure"): finish(NO_LOSS, "no_failure", trunk, None)}
    results[(NO_LOSS, "no_failure")].skipped = skipped
    for lost in setting.lost:
        for arm in setting.arms_for(lost):
            branch = copy.deepcopy(snapshot)
            weights = None
            if arm != CONTROL_ARM:
                weights = rebuild(arm, branch, setting, config, seed, lost).weights
            results[(lost, arm)] = finish(lost, arm, branch, weights)
    return results


def _ratio(gaps: dict[str, float], cf_arm: str) -> tuple[str, float]:
    cf, rnd = gaps[cf_arm], gaps["random"]
    if cf > 0:
        return rounded(rnd / cf, 2, down=True), rnd / cf
    return (f"undefined ({cf_arm} gap {cf:+.4f} <= 0: ratio undefined; random gap "
            f"{rnd:+.4f})"), math.inf


def summarize(setting: Setting, runs: list[dict[tuple[int, str], ArmResult]]
              ) -> tuple[list[str], str]:
    """The table rows (means over seeds, gaps to the no-failure arm) and the ratio line."""
    base = (NO_LOSS, "no_failure")

    def mean_gap(key: tuple[int, str], what: str) -> tuple[float, float]:
        per_seed = [getattr(r[key], what) - getattr(r[base], what) for r in runs]
        sd = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
        return statistics.fmean(per_seed), sd

    rows = [f"{'lost':<5} {'arm':<11} {'jump':>8} {f'gap@+{setting.early}':>9} {'final':>8} "
            f"{'gap':>8} {'gap sd':>7}"]
    keys = [base, *(k for k in runs[0] if k != base)]
    gaps: dict[int, dict[str, float]] = {}
    for key in keys:
        lost, arm = key
        gap, sd = mean_gap(key, "final")
        gaps.setdefault(lost, {})[arm] = gap
        rows.append(f"{lost if lost >= 0 else '-':<5} {arm:<11} "
                    f"{mean_gap(key, 'after_rebuild')[0]:>+8.4f} "
                    f"{mean_gap(key, 'early')[0]:>+9.4f} "
                    f"{statistics.fmean(r[key].final for r in runs):>8.4f} {gap:>+8.4f} {sd:>7.4f}")
    for s in sorted({lost for lost, _ in keys if lost > 0}):
        if not all(s in r[base].skipped for r in runs):
            continue
        jump = statistics.fmean(r[base].skipped[s] - r[base].after_rebuild for r in runs)
        rows.append(f"(reference: skipping stage {s} at step {setting.fail_at} instead of "
                    f"rebuilding it: jump {jump:+.4f})")
    middle: list[tuple[float, str]] = []
    zero_line = []
    for lost, by_arm in sorted(gaps.items()):
        if lost == NO_LOSS:
            continue
        rules = ZERO_ARMS if lost == 0 else MIDDLE_ARMS
        ranked = sorted((a for a in rules if a in by_arm), key=lambda a: by_arm[a])
        rows.append(f"stage {lost} lost, ordering by final gap (smallest first): "
                    + " < ".join(ranked))
        cf_arm = "checkfree+" if lost == 0 else "checkfree"
        if cf_arm in by_arm and "random" in by_arm:
            text, value = _ratio(by_arm, cf_arm)
            if lost == 0:
                zero_line.append(f"stage 0: random/checkfree+ = {text}")
            else:
                middle.append((value, text))
    rows += zero_line
    ratio = min(middle)[1] if middle else "n/a"
    return rows, f"recovery: random/checkfree = {ratio}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Setting()
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--fail-at", type=int, default=d.fail_at)
    ap.add_argument("--decay", type=int, default=d.decay,
                    help="final steps whose lr decays linearly to 10%%")
    ap.add_argument("--early", type=int, default=d.early,
                    help="also evaluate this many steps after the rebuild")
    ap.add_argument("--d-model", type=int, default=d.d_model)
    ap.add_argument("--layers", type=int, default=d.n_layers)
    ap.add_argument("--heads", type=int, default=d.n_heads)
    ap.add_argument("--seq", type=int, default=d.seq_len)
    ap.add_argument("--stages", type=int, default=d.stages, help="block stages")
    ap.add_argument("--lost", type=int, nargs="+", default=list(d.lost),
                    help="the stages that fail (one at a time): 0 and/or middle block stages")
    ap.add_argument("--batch", type=int, default=d.batch)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--eval-batches", type=int, default=d.eval_batches)
    ap.add_argument("--corpus-mib", type=float, default=d.corpus_bytes / 2**20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS),
                    help=f"from {[*ARMS, CONTROL_ARM]}; {CONTROL_ARM!r} is the no-event control")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    setting = Setting(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                      seq_len=args.seq, stages=args.stages, lost=tuple(args.lost),
                      batch=args.batch, steps=args.steps, fail_at=args.fail_at,
                      decay=args.decay, early=args.early, lr=args.lr,
                      eval_batches=args.eval_batches,
                      corpus_bytes=int(args.corpus_mib * 2**20), arms=tuple(args.arms))
    print(f"recovery bench: d_model {setting.d_model}, {setting.n_layers} layers in "
          f"{setting.stages} block stages, stages {list(setting.lost)} lost (one at a time) at "
          f"step {setting.fail_at} of {setting.steps}; seq {setting.seq_len}, batch "
          f"{setting.batch}, AdamW lr {setting.lr:g}, the last {setting.decay} steps decaying to "
          f"{DECAY_TO:g}x (rebuilt stage x{CheckFreeConfig().lr_boost:g}); "
          f"seeds {args.seeds}; held-out loss in nats/byte over {setting.eval_batches} batches",
          flush=True)
    start = time.perf_counter()
    runs = [run_seed(setting, seed) for seed in args.seeds]
    rows, last = summarize(setting, runs)
    for run in runs:
        for (lost, arm), w in run.items():
            if arm == "checkfree" and w.weights is not None:
                a, b = w.weights
                print(f"  seed {w.seed}, stage {lost}: checkfree weights s-1 {a / (a + b):.3f}, "
                      f"s+1 {b / (a + b):.3f}")
    print(f"({time.perf_counter() - start:.0f} s)")
    for row in rows:
        print(row)
    print(last)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
