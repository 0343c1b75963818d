"""Which outer optimizer suits DiLoCo with a short round: steps to a target loss, in one process.

    python -m bench.diloco_outer [--steps 80] [--seeds 1,2,3] [--target-loss 2.8]

bench.wan's model, data and batch (peer/pipeline/model.py's Decoder, the embedded corpus, 32
sequences per step), without a network: 2 replicas each run H = 10 inner AdamW steps on 16
sequences of their own shard, then the average pseudo-gradient goes through the wire's int8
quantisation and optim.diloco.OuterOptimizer (the peer's own code) steps the shared weights. Each
outer setting runs the same seeds; the reference is one model trained on the whole batch with the
same AdamW (what DDP computes). Reported per setting: the step at which the loss (mean over the
replicas, smoothed over 3 steps as in bench.wan) first reaches the target, for each seed, and the
mean loss over the last 10 steps.

Why it exists: the DiLoCo paper's outer SGD (lr 0.7, Nesterov momentum 0.9) is tuned for H = 500;
its momentum multiplies a round's update by up to 1/(1 - 0.9) = 10, which for a 10-step round
overshoots. The last line compares the paper's setting with momentum 0.5 (bench.wan's choice):
`diloco_outer: steps(0.7/0.9) / steps(0.7/0.5) = R, steps(whole batch) / steps(0.7/0.5) = S`
(median steps over the seeds; R > 1 means momentum 0.5 gets there in fewer steps).
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from bench.wan import first_smoothed_below, spec_for
from optim import diloco
from peer.pipeline.data import inputs_targets, load_corpus, shard
from peer.pipeline.model import Decoder
from peer.pipeline.stage_host import model_config

REPLICAS = 2
SETTINGS = ((0.7, 0.9), (0.7, 0.5), (0.8, 0.3), (1.0, 0.0))  # (outer lr, momentum); paper first
CHOSEN = (0.7, 0.5)


def _loss(model: Decoder, batch: torch.Tensor) -> torch.Tensor:
    tokens, targets = inputs_targets(batch)
    logits = model(tokens.long())
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).long())


def train(steps: int, seed: int, outer: tuple[float, float] | None) -> list[float]:
    """Per-step loss (mean over replicas); `outer=None` is the whole-batch reference."""
    spec = spec_for("diloco", steps)
    d = spec.sync.diloco
    torch.manual_seed(seed)
    base = Decoder(model_config(spec))
    n = 1 if outer is None else REPLICAS
    models = [Decoder(model_config(spec)) for _ in range(n)]
    for m in models:
        m.load_state_dict(base.state_dict())
    lr, wd = (spec.optim.lr, spec.optim.weight_decay) if outer is None else (d.inner_lr,
                                                                            d.inner_weight_decay)
    opts = [torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=wd, betas=(0.9, 0.95))
            for m in models]
    corpus = load_corpus(None)
    shards = [shard(corpus, r, n, spec.model.seq_len) for r in range(n)]
    shared = [p.detach().clone() for p in base.parameters()]
    outer_opt = None if outer is None else diloco.OuterOptimizer(shared, diloco.OuterConfig(
        lr=outer[0], momentum=outer[1], nesterov=outer[1] > 0))
    losses = []
    for step in range(1, steps + 1):
        step_losses = []
        for r, (m, opt) in enumerate(zip(models, opts, strict=True)):
            loss = _loss(m, shards[r].batch(spec.pipeline.target_batch // n, seed, step))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), spec.optim.grad_clip)
            opt.step()
            step_losses.append(loss.item())
        losses.append(sum(step_losses) / n)
        if outer_opt is not None and step % d.inner_steps == 0:
            with torch.no_grad():
                deltas = {str(r): [torch.cat([x.reshape(-1) for x in diloco.pseudo_gradient(
                    shared, list(m.parameters()))])] for r, m in enumerate(models)}
                avg = diloco.average(deltas).tensors[0]
                wire = diloco.dequantize(diloco.quantize(avg, "int8"))
                parts = torch.split(wire, [p.numel() for p in shared])
                outer_opt.step(shared, [x.reshape(p.shape) for x, p in zip(parts, shared,
                                                                            strict=True)])
                for m in models:
                    for p, s in zip(m.parameters(), shared, strict=True):
                        p.copy_(s)
    return losses


def crossing(losses: list[float], target: float) -> int | None:
    """The step (1-based) at which the smoothed loss first reaches `target`, as bench.wan."""
    i = first_smoothed_below(losses, target)
    return None if i is None else i + 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--target-loss", type=float, default=2.8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"{REPLICAS} replicas, H = {spec_for('diloco', 1).sync.diloco.inner_steps}, int8 "
          f"pseudo-gradients, {args.steps} steps, seeds {seeds}, target loss {args.target_loss}")
    print(f"{'outer optimizer':<32} {'steps to target per seed':<26} {'median':>7} "
          f"{'last-10 loss':>13}")
    median: dict[object, float] = {}
    for outer in (None, *SETTINGS):
        runs = [train(args.steps, s, outer) for s in seeds]
        steps = [crossing(ls, args.target_loss) for ls in runs]
        reached = [s if s is not None else args.steps + 1 for s in steps]  # a miss counts long
        median[outer] = statistics.median(reached)
        name = ("whole batch (what DDP computes)" if outer is None else
                f"lr {outer[0]}, momentum {outer[1]}" + (" (paper)" if outer == SETTINGS[0]
                                                         else ""))
        last = statistics.mean(sum(ls[-10:]) / 10 for ls in runs)
        shown = ", ".join("-" if s is None else str(s) for s in steps)
        print(f"{name:<32} {shown:<26} {median[outer]:>7.0f} {last:>13.3f}", flush=True)
    print(f"diloco_outer: steps(0.7/0.9) / steps(0.7/0.5) = "
          f"{median[SETTINGS[0]] / median[CHOSEN]:.2f}, steps(whole batch) / steps(0.7/0.5) = "
          f"{median[None] / median[CHOSEN]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
