"""The coordinator's /api/status document (its keys are a contract with the dashboard and
`shoal status`: coordinator/http.py's docstring) and the cache every reader shares.

The status document is built at most twice a second and shared by every reader, so a room full
of open dashboards costs the coordinator one build per tick. `/api/status` is gzipped for a client
that accepts it (browsers do; `shoal status` and curl without --compressed do not ask): a
5,000-peer document is ~3 MB of JSON and ~0.7 MB gzipped (level 1, compressed once per build in a
thread, on the first request that wants it).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocols.tls import is_loopback

if TYPE_CHECKING:
    from coordinator.service import CoordinatorService

STATUS_MAX_AGE_S = 0.5
GZIP_LEVEL = 1  # level 1: 4x smaller for JSON at a sixth of level 6's CPU (measured, 3 MB)
EVENTS_SHOWN = 200


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None


def build_status(svc: CoordinatorService, now: float) -> dict[str, Any]:
    """The /api/status document (see the module docstring for the contract)."""
    m = svc.membership
    spec = svc.spec
    members = sorted(m.members(), key=lambda x: (not x.live, x.stage, x.peer_id))
    peers = []
    for x in members:
        s = x.stats
        peers.append({
            "peer_id": x.peer_id, "address": x.address, "stage": x.stage, "state": x.state,
            "live": x.live, "samples_per_s": _num(s.samples_per_s), "queue": s.queue,
            "reach": x.reach, "link": x.reach or None, "relay": x.relay,
            "relayed_by": x.relayed_by,
            "bytes_sent": s.bytes_sent, "bytes_received": s.bytes_received,
            "loss": _num(s.loss), "step": s.step, "tokens_per_s": _num(s.tokens_per_s),
            "state_hash": s.state_hash,
            "dropped_microbatches": s.dropped_microbatches, "grad_norm": _num(s.grad_norm),
            "microbatches_done": s.microbatches_done, "lease_expires": x.lease_expires,
            "last_seen": x.last_seen, "joined_at": x.joined_at, "device": x.benchmark.device,
            "benchmark_samples_per_s": x.benchmark.samples_per_s,
            "memory_bytes": x.benchmark.memory_bytes or None,
            "memory_available_bytes": x.benchmark.memory_available_bytes or None,
            "bytes_by_kind": dict(s.bytes_by_kind)})
    stages = [{"stage": s.stage, "replicas": list(s.replicas), "throughput": _num(s.throughput),
               "grad_norm": _num(s.grad_norm), "step": s.step, "rebuild": s.rebuild,
               "state": s.state, "attested_hash": s.attested_hash,
               "attested_step": s.attested_step} for s in m.stage_summaries()]
    step = m.step()
    live = sum(1 for x in members if x.live)
    return {
        "run": {"name": spec.run.name, "swarm_id": svc.swarm_id, "sync_mode": spec.sync.mode,
                "stages": m.n_stages, "spec": _finite_tree(_spec_dict(spec))},
        "epoch": m.epoch,
        "now": now,
        "coordinator": {"started_at": svc.started_at, "uptime_s": now - svc.started_at,
                        "grpc_address": svc.grpc_address, "version": svc.version,
                        "restarts": svc.restarts, "peer_id": svc.identity.peer_id,
                        "public_key": svc.identity.public_key.hex()},
        "stages": stages,
        "peers": peers,
        "history": [p.to_json() for p in m.history.points()],
        "events": [e.to_json() for e in m.events.recent(EVENTS_SHOWN)],
        "totals": {"peers": len(members), "live_peers": live,
                   "bytes_sent": m.bytes_sent_total, "bytes_received": m.bytes_received_total,
                   "dropped_microbatches": m.dropped_total, "step": step},
        "bytes_per_step_by_mode": bytes_per_step_by_mode(svc, step),
        "banned": [{"peer_id": b.peer_id, "t": b.t, "reason": b.reason} for b in m.bans()],
        "join": join_info(svc),
    }


def bytes_per_step_by_mode(svc: CoordinatorService, step: int) -> dict[str, float]:
    """Bytes on the wire per optimizer step, by sync mode.

    A mode's figure is what peers counted under bytes_by_kind "sync:<mode>" over the run; the
    run's own mode falls back to all bytes sent when peers report no per-kind split.
    """
    m = svc.membership
    if step <= 0:
        return {}
    out = {kind[5:]: total / step for kind, total in m.bytes_by_kind_total.items()
           if kind.startswith("sync:") and kind[5:]}
    if svc.spec.sync.mode not in out and m.bytes_sent_total:
        out[svc.spec.sync.mode] = m.bytes_sent_total / step
    return out


def join_info(svc: CoordinatorService) -> dict[str, Any]:
    """How a peer joins, for the dashboard's "waiting for peers": the coordinator's gRPC address,
    its fingerprint, the join token's path on the coordinator's machine (never the token) and the
    command a peer machine runs once it has a copy of that file (README, several machines)."""
    addr = svc.grpc_address
    fingerprint = svc.ca.fingerprint if svc.ca is not None else None
    token_file = svc.join_token_file or None
    cmd = ["shoal", "peer", "--coordinator", addr]
    if token_file:
        cmd += ["--token-file", Path(token_file).name]
    elif fingerprint:  # an allow-list only: the peer's key is listed, it pins the fingerprint
        cmd += ["--coordinator-fingerprint", fingerprint]
    if addr and not svc.tls and not is_loopback(addr.rpartition(":")[0]):
        cmd.append("--plaintext")  # the coordinator serves plaintext beyond this machine
    return {"coordinator": addr or None, "fingerprint": fingerprint, "token_file": token_file,
            "command": " ".join(cmd) if addr else None}


def _spec_dict(spec: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(spec)


def _finite_tree(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _finite_tree(v) for k, v in d.items()}
    if isinstance(d, float):
        return _num(d)
    return d


class StatusCache:
    """The status document, built at most every STATUS_MAX_AGE_S and shared by all readers.

    The dict is built on the event loop (it reads live membership state, ~2 ms for 1000
    peers); the JSON encoding (~7 ms) runs in a thread, on a document nothing else references,
    so heartbeats keep flowing meanwhile.
    """

    def __init__(self, svc: CoordinatorService, clock: Callable[[], float]) -> None:
        self.svc = svc
        self.clock = clock
        self._text = ""
        self._gzipped: bytes | None = None  # of _text, made on the first request that wants it
        self._built = -math.inf
        self._lock = asyncio.Lock()

    async def _fresh(self) -> None:
        """Rebuild the document when it is older than STATUS_MAX_AGE_S (under the lock)."""
        now = self.clock()
        if now - self._built >= STATUS_MAX_AGE_S:
            doc = build_status(self.svc, now)
            self._text = await asyncio.to_thread(
                json.dumps, doc, allow_nan=False, separators=(",", ":"))
            self._gzipped = None
            self._built = now

    async def text(self) -> str:
        async with self._lock:
            await self._fresh()
            return self._text

    async def gzipped(self) -> bytes:
        """The same document, gzip-compressed (in a thread; once per build)."""
        async with self._lock:
            await self._fresh()
            if self._gzipped is None:
                self._gzipped = await asyncio.to_thread(
                    gzip.compress, self._text.encode(), GZIP_LEVEL)
            return self._gzipped
