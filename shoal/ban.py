"""`shoal ban PEER`: the operator revokes a member and refuses its key from then on.

    shoal ban 3f2a9c01d4e5b6a7 --reason "sent garbage gradients"
    shoal ban 3f2a9c --coordinator-http 10.0.0.5:8080 --http-token-file http.token

PEER is a peer id (16 hex characters, as the dashboard and `shoal status` show it) or a prefix
of at least 6 characters of a known member's id. It POSTs to the coordinator's HTTP endpoint
`/api/ban` (coordinator/http.py): with `--http-token-file` as `Authorization: Bearer TOKEN`, which
a coordinator started with `--http-token-file` requires; a coordinator without one takes bans
from its own machine (loopback) only. The coordinator revokes the member at once (its calls are
refused, peers drop it with the next view), persists the ban in its state directory, and refuses
every later Join by that key.

Standard library only, like `shoal status`: it runs on the coordinator's tiny VM.

Exit status: 0 banned; 1 refused (unknown or ambiguous peer, no permission: the message says
which); 2 no coordinator answers at the address.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request

DEFAULT_HTTP = "127.0.0.1:8080"
BAN_PATH = "/api/ban"  # coordinator.http.BAN_PATH (shoal/ does not import coordinator/)


def ban_url(address: str) -> str:
    """`HOST:PORT`, `http://HOST:PORT` or `https://HOST:PORT/prefix` -> the /api/ban URL."""
    base = address.strip().rstrip("/")
    if "://" not in base:
        base = f"http://{base}"
    return f"{base}{BAN_PATH}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `shoal ban`."""
    p.add_argument("peer", metavar="PEER",
                   help="peer id, or a unique prefix (>= 6 characters) of a known member's id")
    p.add_argument("--reason", default="", help="why (kept with the ban, shown on the dashboard)")
    p.add_argument("--coordinator-http", metavar="HOST:PORT",
                   default=os.environ.get("SHOAL_HTTP") or DEFAULT_HTTP,
                   help=f"the coordinator's HTTP port (default: $SHOAL_HTTP or {DEFAULT_HTTP})")
    p.add_argument("--http-token-file", default=os.environ.get("SHOAL_HTTP_TOKEN_FILE"),
                   help="the coordinator's HTTP token (its --http-token-file)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer")


def run(args: argparse.Namespace) -> int:
    """Ban `args.peer`; returns the exit status (see the module docstring)."""
    url = ban_url(args.coordinator_http)
    headers = {"Content-Type": "application/json"}
    if args.http_token_file:
        try:
            token = open(args.http_token_file).read().strip()  # noqa: SIM115
        except OSError as exc:
            print(f"shoal ban: cannot read {args.http_token_file}: {exc.strerror}",
                  file=sys.stderr)
            return 1
        headers["Authorization"] = f"Bearer {token}"
    body = json.dumps({"peer_id": args.peer, "reason": args.reason}).encode()
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as resp:
            answer = json.load(resp)
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace").strip()[:500]
        hint = {401: " (pass the coordinator's --http-token-file)",
                403: " (run it on the coordinator's machine, or give it an --http-token-file)",
                404: "" if detail else " (is this a coordinator that knows `shoal ban`?)"}
        print(f"shoal ban: {url} refused: {exc.code} {detail}{hint.get(exc.code, '')}",
              file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"shoal ban: no coordinator answers at {url} ({reason}); pass its HTTP port with "
              f"--coordinator-http HOST:PORT", file=sys.stderr)
        return 2
    state = "revoked at once" if answer.get("was_live") else "not a live member; its key is refused"
    print(f"banned peer {answer.get('peer_id')}: {state}; it cannot join again")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shoal.ban", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
