"""`python -m bench.bandwidth`: sync bytes on the wire per replica and optimizer step, by mode.

One model (d_model 256, 2 layers: 1.6 M parameters in the block stage; the table's header counts
them from the model itself) and one batch, trained
under each mode by the same swarm of real coordinator and peer processes on 127.0.0.1: one
stage-0 driver and two replicas of the block stage, which sync over the wire. (A second stage-0
driver is left out: the driver cannot yet bring a stage-0 replica that starts a step late back
into step, so two of them racing at start-up can stall a run.) The figures are the peers' own
byte counters (peer/pipeline/wire.py counts every TensorChunk sent or received, per kind) as their
heartbeats report them in /api/status `bytes_by_kind`, kind `sync:<mode>` only (activations and
state downloads are other kinds).

Steady state, warm-up skipped, exactly: each mode trains twice from scratch, to step N1 (the
warm-up) and to step N2, and a block replica's figure is (its sync bytes after N2 steps - after
N1 steps) / (N2 - N1) / 2. Both counts are taken at rest (every peer idles at the run's last
step and its counters have stopped), and on loopback every byte one replica sends the other
receives, so half of a replica's sent+received is what it sends. DiLoCo's two runs end right
after an outer step (N1 = H, N2 = 2H): its figure is one whole round's bytes over H, the
amortized per-step cost.

Modes: allreduce (dense fp32 gradients, the baseline); demo with fp32 values (6 bytes per kept
coefficient) and with sign bits (Psyche's wire: 2 bytes of index, 1 bit of sign, a scale per
chunk), both chunk 64, k 32; diloco H = 100 with int8 pseudo-gradients. DeMo is an all-gather
relayed by the round's leader, so each replica downloads every replica's packets.

Streaming DiLoCo (`sync.diloco.streaming_fragments` = P, ALGORITHMS.md §6b): H = --stream-h
(default 128), P = 4 fragments (one round of 1/P of the stage every H/P steps), tau = 1,
alpha = 0.5, int4 pseudo-gradients (1024 values per fp32 scale), DiLoCo's inner AdamW at lr
4e-4 (--stream-lr). Its two runs end at H and 2H: between them every fragment syncs exactly
once, so the figure is one whole model's rounds over H steps, like DiLoCo's. Its loss is held
against allreduce trained the same 2H steps at the same AdamW lr (`optim.lr` = --stream-lr, so
the two differ only in how they sync; the same tokens: one extra allreduce run, loss only):
gap = (streaming - allreduce) / allreduce, target <= 3 %, each loss the mean of the stage-0
driver's logged training losses over the last eighth of the run (steps 7H/4..2H: one step's
loss on 8 sequences swings by ~10 %, so the table's 4-step mean would compare noise).

SPSA (J = 1 direction per stage-0 peer and step, forward passes only): its sync bytes are the
stage-0 driver's, kind `sync:spsa` (peer/sync/spsa_driver.py): per step one PostSpsa to the
coordinator (step + the int8 code; the closing reply is received, not counted in the sent
figure) and per block replica the `spsa` field of EndStep (its tag, length and the code). The
driver's figure S = sent bytes per step (same N1/N2 difference), and the last line's
C = S / (block replicas + coordinator) = bytes per copy of one peer's message per step: 1 byte
of payload (the code) plus protobuf framing (field tags, lengths, the step number in the post).
The peer ids and the step barrier of StepEnd are sent in every mode and counted in none.

Last line: `bandwidth: allreduce/demo = A, allreduce/diloco = B, spsa_bytes_per_step = C,
allreduce/streaming = S` (A with the sign-bit wire; targets A >= 100, B >= 400, C <= 16,
S >= 1000; each rounded toward missing its target, A, B and S down, C up: bench/report.py; the
line above holds the verdicts, the streaming loss gap's among them).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.report import Target, machine, rounded, targets_line
from protocols.coordinator_client import READY_STATES
from protocols.runspec import RunSpec
from shoal.swarm import Swarm, read_metrics

MODEL = {"model.d_model": 256, "model.n_layers": 2, "model.n_heads": 8, "model.seq_len": 32,
         "pipeline.stages": 1, "pipeline.microbatch": 2, "pipeline.target_batch": 8,
         "sync.timeout_s": 20.0, "membership.heartbeat_s": 0.5, "membership.lease_s": 10.0}
LAYOUT = [0, 1, 1]  # one stage-0 driver, two replicas of the block stage
TARGETS = (Target("allreduce/demo", 100.0, digits=1), Target("allreduce/diloco", 400.0, digits=1),
           Target("spsa_bytes_per_step", 16.0, at_least=False, digits=1),
           Target("allreduce/streaming", 1000.0, digits=1))
LOSS_GAP = Target("streaming loss gap vs allreduce", 3.0, at_least=False, digits=2, unit="%")


def block_stage_params(spec: RunSpec) -> int:
    """Parameters of block stage 1 as the peers build it: what allreduce sends in fp32."""
    from peer.pipeline.stage_host import build_stage_module
    from peer.pipeline.stages import count_params

    return count_params(build_stage_module(spec, 1))


@dataclass
class Arm:
    """One mode, trained twice from scratch: `short` steps (the warm-up), then `long` steps."""

    label: str
    changes: dict
    short: int
    long: int
    final: dict[int, float] = field(default_factory=dict)  # steps -> mean sync bytes per replica
    loss: float = float("nan")
    loss_only: bool = False  # trained once, `long` steps, for its loss
    tail_loss: float = float("nan")  # mean training loss of the last eighth of the steps

    @property
    def kind(self) -> str:
        return f"sync:{self.changes['sync.mode']}"

    @property
    def stage(self) -> int:
        """Whose counters count: the block replicas', or SPSA's stage-0 driver's."""
        return 0 if self.changes["sync.mode"] == "spsa" else 1

    def per_step(self) -> float:
        """Bytes one block replica sends per step between step `short` and step `long`
        (SPSA: the driver's sent bytes per step, S)."""
        per = (self.final[self.long] - self.final[self.short]) / (self.long - self.short)
        return per if self.stage == 0 else per / 2


