"""`python -m bench.byzantine`: one hostile replica of four, sending its update sign-flipped x10.

    python -m bench.byzantine [--steps 120] [--seed 1] [--replicas 4] [--diloco-h 10]
                              [--microbatch 8] [--batch 32] [--modes allreduce,demo,diloco]

For each sync mode the same tiny model (the embedded model of peer/pipeline/model.py, small
config: d_model 64, 2 layers, 4 heads, 32-byte sequences, one block stage) trains on the same data
(the embedded corpus, the stdlib's sources, as the stage-0 driver reads it: one shard, batch
`step * 10007 + i` for microbatch i) from the same seed, four times: with the mode's robust rule
(`trimmed_mean`, trim 0.25, i.e. one replica per side of four) honest and attacked, and with the
plain mean (no robust rule, for contrast) honest and attacked. Stage 0 (embedding, head, loss) is
one honest replica; the block stage has `--replicas` replicas, each doing the forward and backward
of every `--replicas`-th microbatch (32 sequences per step in all). In an attacked run the
last replica by id (never the round's leader) sends its contribution sign-flipped and multiplied
by 10:
- allreduce (`sync.allreduce.aggregator`): its gradient sums (the `samples` count is left alone);
- demo (`sync.demo.aggregator`, new with this bench): the values of its top-k DCT packets (with
  sign bits: every sign bit flipped, every scale x10); its own momentum and error feedback stay
  honest, only what it sends is altered;
- diloco (`sync.diloco.aggregator`, H = `--diloco-h` inner steps, inner lr 3e-3, no inner weight
  decay, outer momentum 0.5 as in bench.wan): its int8 pseudo-gradient, i.e. -10 x its delta,
  re-quantized with the run's own codec (peer/sync/diloco.py `delta_to_wire`).
Reported per mode and rule: the evaluation loss after N steps (mean cross-entropy, nats per byte,
over 8 fixed batches of 32 sequences from the corpus's holdout blocks, which no shard trains on),
the mean training loss of the last 10 steps, whether the block replicas end with equal state
hashes, and the gap = (attacked - honest) / honest of the evaluation loss, in %.

Which product code runs, and which does not: the replicas are StageHost objects
(peer/pipeline/stage_host.py) in one process, driven by hand the way peer/sync/rounds.py's
SyncRounds drives them: `contribution` on every replica (the real sync mode classes of peer/sync/,
built by peer/sync/registry.py's `make_sync_mode` from the run spec: AllreduceMode /
RobustAllreduceMode, DemoMode, DilocoMode), every part encoded and decoded by protocols/codec.py
(RAW, digest and finiteness checked, as a `Sync.Exchange` message is), `aggregate` on the
lowest-id replica (the leader), the leader's reply through the codec again, `apply` of the same
bytes on every replica. The attacker's bytes are altered after its `contribution` and before the
codec, where they would leave its machine. The math is optim/robust.py, optim/demo.py and
optim/diloco.py as the peer calls them. Not exercised: the network (gRPC, TLS, the round's
timeouts and leader failover), the state-hash "diverged" check of a round (the attacker's hash
is honest here), the swarm's routing (microbatch i goes to replica i mod W), a hostile leader
(the leader-collects design trusts the round's leader; a hostile one is out of this bench's
scope), and every other attack than a sign flip x10 (e.g. the "a little is enough" attacks that
stay inside the honest spread).

Last line: `byzantine: worst loss gap = P%`, P the largest |gap| over the robust runs of the
modes run, rounded up (bench/report.py); target P <= 2. The line above holds the verdict.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bench.report import Target, machine, rounded, targets_line
from optim import diloco
from peer.pipeline import wire
from peer.pipeline.data import Corpus, holdout, inputs_targets, load_corpus, shard
from peer.pipeline.stage_host import StageHost
from peer.pipeline.stages import StageZero, count_params
from peer.sync.base import SyncMode
from peer.sync.diloco import DilocoMode, delta_from_wire, delta_to_wire
from peer.sync.registry import make_sync_mode
from peer.sync.rounds import LOCAL_STEP, Arrays, Meta
from protocols import codec
from protocols import shoal_pb2 as pb
from protocols.runspec import RunSpec

MODES = ("allreduce", "demo", "diloco")
MODEL = {"model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4, "model.seq_len": 32,
         "pipeline.stages": 1, "pipeline.microbatch": 8, "pipeline.target_batch": 32,
         "pipeline.activations": "fp32",
         "sync.diloco.inner_lr": 3e-3, "sync.diloco.inner_weight_decay": 0.0,
         "sync.diloco.outer_momentum": 0.5}
ROBUST = "trimmed_mean"
TRIM = 0.25  # per side: one replica of four
FACTOR = -10.0  # what the attacker multiplies its contribution by
EVAL_BATCHES, EVAL_BATCH, EVAL_SEED = 8, 32, 424242
TARGET = Target("worst loss gap", 2.0, at_least=False, digits=2, unit="%")


def spec_for(mode: str, aggregator: str, steps: int, seed: int, diloco_h: int,
             microbatch: int = 8, target_batch: int = 32) -> RunSpec:
    """The run spec of one run: the small model, `mode` with `aggregator` for its replicas."""
    return RunSpec().replace(**{
        **MODEL, "run.seed": seed, "run.steps": steps, "sync.mode": mode,
        "pipeline.microbatch": microbatch, "pipeline.target_batch": target_batch,
        "sync.diloco.inner_steps": diloco_h,
        f"sync.{mode}.aggregator": aggregator, f"sync.{mode}.trim": TRIM})


# ---------------------------------------------------------------------------- the attacker


def _flip_sign_bits(bits: np.ndarray, k: int) -> np.ndarray:
    """Every sign bit of a DeMo sign-bit packet flipped, padding bits left zero."""
    flipped = np.bitwise_not(bits)
    if k % 8:
        flipped[:, -1] &= np.uint8((1 << (k % 8)) - 1)
    return flipped


def sign_flip_x10(mode: SyncMode, spec: RunSpec, arrays: Arrays) -> Arrays:
    """The hostile replica's part: its honest `arrays` with the update negated and scaled x10
    (see the module docstring for what that is in each mode). New arrays; `arrays` untouched."""
    name = spec.sync.mode
    if name == "allreduce":
        return {k: (np.float32(FACTOR) * v).astype(np.float32) for k, v in arrays.items()}
    if name == "demo":
        out = dict(arrays)
        for key, value in arrays.items():
            if key.endswith(".v"):  # fp32 values
                out[key] = (np.float32(FACTOR) * value).astype(np.float32)
            elif key.endswith(".c"):  # sign-bit scales: the magnitude x10
                out[key] = (np.float32(abs(FACTOR)) * value).astype(np.float32)
            elif key.endswith(".b"):  # sign bits: all flipped
                out[key] = _flip_sign_bits(value, arrays[key[:-1] + "i"].shape[1])
        return out
    if name == "diloco":
        assert isinstance(mode, DilocoMode)
        if not arrays:  # an invalid (diverged) delta: nothing to alter
            return arrays
        delta = delta_from_wire(arrays, mode.outer.int8_block)
        q = diloco.quantize(FACTOR * delta, mode.outer.quant, mode.outer.int8_block)
        return delta_to_wire(q)
    raise ValueError(f"no attack defined for sync mode {name!r}")


# ---------------------------------------------------------------------------- the wire


def over_the_wire(arrays: Arrays, meta: Meta, step: int, n_params: int) -> Arrays:
    """`arrays` as the receiver of a `Sync.Exchange` message gets them: encoded (RAW) into one
    payload with its digest, then validated and decoded by protocols/codec.py."""
    header = pb.CallHeader(kind="sync", step=step, stage=1, sender="bench")
    header.meta.update(meta)
    encoded = codec.encode(arrays, pb.RAW)
    codec.fill_header(header, encoded)
    return codec.decode(header, encoded.payload, wire.sync_limits(n_params))


# ---------------------------------------------------------------------------- one run


@dataclass
class Run:
    eval_loss: float
    train_loss: float  # mean over the last 10 steps
    same_hash: bool  # every block replica ended with the same state hash
    seconds: float


def _sync(modes: dict[str, SyncMode], hosts: dict[str, StageHost], step: int,
          attacker: str | None, spec: RunSpec, n_params: int) -> None:
    """One step of the stage's replicas: a local step, or a round as SyncRounds runs it."""
    ids = sorted(hosts)
    if not modes[ids[0]].exchanges(step):
        for pid in ids:
            modes[pid].apply(hosts[pid], {}, dict(LOCAL_STEP))
        return
    parts: dict[str, tuple[Meta, Arrays]] = {}
    for pid in ids:
        arrays, meta = modes[pid].contribution(hosts[pid])  # type: ignore[attr-defined]
        if pid == attacker:
            arrays = sign_flip_x10(modes[pid], spec, arrays)
        parts[pid] = (meta, over_the_wire(arrays, meta, step, n_params))
    result, meta = modes[ids[0]].aggregate(parts)
    result = over_the_wire(result, meta, step, n_params)
    for pid in ids:
        modes[pid].apply(hosts[pid], result, meta)


