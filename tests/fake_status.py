"""A stand-in for the coordinator's HTTP port, so the dashboard and `shoal status` can be tested.

It serves what `coordinator/http.py` serves — `/` (coordinator/static/index.html), `/static/<path>`,
`/api/status`, `/api/events` (server-sent events, one status about every second and at once on a
change) and a token `/metrics` — from a status document that tests replace at will:

    PUT  /_fake/status   body: a whole /api/status document
    PUT  /_fake/config   body: {"sse": bool, "interval": seconds, "animate": bool}

Tests run it as a real subprocess on 127.0.0.1 (`FakeStatusServer`), so "the coordinator went away"
is a real closed port. By hand, for looking at the page:

    python -m tests.fake_status --port 8080 --peers 24 --animate

The builders (`make_status`, `make_peer`, `join_peer`, `lose_peer`, `leave_peer`) write documents
of the /api/status shape (coordinator/status_doc.py `build_status`), deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import gzip
import hashlib
import json
import math
import random
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from aiohttp import web

from coordinator.http import accepts_gzip
from coordinator.status_doc import GZIP_LEVEL

STATIC_DIR = Path(__file__).resolve().parents[1] / "coordinator" / "static"
DEVICES = ("cuda:0 (A10G)", "cuda:0 (T4)", "cpu (8 cores)", "mps (M2)", "cuda:0 (L4)")
COORDINATOR = "198.18.0.10:7000"
FINGERPRINT = "sha256:" + hashlib.sha256(b"fake coordinator").hexdigest()
BYTES_PER_STEP_BY_MODE = {"allreduce": 41_943_040, "demo": 1_310_720, "diloco": 655_360, "spsa": 64}

Status = dict[str, Any]


def peer_id(i: int, seed: int = 0) -> str:
    """A stable 16-hex-digit id, shaped like one derived from a public key."""
    return hashlib.sha256(f"peer-{seed}-{i}".encode()).hexdigest()[:16]


def tokens_per_s(step: int) -> float:
    """A wavy but plausible swarm throughput curve."""
    return round(10_000 + 2500 * math.sin(step / 9) + 400 * math.sin(step / 2.3), 1)


def make_peer(i: int, stage: int, now: float, state: str = "training", seed: int = 0) -> dict:
    """One entry of `peers`, with plausible numbers."""
    rng = random.Random(seed * 100_003 + i)
    joined = now - rng.uniform(60, 3600)
    sps = round(rng.uniform(2.0, 40.0), 1) if state in ("training", "draining") else 0.0
    sent = int(rng.uniform(1e6, 5e9))
    return {
        "peer_id": peer_id(i, seed),
        "address": f"10.0.{i // 250}.{i % 250 + 2}:{7100 + i % 7}",
        "stage": stage,
        "state": state,
        "live": state not in ("lost", "left"),
        "samples_per_s": sps,
        "queue": rng.randint(0, 6),
        "bytes_sent": sent,
        "bytes_received": int(sent * rng.uniform(0.8, 1.2)),
        "loss": round(rng.uniform(1.8, 2.6), 3) if stage == 0 else None,
        "step": 1200 + rng.randint(-3, 0),
        "tokens_per_s": sps * 128 if stage == 0 else None,
        "dropped_microbatches": rng.choice((0, 0, 0, 1, 2)),
        "lease_expires": now + rng.uniform(2, 10),
        "joined_at": joined,
        "device": rng.choice(DEVICES),
        "memory_bytes": rng.choice((16, 32, 64)) << 30,
        "bytes_by_kind": {"activations": sent // 2, "grads": sent // 3, "sync": sent // 6},
    }


def make_status(
    n_peers: int = 12,
    n_stages: int = 5,
    sync_mode: str = "demo",
    empty_stages: tuple[int, ...] = (),
    rebuilt: dict[int, str] | None = None,
    seed: int = 0,
    now: float | None = None,
) -> Status:
    """A whole /api/status document: `n_peers` spread over `n_stages` (stage 0 included).

    With no peer and no emptied stage it is a fresh coordinator's: no peer has ever joined, no
    history, no traffic, one "start" event."""
    now = time.time() if now is None else now
    fresh = n_peers == 0 and not empty_stages
    rebuilt = rebuilt or {}
    live_stages = [s for s in range(n_stages) if s not in empty_stages] or [0]
    states = ("training",) * 8 + ("syncing", "joining", "draining", "rebuilt")
    peers = []
    for i in range(n_peers):
        state = states[i % len(states)] if n_peers > 4 else "training"
        peers.append(make_peer(i, live_stages[i % len(live_stages)], now, state, seed))
    for s in empty_stages:  # the replica that was there, now gone
        peers.append(make_peer(n_peers + s, s, now, "lost", seed))
    history = []
    for k in range(0 if fresh else 120):
        t = now - (120 - k) * 5.0
        history.append({
            "t": t, "step": 1080 + k,
            "loss": round(2.0 + 3.5 * math.exp(-k / 35) + 0.05 * math.sin(k), 4),
            "tokens_per_s": tokens_per_s(1080 + k),
            "bytes_per_step": BYTES_PER_STEP_BY_MODE.get(sync_mode, 1e6),
        })
    events = [{"t": p["joined_at"], "kind": "join", "peer_id": p["peer_id"], "stage": p["stage"],
               "detail": f"from {p['address']}"} for p in peers]
    events += [] if not peers else [
        {"t": now - 400, "kind": "restart", "peer_id": "", "stage": -1,
         "detail": "coordinator restarted; 11 peers reconnected"},
        {"t": now - 200, "kind": "drain", "peer_id": peers[0]["peer_id"], "stage": 0,
         "detail": "spot interruption notice"},
        {"t": now - 90, "kind": "move", "peer_id": peers[1]["peer_id"], "stage": 1,
         "detail": "stage 2 → stage 1 (rebalance)"},
    ]
    for s in empty_stages:
        events.append({"t": now - 30, "kind": "expire", "peer_id": peer_id(n_peers + s, seed),
                       "stage": s, "detail": "missed lease (10 s)"})
        events.append({"t": now - 29, "kind": "skip", "peer_id": None, "stage": s,
                       "detail": "no live replica: SkipPipe routes around it"})
    if fresh:
        events.append({"t": now - 5, "kind": "start", "peer_id": "", "stage": -1,
                       "detail": f"swarm 9f2c41d07a3b: run 'bytes-llama-8L', {n_stages - 1} block "
                                 f"stages, sync {sync_mode}"})
    for s, kind in rebuilt.items():
        events.append({"t": now - 60, "kind": "rebuild", "peer_id": None, "stage": s,
                       "detail": f"rebuilt by {kind} from neighbours"})
    events.sort(key=lambda e: e["t"])
    status = {
        "run": {"name": "bytes-llama-8L", "swarm_id": "9f2c41d07a3b", "sync_mode": sync_mode,
                "stages": n_stages, "spec": {"model": {"d_model": 256, "n_layers": 8},
                                             "sync": {"mode": sync_mode}}},
        "epoch": 3, "now": now,
        "coordinator": {"started_at": now - 3725, "uptime_s": 3725.0,
                        "grpc_address": COORDINATOR, "version": "0.1.0", "restarts": 1},
        "stages": [], "peers": peers, "history": history, "events": events,
        "totals": {}, "bytes_per_step_by_mode": {} if fresh else dict(BYTES_PER_STEP_BY_MODE),
        "join": {"coordinator": COORDINATOR, "fingerprint": FINGERPRINT,
                 "token_file": "/var/lib/shoal/join.token",
                 "command": f"shoal peer --coordinator {COORDINATOR} --token-file join.token"},
    }
    for s in range(n_stages):
        status["stages"].append({"stage": s, "replicas": [], "throughput": None, "grad_norm": None,
                                 "step": None, "rebuild": rebuilt.get(s, ""), "state": "empty"})
    return refresh(status)


def refresh(status: Status) -> Status:
    """Recompute `stages` and `totals` from `peers`, as the coordinator would."""
    live = [p for p in status["peers"] if p["live"]]
    for st in status["stages"]:
        mine = [p for p in live if p["stage"] == st["stage"]]
        st["replicas"] = [p["peer_id"] for p in mine]
        training = [p for p in mine if p["state"] in ("training", "rebuilt")]
        st["throughput"] = round(sum(p["samples_per_s"] for p in mine), 1) if mine else None
        st["grad_norm"] = round(0.4 + 0.1 * st["stage"], 3) if mine else None
        st["step"] = max((p["step"] for p in mine), default=None)
        st["state"] = "empty" if not mine else ("ok" if len(training) >= 2 else "degraded")
    status["totals"] = {
        "peers": len(status["peers"]), "live_peers": len(live),
        "bytes_sent": sum(p["bytes_sent"] for p in status["peers"]),
        "bytes_received": sum(p["bytes_received"] for p in status["peers"]),
        "dropped_microbatches": sum(p["dropped_microbatches"] for p in status["peers"]),
        "step": max((p["step"] for p in live), default=None),
    }
    return status


def join_peer(status: Status, i: int, stage: int, seed: int = 0) -> str:
    """Add peer `i` as `joining` on `stage`, with its join event; returns its id."""
    p = make_peer(i, stage, status["now"], "joining", seed)
    p.update(samples_per_s=0.0, bytes_sent=0, bytes_received=0, joined_at=status["now"])
    status["peers"].append(p)
    status["events"].append({"t": status["now"], "kind": "join", "peer_id": p["peer_id"],
                             "stage": stage, "detail": f"from {p['address']}"})
    refresh(status)
    return p["peer_id"]


def lose_peer(status: Status, pid: str) -> None:
    """Mark a peer `lost` (its lease expired), with its expire event."""
    for p in status["peers"]:
        if p["peer_id"] == pid:
            p.update(state="lost", live=False, samples_per_s=0.0, queue=0)
            status["events"].append({"t": status["now"], "kind": "expire", "peer_id": pid,
                                     "stage": p["stage"], "detail": "missed lease (10 s)"})
    refresh(status)


def leave_peer(status: Status, pid: str) -> None:
    """A clean departure (drained, then left), with its leave event."""
    for p in status["peers"]:
        if p["peer_id"] == pid:
            p.update(state="left", live=False, samples_per_s=0.0, queue=0)
            status["events"].append({"t": status["now"], "kind": "leave", "peer_id": pid,
                                     "stage": p["stage"], "detail": "drained and left"})
    refresh(status)


def advance(status: Status, dt: float) -> None:
    """Move the fake swarm forward `dt` seconds: counters, step, loss, history (for --animate)."""
    status["now"] += dt
    status["coordinator"]["uptime_s"] += dt
    for p in status["peers"]:
        if not p["live"]:
            continue
        rate = 2e5 + p["samples_per_s"] * 4e4
        p["bytes_sent"] += int(rate * dt)
        p["bytes_received"] += int(rate * dt * 0.9)
        p["step"] += 1
        p["lease_expires"] = status["now"] + 10
    last = status["history"][-1] if status["history"] else {"step": 0, "loss": 5.0}
    k = last["step"] + 1
    status["history"].append({
        "t": status["now"], "step": k, "loss": round(max(1.5, last["loss"] * 0.998), 4),
        "tokens_per_s": tokens_per_s(k),
        "bytes_per_step": BYTES_PER_STEP_BY_MODE.get(status["run"]["sync_mode"], 1e6),
    })
    del status["history"][:-600]
    refresh(status)


# ---------------------------------------------------------------------------------------------
# The server


class _Served:
    """What the fake serves; mutable after the app starts (aiohttp freezes the app itself)."""

    def __init__(self, status: Status, interval: float, animate: bool) -> None:
        self.status = status
        self.config: dict[str, Any] = {"sse": True, "interval": interval, "animate": animate}
        self._changed = asyncio.Event()
        self._text: str | None = None  # `status` as JSON, until it changes (10,000 peers: ~7 MB)
        self._gzipped: bytes | None = None

    def changed(self) -> None:
        """The status changed (or the config did): encode it anew, wake every SSE stream now."""
        self._text = self._gzipped = None
        self._changed.set()
        self._changed = asyncio.Event()

    def text(self) -> str:
        """The status as JSON, encoded once per change as the coordinator does once per build."""
        if self._text is None:
            self._text = json.dumps(self.status, separators=(",", ":"))
        return self._text

    def gzipped(self) -> bytes:
        """The same, gzipped (what the coordinator sends a client that accepts gzip)."""
        if self._gzipped is None:
            self._gzipped = gzip.compress(self.text().encode(), GZIP_LEVEL)
        return self._gzipped

    async def wait_change(self) -> None:
        """Until the next change or one interval, whichever comes first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), self.config["interval"])


