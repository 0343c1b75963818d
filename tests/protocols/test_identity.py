"""Identities: peer ids, signatures, and key files that are private and never overwritten."""

from __future__ import annotations

import hashlib
import os
import stat
import threading

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from protocols.identity import Identity, KeyFileError, peer_id_of, verify_signature


def test_peer_id_is_sha256_prefix_of_raw_public_key() -> None:
    me = Identity.generate()
    assert len(me.public_key) == 32
    assert me.peer_id == hashlib.sha256(me.public_key).hexdigest()[:16]
    assert peer_id_of(me.public_key) == me.peer_id
    assert me.peer_id in repr(me)
    with pytest.raises(ValueError, match="32 raw bytes"):
        peer_id_of(b"short")


def test_sign_and_verify() -> None:
    me, other = Identity.generate(), Identity.generate()
    sig = me.sign(b"hello")
    assert len(sig) == 64
    assert verify_signature(me.public_key, sig, b"hello")
    assert not verify_signature(me.public_key, sig, b"hellO")
    assert not verify_signature(other.public_key, sig, b"hello")


@pytest.mark.parametrize(
    ("key", "sig", "data"),
    [
        (b"", b"", b""),
        (b"x" * 31, b"s" * 64, b"d"),
        (b"x" * 32, b"s" * 63, b"d"),
        (b"\xff" * 32, b"\xff" * 64, b"d"),
        (None, None, None),
        ("not bytes" * 4, b"s" * 64, b"d"),
        (b"x" * 32, b"s" * 64, 12345),
    ],
)
def test_verify_signature_never_raises(key, sig, data) -> None:
    assert verify_signature(key, sig, data) is False


def test_save_load_roundtrip_with_mode_0600(tmp_path) -> None:
    path = tmp_path / "keys" / "peer.key"
    me = Identity.generate()
    me.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PEM PKCS8
    assert Identity.load(path).public_key == me.public_key
    assert [p.name for p in path.parent.iterdir()] == ["peer.key"]  # no temporary left behind


def test_save_refuses_to_overwrite(tmp_path) -> None:
    path = tmp_path / "peer.key"
    first = Identity.generate()
    first.save(path)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        Identity.generate().save(path)
    assert Identity.load(path).peer_id == first.peer_id


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_load_refuses_key_readable_by_others(tmp_path, mode) -> None:
    path = tmp_path / "peer.key"
    Identity.generate().save(path)
    os.chmod(path, mode)
    with pytest.raises(KeyFileError, match=f"chmod 600 {path}"):
        Identity.load(path)
    os.chmod(path, 0o600)
    Identity.load(path)


def test_load_or_create_is_stable(tmp_path) -> None:
    path = tmp_path / "peer.key"
    created = Identity.load_or_create(path)
    assert Identity.load_or_create(path).peer_id == created.peer_id


def test_load_or_create_races_agree(tmp_path) -> None:
    path = tmp_path / "peer.key"
    ids: list[str] = []
    threads = [
        threading.Thread(target=lambda: ids.append(Identity.load_or_create(path).peer_id))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1 and ids[0] == Identity.load(path).peer_id


def test_load_refuses_other_key_types_and_garbage(tmp_path) -> None:
    ecdsa = tmp_path / "ec.key"
    ecdsa.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ecdsa.chmod(0o600)
    with pytest.raises(KeyFileError, match="Ed25519"):
        Identity.load(ecdsa)
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"not a key")
    garbage.chmod(0o600)
    with pytest.raises(KeyFileError, match="not a PEM private key"):
        Identity.load(garbage)
    with pytest.raises(FileNotFoundError):
        Identity.load(tmp_path / "missing.key")
