"""`python -m bench.recovery`: how well each rule rebuilds one lost middle block stage.

CheckFree (ALGORITHMS.md §3) rebuilds a block stage that lost every replica from its two
neighbours, weighted by their last gradient norms. This bench measures recovery *quality*, not
transport, so it runs in one process: the real model (peer/pipeline/model.py, cut by ``split``),
the real corpus loader (peer/pipeline/data.py: the stdlib's sources, a training shard and the
holdout) and the real recovery math (optim/checkfree.py: ``plan_recovery``, ``weighted_average``,
``uniform_average``, ``copy_neighbor``, ``random_reinit``, ``boosted_lr``).

What one seed does:

1. The trunk trains the pipeline (stage 0 plus S block stages, one AdamW per stage with the
   peer's betas, each stage's gradient clipped on its own, as ``StageHost.apply_gradient`` does)
   for ``--steps`` steps. Batch ``i`` is a pure function of (shard, seed, i), so every arm sees the
   same bytes in the same order. The trunk itself is the **no-failure** arm.
2. At ``--fail-at`` F the trunk is snapshotted (weights, optimizer states, each stage's last
   pre-clip gradient norm: the norm ``StageHost`` records and a peer reports), just before step
   F's first microbatch: the moment the lost stage's weights and optimizer state vanish.
3. Each recovery arm starts from a copy of that snapshot, replaces the lost stage's weights,
   gives it a fresh AdamW at ``boosted_lr`` (x1.1, every arm alike, so the arms differ only in
   the weights), and trains steps F..N-1 on the same batches:
   - ``checkfree``: ``weighted_average`` of stages s-1 and s+1 by their step F-1 gradient norms;
   - ``uniform``: ``uniform_average`` of the same two;
   - ``copy``: ``copy_neighbor`` of stage s-1 (the reference code's naive baseline);
   - ``random``: ``random_reinit`` (matrices ~ N(0, 0.02), norm gains 1: what the stage would
     be with nothing to recover from).
   ``none`` (not run by default) branches from the snapshot and replaces nothing: it must end
   bit-identical to the no-failure trunk, which checks that branching changes nothing by itself.
4. Every arm is evaluated on the same held-out batches (mean loss over ``--eval-batches``) right
   after the rebuild (the jump), ``--early`` steps later, and at the end. Each is reported as a
   gap to the no-failure arm at the same step, averaged over the seeds. A reference row gives
   the jump of skipping the lost stage altogether (SkipPipe's way round a missing stage).

Default setting, and why. d_model 64, 8 layers cut into 4 block stages of 2 layers; block
stage 3 is lost (neighbours 2 and 4); seq 64, batch 16, AdamW lr 3e-3 (the run spec's); 450
steps, the failure at step 300, the last 150 steps decaying linearly to 0.1x lr (a warm-up-free
WSD schedule, the same in every arm); seeds 0 and 1. About 0.1 s of CPU a step, so
2 x (300 + 5 x 150) steps took 4 min (3.3 CPU-min) on this shared 2-core box when it was
quiet, 23 min when five jobs shared it.
- The lr decay after the failure: with a constant lr the arms' end losses wander by +-0.01 nats
  (the runs diverge chaotically after the rebuild), as large as the gaps being compared; the
  decay settles them, so the final gap measures what the rebuild lost, not noise.
- Stage 3, not stage 2: measured first, losing stage 2 ranked uniform < random < checkfree <
  copy (random/checkfree 0.95). Its neighbour stage 1 holds layer 0, whose gradient norm is 3-7x
  the deeper stages' (in this pre-norm model the residual stream grows with depth, so deeper
  blocks see smaller gradients), so CheckFree's weights were 78-85 % stage 1: nearly a copy,
  and it landed between the uniform average and the copy. Stage 3's neighbours have similar
  norms (weights 0.48-0.55), which is the case the rule is meant for; ``--lost 2`` shows the
  other case.
- 300 steps before the failure: the paper fails stages after thousands of steps. Failing stage
  2 at step 1000 instead (``--steps 1150 --fail-at 1000 --lost 2``, seeds 0 and 1) moved random
  from second to last (mean final gaps uniform 0.050 < checkfree 0.052 < copy 0.056 < random
  0.060, ratio 1.16) but costs ~1.7x the CPU; the default stays short.
- A random re-init is nearly the identity at this width: an N(0, 0.02) block's output grows
  like sqrt(d_model), tiny at 64 (its jump equals the skip-the-stage reference), while at the
  paper's d_model 1024+ it injects real noise into the residual stream. So "random" here is
  "skip the stage and relearn it", which SkipPipe shows costs little, and it ends worst by tens
  of percent, not the paper's 5x (121 vs 22.6 perplexity, after many repeated failures over 10k
  steps, not one).

Last line: ``recovery: random/checkfree = R``, the ratio of the two arms' mean final gaps to the
no-failure arm, rounded down (bench/report.py). When CheckFree's gap is <= 0 (it caught up with
the no-failure run entirely, or the noise put it ahead) the ratio means nothing, and the line says
so and gives both gaps: ``recovery: random/checkfree = undefined (checkfree gap -0.0003 <= 0:
ratio undefined; random gap +0.0012)``.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from bench.report import rounded
from optim.checkfree import (
    CheckFreeConfig,
    Recovery,
    boosted_lr,
    copy_neighbor,
    plan_recovery,
    random_reinit,
    uniform_average,
    weighted_average,
)
from peer.pipeline.data import Shard, holdout, inputs_targets, load_corpus, shard
from peer.pipeline.model import ModelConfig
from peer.pipeline.stages import BlockStage, StageZero, init_block_stage, run_pipeline, split

RECOVERY_ARMS = ("checkfree", "uniform", "copy", "random")
ARMS = ("no_failure", *RECOVERY_ARMS)
CONTROL_ARM = "none"  # branches from the snapshot, rebuilds nothing
BETAS = (0.9, 0.95)  # StageHost's AdamW
DECAY_TO = 0.1


@dataclass(frozen=True)
class Setting:
    d_model: int = 64
    n_layers: int = 8
    n_heads: int = 4
    seq_len: int = 64
    stages: int = 4  # block stages; stage 0 (embedding, head) never fails
    lost: int = 3  # the block stage that fails, 1-based; it needs two live neighbours
    batch: int = 16
    steps: int = 450
    fail_at: int = 300
    decay: int = 150  # the last `decay` steps decay the lr linearly to DECAY_TO of it
    early: int = 25  # steps after the rebuild at which the recovery is also evaluated
    lr: float = 3e-3
    grad_clip: float = 1.0
    eval_batches: int = 8
    corpus_bytes: int = 8 * 2**20
    arms: tuple[str, ...] = ARMS

    def __post_init__(self) -> None:
        if not 1 < self.lost < self.stages:
            raise SystemExit(f"--lost {self.lost}: a middle block stage (2..{self.stages - 1}) "
                             "is needed, CheckFree averages both neighbours")
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

    def schedule(self, step: int) -> float:
        """Warm-up-free WSD: 1 until the decay phase, then linearly down to DECAY_TO."""
        start = self.steps - self.decay
        if step < start:
            return 1.0
        return 1.0 - (1.0 - DECAY_TO) * (step - start + 1) / self.decay

    def model(self, seed: int) -> ModelConfig:
        return ModelConfig(d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                           seq_len=self.seq_len, seed=seed)


@dataclass
class Trainee:
    """The pipeline in one process: stage 0, the block stages, one AdamW per module.

    ``modules[0]`` is stage 0, ``modules[s]`` block stage s, so indices match stage numbers.
    Deep-copied as a whole (modules and optimizers together keep their parameter links).
    """

    modules: list[nn.Module]
    optimizers: list[torch.optim.Optimizer]
    lr: float  # the base learning rate, before the schedule and a stage's boost
    grad_clip: float
    lr_scale: list[float] = field(default_factory=list)  # 1.0, or the boost of a rebuilt stage
    last_norms: list[float] = field(default_factory=list)  # pre-clip, per stage, last step

    @classmethod
    def build(cls, config: ModelConfig, n_stages: int, lr: float, grad_clip: float) -> Trainee:
        stage_zero, blocks = split(config, n_stages)
        modules: list[nn.Module] = [stage_zero, *blocks]
        return cls(modules, [_adamw(m, lr) for m in modules], lr, grad_clip,
                   [1.0] * len(modules), [0.0] * len(modules))

    def loss(self, batch: torch.Tensor, skip: int | None = None) -> torch.Tensor:
        x, y = inputs_targets(batch)
        stage_zero = self.modules[0]
        assert isinstance(stage_zero, StageZero)
        blocks = [m for s, m in enumerate(self.modules) if isinstance(m, BlockStage) and s != skip]
        loss, _ = run_pipeline(stage_zero, blocks, x, y)
        return loss

    def train_step(self, batch: torch.Tensor, schedule: float = 1.0) -> float:
        """One optimizer step for every stage at ``lr * schedule * lr_scale[stage]``; each
        stage clips its own gradient and records its pre-clip norm (StageHost's order)."""
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        loss.backward()
        for s, (module, opt) in enumerate(zip(self.modules, self.optimizers, strict=True)):
            norm = torch.nn.utils.clip_grad_norm_(list(module.parameters()), self.grad_clip)
            self.last_norms[s] = float(norm)
            for group in opt.param_groups:
                group["lr"] = self.lr * schedule * self.lr_scale[s]
            opt.step()
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, batches: Sequence[torch.Tensor], skip: int | None = None) -> float:
        """Mean held-out loss; ``skip`` leaves that block stage out of the path (SkipPipe)."""
        return statistics.fmean(float(self.loss(b, skip)) for b in batches)

    def replace(self, stage: int, state: dict[str, torch.Tensor], module: BlockStage,
                lr_scale: float) -> None:
        """Install a rebuilt stage: its new weights, a fresh optimizer, its lr boost."""
        module.load_state_dict(state, strict=True)
        self.modules[stage] = module
        self.lr_scale[stage] = lr_scale
        self.optimizers[stage] = _adamw(module, self.lr * lr_scale)


