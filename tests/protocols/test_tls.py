"""mTLS with P-256 certificates: a round trip on 127.0.0.1, a client without a certificate
refused, per-peer certificates bound to the Ed25519 peer id, and signed calls over TLS."""

from __future__ import annotations

import asyncio
import stat
import time

import grpc
import pytest
from cryptography import x509

from protocols import tls
from protocols.auth import AuthInterceptor, CallSigner, client_interceptors, issue_certificate
from protocols.identity import Identity

HOSTS = ["localhost", "127.0.0.1"]


async def _whoami(request: bytes, context) -> bytes:
    return (tls.tls_peer_id(context) or "-").encode()


async def _serve(tls_dir, interceptors=()) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(interceptors=list(interceptors), options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "test.Tls", {"WhoAmI": grpc.unary_unary_rpc_method_handler(_whoami)})])
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(tls_dir))
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_write_tls_dir_files_and_modes(tmp_path) -> None:
    files = tls.write_tls_dir(tmp_path / "a", HOSTS, common_name="node-a")
    for path, mode in [(files.key, 0o600), (files.ca_key, 0o600), (files.cert, 0o644)]:
        assert stat.S_IMODE(path.stat().st_mode) == mode
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        tls.write_tls_dir(tmp_path / "a", HOSTS)
    other = tls.write_tls_dir(tmp_path / "b", HOSTS, ca_dir=tmp_path / "a")
    assert other.ca_key is None and other.ca.read_bytes() == files.ca.read_bytes()


def test_mtls_round_trip_and_client_without_certificate_refused(tmp_path) -> None:
    server_dir, client_dir = tmp_path / "server", tmp_path / "client"
    tls.write_tls_dir(server_dir, HOSTS, common_name="coordinator")
    tls.write_tls_dir(client_dir, [], common_name="peer-b", ca_dir=server_dir)
    stranger_dir = tmp_path / "stranger"  # certificate from another CA
    tls.write_tls_dir(stranger_dir, [], common_name="mallory")

    async def main() -> None:
        server, address = await _serve(server_dir)
        try:
            async with grpc.aio.secure_channel(address, tls.channel_credentials(client_dir)) as ch:
                assert await ch.unary_unary("/test.Tls/WhoAmI")(b"", timeout=10) == b"peer-b"
            ca_only = grpc.ssl_channel_credentials(root_certificates=(server_dir / "ca.pem")
                                                   .read_bytes())
            for creds in (ca_only, tls.channel_credentials(stranger_dir)):
                async with grpc.aio.secure_channel(address, creds) as ch:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await ch.unary_unary("/test.Tls/WhoAmI")(b"", timeout=10)
                    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_per_peer_certificate_is_bound_to_peer_id_and_carries_signed_calls(tmp_path) -> None:
    coordinator, peer = Identity.generate(), Identity.generate()
    server_dir = tmp_path / "coordinator"
    tls.write_tls_dir(server_dir, HOSTS, common_name="coordinator")
    ca_pem, ca_key = (server_dir / "ca.pem").read_bytes(), (server_dir / "ca.key").read_bytes()

    csr, key_pem = tls.make_csr(peer.peer_id, [])
    with pytest.raises(ValueError, match="not the calling peer"):
        tls.sign_csr(ca_pem, ca_key, csr, Identity.generate().peer_id)
    cert_pem = tls.sign_csr(ca_pem, ca_key, csr, peer.peer_id)
    creds = grpc.ssl_channel_credentials(ca_pem, key_pem, cert_pem)

    signed = issue_certificate(coordinator, peer.public_key, "s", 60, time.time(), serial=1)
    interceptor = AuthInterceptor(issuer_public_key=lambda: coordinator.public_key,
                                  swarm_id=lambda: "s", is_member=lambda pid: pid == peer.peer_id)
    signer = CallSigner(peer, lambda: signed)

    async def main() -> None:
        server, address = await _serve(server_dir, [interceptor])
        try:
            async with grpc.aio.secure_channel(address, creds,
                                               interceptors=client_interceptors(signer)) as ch:
                answer = await ch.unary_unary("/test.Tls/WhoAmI")(b"", timeout=10)
                assert answer == peer.peer_id.encode()
            async with grpc.aio.secure_channel(address, creds) as unsigned:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await unsigned.unary_unary("/test.Tls/WhoAmI")(b"", timeout=10)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_tls_key_readable_by_others_is_refused(tmp_path) -> None:
    files = tls.write_tls_dir(tmp_path, HOSTS)
    files.key.chmod(0o644)
    with pytest.raises(PermissionError, match=f"chmod 600 {files.key}"):
        tls.server_credentials(tmp_path)

