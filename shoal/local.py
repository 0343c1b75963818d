"""`shoal demo`: a whole swarm on this machine, training where you can watch it.

Starts a coordinator and `--peers` peer daemons as separate processes on 127.0.0.1 (the same
programs a real deployment runs), shows a progress line (step, loss, tokens/s, bytes/step) from
the coordinator's status API, prints the dashboard's address, and when the run reaches `--steps`
exports the model from the live peers, writes `summary.json` and stops everything it started —
also on Ctrl-C or error. Defaults are sized to learn visibly in a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

from protocols.coordinator_client import READY_STATES
from protocols.runspec import RunSpec
from shoal.swarm import Swarm, read_metrics

DEMO_DEFAULTS = {
    "model.d_model": 128, "model.n_layers": 4, "model.n_heads": 4, "model.seq_len": 64,
    "pipeline.microbatch": 8, "pipeline.target_batch": 32, "optim.lr": 3e-3,
    "sync.timeout_s": 10.0, "membership.heartbeat_s": 1.0, "membership.lease_s": 6.0,
}

# Zeroth-order training needs a small model to learn within a demo's steps (its progress per step
# shrinks with the parameter count): measured on 2 cores, this one (0.12 M parameters) falls
# 0.6 nats in 100 steps with 2 directions per peer and step (0.25-0.5 with 1), while the
# 0.9 M-parameter backprop default does not move under SPSA. Those runs summed a step's
# directions with lr 3e-3 (5e-3 diverged); a step now applies lr x their mean (1/N), so the same
# step with the demo's one stage-0 peer and 2 directions is lr 6e-3.
SPSA_DEMO_DEFAULTS = {"model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4,
                      "sync.spsa.lr": 6e-3, "sync.spsa.eps": 1e-3,
                      "sync.spsa.samples_per_step": 2}


def demo_inner_steps(steps: int) -> int:
    """DiLoCo's H for a demo of `steps` steps: about a tenth of the run, and a divisor of it.

    The paper's H (100-500) is for runs of many thousand steps; a demo of 100 steps with H = 100
    would show one outer step, at the very end. A tenth gives ~10 outer steps, and a divisor
    makes the run's last step an outer one, where the replicas' hashes must agree (unless the
    nearest divisor is under half the target, e.g. a prime step count: then the tenth it is).
    """
    target = max(1, steps // 10)
    divisor = max(d for d in range(1, target + 1) if steps % d == 0)
    return divisor if 2 * divisor >= target else target


FLAG_KEYS = {"stages": ("pipeline.stages", 2), "steps": ("run.steps", 100),
             "sync": ("sync.mode", "allreduce"), "seed": ("run.seed", 0)}


def _dotted_keys(table: dict, prefix: str = "") -> dict[str, object]:
    """A TOML table's leaves by dotted key: {"model": {"d_model": 8}} -> {"model.d_model": 8}."""
    out: dict[str, object] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_dotted_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def demo_spec(args: argparse.Namespace) -> RunSpec:
    """The run spec of a demo: explicit flags > the --config file > the demo's defaults.

    A key the file sets is never replaced by a default (neither a flag's nor DEMO_DEFAULTS');
    a key it leaves out gets the demo's default, as without --config. An --init-model fixes the
    model's shape (the weights decide it).
    """
    from_file: dict[str, object] = {}
    if args.config:
        from protocols.runspec import RunSpecError

        try:
            RunSpec.load(args.config)  # the file must be a valid spec on its own
            with open(args.config, "rb") as f:
                from_file = _dotted_keys(tomllib.load(f))
        except (RunSpecError, OSError, tomllib.TOMLDecodeError) as exc:
            raise SystemExit(f"shoal demo: --config: {exc}") from None

    def resolve(flag: str) -> object:
        explicit = getattr(args, flag, None)
        key, default = FLAG_KEYS[flag]
        return explicit if explicit is not None else from_file.get(key, default)

    stages, steps, sync, seed = (resolve(f) for f in ("stages", "steps", "sync", "seed"))
    defaults: dict[str, object] = dict(DEMO_DEFAULTS)
    if sync == "spsa" and not args.init_model and not getattr(args, "model", None):
        defaults.update({**SPSA_DEMO_DEFAULTS, "model.n_layers": max(2, int(stages))})
    if sync == "diloco":
        defaults["sync.diloco.inner_steps"] = demo_inner_steps(int(steps))
    defaults["run.name"] = f"demo-{sync}"
    values = {**defaults, **from_file}
    if args.init_model and not getattr(args, "model", None):  # the shape is the export's
        from peer.pipeline.checkpoint import load_config

        c = load_config(args.init_model)
        values.update({"model.d_model": c.d_model, "model.n_layers": c.n_layers,
                       "model.n_heads": c.n_heads, "model.seq_len": c.seq_len})
    if getattr(args, "model", None):  # a Hugging Face folder: its config fixes the shape
        values.update(hf_model_keys(args.model))
    values.update({"pipeline.stages": stages, "run.steps": steps, "sync.mode": sync,
                   "run.seed": seed})
    spec = RunSpec().replace(**values)
    if args.peers < spec.pipeline.stages + 1:
        raise SystemExit(f"--peers {args.peers} cannot cover {spec.pipeline.stages} block stages "
                         f"plus stage 0: use at least {spec.pipeline.stages + 1} peers")
    if spec.run.steps <= 0:
        raise SystemExit(f"shoal demo: run.steps is {spec.run.steps}: a demo needs a number of "
                         "steps to stop at (--steps N)")
    return spec


