"""`python -m bench.skippipe`: SkipPipe partial pipelines against the full pipeline.

One heterogeneous swarm (real coordinator and peer processes on 127.0.0.1): stage 0, and four
block stages of one layer each, whose replicas have unequal speeds: stage 1 fast, stage 2 a fast
and a 3x slower replica, stage 3 one 2x slower replica (the bottleneck), stage 4 fast. On one
machine every peer shares its CPUs, so real compute cannot show a slow *machine* (see
bench/pipeline.py): each block replica runs the real model and holds its compute thread for a
fixed time per sample (`shoal peer --simulate-speed`), as if it had a machine of its own.

The same swarm is started three times in this run and trains the same number of steps on the
same batches: skip_ratio 0 (every microbatch visits stages 1..4 in order: the plain SWARM
pipeline), 0.25 (3 of 4 stages per microbatch) and 0.5 (2 of 4), both with a full-depth iteration
every 10 (ALGORITHMS.md §2; their time is included). Iteration time is the stage-0 driver's own
step time, averaged after a warm-up. Loss is measured the same way for every arm: the model is
exported from the live peers and evaluated at full depth on held-out bytes (the training loss of
a skip arm is that of its partial paths, shown too but not compared).

Last line: `skippipe: full/skip25 = R (loss +P%)` (target R >= 1.25 with P <= 5; R rounded down
and P up, bench/report.py).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.pipeline import wait_for_steps
from bench.report import Target, machine, targets_line
from protocols.runspec import RunSpec
from shoal.swarm import Swarm, read_metrics

SPEC = {"model.d_model": 64, "model.n_layers": 4, "model.n_heads": 4, "model.seq_len": 32,
        "pipeline.stages": 4, "pipeline.microbatch": 4, "pipeline.target_batch": 64,
        "pipeline.activations": "fp32", "optim.lr": 3e-3, "sync.timeout_s": 20.0,
        "membership.heartbeat_s": 1.0, "membership.lease_s": 10.0, "run.seed": 1}
FAST_RATE = 160.0  # samples/s of forward on a fast replica; a backward costs 2 forwards
# (stage, slowdown) per peer; stage 0 runs for real (embedding and head are tiny)
LAYOUT = [(0, 1.0), (1, 1.0), (2, 1.0), (2, 3.0), (3, 2.0), (4, 1.0)]
ARMS = (("full", 0.0), ("skip25", 0.25), ("skip50", 0.5))
SPEEDUP = Target("full/skip25", 1.25)
PENALTY = Target("loss", 5.0, at_least=False, digits=1, unit="%")


def holdout_loss(model_dir: Path, seq_len: int, batches: int = 8, size: int = 32) -> float:
    from peer.pipeline.checkpoint import load_model
    from peer.pipeline.data import holdout, inputs_targets, load_corpus

    model = load_model(model_dir)
    held = holdout(load_corpus(None), seq_len)
    total = 0.0
    with torch.no_grad():
        for i in range(batches):
            tokens, targets = inputs_targets(held.batch(size, 12345, i))
            total += float(model.loss(tokens, targets)[0])
    return total / batches


def run_arm(work: Path, name: str, skip: float, steps: int, warmup: int) -> dict:
    from protocols.identity import Identity
    from shoal.export import export_to

    spec = RunSpec().replace(**{**SPEC, "run.steps": steps, "pipeline.skip_ratio": skip})
    swarm = Swarm(work, spec, 0, None, "cpu")
    try:
        swarm.start(0)
        for i, (stage, slow) in enumerate(LAYOUT):
            extra = ["--stage", str(stage), "--grace", "5"]
            if stage > 0:
                extra += ["--simulate-speed", str(FAST_RATE / slow)]
            swarm.add_peer(i, extra)
        wait_for_steps(swarm, steps, 90 + steps * 20, name)
        time.sleep(spec.membership.heartbeat_s * 2)
        asyncio.run(export_to(work / "model", f"127.0.0.1:{swarm.port}",
                              Identity.load_or_create(work / "export.key"),
                              swarm.token_file.read_text().strip()))
        rows = [r for r in read_metrics(swarm.logs) if r["step"] > warmup]
        last = [r["loss"] for r in rows[-5:] if r.get("loss") is not None]
        lengths = [sum(r["visits"].values()) / max(1, r["completed"]) for r in rows]
        return {"arm": name, "skip": skip, "steps": len(rows),
                "step_s": statistics.mean(r["seconds"] for r in rows),
                "step_s_median": statistics.median(r["seconds"] for r in rows),
                "path_len": statistics.mean(lengths), "dropped": rows[-1]["dropped"],
                "train_loss": statistics.mean(last) if last else float("nan"),
                "eval_loss": holdout_loss(work / "model", spec.model.seq_len)}
    finally:
        swarm.stop(grace=10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="shoal-bench-skippipe-") as tmp:
        results = [run_arm(Path(tmp) / name, name, skip, args.steps, args.warmup)
                   for name, skip in ARMS]
    print(f"skippipe bench: stage 0 + 4 block stages, replica speeds "
          f"{[(s, round(FAST_RATE / x)) for s, x in LAYOUT if s]} (stage, samples/s), "
          f"{args.steps} steps ({args.warmup} warm-up), full depth every 10; {machine()}")
    print(f"{'arm':<8} {'skip':>5} {'mean step s':>12} {'median s':>9} {'path len':>9} "
          f"{'dropped':>8} {'train loss':>11} {'eval loss':>10}")
    for r in results:
        print(f"{r['arm']:<8} {r['skip']:>5.2f} {r['step_s']:>12.3f} {r['step_s_median']:>9.3f} "
              f"{r['path_len']:>9.2f} {r['dropped']:>8} {r['train_loss']:>11.3f} "
              f"{r['eval_loss']:>10.3f}")
    full, skip25 = results[0], results[1]
    ratio = full["step_s"] / skip25["step_s"]
    penalty = 100.0 * (skip25["eval_loss"] / full["eval_loss"] - 1.0)
    print(targets_line([(SPEEDUP, ratio), (PENALTY, penalty)]))
    shown = PENALTY.figure(penalty)
    print(f"skippipe: full/skip25 = {SPEEDUP.figure(ratio)} (loss "
          f"{'' if shown.startswith('-') else '+'}{shown}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
