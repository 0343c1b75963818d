"""Optional mutual TLS for gRPC traffic that crosses untrusted networks.

Call signing (protocols.auth) already authenticates every call; TLS adds confidentiality and
stops captured calls from being replayed to another server. Certificates here are ECDSA P-256:
gRPC's TLS stack (BoringSSL) fails Ed25519 certificates with NO_COMMON_SIGNATURE_ALGORITHMS, so
the Ed25519 identity and the TLS key are separate keys, bound by the certificate's common name.

Simple mode (one operator, a few machines): `write_tls_dir(dir, hosts)` on the first machine makes
a CA (ca.pem, ca.key) and a node certificate; on each other machine run it with `ca_dir` pointing
to a copy of ca.pem + ca.key (or copy the node files made for it). Servers use
`server_credentials(dir)` (clients must present a certificate from the same CA), clients
`channel_credentials(dir)`.

Per-peer mode (how the coordinator can bind TLS to peer ids): the coordinator owns the CA. A peer
makes a P-256 key and a CSR with `make_csr(peer_id, hosts)` and sends the CSR in its signed Join
call; the coordinator checks the Join call's Ed25519 signature, then `sign_csr(..., peer_id)`
issues a short-lived leaf with CN = that peer id (and refuses a CSR naming anyone else). A server
then reads the TLS-verified peer id with `tls_peer_id(context)` and may require it to equal
`protocols.auth.current_caller().peer_id`. This needs proto fields that do not exist yet
(JoinRequest.tls_csr; JoinReply.tls_certificate and tls_ca).

Invariant: private keys are written with mode 0600 and never overwrite an existing file.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_FILE, CA_KEY_FILE, CERT_FILE, KEY_FILE = "ca.pem", "ca.key", "node.pem", "node.key"


@dataclass(frozen=True)
class TlsFiles:
    """Paths written by `write_tls_dir`; `ca_key` is None when the CA lives elsewhere."""

    ca: Path
    cert: Path
    key: Path
    ca_key: Path | None


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def make_ca(common_name: str, days: int = 3650) -> tuple[bytes, bytes]:
    """A self-signed P-256 certificate authority: (cert_pem, key_pem)."""
    key = _new_key()
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _issue(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    subject_key: Any,
    common_name: str,
    hosts: list[str],
    client: bool,
    server: bool,
    days: float,
) -> bytes:
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key must be an ECDSA key (make one with protocols.tls.make_ca)")
    if not (client or server):
        raise ValueError("a leaf certificate must allow client or server use (or both)")
    usages = ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else []) + (
        [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    )
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(subject_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def issue_leaf(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    common_name: str,
    hosts: list[str],
    client: bool = True,
    server: bool = True,
    days: float = 365,
) -> tuple[bytes, bytes]:
    """A P-256 leaf signed by the CA, valid for `hosts` (DNS names or IPs): (cert_pem, key_pem)."""
    key = _new_key()
    cert = _issue(ca_cert_pem, ca_key_pem, key.public_key(), common_name, hosts, client, server,
                  days)
    return cert, _key_pem(key)


def make_csr(common_name: str, hosts: list[str]) -> tuple[bytes, bytes]:
    """A peer's P-256 key and certificate signing request naming itself: (csr_pem, key_pem)."""
    key = _new_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(_name(common_name))
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def sign_csr(
    ca_cert_pem: bytes, ca_key_pem: bytes, csr_pem: bytes, peer_id: str, days: float = 1
) -> bytes:
    """A leaf for the CSR's key with CN = peer_id; refuses a CSR that names someone else.

    The caller (the coordinator) must already have verified that the request came from the
    Ed25519 key whose peer id is `peer_id` (a signed Join call).
    """
    csr = x509.load_pem_x509_csr(csr_pem)
    if not csr.is_signature_valid:
        raise ValueError("the CSR's self-signature is invalid; make it again with make_csr")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [a.value for a in names] != [peer_id]:
        raise ValueError(
            f"the CSR names {[a.value for a in names]}, not the calling peer {peer_id!r}; "
            f"make the CSR with make_csr(identity.peer_id, hosts)"
        )
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        hosts = [str(v) for v in san.get_values_for_type(x509.DNSName)] + [
            str(v) for v in san.get_values_for_type(x509.IPAddress)
        ]
    except x509.ExtensionNotFound:
        hosts = []
    return _issue(ca_cert_pem, ca_key_pem, csr.public_key(), peer_id, hosts, True, True, days)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise FileExistsError(
            f"{path} already exists; refusing to overwrite TLS material. Use another directory "
            f"or delete the old files first"
        ) from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)


def write_tls_dir(
    directory: str | os.PathLike[str],
    hosts: list[str],
    *,
    common_name: str = "shoal-node",
    ca_dir: str | os.PathLike[str] | None = None,
    days: float = 365,
) -> TlsFiles:
    """Write ca.pem, node.pem and node.key (0600) for `hosts` into `directory`.

    Without `ca_dir`, a new CA is made and its key saved as `directory`/ca.key (0600): keep it to
    issue certificates for the other machines (write_tls_dir(other_dir, hosts, ca_dir=directory)).
    With `ca_dir`, the CA there signs the node certificate and only ca.pem is copied.
    """
    out = Path(directory)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_key_path: Path | None
    if ca_dir is None:
        ca_pem, ca_key = make_ca(f"{common_name} CA")
        ca_key_path = out / CA_KEY_FILE
        _write_new(ca_key_path, ca_key, 0o600)
    else:
        source = Path(ca_dir)
        ca_pem, ca_key = (source / CA_FILE).read_bytes(), (source / CA_KEY_FILE).read_bytes()
        ca_key_path = None
    cert_pem, key_pem = issue_leaf(ca_pem, ca_key, common_name, hosts, days=days)
    _write_new(out / CA_FILE, ca_pem, 0o644)
    _write_new(out / KEY_FILE, key_pem, 0o600)
    _write_new(out / CERT_FILE, cert_pem, 0o644)
    return TlsFiles(ca=out / CA_FILE, cert=out / CERT_FILE, key=out / KEY_FILE, ca_key=ca_key_path)


def _read(directory: str | os.PathLike[str]) -> tuple[bytes, bytes, bytes]:
    d = Path(directory)
    key_path = d / KEY_FILE
    if os.name == "posix" and key_path.stat().st_mode & 0o077:
        raise PermissionError(
            f"TLS key {key_path} is accessible to group or others; run `chmod 600 {key_path}`"
        )
    return (d / CA_FILE).read_bytes(), (d / CERT_FILE).read_bytes(), key_path.read_bytes()


def server_credentials(directory: str | os.PathLike[str]) -> grpc.ServerCredentials:
    """Server credentials that require clients to present a certificate from the same CA."""
    ca, cert, key = _read(directory)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=True)


def channel_credentials(directory: str | os.PathLike[str]) -> grpc.ChannelCredentials:
    """Client credentials presenting this node's certificate and trusting only the CA.

    Connect to a name or IP listed in the server's certificate, or set the channel option
    ("grpc.ssl_target_name_override", name) to one that is.
    """
    ca, cert, key = _read(directory)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                        certificate_chain=cert)


def tls_peer_id(context: Any) -> str | None:
    """The common name of the client's verified TLS certificate, or None without mTLS."""
    names = context.auth_context().get("x509_common_name")
    return names[0].decode() if names else None
