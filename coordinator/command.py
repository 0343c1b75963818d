"""`shoal coordinator`'s command line: its flags, and the process that serves until SIGTERM.

    shoal coordinator ...                   (shoal/cli.py adds these flags)
    python -m coordinator.main ...          (the same, without the `shoal` wrapper)

What the coordinator does at start and restart is coordinator/main.py's `serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from coordinator.gcpolicy import GcPolicy
from coordinator.http import DEFAULT_MAX_SSE_CLIENTS
from coordinator.main import DEFAULT_JOIN_NONCE_CAPACITY, serve, tune_interpreter
from coordinator.membership import DEFAULT_REJOIN_COOLDOWN_S


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The coordinator's flags, shared by `shoal coordinator` and `python -m coordinator.main`."""
    p.add_argument("--config", help="run spec TOML (first start; a restart keeps the stored one)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=7000, help="gRPC port (0 = any free)")
    p.add_argument("--http-port", type=int, default=8080, help="dashboard port (0 = any free)")
    p.add_argument("--state-dir", default="./shoal-state")
    p.add_argument("--token-file", help="join token peers must present")
    p.add_argument("--allow-file", help="hex Ed25519 public keys allowed to join, one a line")
    p.add_argument("--no-mdns", action="store_true", help="do not announce on the LAN")
    p.add_argument("--tls-dir", help="serve gRPC over mTLS with the certificates in this folder "
                   "(default: TLS with the swarm CA the coordinator keeps in --state-dir)")
    p.add_argument("--http-token-file",
                   help="bearer token the dashboard, /api/*, /metrics and SSE require "
                        "(Authorization: Bearer TOKEN, or open the dashboard as /?token=TOKEN); "
                        "without it they are open and bans are taken from loopback only")
    p.add_argument("--max-sse-clients", type=int, default=DEFAULT_MAX_SSE_CLIENTS,
                   help="event streams (/api/events) open at once; more get 503")
    p.add_argument("--trust-stage-hints", action="store_true",
                   help="honour every peer's --stage (an operator's lab or test swarm); by "
                        "default a hint is honoured only to re-attach, or for an empty stage")
    p.add_argument("--join-nonce-capacity", type=int, default=DEFAULT_JOIN_NONCE_CAPACITY,
                   help="Joins by keys that are not members remembered (replay protection) "
                        "within the clock-skew window; beyond it Joins get RESOURCE_EXHAUSTED, "
                        "members' calls never do")
    p.add_argument("--rejoin-cooldown", type=float, default=DEFAULT_REJOIN_COOLDOWN_S,
                   help="seconds a peer that left must wait before joining again")
    p.add_argument("--plaintext", action="store_true",
                   help="serve gRPC without TLS even on a non-loopback address (lab only)")
    p.add_argument("--no-relay", action="store_true",
                   help="do not relay for peers nobody can dial (they then need a peer started "
                        "with --relay)")
    p.add_argument("--relay-ports", default=None,
                   help="ports relayed peers are reached at, FIRST-LAST (e.g. 40000-40999; "
                        "default: any free port); open them in the firewall")
    p.add_argument("--relay-host", default=None,
                   help="the host others dial to reach a relayed peer (default: this "
                        "coordinator's address, as in its gRPC address; behind a cloud's 1:1 "
                        "NAT give the public one)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="durable checkpoints every N steps (run spec checkpoint.every): the "
                        "peers send their stages, this coordinator writes them and an index "
                        "(docs/checkpoints.md)")
    p.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help="where the checkpoints go (run spec checkpoint.dir)")


def build_parser() -> argparse.ArgumentParser:
    """The same flags as `shoal coordinator` (shoal/cli.py), for `python -m coordinator.main`."""
    ap = argparse.ArgumentParser(prog="python -m coordinator.main", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    from protocols.logs import add_logging_arguments

    add_logging_arguments(ap)  # default: $SHOAL_LOG_FORMAT / $SHOAL_LOG_LEVEL, else text, INFO
    return ap


async def _run(args: argparse.Namespace) -> int:
    try:
        handle = await serve(args.config, args.port, args.http_port, args.state_dir,
                             args.token_file, args.allow_file, not args.no_mdns, args.host,
                             tls_dir=getattr(args, "tls_dir", None),
                             plaintext=getattr(args, "plaintext", False),
                             trust_stage_hints=getattr(args, "trust_stage_hints", False),
                             rejoin_cooldown_s=getattr(args, "rejoin_cooldown",
                                                       DEFAULT_REJOIN_COOLDOWN_S),
                             http_token_file=getattr(args, "http_token_file", None),
                             max_sse_clients=getattr(args, "max_sse_clients",
                                                     DEFAULT_MAX_SSE_CLIENTS),
                             join_nonce_capacity=getattr(args, "join_nonce_capacity",
                                                         DEFAULT_JOIN_NONCE_CAPACITY),
                             relay=not getattr(args, "no_relay", False),
                             relay_ports=getattr(args, "relay_ports", None),
                             relay_host=getattr(args, "relay_host", None),
                             checkpoint_every=getattr(args, "checkpoint_every", None),
                             checkpoint_dir=getattr(args, "checkpoint_dir", None))
    except Exception as exc:  # RunSpecError, StoreError, KeyFileError, CoordinatorStartError
        print(f"shoal coordinator: {exc}", file=sys.stderr)
        return 2
    svc = handle.service
    tune_interpreter()
    svc.gc_policy = GcPolicy()  # this process's collector pauses (coordinator/gcpolicy.py)
    print(f"shoal coordinator: gRPC listening on {handle.grpc_address} (swarm {svc.swarm_id}, "
          f"epoch {svc.membership.epoch}, {len(svc.membership.live_members())} live members)",
          flush=True)
    print(f"shoal coordinator: dashboard {handle.http_url} (JSON {handle.http_url}api/status, "
          f"Prometheus {handle.http_url}metrics)", flush=True)
    if handle.token_file is not None:
        print(f"shoal coordinator: join token in {handle.token_file}", flush=True)
    print(f"shoal coordinator: fingerprint {svc.ca.fingerprint} (in the token file; peers "
          f"admitted by allow-list pass --coordinator-fingerprint); gRPC "
          f"{'TLS' if svc.tls else 'plaintext'}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("shoal coordinator: stopping (saving state)", flush=True)
    await handle.stop()
    return 0


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    """CLI entry: `shoal coordinator` passes its parsed args; `python -m` passes argv."""
    if not isinstance(args, argparse.Namespace):
        ap = build_parser()
        args = ap.parse_args(args)
        from protocols.logs import LogSettingError, logging_settings, setup_logging

        try:
            setup_logging(*logging_settings(args))
        except LogSettingError as exc:
            ap.error(str(exc))
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # uvloop is optional where it does not exist (Windows)
        runner = asyncio.Runner()
    with runner:
        return runner.run(_run(args))