@torch.no_grad()
def evaluate(stage0: StageZero, block: torch.nn.Module, corpus: Corpus, seq_len: int) -> float:
    """Mean loss (nats per byte) over the fixed holdout batches."""
    held = holdout(corpus, seq_len)
    losses = []
    for j in range(EVAL_BATCHES):
        tokens, targets = inputs_targets(held.batch(EVAL_BATCH, EVAL_SEED, j))
        loss, _ = stage0.head_loss(block(stage0.embed(tokens)), targets.long())
        losses.append(float(loss))
    return sum(losses) / len(losses)


def train(spec: RunSpec, replicas: int, attacked: bool, corpus: Corpus) -> Run:
    """Train `spec.run.steps` steps; the last block replica attacks when `attacked`."""
    t0 = time.perf_counter()
    torch.manual_seed(spec.run.seed)
    steps, p = spec.run.steps, spec.pipeline
    ids = [f"replica-{r}" for r in range(replicas)]
    attacker = ids[-1] if attacked else None
    stage0 = StageHost(spec, 0)
    mode0 = make_sync_mode(spec)
    hosts = {pid: StageHost(spec, 1) for pid in ids}
    modes = {pid: make_sync_mode(spec) for pid in ids}
    n0, n1 = count_params(stage0.module), count_params(hosts[ids[0]].module)
    data = shard(corpus, 0, 1, spec.model.seq_len)
    n_mb = max(1, math.ceil(p.target_batch / p.microbatch))
    losses: list[float] = []
    for step in range(1, steps + 1):
        step_losses = []
        for i in range(n_mb):
            host = hosts[ids[i % replicas]]
            mb = f"{step}-{i}"
            tokens, targets = inputs_targets(data.batch(p.microbatch, spec.run.seed,
                                                        step * 10007 + i))
            h = stage0.embed(mb, tokens, step)
            out = host.forward(mb, h, step)
            loss, g = stage0.head(mb, out, targets)
            stage0.embed_backward(mb, host.backward(mb, g))
            step_losses.append(loss)
        losses.append(sum(step_losses) / len(step_losses))
        _sync({"stage0": mode0}, {"stage0": stage0}, step, None, spec, n0)
        _sync(modes, hosts, step, attacker, spec, n1)
    hashes = {hosts[pid].state_hash() for pid in ids}
    first = hosts[ids[0]]
    for host in (stage0, *hosts.values()):
        assert host.step == steps, (host.stage, host.step)
    module0 = stage0.module
    assert isinstance(module0, StageZero)
    loss = evaluate(module0, first.module, corpus, spec.model.seq_len)
    for host in (stage0, *hosts.values()):
        host.close()
    last = losses[-10:]
    return Run(loss, sum(last) / len(last), len(hashes) == 1, time.perf_counter() - t0)


