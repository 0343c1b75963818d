"""`shoal status`: the swarm at a glance in a terminal, from the coordinator's `/api/status`.

It reads the same JSON document the dashboard draws (one GET, standard library only, so it runs
on the coordinator's tiny VM and in a container health check) and prints the run, each stage with
its replicas and throughput, and each peer with its REACH (the coordinator's dial-back: direct,
relayed, unreachable; "-" until checked). `--json` prints the document itself, for scripts.
`--watch` redraws the view every `--interval` seconds until Ctrl-C (with `--json`: one document a
line); a coordinator that stops answering mid-watch is shown as such above the last view it gave,
and asked again at the next interval.

Exit status: 0 when the coordinator answered (or a watch ended with Ctrl-C); 2 when none answers
at the address at first, or what answers is not a coordinator (the message says which and what
to pass instead).

Fields the coordinator does not know yet are JSON null and print as "-".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any, TextIO

DEFAULT_HTTP = "127.0.0.1:8080"
STATE_ORDER = ("training", "syncing", "joining", "rebuilt", "draining", "lost", "left")
DEPARTED = ("lost", "left")  # no lease any more; the coordinator lists them for a while
ANSI = {"training": "32", "syncing": "34", "joining": "36", "rebuilt": "35", "draining": "33",
        "lost": "31", "left": "90", "empty": "1;31", "degraded": "33", "ok": "32",
        "relayed": "33", "unreachable": "1;31"}
CLEAR = "\x1b[H\x1b[2J"  # cursor home, erase the screen: one redraw of --watch on a terminal
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"

log = logging.getLogger("shoal.status")


class CoordinatorUnreachable(Exception):
    """No usable answer from the coordinator's HTTP port; the message says what to do."""


def status_url(address: str) -> str:
    """`HOST:PORT`, `http://HOST:PORT` or `https://HOST:PORT/prefix` -> the /api/status URL."""
    base = address.strip().rstrip("/")
    if "://" not in base:
        base = f"http://{base}"
    return f"{base}/api/status"


