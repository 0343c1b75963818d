"""`python -m bench.spsa_verify`: verified SPSA against a stage-0 peer posting random scalars.

    python -m bench.spsa_verify [--steps 80] [--verify 0.25] [--lr 0.01] [--tolerance 3]
                                [--seed 1] [--pairs 3] [--work DIR]

Real processes on 127.0.0.1 (shoal.swarm.Swarm: a `shoal coordinator`, `shoal peer`s): four
stage-0 peers (each a driver of `sync.mode = "spsa"`, two microbatches of 8 sequences per step)
and one block stage of one replica, which joins once all four drivers are listed (so every run's
first step sees the same shards); a small model (d_model 64, 2 layers, 32-byte sequences). The
swarm runs five times, with the same peer identities (so the same seeds and data shards):

1. honest, verification off: the reference;
2. honest, `sync.spsa.verify = p`: its CPU time per step against run 1 is the overhead P; its
   closed sets and codes should equal run 1's (nothing struck), and the code differences the
   verifiers measured on honest contributions are the floating-point noise the tolerance must
   cover;
3. peer 3 lying, verification on: peer 3 computes its codes, then posts uniformly random ones
   instead (the driver's `SHOAL_TEST_SPSA_LIE` hook, peer/sync/spsa_driver.py: the post the
   product makes, with other bytes); it verifies others honestly. A lie is a posted code more than
   `sync.spsa.verify_tolerance` from its honest one; caught = lies the ledger struck. A struck
   direction is applied with its verifier's codes (`sync.spsa.verify_repair`, the default);
4. the same with `verify_repair = false`: struck directions are dropped (the step has 3);
5. peer 3 lying, verification off: what the lie costs unchecked (contrast).

Loss: the training loss the honest drivers (peers 0..2) report, (L+ + L-)/2 on their own batches,
averaged over the last 10 steps; G = (run 3 - run 1) / run 1 in %, at equal steps. The gap of run 2
against run 1 is the noise floor of G (two honest runs differ by the drivers' start-up timing:
views of the stage-0 set, hence shards, settle in the first steps). Overhead: P = CPU seconds
per step of all the swarm's processes (coordinator and peers, /proc, from the slowest driver's
step 5 to the last), run 2 / run 1 - 1, in %, the median over `--pairs` such pairs run one
after the other (CPU time on a loaded machine varies from run to run): what verification costs
in compute once the newcomers' probation (their first 3 steps, all checked) is over. The machine's
cores are shared with other work, so the drivers' wall-clock step time is printed beside it but
is not the figure; also printed: forward passes spent on verification over those on training.

Last line: `spsa_verify: caught = X/Y, overhead = P%, loss gap = G%`. Targets: every lie from the
liar's 10th step on caught, the first within 10 steps, no honest contribution struck, P <= 25 at
p = 0.25, G <= 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.report import Target, machine, targets_line
from peer.sync.spsa_driver import LIE_ENV
from protocols.identity import Identity
from protocols.runspec import RunSpec
from shoal.swarm import Swarm

SPEC = {"model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4, "model.seq_len": 32,
        "pipeline.stages": 1, "pipeline.microbatch": 8, "pipeline.target_batch": 64,
        "sync.timeout_s": 10.0, "membership.heartbeat_s": 0.5, "membership.lease_s": 8.0,
        "sync.mode": "spsa", "sync.spsa.hash_every": 10}
DRIVERS = 4
LIAR = 3  # index of the lying stage-0 peer
WARMUP = 5
LAST = 10  # steps the loss is averaged over
CATCH_WITHIN = 10
OVERHEAD = Target("overhead", 25.0, at_least=False, digits=1, unit="%")
GAP = Target("loss gap", 2.0, at_least=False, digits=2, unit="%")


@dataclass
class Arm:
    name: str
    rows: dict[int, list[dict]]  # driver index -> its metrics rows, by step
    wall_s: float
    cpu_per_step: float  # CPU seconds of every peer process and the coordinator per step

    def step_seconds(self) -> float:
        secs = [r["seconds"] for rows in self.rows.values() for r in rows if r["step"] > WARMUP]
        return statistics.fmean(secs)

    def loss(self, steps: int, honest: list[int]) -> float:
        vals = [r["loss"] for i in honest for r in self.rows[i]
                if steps - LAST < r["step"] <= steps and r.get("loss") is not None]
        return statistics.fmean(vals)

    def forward_pairs(self) -> tuple[int, int]:
        """(pairs for own contributions, pairs spent recomputing others'), after the warm-up."""
        own = sum(r["microbatches"] for rows in self.rows.values() for r in rows
                  if r["step"] > WARMUP)
        checks = sum(len(r.get("spsa_checked", [])) * r["microbatches"]
                     for rows in self.rows.values() for r in rows if r["step"] > WARMUP)
        return own, checks

    def closed_sets(self) -> dict[tuple[int, int], tuple]:
        """(driver, step) -> (the step's closed peers, the driver's own codes)."""
        return {(i, r["step"]): (tuple(r["spsa_peers"]), tuple(r["spsa_codes"]))
                for i, rows in self.rows.items() for r in rows}


@dataclass
class Lies:
    posted: int = 0  # lies (posted code off its honest one by more than the tolerance)
    caught: int = 0
    first_lie: int = 0
    first_catch: int = 0
    missed_after: list[int] = field(default_factory=list)  # lies let through after CATCH_WITHIN
    within_tolerance: int = 0  # random codes that happened to land near the honest one


def run_arm(work: Path, keys: Path, spec: RunSpec, name: str, liar: bool, steps: int) -> Arm:
    swarm = Swarm(work, spec, 0, None, "cpu")
    shutil.copytree(keys, work / "keys")
    t0 = time.monotonic()
    try:
        swarm.start(0)
        for i in range(DRIVERS):
            env = {LIE_ENV: "bench"} if liar and i == LIAR else {}
            old = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                swarm.add_peer(i, ["--stage", "0", "--grace", "5"])
            finally:
                for k, v in old.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        # The block replica comes last, once the coordinator lists every driver: no step runs
        # before, so every driver's first step already sees all four (same shards, same batch
        # counts in every run); a driver that started a step seeing fewer would make the runs
        # differ from step 1.
        wait_until = time.monotonic() + 120
        while sum(1 for p in (swarm.status() or {}).get("peers", [])
                  if p["stage"] == 0 and p["live"]) < DRIVERS:
            if time.monotonic() > wait_until:
                raise SystemExit(f"{name}: the {DRIVERS} drivers did not all join; see "
                                 f"{swarm.logs}")
            time.sleep(0.5)
        time.sleep(2 * spec.membership.heartbeat_s)  # their views refresh
        swarm.add_peer(DRIVERS, ["--stage", "1", "--grace", "5"])
        deadline = time.monotonic() + 120 + 5 * steps
        mark: tuple[int, float] | None = None  # (slowest driver's step, CPU s) after warm-up
        while time.monotonic() < deadline:
            rows = _rows(swarm.logs)
            at = min((rows[i][-1]["step"] if rows.get(i) else 0) for i in range(DRIVERS))
            if at >= steps and mark is not None:
                cpu = (_cpu_seconds(swarm) - mark[1]) / max(1, at - mark[0])
                return Arm(name, rows, time.monotonic() - t0, cpu)
            if mark is None and at >= WARMUP:
                mark = (at, _cpu_seconds(swarm))
            if any(p.poll() is not None for p in swarm.peers):
                break
            time.sleep(0.2)
        raise SystemExit(f"{name}: the drivers did not all reach step {steps}; see {swarm.logs}")
    finally:
        swarm.stop(grace=10)


def _cpu_seconds(swarm: Swarm) -> float:
    """User + system CPU seconds so far of the swarm's processes (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in [*swarm.peers, swarm.coordinator]:
        if p is None:
            continue
        try:
            fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def _rows(logs: Path) -> dict[int, list[dict]]:
    out = {}
    for i in range(DRIVERS):
        f = logs / f"peer{i}.metrics.jsonl"
        if f.exists():
            rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
            out[i] = sorted((r for r in rows if "spsa_codes" in r), key=lambda r: r["step"])
    return out


def count_lies(arm: Arm, liar_id: str, tolerance: int) -> Lies:
    lies = Lies()
    for r in arm.rows[LIAR]:
        posted, honest = r["spsa_codes"], r["spsa_honest_codes"]
        if not posted:
            continue
        if max(abs(a - b) for a, b in zip(posted, honest, strict=True)) <= tolerance:
            lies.within_tolerance += 1
            continue
        lies.posted += 1
        lies.first_lie = lies.first_lie or r["step"]
        if liar_id in r["spsa_flagged"]:
            lies.caught += 1
            lies.first_catch = lies.first_catch or r["step"]
        elif r["step"] >= lies.first_lie + CATCH_WITHIN:
            lies.missed_after.append(r["step"])
    return lies


def false_flags(arm: Arm, liar_id: str | None) -> int:
    return sum(1 for rows in arm.rows.values() for r in rows for p in r["spsa_flagged"]
               if p != liar_id) // DRIVERS  # every driver reports the same closed step


def noise(arm: Arm, liar_id: str | None = None) -> list[int]:
    """Code differences between honest posts and their recomputations (the liar's posts that
    passed are its random codes landing near its honest ones, not noise)."""
    return [d for rows in arm.rows.values() for r in rows
            for x, d in r.get("spsa_check_diff", {}).items() if x != liar_id]


def run(steps: int, verify: float, lr: float, seed: int, tolerance: int,
        out=print, work: Path | None = None, pairs: int = 3) -> tuple[Lies, float, float]:
    base = RunSpec().replace(**{**SPEC, "run.steps": steps, "run.seed": seed,
                                "sync.spsa.lr": lr, "sync.spsa.verify_tolerance": tolerance})
    on = base.replace(**{"sync.spsa.verify": verify})
    exclude = on.replace(**{"sync.spsa.verify_repair": False})
    out(f"bench.spsa_verify: {machine()}")
    out(f"{DRIVERS} stage-0 peers (peer {LIAR} lies in the liar runs: uniformly random codes), "
        f"1 block replica; d_model {base.model.d_model}, {base.model.n_layers} layers, seq_len "
        f"{base.model.seq_len}; {base.pipeline.target_batch} sequences per step; {steps} steps; "
        f"lr {lr:g} on the mean of the step's directions; verify p = {verify:g} (window "
        f"{max(1, round(1 / verify))} steps), tolerance {tolerance} codes; seed {seed}")
    with tempfile.TemporaryDirectory(prefix="spsa-verify-") as tmp:
        root = work or Path(tmp)
        keys = root / "keys"
        keys.mkdir()
        ids = [Identity.load_or_create(keys / f"peer{i}.key").peer_id
               for i in range(DRIVERS + 1)]
        arms = {}
        plan = [("honest", base, False), ("honest+verify", on, False),
                ("liar+verify", on, True), ("liar+exclude", exclude, True), ("liar", base, True)]
        for k in range(2, pairs + 1):  # more honest pairs, alternating, for the overhead
            plan += [(f"honest#{k}", base, False), (f"honest+verify#{k}", on, False)]
        for name, spec, liar in plan:
            arms[name] = run_arm(root / name, keys, spec, name, liar, steps)
    honest_peers = [i for i in range(DRIVERS) if i != LIAR]
    ref = arms["honest"]
    out(f"{'run':<14} {'step s':>7} {'cpu s/step':>10} {'loss':>7} {'gap %':>7} {'struck':>7} "
        f"{'wall s':>7}")
    for name, arm in arms.items():
        loss = arm.loss(steps, honest_peers)
        gap = 100 * (loss - ref.loss(steps, honest_peers)) / ref.loss(steps, honest_peers)
        struck = sum(len(r["spsa_flagged"]) for r in arm.rows[0])
        out(f"{name:<14} {arm.step_seconds():>7.3f} {arm.cpu_per_step:>10.3f} {loss:>7.4f} "
            f"{gap:>7.2f} {struck:>7} {arm.wall_s:>7.0f}")
    lies = count_lies(arms["liar+verify"], ids[LIAR], tolerance)
    unchecked = count_lies(arms["liar"], ids[LIAR], tolerance)
    pair_names = [("honest", "honest+verify")] + [(f"honest#{k}", f"honest+verify#{k}")
                                                  for k in range(2, pairs + 1)]
    ratios = [100 * (arms[v].cpu_per_step / arms[h].cpu_per_step - 1) for h, v in pair_names]
    walls = [100 * (arms[v].step_seconds() / arms[h].step_seconds() - 1) for h, v in pair_names]
    p, p_wall = statistics.median(ratios), statistics.median(walls)
    own, checks = arms["honest+verify"].forward_pairs()
    g = 100 * (arms["liar+verify"].loss(steps, honest_peers) - ref.loss(steps, honest_peers)
               ) / ref.loss(steps, honest_peers)
    g_off = 100 * (arms["liar"].loss(steps, honest_peers) - ref.loss(steps, honest_peers)
                   ) / ref.loss(steps, honest_peers)
    g_ex = 100 * (arms["liar+exclude"].loss(steps, honest_peers) - ref.loss(steps, honest_peers)
                  ) / ref.loss(steps, honest_peers)
    g_floor = 100 * (arms["honest+verify"].loss(steps, honest_peers) -
                     ref.loss(steps, honest_peers)) / ref.loss(steps, honest_peers)
    diffs = [d for name, arm in arms.items() if "verify" in name or "exclude" in name
             for d in noise(arm, ids[LIAR])]
    same = ref.closed_sets() == arms["honest+verify"].closed_sets()
    fp = false_flags(arms["honest+verify"], None) + false_flags(arms["liar+verify"], ids[LIAR])
    out(f"lies posted {lies.posted} (and {lies.within_tolerance} random codes within tolerance "
        f"of the honest one); caught {lies.caught}; first lie at step {lies.first_lie}, first "
        f"catch at step {lies.first_catch}; lies let through from step "
        f"{lies.first_lie + CATCH_WITHIN} on: {len(lies.missed_after)}; honest contributions "
        f"struck: {fp}")
    out(f"fp noise: {len(diffs)} honest contributions recomputed, code differences "
        f"{dict(sorted(_hist(diffs).items()))} (tolerance {tolerance})")
    out(f"overhead (honest runs, with verification against without, median of {pairs} pairs: "
        f"{', '.join(f'{r:+.1f}' for r in ratios)}): CPU seconds per step of the swarm's "
        f"processes {p:+.1f}%; the drivers' step time {p_wall:+.1f}% (wall clock, "
        f"on {os.cpu_count()} CPUs shared with whatever else runs); forward passes for "
        f"verification / training = {checks}/{own} = {100 * checks / max(own, 1):.1f}%; "
        f"closed sets and codes of the honest runs with and without verification "
        f"{'equal' if same else 'DIFFER'}")
    out(f"loss gaps against the honest run: liar, verified, struck directions repaired with the "
        f"verifier's codes (the default) {g:.2f}%; liar, verified, struck directions dropped "
        f"(verify_repair = false) {g_ex:.2f}%; liar unchecked {g_off:.2f}% ({unchecked.posted} "
        f"lies applied); honest with verification {g_floor:.2f}% (the noise floor)")
    ok_catch = (lies.posted > 0 and lies.first_catch and
                lies.first_catch < lies.first_lie + CATCH_WITHIN and not lies.missed_after
                and fp == 0)
    out(f"targets: every lie caught from the liar's step {CATCH_WITHIN} on, the first within "
        f"{CATCH_WITHIN}, no honest contribution struck: {'met' if ok_catch else 'MISSED'}; "
        + targets_line([(OVERHEAD, p), (GAP, abs(g))]).removeprefix("targets: "))
    out(f"spsa_verify: caught = {lies.caught}/{lies.posted}, overhead = {OVERHEAD.figure(p)}%, "
        f"loss gap = {GAP.figure(abs(g))}%")
    return lies, p, g


def _hist(xs: list[int]) -> dict[int, int]:
    h: dict[int, int] = {}
    for x in xs:
        h[x] = h.get(x, 0) + 1
    return h


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.spsa_verify",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--verify", type=float, default=0.25, help="p: fraction recomputed")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--tolerance", type=int, default=3, help="codes")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work", type=Path, help="keep the runs' logs here (a new folder)")
    ap.add_argument("--pairs", type=int, default=3,
                    help="honest runs with and without verification for the overhead (median)")
    args = ap.parse_args(argv)
    if not 0 < args.verify <= 1:
        ap.error("--verify must be in (0, 1]")
    if args.steps <= WARMUP + LAST:
        ap.error(f"--steps must be > {WARMUP + LAST}")
    if args.work is not None:
        args.work.mkdir(parents=True)
    run(args.steps, args.verify, args.lr, args.seed, args.tolerance, work=args.work,
        pairs=max(1, args.pairs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
