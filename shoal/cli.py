"""`shoal`: the one command-line entry point.

Every subcommand imports what it needs only when it runs, so `shoal coordinator` and
`shoal status` work on a machine without torch (the coordinator's tiny VM).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable

Command = Callable[[argparse.Namespace], int]
DEVICE_HELP = ("auto (CUDA, else MPS, else CPU), cpu, cuda (GPU 0), cuda:N or mps (default cpu; "
               "docs/gpus.md)")


def _device(value: str) -> str:
    """--device as spelled; whether this machine has it, peer/device.py says at start."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device: use auto, cpu, cuda, "
                                         "cuda:N or mps")
    return value


def _port(value: str) -> int:
    """A TCP port number, 0 for any free one (--dataplane-port and its SHOAL_ variable)."""
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port: use 0..65535 (0 = any free "
                                         "port)")
    return port


def _cmd_identity(args: argparse.Namespace) -> int:
    from protocols.identity import Identity

    if args.action == "new":
        ident = Identity.generate()
        try:
            ident.save(args.path)
        except FileExistsError:
            print(f"shoal identity: {args.path} exists; an identity key is never overwritten "
                  "(its peer id would change): remove it first or pick another name",
                  file=sys.stderr)
            return 1
        print(f"wrote {args.path} (mode 0600); peer id {ident.peer_id}")
    else:
        ident = Identity.load(args.path)
        print(f"{args.path}: peer id {ident.peer_id}, public key {ident.public_key.hex()}")
    return 0


