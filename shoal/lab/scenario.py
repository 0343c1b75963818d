"""Fault scenarios for `shoal lab`: a small command language, a seeded chaos generator, a runner.

One command a line (a scenario file, `--fault '...'`, or typed on stdin with `--interactive`):

    [at step N | at Ts]  ACTION  [TARGET]  [for=Ts] [grace=Ts] [respawn=Ts] [mbit=X]

    kill peer3                 SIGKILL the peer on host peer3
    preempt random grace=10    SIGTERM (it drains), SIGKILL after the grace if still there
    freeze peer2 for=15        SIGSTOP, SIGCONT 15 s later (a frozen peer: no answers at all)
    thaw peer2                 SIGCONT now
    partition peer4 for=20     the host's link down, up again 20 s later (heal peer4 by hand)
    restart coordinator        SIGTERM the coordinator and start it again on the same state
    spawn peer3                a fresh peer (new identity) on a host whose peer is gone
    shape peer1 mbit=5         change the host's cap, both ways

`random` picks a peer host with a live, unfaulted peer (from the scenario's seeded RNG).
`respawn=T` after kill/preempt starts a replacement on that host T seconds later. A command
without `at` runs as soon as it is read. `#` starts a comment. Times count from the start of
training (the first step seen), steps are the swarm's optimizer step.

`chaos(...)` writes the scenario the lab test uses: a third of the peers killed or preempted
(each replaced after a while), one partition that heals, a freeze, one coordinator restart,
spread over the middle of the run. The runner logs every fault it fires (`FaultRecord`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

ACTIONS = ("kill", "preempt", "freeze", "thaw", "partition", "heal", "restart", "spawn",
           "shape")
NEEDS_TARGET = frozenset(ACTIONS) - {"restart"}
_AT = re.compile(r"^at\s+(?:step\s+(\d+)|(\d+(?:\.\d+)?)\s*s)\s+(.*)$")


class ScenarioError(ValueError):
    """A scenario line cannot be understood; the message names the line and what is wrong."""


@dataclass
class Fault:
    action: str
    target: str = ""
    at_step: int | None = None
    at_s: float | None = None
    options: dict[str, float] = field(default_factory=dict)
    line: str = ""

    def due(self, step: int, t: float) -> bool:
        if self.at_step is not None:
            return step >= self.at_step
        return self.at_s is None or t >= self.at_s


@dataclass
class FaultRecord:
    t: float
    step: int
    action: str
    target: str
    detail: str = ""


def parse_line(text: str, lineno: int = 0) -> Fault | None:
    """One command, or None for a blank/comment line."""
    line = text.split("#", 1)[0].strip()
    if not line:
        return None
    where = f"line {lineno}: " if lineno else ""
    at_step = at_s = None
    m = _AT.match(line)
    if m:
        at_step = int(m.group(1)) if m.group(1) else None
        at_s = float(m.group(2)) if m.group(2) else None
        line = m.group(3)
    elif line.startswith("at "):
        raise ScenarioError(f"{where}{text.strip()!r}: write `at step N ...` or `at 30s ...`")
    words = line.split()
    action, rest = words[0], words[1:]
    if action not in ACTIONS:
        raise ScenarioError(f"{where}unknown action {action!r}; one of {', '.join(ACTIONS)}")
    target = ""
    if rest and "=" not in rest[0]:
        target, rest = rest[0], rest[1:]
    if action == "restart":
        target = target or "coordinator"
        if target != "coordinator":
            raise ScenarioError(f"{where}only the coordinator restarts; for a peer use "
                                "`kill HOST respawn=T`")
    elif not target:
        raise ScenarioError(f"{where}{action} needs a target host (peerN or random)")
    options: dict[str, float] = {}
    for word in rest:
        key, eq, value = word.partition("=")
        if not eq or key not in ("for", "grace", "respawn", "mbit"):
            raise ScenarioError(f"{where}bad option {word!r}; use for=, grace=, respawn=, mbit=")
        try:
            options[key] = float(value.rstrip("s"))
        except ValueError:
            raise ScenarioError(f"{where}{key}= needs a number, got {value!r}") from None
    if action == "shape" and "mbit" not in options:
        raise ScenarioError(f"{where}shape needs mbit=X")
    return Fault(action, target, at_step, at_s, options, text.strip())


def parse(text: str) -> list[Fault]:
    faults = []
    for i, raw in enumerate(text.splitlines(), 1):
        f = parse_line(raw, i)
        if f is not None:
            faults.append(f)
    return faults


def chaos(n_peers: int, steps: int, seed: int, *, respawn_s: float = 20.0,
          grace_s: float = 8.0, partition_s: float = 20.0, freeze_s: float = 8.0) -> str:
    """The chaos scenario as text: seeded, so a failing run can be replayed exactly."""
    rng = random.Random(seed)
    lo, hi = max(2, steps // 5), max(3, (steps * 7) // 10)
    hosts = [f"peer{i}" for i in range(1, n_peers + 1)]
    victims = rng.sample(hosts, max(1, round(n_peers / 3)))
    others = [h for h in hosts if h not in victims]
    lines = [f"# chaos seed {seed}: {len(victims)} of {n_peers} peers killed or preempted"]
    for i, h in enumerate(victims):  # the first is killed, the second preempted, then random
        step = rng.randint(lo, hi)
        if i == 0 or (i > 1 and rng.random() < 0.5):
            lines.append(f"at step {step} kill {h} respawn={respawn_s:g}")
        else:
            lines.append(f"at step {step} preempt {h} grace={grace_s:g} respawn={respawn_s:g}")
    cut, frozen = (rng.sample(others, 2) + others)[:2] if others else ("", "")
    if cut:
        lines.append(f"at step {rng.randint(lo, hi)} partition {cut} for={partition_s:g}")
    if frozen and frozen != cut:
        lines.append(f"at step {rng.randint(lo, hi)} freeze {frozen} for={freeze_s:g}")
    lines.append(f"at step {rng.randint(lo, hi)} restart coordinator")
    return "\n".join(lines) + "\n"


class ScenarioRunner:
    """Fires due faults against a LabSwarm; follow-ups (thaw, heal, respawn) are timed faults."""

    def __init__(self, swarm, faults: list[Fault], seed: int = 0) -> None:
        self.swarm = swarm
        self.pending = list(faults)
        self.rng = random.Random(seed)
        self.log: list[FaultRecord] = []
        self.busy: set[str] = set()  # hosts with a fault in progress (not `random` targets)

    def add(self, fault: Fault) -> None:
        self.pending.append(fault)

    def poll(self, step: int, t: float) -> list[FaultRecord]:
        fired = []
        for f in [f for f in self.pending if f.due(step, t)]:
            self.pending.remove(f)
            rec = self._fire(f, step, t)
            if rec is not None:
                fired.append(rec)
        return fired

    def _pick(self, f: Fault) -> str:
        if f.target != "random":
            if f.target != "coordinator" and f.target not in self.swarm.net.hosts:
                raise ScenarioError(f"{f.line!r}: no host {f.target!r} in this lab "
                                    f"({', '.join(self.swarm.peer_hosts)})")
            return f.target
        free = [h for h in self.swarm.live_peer_hosts() if h not in self.busy]
        if not free:
            raise ScenarioError(f"{f.line!r}: no live peer left to pick at random")
        return self.rng.choice(free)

    def _fire(self, f: Fault, step: int, t: float) -> FaultRecord | None:
        s = self.swarm
        o = f.options
        if f.action == "spawn" and f.target in s.live_peer_hosts():
            self.add(Fault("spawn", f.target, at_s=t + 1.0, line=f.line))  # still draining
            return None
        try:
            host = self._pick(f)
            detail = ""
            if f.action == "kill":
                detail = f"pid {s.kill(host)}"
            elif f.action == "preempt":
                detail = f"pid {s.preempt(host, o.get('grace', s.grace_s))}"
            elif f.action == "freeze":
                detail = f"pid {s.freeze(host)}"
                self._later(t, o, "thaw", host)
            elif f.action == "thaw":
                detail = f"pid {s.thaw(host)}"
                self.busy.discard(host)
            elif f.action == "partition":
                s.partition(host)
                self._later(t, o, "heal", host)
            elif f.action == "heal":
                s.heal(host)
                self.busy.discard(host)
            elif f.action == "restart":
                s.restart_coordinator()
            elif f.action == "spawn":
                detail = f"pid {s.spawn_peer(host).pid}"
                self.busy.discard(host)
            elif f.action == "shape":
                s.net.shape(host, o["mbit"])
                detail = f"{o['mbit']:g} Mbit/s"
            if f.action in ("kill", "preempt"):
                self.busy.add(host)
                if "respawn" in o:
                    self.add(Fault("spawn", host, at_s=t + o["respawn"], line=f"spawn {host}"))
            rec = FaultRecord(round(t, 2), step, f.action, host, detail)
        except (ValueError, KeyError, OSError, RuntimeError) as exc:  # ScenarioError, LabError
            rec = FaultRecord(round(t, 2), step, f.action, f.target, f"failed: {exc}")
        self.log.append(rec)
        return rec

    def _later(self, t: float, options: dict[str, float], action: str, host: str) -> None:
        self.busy.add(host)
        if "for" in options:
            self.add(Fault(action, host, at_s=t + options["for"], line=f"{action} {host}"))
