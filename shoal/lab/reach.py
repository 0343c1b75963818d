"""How the lab's peers were reached: the `summary.json` fields of `shoal lab --nat`.

    peers_reach     one row per peer the coordinator knows: host, peer id, address, stage,
                    step, live, behind_nat, reachable ("direct" | "relayed" | "unreachable" | "", as
                    the coordinator's /api/status `reach` says; "" where it says nothing)
    relayed_bytes   the coordinator's relay counter, shoal_relayed_bytes_total on its /metrics
                    (0 when it is not exposed, with `relayed_bytes_metric` naming what was
                    read or saying it was absent). Relays offered by peers (`--relay`) are
                    not counted: their bytes appear on no coordinator counter.
    direct_bytes    the peers' own bytes sent (their reported payload totals) minus
                    relayed_bytes, never below 0: the payload that went peer to peer. An
                    estimate: the relay counts tunnelled TCP bytes both ways (TLS and HTTP/2
                    framing included), the peers count payload bytes they sent.

A peer is matched to its lab host by its identity file (keys/HOST-GEN.key, written by
LabSwarm.spawn_peer), so a relayed peer whose address names its relay is still placed.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

from protocols.identity import Identity

#: coordinator/metrics.py's total of the bytes its relay carried, both ways (the per-peer
#: shoal_peer_relayed_bytes_total splits the same bytes, so it is not added)
RELAYED_METRIC = "shoal_relayed_bytes_total"


class _Swarm(Protocol):
    work: object
    net: object

    def http_get(self, path: str) -> bytes | None: ...


def peer_hosts_by_id(swarm: _Swarm) -> dict[str, str]:
    """peer id -> lab host, from the identity files the lab gave its peers."""
    out: dict[str, str] = {}
    for key in sorted((swarm.work / "keys").glob("peer*-*.key")):  # type: ignore[attr-defined]
        with contextlib.suppress(Exception):
            out[Identity.load(key).peer_id] = key.stem.rpartition("-")[0]
    return out


def relayed_bytes(metrics_text: str | None) -> tuple[int, str]:
    """(bytes, what was read) from the coordinator's /metrics text: RELAYED_METRIC's value."""
    if not metrics_text:
        return 0, "no /metrics answer: 0 reported"
    for line in metrics_text.splitlines():
        name, _, value = line.partition(" ")
        if name == RELAYED_METRIC:
            try:
                return int(float(value.split()[0])), RELAYED_METRIC
            except (IndexError, ValueError):
                return 0, f"unreadable /metrics line {line!r}: 0 reported"
    return 0, f"no {RELAYED_METRIC} on the coordinator's /metrics: 0 reported"


def reach_summary(swarm: _Swarm, status: dict | None, bytes_sent: int) -> dict:
    """The summary fields above, from the last /api/status and a fresh /metrics."""
    hosts = peer_hosts_by_id(swarm)
    nat = set(getattr(swarm.net, "nat", []))
    rows = []
    for p in (status or {}).get("peers") or []:
        pid = p.get("peer_id") or ""
        host = hosts.get(pid, "")
        rows.append({"host": host, "peer_id": pid, "address": p.get("address") or "",
                     "stage": p.get("stage"), "step": p.get("step"), "live": bool(p.get("live")),
                     "behind_nat": host in nat, "reachable": p.get("reach") or ""})
    body = swarm.http_get("/metrics")
    relayed, source = relayed_bytes(body.decode(errors="replace") if body else None)
    return {"peers_reach": rows, "relayed_bytes": relayed,
            "direct_bytes": max(0, int(bytes_sent) - relayed), "relayed_bytes_metric": source}
