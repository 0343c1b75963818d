"""One rank of bench.wan's outside baseline: PyTorch DDP (gloo) on Shoal's model and data.

    ip netns exec HOST python -m bench.wan_ddp --rank R --world W --master ADDR:PORT \\
        --spec "$(cat run.toml)" --steps N --out rows.jsonl

The whole model (peer/pipeline/model.py's Decoder) on every rank, the run spec's AdamW settings and
grad clip, the rank's own shard of the same corpus, `pipeline.target_batch / W` sequences per rank
and step (the same global batch as the Shoal runs). DDP averages the gradients with gloo's allreduce
over TCP; in the lab those connections cross the capped links and the delay relays like Shoal's.

The loop is a DDP user's loop and nothing more: forward, backward (the one gradient allreduce),
clip, step, and the rank's own loss logged locally. Each step appends {"t", "step", "loss",
"seconds"} to --out. No collective is added for logging or stopping: over a 40 ms link each would
cost a round trip per step that no mode of Shoal pays. bench.wan reads every rank's file, takes the
mean over ranks (as it does over Shoal's stage-0 replicas) and ends the ranks once the target is
reached, the steps are done or the time is up. Bytes are not estimated here: bench.wan counts them
on the hosts' links.
"""

from __future__ import annotations

import argparse
import json
import time
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
            out.write(json.dumps({"t": time.time(), "step": step, "loss": loss.item(),
                                  "seconds": time.time() - t0}) + "\n")
            out.flush()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
