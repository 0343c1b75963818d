"""Logging, configured once for every command (protocols/logs.py, shoal/cli.py): the JSON line's
keys, and where the settings come from, through the real `shoal` command line: a flag before or
after the subcommand, else SHOAL_LOG_FORMAT / SHOAL_LOG_LEVEL, and the processes `shoal demo`
spawns logging as their parent was told to."""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from protocols.logs import (
    JsonFormatter,
    LogSettingError,
    add_logging_arguments,
    iso_time,
    logging_settings,
)
from tests.polling import poll_until
from tests.shoal.test_status_cli import ShoalCoordinator, run_shoal

CORE = ("time", "level", "logger", "message")


def record(msg: str = "hello %s", args: tuple = ("world",), **fields: object) -> logging.LogRecord:
    rec = logging.LogRecord("shoal.test", logging.WARNING, __file__, 7, msg, args, None)
    if fields:
        rec.fields = fields
    return rec


def parse_time(stamp: str) -> datetime:
    """ISO 8601 as a log shipper reads it; a `Z` suffix or +00:00 both mean UTC."""
    return datetime.fromisoformat(stamp)


def test_json_line_has_iso_time_level_logger_message_and_fields() -> None:
    rec = record(step=3, loss=2.5)
    out = json.loads(JsonFormatter().format(rec))
    assert list(out)[:4] == list(CORE)
    assert out["level"] == "warning" and out["logger"] == "shoal.test"
    assert out["message"] == "hello world"
    assert out["step"] == 3 and out["loss"] == 2.5
    assert "t" not in out and "msg" not in out  # the old keys are gone

    when = parse_time(out["time"])
    assert when.utcoffset() == timedelta(0), out["time"]
    assert abs(when.timestamp() - rec.created) < 0.001  # millisecond precision, same instant
    assert len(out["time"].split(".")[1].rstrip("Z")) == 3, "milliseconds"


def test_iso_time_is_utc_whatever_the_local_zone() -> None:
    assert iso_time(0.0) == "1970-01-01T00:00:00.000Z"
    assert iso_time(1_700_000_000.1234) == "2023-11-14T22:13:20.123Z"
    assert parse_time(iso_time(1_700_000_000.5)) == datetime(2023, 11, 14, 22, 13, 20, 500000,
                                                             tzinfo=UTC)


def test_a_field_never_hides_a_core_key_and_exceptions_go_under_exc() -> None:
    out = json.loads(JsonFormatter().format(record(message="spoof", time=1, peer="p1")))
    assert out["message"] == "hello world" and out["field_message"] == "spoof"
    assert parse_time(out["time"]) and out["field_time"] == 1 and out["peer"] == "p1"

    try:
        raise RuntimeError("boom")
    except RuntimeError:
        rec = logging.LogRecord("shoal.test", logging.ERROR, __file__, 1, "failed", (),
                                sys.exc_info())
    out = json.loads(JsonFormatter().format(rec))
    assert out["message"] == "failed"
    assert "RuntimeError: boom" in out["exc"] and out["exc"].startswith("Traceback")


def test_flag_beats_environment_beats_default() -> None:
    ap = argparse.ArgumentParser()
    add_logging_arguments(ap)
    env = {"SHOAL_LOG_FORMAT": "json", "SHOAL_LOG_LEVEL": "debug"}
    assert logging_settings(ap.parse_args([]), {}) == ("text", "INFO")
    assert logging_settings(ap.parse_args([]), env) == ("json", "DEBUG")
    assert logging_settings(ap.parse_args(["--log-format", "text", "--log-level", "error"]),
                            env) == ("text", "ERROR")
    with pytest.raises(LogSettingError, match="SHOAL_LOG_LEVEL='loud' is not a log level"):
        logging_settings(ap.parse_args([]), {"SHOAL_LOG_LEVEL": "loud"})
    with pytest.raises(LogSettingError, match="SHOAL_LOG_FORMAT='xml' is not a log format"):
        logging_settings(ap.parse_args([]), {"SHOAL_LOG_FORMAT": "xml"})


# ------------------------------------------------------------------ through the command line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def json_lines(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def status_get_logged(stderr: str) -> dict | None:
    """The JSON line of `shoal status`'s DEBUG "GET URL" record, if there is one."""
    return next((r for r in json_lines(stderr) if r.get("logger") == "shoal.status"
                 and r["message"].startswith("GET http://127.0.0.1:")), None)


