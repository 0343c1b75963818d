"""Logging set-up shared by every process: human text by default, one JSON object a line with
`--log-format json` (for log shippers). Stdlib only.

Where the settings come from, strongest first: the `--log-format` / `--log-level` flags (which
`shoal` accepts before or after the subcommand), the environment (`SHOAL_LOG_FORMAT`,
`SHOAL_LOG_LEVEL`: how a container or a parent process sets them), then text at INFO. A process
that spawns others (`shoal demo`, `shoal lab`) exports what it resolved to the environment, so
its coordinator and peers log the same way.

A JSON line holds `time` (ISO 8601, UTC, milliseconds, `Z`), `level`, `logger`, `message`, then
the event's own fields (`logger.info(..., extra={"fields": {...}})`), and `exc` with the
traceback when there is one. A field named like one of the first four keys is kept as
`field_<name>` rather than hiding them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from datetime import UTC, datetime

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
ENV_FORMAT = "SHOAL_LOG_FORMAT"
ENV_LEVEL = "SHOAL_LOG_LEVEL"
DEFAULT_FORMAT = "text"
DEFAULT_LEVEL = "INFO"
CORE_KEYS = ("time", "level", "logger", "message")


class LogSettingError(ValueError):
    """An environment variable names a format or level that does not exist."""


def iso_time(created: float) -> str:
    """A record's epoch seconds as ISO 8601 in UTC with milliseconds: 2026-12-03T02:20:00.123Z."""
    stamp = datetime.fromtimestamp(created, tz=UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: the core keys, the record's `fields`, `exc` on an exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            for key, value in extra.items():
                out[f"field_{key}" if key in CORE_KEYS else str(key)] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def add_logging_arguments(ap: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """`--log-format` and `--log-level` on `ap`.

    Args:
        suppress: leave the attribute unset when the flag is absent (argparse.SUPPRESS). `shoal`
            puts the flags on its top-level parser (default None) and, suppressed, on every
            subparser: a subparser's value then overrides the top level's only when given, so the
            flags work on either side of the subcommand.
    """
    default = argparse.SUPPRESS if suppress else None
    ap.add_argument("--log-format", choices=LOG_FORMATS, default=default,
                    help=f"text or json lines on stderr (default: ${ENV_FORMAT}, else text)")
    ap.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=default,
                    metavar="LEVEL",
                    help=f"{', '.join(LOG_LEVELS)} (default: ${ENV_LEVEL}, else INFO)")


def logging_settings(args: argparse.Namespace,
                     environ: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """(format, level) from the parsed flags, else the environment, else text at INFO.

    Raises:
        LogSettingError: SHOAL_LOG_FORMAT or SHOAL_LOG_LEVEL holds something unknown (a flag
            never does: argparse refused it already).
    """
    fmt = getattr(args, "log_format", None) or _from_env(
        environ, ENV_FORMAT, str.lower, LOG_FORMATS, DEFAULT_FORMAT, "log format")
    level = getattr(args, "log_level", None) or _from_env(
        environ, ENV_LEVEL, str.upper, LOG_LEVELS, DEFAULT_LEVEL, "log level")
    return fmt, level


def _from_env(environ: Mapping[str, str], name: str, normal: Callable[[str], str],
              allowed: Sequence[str], default: str, what: str) -> str:
    """`environ[name]` normalized, `default` when unset or blank; LogSettingError when it is
    not one of `allowed`."""
    value = normal(environ.get(name, "").strip()) or default
    if value not in allowed:
        raise LogSettingError(f"{name}={environ[name]!r} is not a {what}: choose from "
                              f"{', '.join(allowed)}")
    return value


def export_logging_settings(fmt: str, level: str,
                            environ: MutableMapping[str, str] = os.environ) -> None:
    """Put the resolved settings in the environment that child processes inherit."""
    environ[ENV_FORMAT] = fmt
    environ[ENV_LEVEL] = level


def setup_logging(fmt: str = DEFAULT_FORMAT, level: str = DEFAULT_LEVEL) -> None:
    """Send every logger's records to stderr in `fmt` at `level`; replaces earlier handlers."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        f = logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s", "%H:%M:%S")
        f.converter = time.localtime
        handler.setFormatter(f)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiohttp.access", "zeroconf", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