def _cmd_token(args: argparse.Namespace) -> int:
    from protocols.auth import new_token

    token = new_token()
    if args.path:
        try:
            fd = os.open(args.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            print(f"shoal token: {args.path} exists; a token file is never overwritten (peers "
                  "that hold it would be locked out): remove it first or pick another name",
                  file=sys.stderr)
            return 1
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        print(f"wrote a join token to {args.path} (mode 0600); give it to peers with --token-file")
    else:
        print(token)
    return 0


def _cmd_ban(args: argparse.Namespace) -> int:
    from shoal.ban import run

    return run(args)


def _cmd_coordinator(args: argparse.Namespace) -> int:
    from coordinator.command import main as coordinator_main

    return coordinator_main(args)


def _cmd_status(args: argparse.Namespace) -> int:
    from shoal.status import run as status_run

    return status_run(args)


def _cmd_peer(args: argparse.Namespace) -> int:
    if args.tls_dir:
        # TLS is automatic: the coordinator (the swarm's CA) issues the peer its certificate at
        # Join. A hand-made folder would be a second, unchecked source of trust.
        print("shoal peer: --tls-dir is not used by peers: links are mTLS by default with a "
              "certificate the coordinator issues at join (protocols/tls.py); the coordinator is "
              "verified with the fingerprint in the token file or --coordinator-fingerprint. "
              "Drop --tls-dir (or pass --plaintext on a lab network you trust).",
              file=sys.stderr)
        return 2
    from peer.daemon import main as peer_main
    from peer.machine import device

    device(args.device)  # refuse a device this machine lacks before anything starts
    return peer_main(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from peer.machine import device
    from shoal.local import main as demo_main

    device(args.device, "shoal demo")  # every peer would refuse it: say so once, first

    return demo_main(args)


def _cmd_export(args: argparse.Namespace) -> int:
    from shoal.export import export_main

    return export_main(args)


def _cmd_generate(args: argparse.Namespace) -> int:
    from shoal.generate import generate_main

    return generate_main(args)


def _cmd_lab(args: argparse.Namespace) -> int:
    from shoal.lab.command import main as lab_main

    return lab_main(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="shoal",
        description="Train one model on many unreliable, unequal, poorly connected machines.",
    )
    from protocols.logs import add_logging_arguments
    from shoal import package_version

    ap.add_argument("--version", action="version", version=f"shoal {package_version()}")
    add_logging_arguments(ap)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="a coordinator and N peers on this machine, training a small "
                       "byte-level model on the Python standard library's source")
    # --stages, --steps, --sync and --seed default to None: an explicit flag wins over the
    # --config file, and the file wins over the built-in default (shoal/local.py's demo_spec).
    p.add_argument("--peers", type=int, default=4, help="peer processes (default 4)")
    p.add_argument("--stages", type=int, help="block stages (default: --config's, else 2)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: --config's, else 100)")
    p.add_argument("--sync", choices=("allreduce", "demo", "diloco", "spsa"),
                   help="how replicas stay equal (default: --config's, else allreduce)")
    p.add_argument("--config", help="a run spec TOML to start from (explicit flags override it; "
                   "it overrides the flags' defaults)")
    p.add_argument("--data", help="your own text, JSONL or Parquet file or folder instead of "
                   "the stdlib (docs/data.md)")
    p.add_argument("--out", help="write summary.json, the exported model and logs here (a new "
                   "or empty folder)")
    p.add_argument("--http-port", type=int, default=0, help="dashboard port (default: any free)")
    p.add_argument("--device", default="cpu", type=_device, help=DEVICE_HELP)
    p.add_argument("--seed", type=int, help="run seed (default: --config's, else 0)")
    p.add_argument("--init-model", help="start from an exported model (a folder with "
                   "model.safetensors)")
    p.add_argument("--model", help="train a local Hugging Face LlamaForCausalLM or "
                   "Qwen2ForCausalLM folder (config.json + safetensors) instead of the built-in "
                   "byte model (docs/models.md)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("coordinator", help="the membership service and dashboard")
    from coordinator.command import add_arguments as add_coordinator_arguments

    add_coordinator_arguments(p)
    p.set_defaults(func=_cmd_coordinator)

    p = sub.add_parser("peer", help="the peer daemon")
    p.add_argument("--coordinator", default=os.environ.get("SHOAL_COORDINATOR"),
                   help="HOST:PORT (or env SHOAL_COORDINATOR; default: find it by mDNS)")
    p.add_argument("--identity", default=os.environ.get("SHOAL_IDENTITY", "./shoal-peer.key"))
    p.add_argument("--token-file", default=os.environ.get("SHOAL_TOKEN_FILE"))
    p.add_argument("--data", help="text, JSONL or Parquet file or folder for stage 0 "
                   "(default: the run spec's data.path, else the stdlib; docs/data.md)")
    p.add_argument("--device", default="cpu", type=_device, help=DEVICE_HELP)
    p.add_argument("--host", help="address to serve on (default: all interfaces, 0.0.0.0; "
                   "127.0.0.1 when the coordinator is on this machine's loopback)")
    p.add_argument("--advertise", metavar="HOST",
                   help="host other peers use to reach this one (default: the host the "
                   "coordinator sees this peer's Join come from)")
    p.add_argument("--relay", action="store_true",
                   help="offer to relay for peers nobody can dial (the coordinator names this "
                   "peer to them once it has reached it directly)")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--grace", type=float, default=20.0, help="drain grace period, seconds")
    p.add_argument("--spot-url", action="append", default=[],
                   help="spot-interruption endpoint to poll (aws:URL or gcp:URL)")
    p.add_argument("--throttle", type=float, default=1.0,
                   help="slow compute down by this factor (tests and benchmarks)")
    p.add_argument("--simulate-speed", type=float, default=0.0, metavar="SAMPLES_PER_S",
                   help="pad compute to this speed, emulating a machine of its own (benchmarks)")
    p.add_argument("--stage", type=int, default=-1, help="ask for this stage (default: assigned)")
    p.add_argument("--snapshot-dir", help="keep periodic safetensors snapshots of the stage here")
    p.add_argument("--resume", metavar="DIR",
                   help="start from the durable checkpoint in DIR (a copy of the coordinator's "
                        "--checkpoint-dir) when no live replica holds this peer's stage")
    p.add_argument("--tls-dir", help=argparse.SUPPRESS)  # refused: TLS is automatic
    p.add_argument("--plaintext", action="store_true",
                   help="no TLS on any link (the coordinator must run --plaintext too); default: "
                   "mTLS with a certificate the coordinator issues, on every non-loopback link")
    p.add_argument("--coordinator-fingerprint",
                   default=os.environ.get("SHOAL_COORDINATOR_FINGERPRINT"),
                   help="sha256:HEX as `shoal coordinator` prints it (default: the one in the "
                   "token file); needed with an allow-list, and for mDNS discovery")
    p.add_argument("--router", choices=("swarm", "round_robin"), default="swarm",
                   help="how the next stage's replica is chosen: by stage 0, and by a block "
                   "replica passing a microbatch on peer to peer (round_robin = the baseline)")
    p.add_argument("--init-model", help="first replica of a stage starts from this exported "
                   "model instead of the seeded initial weights")
    p.add_argument("--metrics-file", help="stage 0: append one JSON line per optimizer step")
    p.add_argument("--metrics-port", type=int, default=os.environ.get("SHOAL_METRICS_PORT"),
                   help="serve Prometheus /metrics on --host at this port (0 = any free port, "
                   "logged; or env SHOAL_METRICS_PORT; default: off)")
    p.add_argument("--dataplane-port", type=_port, metavar="PORT",
                   default=os.environ.get("SHOAL_DATAPLANE_PORT") or "0",
                   help="serve state downloads' bulk data plane on --host at this port, beside "
                   "--port: open or forward it too behind a firewall or NAT (or env "
                   "SHOAL_DATAPLANE_PORT; default: 0, any free port)")
    p.add_argument("--progress-s", type=float, default=30.0,
                   help="log a progress line this often, seconds (0 = never)")
    p.set_defaults(func=_cmd_peer)

    p = sub.add_parser("status", help="the swarm at a glance (--json for scripts)")
    from shoal.status import add_arguments as add_status_arguments

    add_status_arguments(p)
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("ban", help="revoke a member and refuse its key from now on (operator)")
    from shoal.ban import add_arguments as add_ban_arguments

    add_ban_arguments(p)
    p.set_defaults(func=_cmd_ban)

    p = sub.add_parser("export", help="pull every stage from live peers into model.safetensors")
    p.add_argument("--coordinator", default=os.environ.get("SHOAL_COORDINATOR"), required=False)
    p.add_argument("--identity", default=os.environ.get("SHOAL_IDENTITY", "./shoal-export.key"))
    p.add_argument("--token-file", default=os.environ.get("SHOAL_TOKEN_FILE"))
    p.add_argument("--plaintext", action="store_true", help="no TLS (a --plaintext swarm)")
    p.add_argument("--coordinator-fingerprint",
                   default=os.environ.get("SHOAL_COORDINATOR_FINGERPRINT"),
                   help="sha256:HEX of the coordinator (default: the one in the token file)")
    p.add_argument("--out", required=True, help="folder for model.safetensors and config.json")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("generate", help="sample text from an exported model")
    p.add_argument("--model", required=True, help="folder written by export or demo --out, or "
                   "a local Hugging Face model folder")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--tokens", "--max-new-tokens", dest="tokens", type=int, default=200)
    p.add_argument("--greedy", action="store_true", help="take the likeliest token each time "
                   "(temperature 0): deterministic")
    p.add_argument("--engine", choices=("auto", "shoal", "transformers"), default="auto",
                   help="shoal: Shoal's own model; transformers: AutoModelForCausalLM on the "
                   "folder (any local Hugging Face model); auto: shoal for a Shoal export")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", type=float, default=0.0, help="run only a fraction 1-SKIP of layers")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("identity", help="make or show an Ed25519 identity key")
    p.add_argument("action", choices=("new", "show"))
    p.add_argument("path")
    p.set_defaults(func=_cmd_identity)

    p = sub.add_parser("token", help="make a join token")
    p.add_argument("action", choices=("new",))
    p.add_argument("path", nargs="?", help="write it to this file (mode 0600)")
    p.set_defaults(func=_cmd_token)

    p = sub.add_parser("lab", help="a swarm on a namespace test network: hosts, bandwidth "
                       "caps, latency, faults (root only)")
    from shoal.lab.command import add_arguments as add_lab_arguments

    add_lab_arguments(p)
    p.set_defaults(func=_cmd_lab)
    # The logging flags work after the subcommand too (`shoal status --json --log-format json`):
    # suppressed there, a subcommand's flag overrides the top level's only when it is given.
    for subparser in sub.choices.values():
        add_logging_arguments(subparser, suppress=True)
    return ap


def main(argv: list[str] | None = None) -> int:
    """`shoal ...`: parse, configure logging once (flag, else $SHOAL_LOG_FORMAT and
    $SHOAL_LOG_LEVEL, else text at INFO), run the subcommand; returns the exit status."""
    ap = build_parser()
    args = ap.parse_args(argv)
    from protocols.logs import (
        LogSettingError,
        export_logging_settings,
        logging_settings,
        setup_logging,
    )

    try:
        log_format, log_level = logging_settings(args)
    except LogSettingError as exc:
        ap.error(str(exc))  # exits 2, as a bad flag does
    # The coordinator and peers that `shoal demo` and `shoal lab` spawn inherit the environment:
    # they log as this process does.
    export_logging_settings(log_format, log_level)
    setup_logging(log_format, log_level)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
