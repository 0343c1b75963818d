"""One rank of bench.wan's outside baseline: PyTorch DDP (gloo) on Shoal's model and data.

    ip netns exec HOST python -m bench.wan_ddp --rank R --world W --master ADDR:PORT \\
        --spec "$(cat run.toml)" --steps N --max-seconds S --target-loss L --out rows.jsonl

The whole model (peer/pipeline/model.py's Decoder) on every rank, the run spec's AdamW settings and
grad clip, the rank's own shard of the same corpus, `pipeline.target_batch / W` sequences per rank
and step (the same global batch as the Shoal runs). DDP averages the gradients with gloo's allreduce
over TCP; in the lab those connections cross the capped links and the delay relays like Shoal's.
Each step appends {"t", "step", "loss", "seconds", "bytes"} to --out (bytes: this rank's share of
a ring allreduce of the fp32 gradients, 2 (W-1)/W of their size). Ranks stop together: every
step they also allreduce the "stop" flag rank 0 raises once the mean loss reached the target
(smoothed like bench.wan) or the time ran out.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import deque
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from peer.pipeline.data import inputs_targets, load_corpus, shard
from peer.pipeline.model import Decoder
from peer.pipeline.stage_host import model_config
from protocols.runspec import RunSpec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.wan_ddp")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--master", required=True, help="HOST:PORT of rank 0's store")
    ap.add_argument("--spec", required=True, help="the run spec as TOML text")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--max-seconds", type=float, required=True)
    ap.add_argument("--target-loss", type=float, required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    spec = RunSpec.from_toml(args.spec)
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}", rank=args.rank,
                            world_size=args.world, timeout=timedelta(seconds=300))
    model = Decoder(model_config(spec))
    ddp = DistributedDataParallel(model)
    o = spec.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay,
                            betas=(0.9, 0.95))
    data = shard(load_corpus(None), args.rank, args.world, spec.model.seq_len)
    per_rank = max(1, spec.pipeline.target_batch // args.world)
    grad_bytes = 4 * sum(p.numel() for p in model.parameters())
    ring_bytes = int(2 * (args.world - 1) / args.world * grad_bytes)
    recent: deque[float] = deque(maxlen=3)
    t_start = time.time()
    with open(args.out, "a") as out:
        for step in range(1, args.steps + 1):
            t0 = time.time()
            tokens, targets = inputs_targets(data.batch(per_rank, spec.run.seed, step))
            logits = ddp(tokens.long())
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                   targets.reshape(-1).long())
            opt.zero_grad(set_to_none=True)
            loss.backward()  # DDP's gloo allreduce of the gradients happens here
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            opt.step()
            mean = torch.tensor([loss.item()])
            dist.all_reduce(mean)  # the ranks' losses summed: one tiny message
            recent.append(float(mean[0]) / args.world)
            out.write(json.dumps({"t": time.time(), "step": step, "loss": loss.item(),
                                  "seconds": time.time() - t0, "bytes": ring_bytes}) + "\n")
            out.flush()
            stop = torch.tensor([0.0])
            if args.rank == 0 and ((len(recent) == 3 and sum(recent) / 3 <= args.target_loss)
                                   or time.time() - t_start > args.max_seconds):
                stop[0] = 1.0
            dist.all_reduce(stop)
            if stop[0] > 0:
                break
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
