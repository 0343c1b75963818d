"""The swarm CA (protocols/tls.py, coordinator/ca.py): fingerprints, leaves that name only the
caller, token files that carry the fingerprint, the one peer-to-peer channel function, and a peer
server whose certificate arrives after it started."""

from __future__ import annotations

import asyncio
import errno
import os
import stat

import grpc
import pytest
from cryptography import x509

from coordinator.ca import CaError, CoordinatorCA
from protocols import tls
from protocols.admission import Admission, parse_token, token_proof
from protocols.identity import Identity

PEER_A, PEER_B = "00000000000000aa", "00000000000000bb"


def test_fingerprint_covers_the_coordinator_key_and_the_ca_key() -> None:
    key = Identity.generate().public_key
    ca, _ = tls.make_coordinator_ca(key)
    assert tls.coordinator_key_of(ca) == key
    fp = tls.fingerprint(ca)
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    assert tls.fingerprint(tls.make_coordinator_ca(key)[0]) != fp  # another CA key
    tls.verify_coordinator_ca(ca, fp, key)
    with pytest.raises(tls.TlsTrustError, match="not the"):
        tls.verify_coordinator_ca(ca, "sha256:" + "0" * 64)
    with pytest.raises(tls.TlsTrustError, match="not the one its swarm CA names"):
        tls.verify_coordinator_ca(ca, fp, Identity.generate().public_key)
    plain_ca, _ = tls.make_ca("not a swarm CA")
    with pytest.raises(tls.TlsTrustError, match="not a Shoal swarm CA"):
        tls.fingerprint(plain_ca)
    assert tls.check_fingerprint(fp.upper().replace("SHA256:", "")) == fp
    with pytest.raises(ValueError, match="64 hex digits"):
        tls.check_fingerprint("sha256:abc")


def test_leaf_names_only_the_caller_whatever_the_csr_asks_for() -> None:
    ca, ca_key = tls.make_coordinator_ca(Identity.generate().public_key)
    csr, _ = tls.make_csr(PEER_A, [tls.COORDINATOR_TLS_NAME, PEER_B, "10.0.0.1"])
    leaf = x509.load_pem_x509_certificate(tls.sign_csr(ca, ca_key, csr, PEER_A))
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [PEER_A]
    assert san.get_values_for_type(x509.IPAddress) == []
    with pytest.raises(ValueError, match="not the calling peer"):
        tls.sign_csr(ca, ca_key, csr, PEER_B)


def test_coordinator_ca_is_made_once_0600_and_reused(tmp_path) -> None:
    key = Identity.generate().public_key
    first = CoordinatorCA.load_or_create(tmp_path, key)
    assert stat.S_IMODE((tmp_path / "tls-ca.key").stat().st_mode) == 0o600
    again = CoordinatorCA.load_or_create(tmp_path, key)
    assert again.fingerprint == first.fingerprint and again.key_pem == first.key_pem
    with pytest.raises(CaError, match="another coordinator key"):
        CoordinatorCA.load_or_create(tmp_path, Identity.generate().public_key)
    (tmp_path / "tls-ca.key").unlink()
    with pytest.raises(CaError, match="is missing"):
        CoordinatorCA.load_or_create(tmp_path, key)
    with pytest.raises(ValueError, match="not a PEM certificate signing request"):
        first.sign(b"garbage", PEER_A)


def test_token_file_carries_the_fingerprint_and_only_the_secret_is_proved(tmp_path) -> None:
    ca = CoordinatorCA.load_or_create(tmp_path / "s", Identity.generate().public_key)
    path = tmp_path / "join.token"
    path.write_text("s3cret\n")
    path.chmod(0o600)
    text = ca.stamp_token_file(path)
    assert parse_token(path.read_text()) == ("s3cret", ca.fingerprint) == parse_token(text)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ca.stamp_token_file(path) == text  # unchanged when it already carries it
    key = Identity.generate().public_key
    assert token_proof(text, key, 5.0) == token_proof("s3cret", key, 5.0)
    Admission(token=text).check(key, token_proof("s3cret", key, 5.0), 5.0, 5.0)
    assert parse_token("only-a-secret") == ("only-a-secret", None)


def test_peer_channel_is_mtls_off_loopback_and_plaintext_on_it(monkeypatch) -> None:
    monkeypatch.delenv("SHOAL_TLS_ON_LOOPBACK", raising=False)
    assert tls.link_is_local("127.0.0.1") and tls.link_is_local("localhost")
    assert not tls.link_is_local("198.18.0.2") and not tls.link_is_local("0.0.0.0")
    monkeypatch.setenv("SHOAL_TLS_ON_LOOPBACK", "1")
    assert not tls.link_is_local("127.0.0.1")
    with pytest.raises(ValueError, match="callee's peer id"):
        ca, ca_key = tls.make_coordinator_ca(Identity.generate().public_key)
        key = tls.new_tls_key()
        leaf = tls.sign_csr(ca, ca_key, tls.csr_for_key(PEER_A, key), PEER_A)
        tls.peer_channel("198.18.0.2:7100", "", tls.PeerTls(ca, leaf, key))


async def _echo_id(request: bytes, context) -> bytes:
    return (tls.tls_peer_id(context) or "-").encode()


def test_peer_server_serves_nothing_until_its_leaf_then_mtls(monkeypatch) -> None:
    monkeypatch.setenv("SHOAL_TLS_ON_LOOPBACK", "1")
    ca, ca_key = tls.make_coordinator_ca(Identity.generate().public_key)
    material = {}
    for pid in (PEER_A, PEER_B):
        key = tls.new_tls_key()
        material[pid] = tls.PeerTls(ca, tls.sign_csr(ca, ca_key, tls.csr_for_key(pid, key), pid),
                                    key)

    async def main() -> None:
        creds = tls.PeerServerTls()
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "t.T", {"Who": grpc.unary_unary_rpc_method_handler(_echo_id)})])
        port = server.add_secure_port("127.0.0.1:0", creds.credentials)
        await server.start()
        address = f"127.0.0.1:{port}"
        try:
            async with tls.peer_channel(address, PEER_A, material[PEER_B]) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as info:  # no leaf yet: no handshake
                    await ch.unary_unary("/t.T/Who")(b"", timeout=3)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            creds.update(material[PEER_A])
            async with tls.peer_channel(address, PEER_A, material[PEER_B]) as ch:
                assert await ch.unary_unary("/t.T/Who")(b"", timeout=10) == PEER_B.encode()
            async with tls.peer_channel(address, PEER_B, material[PEER_B]) as ch:
                with pytest.raises(grpc.aio.AioRpcError):  # it is PEER_A, not PEER_B
                    await ch.unary_unary("/t.T/Who")(b"", timeout=3)
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_a_read_only_token_file_is_left_alone_with_a_warning(tmp_path, caplog,
                                                             monkeypatch) -> None:
    ca = CoordinatorCA.load_or_create(tmp_path / "s", Identity.generate().public_key)
    path = tmp_path / "join.token"
    path.write_text("s3cret\n")

    def read_only(src, dst) -> None:  # a Docker / Kubernetes secret cannot be replaced
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "replace", read_only)
    assert parse_token(ca.stamp_token_file(path)) == ("s3cret", ca.fingerprint)
    assert path.read_text() == "s3cret\n"
    assert not list(tmp_path.glob(".join.token.*"))
    assert "--coordinator-fingerprint " + ca.fingerprint in caplog.text
    assert "s3cret" not in caplog.text  # the secret is never logged