def build_app(status: Status, interval: float = 1.0, animate: bool = False) -> web.Application:
    """The aiohttp application serving `status`."""
    served = _Served(status, interval, animate)

    async def index(_: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})

    async def api_status(request: web.Request) -> web.Response:
        headers = {"Cache-Control": "no-store", "Vary": "Accept-Encoding"}
        if accepts_gzip(request):
            return web.Response(body=served.gzipped(), content_type="application/json",
                                headers={**headers, "Content-Encoding": "gzip"})
        return web.Response(text=served.text(), content_type="application/json",
                            headers=headers)

    async def api_events(request: web.Request) -> web.StreamResponse:
        if not served.config["sse"]:
            raise web.HTTPNotFound(text="events disabled by /_fake/config")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionResetError):  # the page went away: not an error
            await resp.write(b"retry: 1000\n\n")
            while served.config["sse"]:
                await resp.write(f"data: {served.text()}\n\n".encode())
                await served.wait_change()
        return resp

    async def metrics(_: web.Request) -> web.Response:
        body = f"# TYPE shoal_peers gauge\nshoal_peers {len(served.status['peers'])}\n"
        return web.Response(text=body, content_type="text/plain")

    async def put_status(request: web.Request) -> web.Response:
        served.status = await request.json()
        served.changed()
        return web.json_response({"ok": True})

    async def put_config(request: web.Request) -> web.Response:
        served.config.update(await request.json())
        served.changed()
        return web.json_response(served.config)

    async def animator(_: web.Application):  # an aiohttp cleanup context
        async def loop() -> None:
            while True:
                await asyncio.sleep(served.config["interval"])
                if served.config["animate"]:
                    advance(served.status, served.config["interval"])
                    served.changed()

        task = asyncio.create_task(loop())
        yield
        task.cancel()

    # a 10,000-peer document is ~7 MB: PUT /_fake/status takes it (aiohttp's default is 1 MiB)
    app = web.Application(client_max_size=256 << 20)
    app.cleanup_ctx.append(animator)
    app.router.add_get("/", index)
    app.router.add_static("/static", STATIC_DIR)
    app.router.add_get("/api/status", api_status)
    app.router.add_get("/api/events", api_events)
    app.router.add_get("/metrics", metrics)
    app.router.add_put("/_fake/status", put_status)
    app.router.add_put("/_fake/config", put_config)
    return app


