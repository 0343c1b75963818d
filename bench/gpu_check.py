"""`python -m bench.gpu_check`: Shoal on a machine with a CUDA GPU, checked and measured.

    python -m bench.gpu_check [--steps 40] [--replicas 2] [--work DIR]

Needs CUDA: without a device torch can see it says so and exits with status 2 (nothing here is
measured on a CPU and reported as a GPU figure). Three parts:

1. SPSA's perturbation z (optim/spsa_z.py: a counter-based hash of (seed, tensor, index), no
   torch generator) drawn on the GPU equals the CPU's bit for bit, Rademacher and Gaussian, at
   several offsets; and a perturbed and an updated parameter set hash equal on both
   (optim/spsa.py `perturb`, `apply`, `state_hash`), so CPU and GPU replicas of an SPSA run agree.
2. A swarm on the GPU (shoal.swarm.Swarm: real `shoal coordinator` and `shoal peer --device
   cuda` processes on 127.0.0.1): one block stage and stage 0, `--replicas` peers on each
   (4 peers by default, all on GPU 0), `sync.mode = "allreduce"`, bf16 autocast (the default
   `pipeline.precision = "auto"`), `--steps` steps. Replicas equal after every step: each peer
   runs at `--log-level debug`, where it logs its stage's state hash after each step
   (peer/daemon.py), and for every stage and every step from the first after which all had
   logged one (a replica that joins late downloads its stage first) to the last, each replica
   must have logged one hash, the same as the others'; a replica that found its hash differing
   from its stage's (peer/consistency.py) logs "state hash ... differs": those lines count too.
3. The same swarm on the CPU (`--device cpu`, one torch thread per peer) for the baseline.

Samples/s: the drivers' metrics rows (samples per step = pipeline.target_batch), from the end of
step WARMUP (CUDA context, kernels, allocator) to the last step. The model is small enough for
the CPU run to finish in minutes (d_model 256, 4 layers, 128-byte sequences), so the GPU is far
from busy: the ratio says what a GPU buys at this size, not at a size a GPU is meant for.

Last line: `gpu_check: cuda/cpu samples/s = R, replicas equal = K/K steps, spsa z bit-identical
= yes|NO`.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.report import machine
from protocols.runspec import RunSpec
from shoal.swarm import Swarm, read_metrics

SPEC = {"model.d_model": 256, "model.n_layers": 4, "model.n_heads": 8, "model.seq_len": 128,
        "pipeline.stages": 1, "pipeline.microbatch": 8, "pipeline.target_batch": 32,
        "sync.mode": "allreduce", "sync.timeout_s": 20.0, "membership.heartbeat_s": 0.5,
        "membership.lease_s": 6.0}
WARMUP = 5
# (start, count) of the z draws compared: offsets past one word, past 2**32, odd lengths
DRAWS = ((0, 1), (0, 300_001), (12_345, 70_000), (2**33 + 1, 4097))
NO_CUDA = ("bench.gpu_check: no CUDA device is visible to torch here (torch.cuda.is_available() "
           "is False): run it on a machine with an NVIDIA GPU and a CUDA build of torch; nothing "
           "was measured")


def out(line: str) -> None:
    print(line, flush=True)


# ---------------------------------------------------------------- part 1: SPSA's z


def spsa_bits_equal(device: str = "cuda") -> tuple[bool, int]:
    """(whether every draw and update matched, how many comparisons were made), CPU vs
    `device` (the tests run it against the CPU itself, to check the comparisons run)."""
    from optim import spsa, spsa_z

    checks, ok = 0, True
    seed = spsa.seed_for("gpu-check", 7, "peer-a")
    for kind in spsa_z.PERTURBATIONS:
        for start, n in DRAWS:
            cpu = spsa_z.direction_int(kind, seed, "layers.0.attn.wq.weight", n, start)
            gpu = spsa_z.direction_int(kind, seed, "layers.0.attn.wq.weight", n, start, device)
            ok &= torch.equal(gpu.cpu(), cpu)
            checks += 1
        gen = torch.Generator().manual_seed(0)
        base = [torch.randn(257, 129, generator=gen), torch.randn(1000, generator=gen)]
        on_cpu, on_gpu = [p.clone() for p in base], [p.clone().to(device) for p in base]
        spsa.perturb(on_cpu, seed, 1e-3, 1, None, kind)
        spsa.perturb(on_gpu, seed, 1e-3, 1, None, kind)
        ok &= spsa.state_hash(on_cpu) == spsa.state_hash(on_gpu)
        updates = [(spsa.seed_for("gpu-check", 7, f"p{i}"), c) for i, c in enumerate((5, -127))]
        spsa.apply(on_cpu, updates, 1e-3, 0.37, None, kind)
        spsa.apply(on_gpu, updates, 1e-3, 0.37, None, kind)
        ok &= spsa.state_hash(on_cpu) == spsa.state_hash(on_gpu)
        checks += 2
    return bool(ok), checks


# ---------------------------------------------------------------- parts 2 and 3: swarms


HASH_LINE = re.compile(r"stage (\d+) after step (\d+): state hash ([0-9a-f]+)")


def hashes_by_step(logs: dict[str, str]) -> dict[tuple[int, int], dict[str, set[str]]]:
    """Per (stage, step), the hashes each peer logged after it (peer/daemon.py logs one at debug
    level whenever its state hash for a step is known; a replay or re-download logs again)."""
    seen: dict[tuple[int, int], dict[str, set[str]]] = {}
    for peer, text in logs.items():
        for m in HASH_LINE.finditer(text):
            stage, step, digest = int(m.group(1)), int(m.group(2)), m.group(3)
            seen.setdefault((stage, step), {}).setdefault(peer, set()).add(digest)
    return seen


def compare(seen: dict[tuple[int, int], dict[str, set[str]]], stages: int, steps: int,
            replicas: int) -> tuple[int, int, list[tuple[int, int]]]:
    """(the first step after which every replica of every stage logged a hash: a replica that
    joins after the first steps downloads its stage and logs from then on; how many (stage, step)
    pairs from that step to `steps` have every replica's hash logged and equal; the pairs where
    that fails: a replica missing, or two hashes). The first step is steps + 1 when none is."""
    first = next((step for step in range(1, steps + 1)
                  if all(len(seen.get((stage, step), {})) == replicas
                         for stage in range(stages))), steps + 1)
    bad = []
    for key in [(stage, step) for stage in range(stages) for step in range(first, steps + 1)]:
        by_peer = seen.get(key, {})
        hashes = set().union(*by_peer.values()) if by_peer else set()
        if len(by_peer) != replicas or len(hashes) != 1:
            bad.append(key)
    return first, stages * (steps + 1 - first) - len(bad), bad


def samples_per_s(rows: list[dict], per_step: int, warmup: int = WARMUP) -> float:
    """Swarm-wide samples/s from the drivers' metrics rows: from the end of step `warmup` to
    the end of the last step (each step's end: the latest row for it)."""
    ends: dict[int, float] = {}
    for r in rows:
        ends[r["step"]] = max(ends.get(r["step"], 0.0), r["t"])
    last = max(ends)
    if warmup not in ends or last <= warmup:
        raise SystemExit(f"bench.gpu_check: the run logged steps {sorted(ends)}; it needs step "
                         f"{warmup} and later ones (raise --steps)")
    return per_step * (last - warmup) / (ends[last] - ends[warmup])


def run_swarm(device: str, steps: int, replicas: int, work: Path) -> dict:
    spec = RunSpec().replace(**{**SPEC, "run.steps": steps})
    swarm = Swarm(work, spec, 0, None, device)
    try:
        swarm.start(0)
        for i in range(2 * replicas):  # stage 0, then stage 1, then the second replicas
            swarm.add_peer(i, ["--stage", str(i % 2), "--log-level", "debug"])
        deadline = time.monotonic() + 60 + 20 * steps
        while time.monotonic() < deadline:
            status = swarm.status() or {}
            live = [p for p in status.get("peers", []) if p.get("live")]
            if len(live) == 2 * replicas and all(p["step"] >= steps for p in live):
                break
            if any(p.poll() is not None for p in swarm.peers):
                raise SystemExit(f"bench.gpu_check: a peer exited; see {swarm.logs}")
            time.sleep(0.5)
        else:
            raise SystemExit(f"bench.gpu_check: the {device} swarm did not reach step "
                             f"{steps}; see {swarm.logs}")
    finally:
        swarm.stop()
    logs = {f.stem: f.read_text(errors="replace") for f in swarm.logs.glob("peer*.log")}
    diverged = sum(t.count("state hash at step") + t.count("state hash differs")
                   for t in logs.values())
    first, equal, differing = compare(hashes_by_step(logs), 2, steps, replicas)
    rate = samples_per_s(read_metrics(swarm.logs), spec.pipeline.target_batch)
    return {"rate": rate, "first": first, "equal": equal, "compared": 2 * (steps + 1 - first),
            "differing": differing, "diverged": diverged, "logs": str(swarm.logs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--replicas", type=int, default=2, help="peers per stage (2 stages)")
    ap.add_argument("--work", type=Path, help="keep the runs' logs here (a new folder)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    if args.steps <= WARMUP + 2:
        ap.error(f"--steps must be > {WARMUP + 2}")
    out(f"bench.gpu_check on {machine()}; GPU 0: {torch.cuda.get_device_name(0)}, "
        f"{torch.cuda.mem_get_info(0)[1] / 2**30:.1f} GiB; torch {torch.__version__}")
    same, checks = spsa_bits_equal()
    out(f"SPSA z and updates, CPU vs CUDA: {checks} comparisons, "
        f"{'bit-identical' if same else 'DIFFER'}")
    work = args.work or Path(tempfile.mkdtemp(prefix="shoal-gpu-check-"))
    if args.work is not None:
        args.work.mkdir(parents=True)
    runs = {}
    for device in ("cuda", "cpu"):
        runs[device] = r = run_swarm(device, args.steps, args.replicas, work / device)
        out(f"{device:>4}: {r['rate']:8.1f} samples/s over steps {WARMUP}..{args.steps}; "
            f"every replica logged from step {r['first']}; from there, (stage, step) pairs with "
            f"every replica's hash equal {r['equal']}/{r['compared']}, the others "
            f"{r['differing'][:5]}; replicas that found their "
            f"hash differing {r['diverged']} (logs: {r['logs']})")
    g = runs["cuda"]
    ok = same and not g["differing"] and not g["diverged"] and g["compared"] > 0
    out(f"gpu_check: cuda/cpu samples/s = {g['rate'] / runs['cpu']['rate']:.2f}, replicas equal "
        f"= {g['equal']}/{g['compared']} steps, spsa z bit-identical = {'yes' if same else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