def start_blocks_first(swarm: Swarm, layout: list[int], timeout: float = 90.0) -> None:
    """Start the block replicas, wait until they all serve, then the stage-0 drivers.

    A block replica that joins after the drivers' first steps falls behind and catches up by
    downloading its stage; starting it first keeps every replica in every round from step 1.
    """
    blocks = [(i, s) for i, s in enumerate(layout) if s > 0]
    for i, stage in blocks:
        swarm.add_peer(i, ["--stage", str(stage), "--grace", "5"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        peers = (swarm.status() or {}).get("peers", [])
        if sum(p.get("state") == "training" for p in peers) >= len(blocks):
            break
        time.sleep(0.2)
    else:
        raise SystemExit(f"the block replicas did not start in {timeout:.0f} s; see {swarm.logs}")
    for i, stage in enumerate(layout):
        if stage == 0:
            swarm.add_peer(i, ["--stage", "0", "--grace", "5"])


def run_arm(work: Path, arm: Arm, steps: int) -> None:
    """Train `steps` steps; record the block replicas' final sync bytes (and the loss)."""
    spec = RunSpec().replace(**{**MODEL, **arm.changes, "run.steps": steps})
    swarm = Swarm(work, spec, 0, None, "cpu")
    try:
        swarm.start(0)
        start_blocks_first(swarm, LAYOUT)
        deadline = time.monotonic() + 120 + steps * 5
        final: dict[str, int] | None = None
        since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.5)
            peers = [p for p in (swarm.status() or {}).get("peers", [])
                     if p.get("state") in READY_STATES]
            if len(peers) < len(LAYOUT) or any(int(p.get("step") or 0) < steps for p in peers):
                continue
            now = {p["peer_id"]: int((p.get("bytes_by_kind") or {}).get(arm.kind, 0))
                   for p in peers if p["stage"] == arm.stage}
            if now != final:
                final, since = now, time.monotonic()
            elif time.monotonic() - since > 8 * MODEL["membership.heartbeat_s"]:
                break  # every peer idles at the last step and its counters have stopped
        else:
            raise SystemExit(f"{arm.label}: the run did not finish {steps} steps in time; "
                             f"see {swarm.logs}")
        arm.final[steps] = sum(final.values()) / len(final)
        rows = [r for r in read_metrics(swarm.logs) if r.get("loss") is not None]
        arm.loss = sum(r["loss"] for r in rows[-4:]) / max(len(rows[-4:]), 1)
        tail = rows[-max(4, steps // 8):]
        arm.tail_loss = sum(r["loss"] for r in tail) / max(len(tail), 1)
    finally:
        swarm.stop(grace=10)


def make_arms(args: argparse.Namespace) -> list[Arm]:
    """The bench's arms, in table order (the last one, allreduce at 2H steps, is loss only)."""
    h, sh = args.inner_steps, args.stream_h
    return [
        Arm("allreduce", {"sync.mode": "allreduce"}, args.warmup, args.steps),
        Arm("demo (fp32 values)", {"sync.mode": "demo"}, args.warmup, args.steps),
        Arm("demo (sign bits)", {"sync.mode": "demo", "sync.demo.sign_bits": True},
            args.warmup, args.steps),
        # both runs end right after an outer step: exactly one round apart
        Arm(f"diloco (H={h}, int8)", {"sync.mode": "diloco", "sync.diloco.inner_steps": h,
                                      "sync.diloco.quant": "int8"}, h, 2 * h),
        Arm("spsa (J=1, int8)", {"sync.mode": "spsa", "sync.spsa.lr": 1e-3}, args.warmup,
            args.steps),
        Arm(f"streaming (H={sh}, P={args.fragments}, int4)", {
            "sync.mode": "diloco", "sync.diloco.inner_steps": sh, "sync.diloco.quant": "int4",
            "sync.diloco.streaming_fragments": args.fragments,
            "sync.diloco.streaming_delay": args.delay, "sync.diloco.streaming_alpha": args.alpha,
            "sync.diloco.inner_lr": args.stream_lr}, sh, 2 * sh),
        Arm(f"allreduce ({2 * sh} steps)", {"sync.mode": "allreduce", "optim.lr": args.stream_lr},
            2 * sh, 2 * sh, loss_only=True),
    ]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="steps of the every-step modes")
    ap.add_argument("--warmup", type=int, default=10, help="steps not counted")
    ap.add_argument("--inner-steps", type=int, default=100, help="DiLoCo's H")
    ap.add_argument("--stream-h", type=int, default=128, help="streaming DiLoCo's H")
    ap.add_argument("--fragments", type=int, default=4, help="streaming DiLoCo's P")
    ap.add_argument("--delay", type=int, default=1, help="streaming DiLoCo's tau")
    ap.add_argument("--alpha", type=float, default=0.5, help="streaming DiLoCo's alpha")
    ap.add_argument("--stream-lr", type=float, default=RunSpec().sync.diloco.inner_lr,
                    help="streaming DiLoCo's inner lr, and the lr of allreduce at 2H steps")
    ap.add_argument("--only", help="run only the modes whose label starts with this")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    arms = make_arms(args)
    if args.only:
        arms = [a for a in arms if a.label.startswith(args.only)]
    tmp = Path(tempfile.mkdtemp(prefix="shoal-bench-bandwidth-"))
    for i, arm in enumerate(arms):
        for steps in (arm.long,) if arm.loss_only else (arm.short, arm.long):
            run_arm(tmp / f"{i}-{steps}", arm, steps)  # on failure the logs stay in tmp
    shutil.rmtree(tmp, ignore_errors=True)
    if len(arms) < 7:
        for arm in arms:
            per = "" if arm.loss_only else f"{arm.per_step():,.0f} B per block replica and step; "
            print(f"{arm.label}: {per}loss {arm.loss:.3f} (last eighth {arm.tail_loss:.3f})")
        return 0
    base = arms[0].per_step()
    spec = RunSpec().replace(**MODEL)
    params = block_stage_params(spec)
    dense = 4 * params  # fp32 bytes of the block stage's gradient
    m, p = spec.model, spec.pipeline
    print(f"bandwidth bench: d_model {m.d_model}, {m.n_layers} layers (block stage {params:,} "
          f"parameters, {dense:,} B dense fp32), {LAYOUT.count(1)} block replicas, batch "
          f"{p.target_batch} x {m.seq_len} tokens; loopback; {machine()}")
    print("sync bytes sent per block replica per optimizer step (steady state, from the "
          "peers' wire counters)")
    print(f"{'mode':<29} {'steps':>9} {'bytes/step':>12} {'vs dense':>9} {'allreduce/x':>12} "
          f"{'loss':>7}")
    for arm in arms[:6]:
        b = arm.per_step()
        print(f"{arm.label:<29} {f'{arm.short}..{arm.long}':>9} {b:>12,.0f} {b / dense:>9.4f} "
              f"{rounded(base / b, 1, down=True):>12} {arm.loss:>7.3f}")
    demo_ratio = base / arms[2].per_step()
    recipients = LAYOUT.count(1) + 1  # the block replicas and the coordinator
    spsa_c = arms[4].per_step() / recipients
    print(f"(demo with fp32 values: allreduce/demo = "
          f"{rounded(base / arms[1].per_step(), 1, down=True)}; spsa: the "
          f"driver sends {arms[4].per_step():.1f} B per step to {recipients} recipients, "
          f"{spsa_c:.1f} B per copy of its 1-byte code)")
    stream, equal = arms[5], arms[6]
    gap = 100.0 * (stream.tail_loss - equal.tail_loss) / equal.tail_loss
    print(f"(streaming: mean loss {stream.tail_loss:.3f} over steps {stream.long * 7 // 8 + 1}"
          f"..{stream.long}, allreduce {equal.tail_loss:.3f} over the same steps (last 4: "
          f"{equal.loss:.3f}): gap {gap:+.2f} %; "
          f"H = {args.stream_h}, P = {args.fragments}, tau = {args.delay}, "
          f"alpha = {args.alpha}, AdamW lr {args.stream_lr:g} in both)")
    figures = [demo_ratio, base / arms[3].per_step(), spsa_c, base / stream.per_step()]
    print(targets_line([*zip(TARGETS, figures, strict=True), (LOSS_GAP, gap)]))
    print("bandwidth: " + ", ".join(f"{t.name} = {t.figure(v)}"
                                    for t, v in zip(TARGETS, figures, strict=True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
