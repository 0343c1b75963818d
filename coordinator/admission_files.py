"""The coordinator's admission and HTTP API secrets as files: the join token file (made with a
fresh token when it does not exist), the allow-list of Ed25519 public keys, and the HTTP bearer
token. Each refuses a file it cannot use with a `CoordinatorStartError` that says what to do.
Split out of coordinator/main.py by responsibility.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from protocols.auth import Admission, new_token

log = logging.getLogger("shoal.coordinator")

DEFAULT_TOKEN_FILE = "join.token"


class CoordinatorStartError(RuntimeError):
    """The coordinator cannot start; the message says what to change."""


def read_admission(state_dir: Path, token_file: str | None, allow_file: str | None
               ) -> tuple[Admission, Path | None]:
    token = None
    path = None
    if token_file is None and allow_file is None:
        token_file = str(state_dir / DEFAULT_TOKEN_FILE)
    if token_file is not None:
        path = Path(token_file)
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(new_token() + "\n")
            log.info("wrote a new join token to %s (give it to peers with --token-file)", path)
        token = path.read_text().strip()
        if not token:
            raise CoordinatorStartError(f"token file {path} is empty; delete it to have a new "
                                        f"token made, or write one (`shoal token new FILE`)")
    allowed = None
    if allow_file is not None:
        allowed = set()
        try:
            lines = Path(allow_file).read_text().splitlines()
        except OSError as exc:
            raise CoordinatorStartError(f"cannot read allow-list {allow_file}: "
                                        f"{exc.strerror}") from exc
        for n, line in enumerate(lines, 1):
            entry = line.split("#", 1)[0].strip()
            if not entry:
                continue
            try:
                key = bytes.fromhex(entry)
            except ValueError:
                key = b""
            if len(key) != 32:
                raise CoordinatorStartError(
                    f"{allow_file}:{n}: {entry[:80]!r} is not a 64-hex-digit Ed25519 public key "
                    f"(`shoal identity show KEYFILE` prints one)")
            allowed.add(key)
    return Admission(token=token, allowed_keys=allowed), path


def read_http_token(path: str | None) -> str | None:
    """The HTTP API's bearer token from --http-token-file (None: no token)."""
    if path is None:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise CoordinatorStartError(f"cannot read --http-token-file {path}: "
                                    f"{exc.strerror}") from exc
    if len(token) < 16 or not token.isprintable() or " " in token:
        raise CoordinatorStartError(f"--http-token-file {path} must hold one token of at least "
                                    f"16 printable characters without spaces (`shoal token new "
                                    f"FILE` makes one)")
    return token