def out_dir(path: str | None, command: str = "demo") -> Path:
    """The working folder of `shoal demo` or `shoal lab`: --out when given (new or empty), else a
    fresh temporary one.

    A folder with an earlier run in it is refused: the coordinator would resume its stored state
    (the old swarm's members and leases) and the metrics files would get the new run appended,
    so the summary mixes two runs (a lab run pointed at an old folder read the old metrics and
    ended at once) and the export waits on replicas that no longer exist.
    """
    if not path:
        return Path(tempfile.mkdtemp(prefix=f"shoal-{command}-"))
    work = Path(path)
    if work.exists() and not work.is_dir():
        raise SystemExit(f"shoal {command}: --out {work} is a file; name a new or empty folder")
    if work.is_dir() and any(work.iterdir()):
        raise SystemExit(f"shoal {command}: --out {work} is not empty (an earlier run's state, "
                         f"logs and model are there, and a {command} run does not resume one): "
                         "name a new or empty folder, or remove this one")
    work.mkdir(parents=True, exist_ok=True)
    return work


def summarize(spec: RunSpec, peers: int, rows: list[dict], status: dict | None,
              seconds: float) -> dict:
    by_step: dict[int, list[float]] = {}
    for r in rows:
        if r.get("loss") is not None:
            by_step.setdefault(r["step"], []).append(r["loss"])
    steps = sorted(by_step)
    losses = [sum(by_step[s]) / len(by_step[s]) for s in steps]
    k = min(5, max(1, len(losses) // 10))
    peers_info = (status or {}).get("peers", [])
    tokens = sum(r.get("tokens", 0) for r in rows)
    bytes_sent = sum(p.get("bytes_sent") or 0 for p in peers_info)
    return {
        "peers": peers, "stages": spec.pipeline.stages, "sync": spec.sync.mode,
        "steps": steps[-1] if steps else 0,
        "initial_loss": sum(losses[:k]) / k if losses else None,
        "final_loss": sum(losses[-k:]) / k if losses else None,
        "loss_by_step": [[s, round(v, 5)] for s, v in zip(steps, losses, strict=True)],
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "tokens": tokens, "seconds": round(seconds, 2),
        "bytes_sent": bytes_sent,
        "bytes_per_step": bytes_sent / steps[-1] if steps else None,
        "bytes_by_kind": _sum_kinds(peers_info),
        "dropped_microbatches": sum(p.get("dropped_microbatches") or 0 for p in peers_info),
        "stage_hashes": _stage_hashes(peers_info),
        "stages_differ": stages_differ(_stage_hashes(peers_info)),
    }


def stages_differ(hashes: dict[str, list[str]]) -> list[str]:
    """The stages whose replicas did not end on one known state hash (an unknown hash counts
    as a difference: it was never shown equal)."""
    return sorted((s for s, h in hashes.items() if not h or not all(h) or len(set(h)) > 1),
                  key=int)


def _sum_kinds(peers: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in peers:
        for k, v in (p.get("bytes_by_kind") or {}).items():
            out[k] = out.get(k, 0) + int(v)
    return out


def settle(status: Callable[[], dict | None], last: dict | None, timeout_s: float,
           poll_s: float) -> dict | None:
    """After the last step: the swarm's status once the replicas of every stage report one
    state hash, or the last one seen after `timeout_s`. A replica that missed the last round
    catches up on its own (peer/consistency.py's behind_the_attestation, a couple of heartbeats
    after the swarm stopped stepping); the summary should report where the run ended, not a
    replica in the middle of its download."""
    deadline = time.monotonic() + timeout_s
    while True:
        time.sleep(poll_s)
        last = status() or last
        hashes = _stage_hashes((last or {}).get("peers", []))
        if hashes and all(h and len(set(h)) == 1 for h in hashes.values()):
            return last
        if time.monotonic() > deadline:
            return last


def _stage_hashes(peers: list[dict]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in peers:
        if p.get("state") in (*READY_STATES, "draining") and p.get("stage", -1) >= 0:
            out.setdefault(str(p["stage"]), []).append(p.get("state_hash") or "")
    return out


def tokens_per_s(rows: list[dict], last: int = 8) -> float:
    """The swarm's tokens per second over its last `last` optimizer steps, from the stage-0
    drivers' metrics rows (one per driver and step; the drivers of a step run side by side, so
    a step's tokens add up and it lasts as long as its slowest driver). Stalls and faults count:
    this is the time the steps really took."""
    tokens: dict[int, int] = {}
    seconds: dict[int, float] = {}
    for r in rows:
        s = r.get("step", 0)
        tokens[s] = tokens.get(s, 0) + int(r.get("tokens") or 0)
        seconds[s] = max(seconds.get(s, 0.0), float(r.get("seconds") or 0.0))
    recent = sorted(tokens)[-last:]
    total_s = sum(seconds[s] for s in recent)
    return sum(tokens[s] for s in recent) / total_s if total_s > 0 else 0.0


def progress_line(step: int, total: int, loss: float | None, tps: float, bps: float | None,
              tty: bool) -> str:
    width = 30
    done = int(width * min(step, total) / max(total, 1))
    bar = "#" * done + "-" * (width - done)
    loss_s = f"{loss:.3f}" if loss is not None and math.isfinite(loss) else "  -  "
    bps_s = f"{bps / 1e6:.2f} MB" if bps else "-"
    text = (f"[{bar}] step {step}/{total}  loss {loss_s}  {tps:,.0f} tok/s  "
            f"{bps_s}/step")
    return ("\r" + text) if tty else text


def check_data(data: str | None, spec: RunSpec) -> RunSpec:
    """Read the run's data here first, in its tokenizer, into the token cache the peers then
    reuse: data that are missing, malformed or hold no text fail now, with the peers' own
    message, not as a stage-0 peer that dies while the others wait for it. Returns `spec` with
    data.path (--data, absolute) and data.fingerprint filled in (docs/data.md)."""
    from peer.pipeline.data import CorpusError, load_corpus_for

    if data:
        spec = spec.replace(**{"data.path": str(Path(data).resolve())})
    try:
        corpus = load_corpus_for(spec, None)
    except CorpusError as exc:
        raise SystemExit(f"shoal demo: --data: {exc}") from None
    given = spec.data.fingerprint
    if given and given != corpus.fingerprint:
        raise SystemExit(f"shoal demo: the data's fingerprint is {corpus.fingerprint}, not the "
                         f"run spec's data.fingerprint {given}: the data or tokenizer changed")
    return spec.replace(**{"data.fingerprint": corpus.fingerprint})


def _dead_peer(swarm: Swarm) -> str | None:
    """A message naming the first peer that exited with an error, and its log's last lines."""
    for i, p in enumerate(swarm.peers):
        if p.poll() not in (None, 0):
            log = swarm.logs / f"peer{i}.log"
            tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log.exists() else []
            return (f"peer {i} exited with code {p.returncode} before the run ended (log: {log}):"
                    "\n  " + "\n  ".join(tail))
    return None


def hf_model_keys(directory: str) -> dict[str, object]:
    """Run spec keys for `shoal demo --model DIR` (a local Hugging Face folder, docs/models.md)."""
    from peer.pipeline.hf import HFConfig, HFModelError

    try:
        c = HFConfig.read(directory)
    except HFModelError as exc:
        raise SystemExit(f"shoal demo: --model: {exc}") from None
    return {"model.hf": str(Path(directory).resolve()), "model.d_model": c.hidden_size,
            "model.n_layers": c.n_layers, "model.n_heads": c.n_heads, "model.vocab": c.vocab_size}


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # the same clean stop as Ctrl-C: every process started is ended


def main(args: argparse.Namespace) -> int:
    spec = check_data(args.data, demo_spec(args))
    print(f"data: {spec.data.path or 'the standard library'}, fingerprint {spec.data.fingerprint}")
    work = out_dir(args.out)
    signal.signal(signal.SIGTERM, _on_sigterm)
    swarm = Swarm(work, spec, args.peers, args.data, args.device)
    swarm.init_model = args.init_model
    tty = sys.stdout.isatty()
    t_start = time.monotonic()
    status = None
    try:
        swarm.start(args.http_port)
        print(f"shoal demo: {args.peers} peers, {spec.pipeline.stages} block stages, sync "
              f"{spec.sync.mode}, {spec.run.steps} steps")
        print(f"dashboard: http://127.0.0.1:{swarm.http_port}/   logs: {swarm.logs}")
        last_print = 0.0
        deadline = time.monotonic() + max(600.0, spec.run.steps * 10.0)
        while True:
            time.sleep(1.0)
            if all(p.poll() is not None for p in swarm.peers):
                raise SystemExit("every peer exited; see the logs in " + str(swarm.logs))
            if dead := _dead_peer(swarm):
                raise SystemExit(f"shoal demo: {dead}")
            status = swarm.status() or status
            rows = read_metrics(swarm.logs)
            step = max((r["step"] for r in rows), default=0)
            recent = [r for r in rows if r["step"] >= step - 2 and r.get("loss") is not None]
            loss = sum(r["loss"] for r in recent) / len(recent) if recent else None
            tps = tokens_per_s(rows)
            bps = sum(r["bytes"] for r in rows) / step if step else None
            if tty or time.monotonic() - last_print > 10:
                print(progress_line(step, spec.run.steps, loss, tps, bps, tty), end="" if tty else
                      "\n", flush=True)
                last_print = time.monotonic()
            if step >= spec.run.steps:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"the run did not reach step {spec.run.steps} in time")
        if tty:
            print()
        seconds = time.monotonic() - t_start
        time.sleep(spec.membership.heartbeat_s * 2.5)  # let final stats reach the coordinator
        status = settle(swarm.status, status, 12 * spec.membership.heartbeat_s + 10.0,
                        spec.membership.heartbeat_s)
        from protocols.identity import Identity
        from shoal.export import export_to

        model_dir = work / "model"
        asyncio.run(export_to(model_dir, f"127.0.0.1:{swarm.port}",
                              Identity.load_or_create(work / "keys" / "export.key"),
                              swarm.token_file.read_text().strip()))
        summary = summarize(spec, args.peers, read_metrics(swarm.logs), status, seconds)
        summary["model_dir"] = str(model_dir)
        (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"loss {summary['initial_loss']:.3f} -> {summary['final_loss']:.3f} over "
              f"{summary['steps']} steps; {summary['tokens_per_s']:,.0f} tokens/s; "
              f"{summary['bytes_sent'] / 1e6:.1f} MB sent; "
              f"{summary['dropped_microbatches']} microbatches dropped")
        print(f"model: {model_dir}   summary: {work / 'summary.json'}")
        print(f"try:   shoal generate --model {model_dir} --prompt 'def '")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the swarm", flush=True)
        return 130
    finally:
        swarm.stop()
