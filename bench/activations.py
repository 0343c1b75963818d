"""`python -m bench.activations`: what each activation encoding costs in loss, at equal steps.

The same model, data, seed and steps are trained once per `pipeline.activations` encoding (fp32,
bf16, int8, fp8), with every stage boundary crossed the way the product crosses it: each
activation and each activation gradient is encoded into the TensorChunks a peer sends
(`peer.pipeline.wire.encode_chunks`, the run's encoding) and rebuilt by the receiver's
assembler (`protocols.tensor_stream.receive_sync`, digest, size and finiteness checks
included); the stages are the peer's own `StageHost`s and each step is the allreduce sync
mode's update (`AllreduceMode`: contribution, aggregate, apply) for one replica per stage. Only
the network is left out: it changes when the bytes arrive, not what they are, and time to a loss
over thin links is bench.wan's question.

The model and batch are bench.wan's (d_model 192, 4 layers, 64-token sequences, 32 sequences
per step, microbatches of 8), split here into 2 block stages, so a microbatch crosses 3
boundaries forward and 3 backward (bench.wan's swarm has 1 block stage: 2 each way).

Reported per encoding: bytes of one activation message on the wire (header and payload, as the
byte counters count it), encode + decode time per message, and the held-out loss of the trained
stages (fp32, no wire: the model's quality), each encoding against fp32 trained on the same seed
(model init and batches), for `--seeds` seeds: two runs that differ only in rounding drift
apart, so one seed cannot tell a cost from that spread; the per-seed figures show it.

Last line: `activations: fp32/int8 bytes = A, fp32/fp8 bytes = B, heldout loss vs fp32 (mean of
N): bf16 = +x %, int8 = +y %, fp8 = +z %` (ratios rounded down, loss costs up: bench/report.py).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch

from bench.report import machine, rounded
from peer.pipeline import wire
from peer.pipeline.data import holdout, inputs_targets, load_corpus, shard
from peer.pipeline.stage_host import StageHost
from peer.sync.allreduce import AllreduceMode
from protocols import shoal_pb2 as pb
from protocols.runspec import RunSpec
from protocols.tensor_stream import receive_sync

MODEL = {"model.d_model": 192, "model.n_layers": 4, "model.n_heads": 4, "model.seq_len": 64,
         "pipeline.microbatch": 8, "pipeline.target_batch": 32, "optim.lr": 3e-3}
ENCODINGS = ("fp32", "bf16", "int8", "fp8")
HELDOUT_BATCHES = 8
LAST = 10  # steps averaged for the training loss


@dataclass
class Arm:
    encoding: str
    message_bytes: int = 0
    codec_s: list[float] | None = None
    losses: list[float] | None = None
    heldout: float = float("nan")


class Wire:
    """A boundary between two stages: what one side sends, as the other side rebuilds it."""

    def __init__(self, spec: RunSpec) -> None:
        self.encoding = wire.ACTIVATION_ENCODINGS[spec.pipeline.activations]
        self.limits = wire.activation_limits(spec)
        self.sizes: list[int] = []
        self.seconds: list[float] = []

    def cross(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        t0 = time.perf_counter()
        header = pb.CallHeader(kind=kind, microbatch_id="mb", step=1)
        chunks = wire.encode_chunks(header, {"x": x.float().numpy()}, self.encoding)
        _, arrays = receive_sync(chunks, self.limits)
        self.seconds.append(time.perf_counter() - t0)
        self.sizes.append(wire.chunk_bytes(chunks))
        return torch.from_numpy(arrays["x"].copy())


def train(spec: RunSpec, steps: int, corpus) -> tuple[list[StageHost], list[float], Wire]:
    torch.manual_seed(spec.run.seed)
    hosts = [StageHost(spec, s) for s in range(spec.pipeline.stages + 1)]
    mode = AllreduceMode()
    data = shard(corpus, 0, 1, spec.model.seq_len)
    link = Wire(spec)
    losses = []
    mb = spec.pipeline.microbatch
    for step in range(steps):
        tokens, targets = inputs_targets(data.batch(spec.pipeline.target_batch, spec.run.seed,
                                                    step))
        total = 0.0
        for i in range(0, tokens.shape[0], mb):
            mb_id = f"s{step}m{i}"
            h = link.cross(hosts[0].embed(mb_id, tokens[i:i + mb], step + 1), "forward")
            for host in hosts[1:]:
                h = link.cross(host.forward(mb_id, h, step + 1), "forward")
            loss, g = hosts[0].head(mb_id, h, targets[i:i + mb])
            total += loss * min(mb, tokens.shape[0] - i)
            g = link.cross(g, "backward")
            for host in reversed(hosts[1:]):
                g = link.cross(host.backward(mb_id, g), "backward")
            hosts[0].embed_backward(mb_id, g)
        losses.append(total / tokens.shape[0])
        for host in hosts:
            arrays, meta = mode.contribution(host)
            result, meta = mode.aggregate({"me": (meta, arrays)})
            mode.apply(host, result, meta)
    return hosts, losses, link


@torch.no_grad()
def heldout_loss(hosts: list[StageHost], spec: RunSpec, corpus) -> float:
    held = holdout(corpus, spec.model.seq_len)
    total = 0.0
    for i in range(HELDOUT_BATCHES):
        tokens, targets = inputs_targets(held.batch(32, 12345, i))
        h = hosts[0].module.embed(tokens)
        for host in hosts[1:]:
            h = host.module(h)
        total += float(hosts[0].module.head_loss(h, targets)[0])
    return total / HELDOUT_BATCHES


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.activations",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--stages", type=int, default=2, help="block stages (default 2)")
    ap.add_argument("--seeds", type=int, default=3,
                    help="runs per encoding, seeds 1..N (model init and batches)")
    ap.add_argument("--encodings", nargs="+", default=list(ENCODINGS), choices=ENCODINGS)
    args = ap.parse_args()
    if "fp32" not in args.encodings:
        ap.error("fp32 is the baseline: keep it in --encodings")
    encodings = ["fp32"] + [e for e in args.encodings if e != "fp32"]
    print(f"bench.activations: {args.steps} steps, {args.stages} block stages, seeds "
          f"1..{args.seeds}, {machine()}", flush=True)
    torch.set_num_threads(1)  # the same compute order in every arm (and a fair share of 2 CPUs)
    corpus = load_corpus(None)
    arms: dict[str, list[Arm]] = {e: [] for e in encodings}
    for seed in range(1, args.seeds + 1):
        for enc in encodings:
            spec = RunSpec().replace(**{**MODEL, "pipeline.stages": args.stages,
                                        "pipeline.activations": enc, "run.seed": seed})
            t0 = time.monotonic()
            hosts, losses, link = train(spec, args.steps, corpus)
            arm = Arm(enc, int(np.median(link.sizes)), link.seconds, losses,
                      heldout_loss(hosts, spec, corpus))
            arms[enc].append(arm)
            print(f"  seed {seed} {enc}: {time.monotonic() - t0:.0f} s, train loss "
                  f"{np.mean(losses[-LAST:]):.4f}, heldout {arm.heldout:.4f}", flush=True)

    def cost(enc: str) -> list[float]:  # % heldout loss over fp32's, per seed
        return [100 * (a.heldout / b.heldout - 1) for a, b in zip(arms[enc], arms["fp32"],
                                                                     strict=True)]

    base = arms["fp32"][0]
    print(f"{'encoding':<9} {'bytes/message':>13} {'vs fp32':>8} {'codec ms':>9} "
          f"{'heldout loss (mean)':>20} {'vs fp32, mean':>14}  per seed")
    for enc, runs in arms.items():
        ms = 1e3 * float(np.median([s for a in runs for s in a.codec_s]))
        costs = cost(enc)
        ratio = base.message_bytes / runs[0].message_bytes
        print(f"{enc:<9} {runs[0].message_bytes:>13} {ratio:>8.2f} "
              f"{ms:>9.2f} {np.mean([a.heldout for a in runs]):>20.4f} "
              f"{rounded(float(np.mean(costs)), 2, down=False):>13}%  "
              + " ".join(f"{c:+.2f}%" for c in costs))
    ratios = [f"fp32/{e} bytes = "
              f"{rounded(base.message_bytes / arms[e][0].message_bytes, 2, down=True)}"
              for e in ("int8", "fp8") if e in arms]
    costs = [f"{e} = {'+' if np.mean(cost(e)) >= 0 else ''}"
             f"{rounded(float(np.mean(cost(e))), 2, down=False)} %" for e in encodings[1:]]
    print("activations: " + ", ".join(
        [*ratios, f"heldout loss vs fp32 (mean of {args.seeds}): " + ", ".join(costs)]))


if __name__ == "__main__":
    main()
