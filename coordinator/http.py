"""The coordinator's HTTP side, on the same event loop as gRPC (aiohttp).

Routes:
- `/` the dashboard (coordinator/static/index.html; a plain placeholder when it is absent) and
  `/static/...` its files.
- `/api/status` the whole swarm as one JSON document. Its keys are a contract with the dashboard
  and `shoal status`; add keys, never rename them. JSON has no NaN: unknown numbers are null.
  `join` says how a peer joins (address, fingerprint, the token file's path, never the token).
  Each of `peers` has `reach` ("" not checked yet, "direct", "relayed", "unreachable": the
  coordinator's dial-back, coordinator/reach.py; `link` is the same, null until checked, for the
  dashboard's tiles), `relay` (offers to relay) and `relayed_by`.
- `/api/events` server-sent events: the same document about once a second (`event: status`),
  sooner (within a quarter second) when the membership changed.
- `/healthz` a tiny liveness document (ok, epoch, live peers) for probes and scripts.
- `/metrics` the swarm and the process for Prometheus (coordinator/metrics.py: names, labels,
  the registry of its own per app).

- `POST /api/ban` the operator's ban (`shoal ban PEER`): JSON {"peer_id": ID or a unique prefix
  of at least 6 characters of a known member's id, "reason": text}; revokes the member at once
  and refuses its key from then on (persisted). Answers {"peer_id", "was_live"}.

The status document and its cache are coordinator/status_doc.py's.

Access (issue #12): with an HTTP token (`shoal coordinator --http-token-file F`) every route but
`/healthz` needs it, as `Authorization: Bearer TOKEN` (scripts, Prometheus' `authorization`) or
the `shoal_token` cookie, which opening the dashboard once as `/?token=TOKEN` sets (HttpOnly,
SameSite=Strict; browsers' EventSource cannot send headers). Without a token the read-only
routes are open as before and `POST /api/ban` is served to loopback callers only. At most
`max_sse_clients` event streams are open at once; more get 503 (the dashboard then polls
/api/status). Nothing served holds a secret: no join token, token proof, HTTP token or private
key (public keys, addresses and peer ids are not secrets).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from coordinator.metrics import exposition, metrics_registry
from coordinator.status_doc import StatusCache

if TYPE_CHECKING:
    from coordinator.service import CoordinatorService

log = logging.getLogger("shoal.coordinator.http")

STATIC_DIR = Path(__file__).resolve().parent / "static"
SSE_PERIOD_S = 1.0
SSE_CHECKS = 4
DEFAULT_MAX_SSE_CLIENTS = 32
TOKEN_COOKIE = "shoal_token"
BAN_PATH = "/api/ban"
_PEER_ID_RE = re.compile(r"^[0-9a-f]{6,64}$")
PLACEHOLDER = """<!doctype html><html><head><meta charset="utf-8"><title>Shoal coordinator</title>
</head><body><h1>Shoal coordinator</h1><p>The dashboard files are not installed
(coordinator/static/index.html). The data is here: <a href="api/status">api/status</a>,
<a href="metrics">metrics</a>.</p></body></html>"""


# ---------------------------------------------------------------------- the app


def accepts_gzip(request: web.Request) -> bool:
    """True when the client's Accept-Encoding takes gzip: listed (or `*`) without q=0, gzip's own
    entry deciding over `*`'s."""
    q: dict[str, float] = {}
    for item in request.headers.get("Accept-Encoding", "").split(","):
        name, *params = (x.strip() for x in item.split(";"))
        weight = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        q[name.lower()] = weight
    return q.get("gzip", q.get("*", 0.0)) > 0