def _adamw(module: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0, betas=BETAS)


def rebuild(arm: str, trainee: Trainee, setting: Setting, config: ModelConfig,
            seed: int) -> Recovery:
    """Rebuild ``setting.lost`` in ``trainee`` by ``arm``'s rule; the old stage is gone."""
    s, n = setting.lost, setting.stages
    plan = plan_recovery(s, n, alive=set(range(1, n + 1)) - {s}, checkfree_plus=False)
    if plan.method != "weighted_average":
        raise SystemExit(f"stage {s} of {n} cannot be averaged: {plan.note}")
    prev_i, next_i = plan.sources
    lost = trainee.modules[s]
    assert isinstance(lost, BlockStage)
    fresh = init_block_stage(config, lost.layer_indices)  # names and shapes only: no lost state
    like = {k: v.clone() for k, v in fresh.state_dict().items()}
    prev_state, next_state = (trainee.modules[i].state_dict() for i in (prev_i, next_i))
    cfg = CheckFreeConfig()
    if arm == "checkfree":
        rec = weighted_average(prev_state, next_state, trainee.last_norms[prev_i],
                               trainee.last_norms[next_i], like, cfg)
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
    skipped: float = math.nan  # no_failure only: the loss at fail_at with the lost stage skipped


def run_seed(setting: Setting, seed: int, log: bool = True) -> dict[str, ArmResult]:
    """Train the trunk (the no-failure arm) and branch every other arm at ``fail_at``."""
    torch.manual_seed(seed)
    config = setting.model(seed)
    corpus = load_corpus(max_bytes=setting.corpus_bytes)
    train: Shard = shard(corpus, 0, 1, setting.seq_len)
    held = holdout(corpus, setting.seq_len)
    evals = [held.batch(setting.batch, seed, i) for i in range(setting.eval_batches)]
    batches = [train.batch(setting.batch, seed, i) for i in range(setting.steps)]
    early_step = setting.fail_at + setting.early

    trunk = Trainee.build(config, setting.stages, setting.lr, setting.grad_clip)
    t0 = time.perf_counter()
    for step in range(setting.fail_at):
        trunk.train_step(batches[step], setting.schedule(step))
    snapshot = copy.deepcopy(trunk)
    skipped = trunk.evaluate(evals, skip=setting.lost)
    if log:
        print(f"  seed {seed}: {setting.fail_at} steps in {time.perf_counter() - t0:.0f} s, "
              f"held-out loss {trunk.evaluate(evals):.4f} at the failure ({skipped:.4f} with "
              f"stage {setting.lost} skipped); last gradient norms by stage "
              + " ".join(f"{n:.3f}" for n in trunk.last_norms), flush=True)

    def finish(arm: str, trainee: Trainee, weights: tuple[float, float] | None) -> ArmResult:
        after = trainee.evaluate(evals)
        losses, early = [], math.nan
        for step in range(setting.fail_at, setting.steps):
            if step == early_step:
                early = trainee.evaluate(evals)
            losses.append(trainee.train_step(batches[step], setting.schedule(step)))
        final = trainee.evaluate(evals)
        early = final if math.isnan(early) else early  # early == steps - fail_at
        result = ArmResult(arm, seed, after, early, final, losses, weights)
        if log:
            print(f"  seed {seed} {arm:<10} after rebuild {after:.4f}  final {result.final:.4f}",
                  flush=True)
        return result

    results = {"no_failure": finish("no_failure", trunk, None)}
    results["no_failure"].skipped = skipped
    for arm in setting.arms:
        if arm == "no_failure":
            continue
        branch = copy.deepcopy(snapshot)
        weights = None
        if arm != CONTROL_ARM:
            weights = rebuild(arm, branch, setting, config, seed).weights
        results[arm] = finish(arm, branch, weights)
    return results