def test_flags_work_before_and_after_the_subcommand() -> None:
    where = f"127.0.0.1:{free_port()}"  # nobody answers: status logs its GET, then exits 2
    before = run_shoal("--log-format", "json", "--log-level", "DEBUG", "status",
                       "--coordinator-http", where, "--timeout", "2")
    after = run_shoal("status", "--coordinator-http", where, "--timeout", "2",
                      "--log-format", "json", "--log-level", "debug")
    mixed = run_shoal("--log-level", "DEBUG", "status", "--log-format", "json",
                      "--coordinator-http", where, "--timeout", "2")
    for done in (before, after, mixed):
        assert done.returncode == 2, done.stderr
        line = status_get_logged(done.stderr)
        assert line is not None, done.stderr
        assert line["level"] == "debug" and line["url"] == f"http://{where}/api/status"
        assert set(CORE) <= set(line)
        parse_time(line["time"])

    text = run_shoal("--log-level", "DEBUG", "status", "--coordinator-http", where,
                     "--timeout", "2")
    assert f" D shoal.status: GET http://{where}/api/status" in text.stderr
    assert not json_lines(text.stderr)
    quiet = run_shoal("status", "--coordinator-http", where, "--timeout", "2",
                      "--log-format", "json")
    assert status_get_logged(quiet.stderr) is None, "INFO by default: no DEBUG line"

    # the subcommand's flag wins over the top level's
    both = run_shoal("--log-format", "text", "status", "--log-format", "json", "--log-level",
                     "DEBUG", "--coordinator-http", where, "--timeout", "2")
    assert status_get_logged(both.stderr) is not None


def test_environment_sets_them_and_a_flag_wins() -> None:
    where = f"127.0.0.1:{free_port()}"
    by_env = run_shoal("status", "--coordinator-http", where, "--timeout", "2",
                       SHOAL_LOG_FORMAT="json", SHOAL_LOG_LEVEL="debug")
    assert status_get_logged(by_env.stderr) is not None, by_env.stderr

    flag_wins = run_shoal("status", "--coordinator-http", where, "--timeout", "2",
                          "--log-format", "text", SHOAL_LOG_FORMAT="json",
                          SHOAL_LOG_LEVEL="DEBUG")
    assert f"D shoal.status: GET http://{where}" in flag_wins.stderr
    assert not json_lines(flag_wins.stderr)


def test_a_bad_level_or_format_is_an_argparse_error() -> None:
    for argv, env, says in (
            (["--log-level", "LOUD", "token", "new"], {}, "argument --log-level: invalid choice"),
            (["token", "new", "--log-format", "xml"], {}, "argument --log-format: invalid choice"),
            (["token", "new"], {"SHOAL_LOG_LEVEL": "loud"},
             "SHOAL_LOG_LEVEL='loud' is not a log level"),
            (["token", "new"], {"SHOAL_LOG_FORMAT": "yaml"},
             "SHOAL_LOG_FORMAT='yaml' is not a log format")):
        done = run_shoal(*argv, **env)
        assert done.returncode == 2, (argv, env, done.stdout)
        assert "usage: shoal" in done.stderr and says in done.stderr, done.stderr
        assert done.stdout == "", "nothing ran"


def test_shoal_coordinator_logs_json_with_the_flag_after_the_subcommand(tmp_path: Path) -> None:
    coord = ShoalCoordinator(tmp_path / "state", log_level="INFO",
                             extra=["--log-format", "json"]).start()
    try:
        assert coord.stop() == 0
    finally:
        coord.kill()

    def records() -> list[dict]:
        return [json.loads(line) for line in list(coord.lines) if line.startswith("{")]

    # the thread that reads its output may still hold the last lines when the process is gone
    stopped = poll_until(lambda: any(r["message"].startswith("coordinator stopped")
                                     for r in records()), 30)
    assert stopped, "".join(coord.lines)
    started = [r for r in records() if r["message"].startswith("coordinator for swarm")]
    assert started, "".join(coord.lines)
    assert started[0]["logger"] == "shoal.coordinator" and started[0]["level"] == "info"
    assert started[0]["grpc"] == coord.grpc_address and started[0]["http"] == coord.http_url
    assert started[0]["epoch"] == 0 and started[0]["run"] == "shoal-run"


def test_peers_that_shoal_demo_spawns_log_json_when_asked(tmp_path: Path) -> None:
    """`shoal demo --log-format json`: its coordinator and peers inherit the format (the CLI
    exports SHOAL_LOG_FORMAT / SHOAL_LOG_LEVEL to the processes it starts)."""
    out = tmp_path / "demo"
    done = run_shoal("demo", "--peers", "3", "--stages", "2", "--steps", "2", "--out", out,
                     "--log-format", "json", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    peer_logs = sorted((out / "logs").glob("peer*.log"))
    assert len(peer_logs) == 3
    for log in peer_logs:
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        assert lines, log
        records = [json.loads(line) for line in lines]  # every line a JSON object
        assert all(set(CORE) <= set(r) for r in records)
        assert any(r["logger"] == "shoal.peer" and r["message"].startswith("joined")
                   for r in records), log
    coord = (out / "logs" / "coordinator.log").read_text().splitlines()
    assert any(json.loads(line)["logger"] == "shoal.coordinator"
               for line in coord if line.startswith("{"))