def fetch_status(url: str, timeout: float = 5.0, token: str | None = None) -> dict[str, Any]:
    """GET the status document (with `token` as a bearer token when the coordinator has an
    --http-token-file), or raise CoordinatorUnreachable with an actionable message."""
    hint = "is `shoal coordinator` running? pass --coordinator-http HOST:PORT"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    log.debug("GET %s", url, extra={"fields": {"url": url, "token": bool(token)}})
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as err:
        if err.code == 401:
            raise CoordinatorUnreachable(
                f"{url} wants the coordinator's HTTP token: pass --http-token-file F (the "
                f"coordinator's --http-token-file)") from err
        raise CoordinatorUnreachable(
            f"{url} answered HTTP {err.code}: is that the coordinator's HTTP port "
            f"(`shoal coordinator --http-port`)? pass --coordinator-http HOST:PORT") from err
    except (TimeoutError, urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise CoordinatorUnreachable(
            f"no coordinator answers at {url}: {hint} ({reason})") from err
    try:
        status = json.loads(body)
    except ValueError as err:
        raise CoordinatorUnreachable(
            f"{url} did not answer with JSON ({err}): is that the coordinator's HTTP port? "
            "pass --coordinator-http HOST:PORT") from err
    if not isinstance(status, dict):
        raise CoordinatorUnreachable(f"{url} answered JSON that is not a status document")
    return status


# ---------------------------------------------------------------------------------------------
# Formatting


def _unknown(v: object) -> bool:
    return v is None or v == "" or (isinstance(v, float) and v != v)


def fmt_bytes(n: float | None) -> str:
    """1234567 -> '1.23 MB' (SI, as network traffic is quoted)."""
    if _unknown(n):
        return "-"
    v = float(n)  # type: ignore[arg-type]
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(v) < 1000 or unit == "TB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.3g} {unit}"
        v /= 1000
    raise AssertionError("unreachable")


def fmt_num(v: float | None, digits: int = 1) -> str:
    return "-" if _unknown(v) else f"{float(v):,.{digits}f}"  # type: ignore[arg-type]


def fmt_int(v: float | None) -> str:
    return "-" if _unknown(v) else f"{round(float(v)):,}"  # type: ignore[arg-type]


def fmt_duration(s: float | None) -> str:
    if _unknown(s):
        return "-"
    s = max(0, round(float(s)))  # type: ignore[arg-type]
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h >= 24:
        return f"{h // 24} d {h % 24:02d} h"
    return f"{h} h {m:02d} m" if h else (f"{m} m {sec:02d} s" if m else f"{sec} s")


def stage_of(v: object) -> int | None:
    """A stage number, or None for the ways the status says 'none' (null, '', -1)."""
    if _unknown(v) or not isinstance(v, int | float) or v < 0:
        return None
    return int(v)


def _short(peer_id: object, width: int = 16) -> str:
    s = "-" if _unknown(peer_id) else str(peer_id)
    return s if len(s) <= width else s[: width - 1] + "…"


def _latest(history: list[dict], key: str) -> Any:
    for point in reversed(history or []):
        if not _unknown(point.get(key)):
            return point[key]
    return None


def table(headers: Sequence[str], rows: list[Sequence[str]], right: set[int],
          paint: Sequence[int] = (), color: bool = False) -> list[str]:
    """Aligned columns; `right`: right-aligned columns; `paint`: columns coloured by state."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str], header: bool = False) -> str:
        out = []
        for i, cell in enumerate(cells):
            text = cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            if color and not header and i in paint:
                code = ANSI.get(cell.strip().lower(), "")
                text = f"\x1b[{code}m{text}\x1b[0m" if code else text
            out.append(text)
        joined = "  ".join(out).rstrip()
        return f"\x1b[1m{joined}\x1b[0m" if color and header else joined

    return [line(headers, header=True)] + [line(r) for r in rows]


def render(status: dict[str, Any], color: bool = False) -> str:
    """The terminal view of one status document."""
    run = status.get("run") or {}
    coord = status.get("coordinator") or {}
    totals = status.get("totals") or {}
    peers = status.get("peers") or []
    history = status.get("history") or []
    stages = sorted(status.get("stages") or [], key=lambda s: stage_of(s.get("stage")) or 0)

    counts: dict[str, int] = {}
    for p in peers:
        counts[str(p.get("state"))] = counts.get(str(p.get("state")), 0) + 1
    live = sum(1 for p in peers if p.get("live") is not False and p.get("state") not in DEPARTED)
    known = [s for s in STATE_ORDER if counts.get(s)] + [s for s in counts if s not in STATE_ORDER]
    by_state = ", ".join(f"{counts[s]} {s}" for s in known)
    loss = _latest(history, "loss")
    tokens = _latest(history, "tokens_per_s")
    step = totals.get("step")
    restarts = coord.get("restarts")

    swarm = "" if _unknown(run.get("swarm_id")) else f" · swarm {run['swarm_id']}"
    lines = [
        f"Shoal · run {run.get('name') or '-'}{swarm}",
        f"  sync {run.get('sync_mode') or '-'} · epoch {fmt_int(status.get('epoch'))}"
        f" · step {fmt_int(step)} · loss {fmt_num(loss, 3)} · {fmt_num(tokens, 0)} tokens/s",
        f"  peers {live} live of {len(peers)}" + (f": {by_state}" if by_state else ""),
        f"  traffic sent {fmt_bytes(totals.get('bytes_sent'))}, received "
        f"{fmt_bytes(totals.get('bytes_received'))} · dropped microbatches "
        f"{fmt_int(totals.get('dropped_microbatches'))}",
        f"  coordinator {coord.get('grpc_address') or '-'} · shoal {coord.get('version') or '-'}"
        f" · up {fmt_duration(coord.get('uptime_s'))} · restarts {fmt_int(restarts)}",
        "",
    ]

    stage_rows = []
    for st in stages:
        state = str(st.get("state") or "-")
        stage_rows.append([
            str(stage_of(st.get("stage")) if stage_of(st.get("stage")) is not None else "-"),
            state.upper() if state == "empty" else state,
            str(len(st.get("replicas") or [])),
            fmt_num(st.get("throughput")),
            fmt_num(st.get("grad_norm"), 2),
            fmt_int(st.get("step")),
            st.get("rebuild") or "",
        ])
    if stage_rows:
        lines += table(["STAGE", "STATE", "REPLICAS", "SAMPLES/S", "GRAD NORM", "STEP", "REBUILT"],
                       stage_rows, right={0, 2, 3, 4, 5}, paint=(1,), color=color)
    else:
        lines.append("no stages reported yet")
    lines.append("")

    rank = {s: i for i, s in enumerate(STATE_ORDER)}
    ordered = sorted(peers, key=lambda p: (stage_of(p.get("stage")) is None,
                                           stage_of(p.get("stage")) or 0,
                                           rank.get(p.get("state"), 99), str(p.get("peer_id"))))
    peer_rows = [[
        _short(p.get("peer_id")),
        str(stage_of(p.get("stage")) if stage_of(p.get("stage")) is not None else "-"),
        str(p.get("state") or "-"),
        str(p.get("reach") or "-"),
        fmt_num(p.get("samples_per_s")),
        fmt_int(p.get("queue")),
        fmt_bytes(p.get("bytes_sent")),
        fmt_bytes(p.get("bytes_received")),
        fmt_num(p.get("loss"), 3),
        str(p.get("device") or "-"),
    ] for p in ordered]
    if peer_rows:
        headers = ["PEER", "STAGE", "STATE", "REACH", "SAMPLES/S", "QUEUE", "SENT", "RECEIVED",
                   "LOSS", "DEVICE"]
        lines += table(headers, peer_rows, right={1, 4, 5, 6, 7, 8}, paint=(2, 3),
                       color=color)
    else:
        lines.append("no peers have joined yet")
    return "\n".join(lines) + "\n"


def _use_color(stream: TextIO) -> bool:
    return (stream.isatty() and "NO_COLOR" not in os.environ
            and os.environ.get("TERM", "") not in ("", "dumb"))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags of `shoal status`, on `shoal`'s subparser or on this module's own parser."""
    ap.add_argument("--coordinator-http", metavar="HOST:PORT",
                    default=os.environ.get("SHOAL_HTTP") or DEFAULT_HTTP,
                    help="the coordinator's HTTP (dashboard) port "
                         f"(default: $SHOAL_HTTP or {DEFAULT_HTTP})")
    ap.add_argument("--json", action="store_true", help="print the /api/status document as JSON")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    ap.add_argument("--http-token-file", default=os.environ.get("SHOAL_HTTP_TOKEN_FILE"),
                    help="the coordinator's HTTP token, when it has one (its --http-token-file)")
    ap.add_argument("--watch", action="store_true",
                    help="redraw every --interval seconds until Ctrl-C (with --json: one "
                         "document a line)")
    ap.add_argument("--interval", type=_positive_seconds, default=2.0, metavar="S",
                    help="seconds between redraws of --watch (default 2)")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above 0")
    return value


def watch_frame(status: dict[str, Any] | None, error: str | None, seen_at: str,
                interval: float, color: bool = False) -> str:
    """One redraw of `--watch`: a header line, the unreachable notice if the last ask failed,
    then the view of the last status the coordinator gave (`seen_at`: when, HH:MM:SS)."""
    lines = [f"shoal status --watch · every {interval:g} s · {time.strftime('%H:%M:%S')} · "
             "Ctrl-C to stop"]
    if error:
        notice = f"coordinator unreachable: {error}; asking again every {interval:g} s"
        lines.append(f"\x1b[1;31m{notice}\x1b[0m" if color else notice)
        if status is not None:
            lines.append(f"last view, from {seen_at}:")
    lines.append("")
    return "\n".join(lines) + "\n" + (render(status, color) if status is not None else "")


def watch(url: str, token: str | None, args: argparse.Namespace, first: dict[str, Any],
          out: TextIO) -> int:
    """Redraw until Ctrl-C, which ends it with 0. On a terminal each redraw clears the screen;
    into a pipe or file the frames follow each other, a blank line apart."""
    tty = out.isatty()
    color = _use_color(out)
    status: dict[str, Any] | None = first
    seen_at = time.strftime("%H:%M:%S")
    error: str | None = None
    if tty:
        out.write(HIDE_CURSOR)
    try:
        while True:
            if args.json:
                if error is None:
                    out.write(json.dumps(status) + "\n")
                else:
                    print(f"shoal status: {error} (asking again in {args.interval:g} s)",
                          file=sys.stderr, flush=True)
            else:
                frame = watch_frame(status, error, seen_at, args.interval, color)
                out.write((CLEAR if tty else "\n") + frame)
            out.flush()
            time.sleep(args.interval)
            try:
                status, error = fetch_status(url, args.timeout, token), None
                seen_at = time.strftime("%H:%M:%S")
            except CoordinatorUnreachable as err:
                error = str(err)
                log.debug("status watch: %s", err)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `shoal status --watch | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())  # no second error at exit
        return 0
    finally:
        if tty:
            out.write(SHOW_CURSOR)
            out.flush()


def run(args: argparse.Namespace) -> int:
    """Fetch and print the status for parsed flags; returns the exit status (0, or 2)."""
    url = status_url(args.coordinator_http)
    try:
        token = None
        if getattr(args, "http_token_file", None):
            try:
                with open(args.http_token_file) as f:
                    token = f.read().strip()
            except OSError as exc:
                raise CoordinatorUnreachable(
                    f"cannot read {args.http_token_file}: {exc.strerror}") from exc
        status = fetch_status(url, args.timeout, token)
    except CoordinatorUnreachable as err:
        print(f"shoal status: {err}", file=sys.stderr)
        return 2
    if getattr(args, "watch", False):
        return watch(url, token, args, status, sys.stdout)
    if args.json:
        json.dump(status, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(status, color=_use_color(sys.stdout)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`shoal status [--coordinator-http HOST:PORT] [--json] [--watch]`; the exit status."""
    ap = argparse.ArgumentParser(prog="shoal status",
                                 description="The swarm at a glance, from the coordinator.")
    add_arguments(ap)
    return run(ap.parse_args(list(argv) if argv is not None else None))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