@dataclass
class Row:
    """One mode under one rule: its honest and attacked runs and the gap between them."""

    mode: str
    rule: str
    honest: Run
    attacked: Run
    gap: float  # %, signed


def gap_percent(honest: float, attacked: float) -> float:
    """(attacked - honest) / honest in %, nan when either loss is not finite."""
    if not (math.isfinite(honest) and math.isfinite(attacked)) or honest == 0:
        return float("nan")
    return 100.0 * (attacked - honest) / honest


def worst(gaps: Sequence[float]) -> float:
    """The largest |gap|; nan if any gap is nan (a diverged run never meets the target)."""
    if any(math.isnan(g) for g in gaps):
        return float("nan")
    return max(abs(g) for g in gaps)


# ---------------------------------------------------------------------------- main


def _fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if math.isfinite(x) else str(x)


def run(modes: Sequence[str], steps: int, seed: int, replicas: int, diloco_h: int,
        microbatch: int = 8, target_batch: int = 32,
        out: Callable[[str], None] = print) -> tuple[float, list[Row]]:
    """Run the bench and print its report; returns P (the worst robust gap, unrounded) and the
    table's rows."""
    if "diloco" in modes and steps % diloco_h:
        raise SystemExit(f"--steps {steps} must be a multiple of --diloco-h {diloco_h}, so that "
                         "the evaluation follows an outer step")
    if replicas < 3:
        raise SystemExit(f"--replicas {replicas}: a trimmed mean needs at least 3 replicas")
    corpus = load_corpus(None)
    probe = spec_for("allreduce", "mean", steps, seed, diloco_h, microbatch, target_batch)
    out(f"bench.byzantine: {machine()}")
    out(f"model d_model {probe.model.d_model}, {probe.model.n_layers} layers, seq_len "
        f"{probe.model.seq_len}; block stage {count_params(StageHost(probe, 1).module):,} "
        f"parameters; {replicas} block replicas (the last one hostile in attacked runs: "
        f"update x {FACTOR:g}); {target_batch} sequences per step in microbatches of "
        f"{microbatch}; {steps} steps; seed {seed}; diloco H = {diloco_h}; robust rule "
        f"{ROBUST}, trim {TRIM} per side")
    out(f"{'mode':<10} {'rule':<13} {'honest':>8} {'attacked':>9} {'gap %':>8} "
        f"{'train(h)':>9} {'train(a)':>9} {'hashes':>7} {'s':>6}")
    rows: list[Row] = []
    for mode in modes:
        for rule in (ROBUST, "mean"):
            spec = spec_for(mode, rule, steps, seed, diloco_h, microbatch, target_batch)
            honest = train(spec, replicas, False, corpus)
            attacked = train(spec, replicas, True, corpus)
            gap = gap_percent(honest.eval_loss, attacked.eval_loss)
            rows.append(Row(mode, rule, honest, attacked, gap))
            same = "equal" if honest.same_hash and attacked.same_hash else "DIFFER"
            out(f"{mode:<10} {rule:<13} {_fmt(honest.eval_loss):>8} "
                f"{_fmt(attacked.eval_loss):>9} {rounded(gap, 2, down=False):>8} "
                f"{_fmt(honest.train_loss):>9} {_fmt(attacked.train_loss):>9} {same:>7} "
                f"{honest.seconds + attacked.seconds:>6.1f}")
    p = worst([r.gap for r in rows if r.rule == ROBUST])
    out("(loss: evaluation cross-entropy after the last step, nats per byte, holdout batches; "
        "gap = (attacked - honest) / honest; 'mean' is the unprotected rule, for contrast; "
        "hashes: the block replicas' state hashes at the end, both runs)")
    out(targets_line([(TARGET, p)]))
    out(f"byzantine: worst loss gap = {TARGET.figure(p)}%")
    return p, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.byzantine",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--diloco-h", type=int, default=10)
    ap.add_argument("--microbatch", type=int, default=8,
                    help="sequences per microbatch; one microbatch per replica and step when "
                         "--batch = --replicas x --microbatch")
    ap.add_argument("--batch", type=int, default=32, help="sequences per step, all replicas")
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        ap.error(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    torch.set_num_threads(1)
    run(modes, args.steps, args.seed, args.replicas, args.diloco_h, args.microbatch, args.batch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