def main(argv: list[str] | None = None) -> None:
    """Serve a fake status; prints `LISTENING http://HOST:PORT` once bound."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--peers", type=int, default=12)
    ap.add_argument("--stages", type=int, default=5)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between SSE pushes")
    ap.add_argument("--animate", action="store_true", help="advance counters every interval")
    args = ap.parse_args(argv)
    status = make_status(args.peers, args.stages, empty_stages=(3,) if args.stages > 3 else (),
                         rebuilt={2: "checkfree"} if args.stages > 2 else None)

    async def serve() -> None:
        runner = web.AppRunner(build_app(status, args.interval, args.animate),
                               shutdown_timeout=0.5, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port, reuse_address=True)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(f"LISTENING http://{args.host}:{port}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


class FakeStatusServer:
    """Runs `python -m tests.fake_status` as a subprocess; stop() and start() keep the same port."""

    def __init__(self, status: Status | None = None, interval: float = 0.5) -> None:
        self.status = status if status is not None else make_status()
        self.interval = interval
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        """Base URL, without a trailing slash."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeStatusServer:
        """Start (or restart on the same port) and push the current status."""
        root = Path(__file__).resolve().parents[1]
        cmd = [sys.executable, "-m", "tests.fake_status", "--port", str(self.port),
               "--interval", str(self.interval)]
        for _ in range(50):  # a just-freed port can take a moment to bind again
            self.proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, text=True)
            line = self.proc.stdout.readline() if self.proc.stdout else ""
            if line.startswith("LISTENING "):
                self.port = int(line.rsplit(":", 1)[1])
                self.set_status(self.status)
                return self
            self.proc.wait(timeout=10)
            time.sleep(0.1)
        raise RuntimeError(f"fake status server did not start: {cmd}")

    def stop(self) -> None:
        """Kill the server as a crash would: connections drop, the port refuses."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            if self.proc.stdout:
                self.proc.stdout.close()
            self.proc = None

    def _put(self, path: str, body: dict) -> None:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     method="PUT", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()

    def set_status(self, status: Status) -> None:
        """Serve `status` from now on (a copy is kept for restarts)."""
        self.status = copy.deepcopy(status)
        self._put("/_fake/status", self.status)

    def configure(self, **config: Any) -> None:
        """Change `sse`, `interval` or `animate` on the running server."""
        self._put("/_fake/config", config)

    def __enter__(self) -> FakeStatusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    main()