def summarize(setting: Setting, runs: list[dict[str, ArmResult]]) -> tuple[list[str], str]:
    """The table rows (means over seeds, gaps to the no-failure arm) and the ratio line."""

    def mean_gap(arm: str, what: str) -> tuple[float, float]:
        per_seed = [getattr(r[arm], what) - getattr(r["no_failure"], what) for r in runs]
        sd = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
        return statistics.fmean(per_seed), sd

    rows = [f"{'arm':<11} {'jump':>8} {f'gap@+{setting.early}':>9} {'final':>8} "
            f"{'gap':>8} {'gap sd':>7}"]
    gaps: dict[str, float] = {}
    for arm in setting.arms:
        gaps[arm], sd = mean_gap(arm, "final")
        rows.append(f"{arm:<11} {mean_gap(arm, 'after_rebuild')[0]:>+8.4f} "
                    f"{mean_gap(arm, 'early')[0]:>+9.4f} "
                    f"{statistics.fmean(r[arm].final for r in runs):>8.4f} "
                    f"{gaps[arm]:>+8.4f} {sd:>7.4f}")
    skip_jump = statistics.fmean(r["no_failure"].skipped - r["no_failure"].after_rebuild
                                 for r in runs)
    rows.append(f"(reference: skipping stage {setting.lost} at step {setting.fail_at} instead of "
                f"rebuilding it: jump {skip_jump:+.4f})")
    ranked = sorted((a for a in RECOVERY_ARMS if a in gaps), key=lambda a: gaps[a])
    rows.append("measured ordering by final gap (smallest first): " + " < ".join(ranked))
    if "checkfree" in gaps and "random" in gaps:
        cf, rnd = gaps["checkfree"], gaps["random"]
        ratio = (rounded(rnd / cf, 2, down=True) if cf > 0 else
                 f"undefined (checkfree gap {cf:+.4f} <= 0: ratio undefined; random gap "
                 f"{rnd:+.4f})")
    else:
        ratio = "n/a"
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
    ap.add_argument("--lost", type=int, default=d.lost, help="the block stage that fails")
    ap.add_argument("--batch", type=int, default=d.batch)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--eval-batches", type=int, default=d.eval_batches)
    ap.add_argument("--corpus-mib", type=float, default=d.corpus_bytes / 2**20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--arms", nargs="+", default=list(ARMS),
                    help=f"from {[*ARMS, CONTROL_ARM]}; {CONTROL_ARM!r} is the no-event control")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    setting = Setting(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                      seq_len=args.seq, stages=args.stages, lost=args.lost, batch=args.batch,
                      steps=args.steps, fail_at=args.fail_at, decay=args.decay,
                      early=args.early, lr=args.lr,
                      eval_batches=args.eval_batches,
                      corpus_bytes=int(args.corpus_mib * 2**20), arms=tuple(args.arms))
    print(f"recovery bench: d_model {setting.d_model}, {setting.n_layers} layers in "
          f"{setting.stages} block stages, block stage {setting.lost} lost at step "
          f"{setting.fail_at} of {setting.steps}; seq {setting.seq_len}, batch {setting.batch}, "
          f"AdamW lr {setting.lr:g}, the last {setting.decay} steps decaying to "
          f"{DECAY_TO:g}x (rebuilt stage x{CheckFreeConfig().lr_boost:g}); "
          f"seeds {args.seeds}; held-out loss in nats/byte over {setting.eval_batches} batches",
          flush=True)
    start = time.perf_counter()
    runs = [run_seed(setting, seed) for seed in args.seeds]
    rows, last = summarize(setting, runs)
    for run in runs:
        if (w := run.get("checkfree")) is not None and w.weights is not None:
            a, b = w.weights
            print(f"  seed {w.seed}: checkfree weights s-1 {a / (a + b):.3f}, "
                  f"s+1 {b / (a + b):.3f}")
    print(f"({time.perf_counter() - start:.0f} s)")
    for row in rows:
        print(row)
    print(last)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
