"""Ed25519 identities: the key a process is known by, and the peer id derived from it.

Every Shoal process (coordinator, peer, observer) holds one Ed25519 private key in a PEM PKCS8
file that only its owner can read. Its peer id is the first 16 hex characters of the SHA-256 of
the raw 32-byte public key, so anyone holding the public key can recompute it and nobody can
claim an id without the key.

Invariants:
- A key file is never overwritten: `save` creates the file atomically with mode 0600 and refuses
  an existing path, because replacing a key silently changes the peer's identity.
- `load` refuses a key file that group or others may access, and says which `chmod` fixes it.
- `verify_signature` never raises on malformed input; it answers False.
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
PEER_ID_CHARS = 16


class KeyFileError(Exception):
    """A key file is missing, unreadable, too permissive or not an Ed25519 key."""


def peer_id_of(public_key: bytes) -> str:
    """The peer id of a raw 32-byte Ed25519 public key: sha256(key).hexdigest()[:16]."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(
            f"an Ed25519 public key is {PUBLIC_KEY_BYTES} raw bytes, got {len(public_key)}"
        )
    return hashlib.sha256(bytes(public_key)).hexdigest()[:PEER_ID_CHARS]


@functools.lru_cache(maxsize=4096)
def _public_key_object(public_key: bytes) -> Ed25519PublicKey:
    # Parsing a key is cheap but not free; the same few hundred peers sign every call.
    return Ed25519PublicKey.from_public_bytes(public_key)


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """True when `signature` is a valid Ed25519 signature of `data` by `public_key`.

    Never raises: wrong lengths, wrong types and invalid signatures all answer False.
    """
    try:
        if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
            return False
        _public_key_object(bytes(public_key)).verify(bytes(signature), bytes(data))
        return True
    except (InvalidSignature, TypeError, ValueError):
        return False


class Identity:
    """An Ed25519 private key with its raw public key and peer id.

    Construct with `generate`, `load` or `load_or_create`; the private key never leaves the
    object except through `save`.
    """

    __slots__ = ("_key", "_peer_id", "_public_key")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise TypeError(f"Identity needs an Ed25519 private key, got {type(private_key)}")
        self._key = private_key
        self._public_key = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self._peer_id = peer_id_of(self._public_key)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity (not saved anywhere)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Read a PEM PKCS8 Ed25519 key file that only its owner can access.

        Raises:
            FileNotFoundError: no file at `path`.
            KeyFileError: the file is accessible to group/others, encrypted, or not Ed25519.
        """
        path = Path(path)
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if os.name == "posix" and mode & 0o077:
                raise KeyFileError(
                    f"key file {path} has mode {stat.S_IMODE(mode):04o}: group or others can "
                    f"access it. A private key must be readable only by its owner; run "
                    f"`chmod 600 {path}` (and consider the key exposed if others could read it)"
                )
            data = f.read()
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError as e:
            raise KeyFileError(
                f"key file {path} is encrypted; Shoal keys are unencrypted PEM PKCS8 protected "
                f"by file mode 0600 ({e})"
            ) from e
        except ValueError as e:
            raise KeyFileError(
                f"key file {path} is not a PEM private key ({e}); move it away and let Shoal "
                f"create a new identity, or point to the right file"
            ) from e
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(
                f"key file {path} holds a {type(key).__name__}; Shoal identities are Ed25519 "
                f"(make one with Identity.generate().save(path))"
            )
        return cls(key)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key as PEM PKCS8, mode 0600, atomically; never overwrites.

        The key is written to a private temporary file in the same directory and then hard-linked
        to `path`, which fails if `path` exists; readers never see a half-written key.

        Raises:
            FileExistsError: `path` already exists.
        """
        path = Path(path)
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            raise _exists(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o600)  # mkstemp already uses 0600; make it explicit
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # atomic, and refuses an existing path
            except FileExistsError:
                raise _exists(path) from None
            except OSError:
                _write_exclusive(path, pem)  # filesystems without hard links
            _fsync_dir(path.parent)
        finally:
            os.unlink(tmp)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        """Load the identity at `path`, or create and save a new one if there is none."""
        try:
            return cls.load(path)
        except FileNotFoundError:
            pass
        identity = cls.generate()
        try:
            identity.save(path)
        except FileExistsError:  # another process created it between our load and save
            return cls.load(path)
        return identity

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key."""
        return self._public_key

    @property
    def peer_id(self) -> str:
        return self._peer_id

    def sign(self, data: bytes) -> bytes:
        """A 64-byte Ed25519 signature of `data` (sign a digest, not a bulk payload)."""
        return self._key.sign(bytes(data))

    def __repr__(self) -> str:
        return f"Identity(peer_id={self._peer_id!r})"


def _exists(path: Path) -> FileExistsError:
    return FileExistsError(
        f"{path} already exists; refusing to overwrite a key file (it would change this "
        f"process's peer id). Load it with Identity.load, or delete it first if you mean to."
    )


def _write_exclusive(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise _exists(path) from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