def _is_loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _presented_token(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.cookies.get(TOKEN_COOKIE)


def _token_ok(presented: str | None, token: str) -> bool:
    return presented is not None and hmac.compare_digest(presented.encode(), token.encode())


def make_app(svc: CoordinatorService, clock: Callable[[], float],
             static_dir: Path = STATIC_DIR, *, http_token: str | None = None,
             max_sse_clients: int = DEFAULT_MAX_SSE_CLIENTS) -> web.Application:
    """The aiohttp application serving the dashboard, the JSON API and /metrics.

    `http_token`: when set, every route but /healthz needs it (see the module docstring)."""
    cache = StatusCache(svc, clock)
    registry = metrics_registry(svc)
    sse_open = [0]

    @web.middleware
    async def guard(request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        if http_token is None or request.path == "/healthz":
            return await handler(request)
        if request.path == "/" and _token_ok(request.query.get("token"), http_token):
            resp = web.HTTPFound("/")  # drop the token from the address bar and history
            resp.set_cookie(TOKEN_COOKIE, http_token, httponly=True, samesite="Strict",
                            path="/")
            raise resp
        if not _token_ok(_presented_token(request), http_token):
            raise web.HTTPUnauthorized(
                text="this coordinator needs its HTTP token: send 'Authorization: Bearer TOKEN' "
                     "or open the dashboard once as /?token=TOKEN\n",
                headers={"WWW-Authenticate": 'Bearer realm="shoal"'})
        return await handler(request)

    app = web.Application(middlewares=[guard], client_max_size=64 << 10)

    async def index(_: web.Request) -> web.StreamResponse:
        page = static_dir / "index.html"
        if page.is_file():
            return web.FileResponse(page, headers={"Cache-Control": "no-cache"})
        return web.Response(text=PLACEHOLDER, content_type="text/html")

    async def status(request: web.Request) -> web.Response:
        headers = {"Cache-Control": "no-store", "Vary": "Accept-Encoding"}
        if accepts_gzip(request):
            return web.Response(body=await cache.gzipped(), content_type="application/json",
                                headers={**headers, "Content-Encoding": "gzip"})
        return web.Response(text=await cache.text(), content_type="application/json",
                            headers=headers)

    async def metrics(request: web.Request) -> web.Response:
        body, content_type = await exposition(registry, request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type,
                                                "Cache-Control": "no-store"})

    async def healthz(_: web.Request) -> web.Response:
        m = svc.membership
        return web.json_response({"ok": True, "epoch": m.epoch, "swarm_id": svc.swarm_id,
                                  "live_peers": sum(1 for x in m.members() if x.live)})

    async def events(request: web.Request) -> web.StreamResponse:
        if sse_open[0] >= max_sse_clients:
            raise web.HTTPServiceUnavailable(
                text=f"{max_sse_clients} event streams are open already (the coordinator's "
                     f"--max-sse-clients); poll /api/status instead\n",
                headers={"Retry-After": "10"})
        sse_open[0] += 1
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
            await resp.prepare(request)
            with contextlib.suppress(ConnectionResetError, asyncio.CancelledError):
                await resp.write(b"retry: 2000\n\n")
                while True:
                    epoch = svc.membership.epoch
                    await resp.write(f"event: status\ndata: {await cache.text()}\n\n".encode())
                    for _ in range(SSE_CHECKS):  # about once a second, sooner on a change
                        await asyncio.sleep(SSE_PERIOD_S / SSE_CHECKS)
                        if svc.membership.epoch != epoch:
                            break
            return resp
        finally:
            sse_open[0] -= 1

    async def ban(request: web.Request) -> web.Response:
        if http_token is None and not _is_loopback(request.remote):
            raise web.HTTPForbidden(text="without --http-token-file the coordinator takes bans "
                                         "from this machine (loopback) only\n")
        # no cross-site requests: a web page in the operator's browser could otherwise POST
        # here (JSON needs a CORS preflight, which this server never grants)
        origin = request.headers.get("Origin")
        if origin is not None and origin.split("://", 1)[-1].rstrip("/") != request.host:
            raise web.HTTPForbidden(text="cross-site ban refused\n")
        if request.content_type != "application/json":
            raise web.HTTPUnsupportedMediaType(text="send JSON (Content-Type: "
                                                    "application/json)\n")
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("peer_id"), str) or \
                not isinstance(body.get("reason", ""), str):
            raise web.HTTPBadRequest(text='send JSON {"peer_id": "...", "reason": "..."}\n')
        wanted, reason = body["peer_id"].strip().lower(), body.get("reason", "").strip()
        if not _PEER_ID_RE.match(wanted) or len(reason) > 200 or not reason.isprintable():
            raise web.HTTPBadRequest(text="peer_id must be a peer id (hex, or a unique prefix "
                                          "of at least 6 characters); reason printable, at most "
                                          "200 characters\n")
        known = [x.peer_id for x in svc.membership.members()]
        if wanted in known:
            peer_id = wanted
        else:
            matches = [p for p in known if p.startswith(wanted)]
            if len(matches) > 1:
                raise web.HTTPConflict(text=f"{wanted} is a prefix of {len(matches)} peer ids; "
                                            f"give more of it\n")
            if matches:
                peer_id = matches[0]
            elif len(wanted) == 16:  # a full id of a peer not seen (yet): banned all the same
                peer_id = wanted
            else:
                raise web.HTTPNotFound(text=f"no known peer id starts with {wanted}; give the "
                                            f"full 16-character id to ban a peer not seen\n")
        was_live = await svc.ban(peer_id, reason)
        log.warning("peer %s banned by the operator (%s)", peer_id, reason or "no reason")
        return web.json_response({"peer_id": peer_id, "was_live": was_live})

    app.router.add_get("/", index)
    app.router.add_get("/api/status", status)
    app.router.add_get("/api/events", events)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_post(BAN_PATH, ban)
    if static_dir.is_dir():
        app.router.add_static("/static", static_dir, show_index=False, follow_symlinks=False)
    return app


async def start_http(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port; returns the runner and the bound port (for port 0)."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(exc.errno, f"cannot serve HTTP on {host}:{port} ({exc.strerror}); pick "
                                 f"another --http-port or stop what holds it") from exc
    addresses = runner.addresses  # (host, port, ...) of each bound socket
    bound = addresses[0][1] if addresses else port
    return runner, bound
