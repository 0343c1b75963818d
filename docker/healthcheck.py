#!/usr/bin/env python3
"""shoal-healthcheck: the container's health probe (no curl needed).

    shoal-healthcheck --url http://127.0.0.1:8080/healthz   healthy when it answers 2xx
    shoal-healthcheck --tcp 127.0.0.1:7100                  healthy when the port accepts
    shoal-healthcheck                                       finds the shoal process and decides:

With no option (the image's HEALTHCHECK) it reads the command line of the `shoal` process in this
container from /proc: `shoal coordinator` is probed at http://127.0.0.1:HTTP_PORT/healthz
(--http-port, default 8080); `shoal peer` is asked for its state: its gRPC port (--port) must
accept, and the coordinator's /api/status must list this peer (its id, from the key file at
--identity / $SHOAL_IDENTITY) as live and not "lost". The coordinator's HTTP address is
$SHOAL_COORDINATOR_HTTP (HOST:PORT), else --coordinator's host with port 8080; a bearer token is
read from $SHOAL_HTTP_TOKEN_FILE when set. A coordinator that cannot be reached does not make a
peer unhealthy (Swarm would replace every peer while the coordinator restarts): the probe then
falls back to the port. Any other shoal command is healthy while it runs. No shoal process:
unhealthy.

Exit 0 = healthy, 1 = unhealthy (what Docker's HEALTHCHECK expects); one line says why.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path

SUBCOMMANDS = ("coordinator", "peer", "demo", "status", "export", "generate", "lab")


def probe_url(url: str, timeout: float) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300, f"{url}: HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return False, f"{url}: HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return False, f"{url}: {exc}"


def probe_tcp(address: str, timeout: float) -> tuple[bool, str]:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout):
            return True, f"{address}: accepting connections"
    except (OSError, ValueError) as exc:
        return False, f"{address}: {exc}"


def find_shoal(proc: Path = Path("/proc")) -> list[str] | None:
    """argv of the shoal process (the console script or `python -m shoal.cli`), lowest pid first."""
    me = os.getpid()
    pids = sorted(int(p.name) for p in proc.iterdir() if p.name.isdigit())
    for pid in pids:
        if pid == me:
            continue
        try:
            raw = (proc / str(pid) / "cmdline").read_bytes()
        except OSError:
            continue
        argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        for i, arg in enumerate(argv[:3]):
            if os.path.basename(arg) == "shoal" or arg == "shoal.cli":
                return argv[i + 1:]
    return None


def flag(args: list[str], name: str, default: str) -> str:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return default


def probe_auto(timeout: float, proc: Path = Path("/proc")) -> tuple[bool, str]:
    args = find_shoal(proc)
    if args is None:
        return False, "no shoal process in this container"
    cmd = next((a for a in args if a in SUBCOMMANDS), "")
    if cmd == "coordinator":
        port = flag(args, "--http-port", "8080")
        if port == "0":
            return True, "coordinator running (--http-port 0: no fixed port to probe)"
        return probe_url(f"http://127.0.0.1:{port}/healthz", timeout)
    if cmd == "peer":
        port = flag(args, "--port", "0")
        if port == "0":
            return True, "peer running (--port 0: no fixed port to probe)"
        host = flag(args, "--host", "127.0.0.1")
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        ok, why = probe_tcp(f"{host}:{port}", timeout)
        if not ok:
            return ok, why
        return probe_peer_state(args, timeout)
    return True, f"shoal {cmd or '(no subcommand)'} running"


def peer_id_from_key(path: str) -> str:
    """The peer id of the Ed25519 key at `path` (protocols.identity's rule, in the image)."""
    from protocols.identity import Identity

    return Identity.load(path).peer_id


def coordinator_http(args: list[str]) -> str | None:
    explicit = os.environ.get("SHOAL_COORDINATOR_HTTP", "").strip()
    if explicit:
        return explicit
    grpc = flag(args, "--coordinator", os.environ.get("SHOAL_COORDINATOR", ""))
    host = grpc.rpartition(":")[0] if ":" in grpc else grpc
    return f"{host}:8080" if host else None


def probe_peer_state(args: list[str], timeout: float) -> tuple[bool, str]:
    """Whether the coordinator lists this peer as live (see the module docstring)."""
    key = flag(args, "--identity", os.environ.get("SHOAL_IDENTITY", "./shoal-peer.key"))
    try:
        peer_id = peer_id_from_key(key)
    except FileNotFoundError:
        return False, f"no identity key at {key} yet: the peer has not started its join"
    except Exception as exc:  # a key the peer itself would refuse: it says so in its log
        return False, f"identity key {key}: {exc}"
    http = coordinator_http(args)
    if http is None:
        return True, f"peer {peer_id}: port accepting (no coordinator address to ask)"
    req = urllib.request.Request(f"http://{http}/api/status")
    token_file = os.environ.get("SHOAL_HTTP_TOKEN_FILE", "").strip()
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            return False, f"SHOAL_HTTP_TOKEN_FILE={token_file}: {exc}"
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status = json.load(resp)
    except (OSError, ValueError) as exc:
        return True, (f"peer {peer_id}: port accepting; coordinator {http} not answering ({exc}), "
                      f"so its view was not checked")
    for p in status.get("peers", []) if isinstance(status, dict) else []:
        if isinstance(p, dict) and p.get("peer_id") == peer_id:
            state, step, stage = p.get("state"), p.get("step"), p.get("stage")
            if not p.get("live") or state == "lost":
                return False, f"peer {peer_id}: the coordinator lists it {state}, not live"
            return True, f"peer {peer_id}: stage {stage}, {state}, step {step}"
    return False, f"peer {peer_id}: not a member of the swarm at {http}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="shoal-healthcheck", description=__doc__.split("\n")[0])
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--url", help="healthy when this URL answers 2xx")
    group.add_argument("--tcp", metavar="HOST:PORT", help="healthy when this port accepts")
    ap.add_argument("--timeout", type=float, default=4.0, help="seconds (default 4)")
    args = ap.parse_args(argv)
    if args.url:
        ok, why = probe_url(args.url, args.timeout)
    elif args.tcp:
        ok, why = probe_tcp(args.tcp, args.timeout)
    else:
        ok, why = probe_auto(args.timeout)
    print(f"{'healthy' if ok else 'unhealthy'}: {why}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
