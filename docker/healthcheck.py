#!/usr/bin/env python3
"""shoal-healthcheck: the container's health probe (standard library only, no curl needed).

    shoal-healthcheck --url http://127.0.0.1:8080/healthz   healthy when it answers 2xx
    shoal-healthcheck --tcp 127.0.0.1:7100                  healthy when the port accepts
    shoal-healthcheck                                       finds the shoal process and decides:

With no option (the image's HEALTHCHECK) it reads the command line of the `shoal` process in this
container from /proc: `shoal coordinator` is probed at http://127.0.0.1:HTTP_PORT/healthz
(--http-port, default 8080); `shoal peer` by a TCP connection to its gRPC port (--port, when it is
not 0); any other shoal command is healthy while it runs. No shoal process: unhealthy.

Exit 0 = healthy, 1 = unhealthy (what Docker's HEALTHCHECK expects); one line says why.
"""

from __future__ import annotations

import argparse
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
        return probe_tcp(f"{host}:{port}", timeout)
    return True, f"shoal {cmd or '(no subcommand)'} running"


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
