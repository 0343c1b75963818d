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
`protocols.auth.current_caller().peer_id` (AuthInterceptor does: a TLS client certificate naming
another peer than the call's signer is refused). The CSR travels in JoinRequest.tls_csr, the leaf
and the CA in JoinReply.tls_certificate / tls_ca.

The swarm's CA (what `shoal coordinator` and `shoal peer` do by default): the coordinator makes a
CA with `make_coordinator_ca` on first start (coordinator/ca.py keeps it in its state folder). The
CA certificate embeds the coordinator's Ed25519 public key and is also the certificate the
coordinator serves TLS with (name COORDINATOR_TLS_NAME), so one TLS handshake gives a peer the CA
(Python 3.11's `ssl` shows only the leaf; here the leaf is the CA). `fingerprint(ca_pem)` hashes
the Ed25519 key and the CA's public key; a join token carries it (protocols.admission
parse_token) the way kubeadm tokens carry the CA hash, and `CoordinatorClient` refuses a
coordinator whose CA does not match it before it sends anything but the TLS handshake.

Links: `peer_channel(address, peer_id, tls)` is THE way to dial a peer: mTLS with the swarm CA as
root, this peer's leaf as client certificate and the callee's peer id as the TLS name, unless the
link is loopback (127.0.0.0/8, ::1, localhost) or the peer runs `--plaintext` (tls None). Peer
servers serve with `PeerServerTls` (the leaf is only known after Join, the server starts before
it: dynamic credentials that switch from a placeholder to the leaf on the next handshake).

Invariant: private keys are written with mode 0600 and never overwrite an existing file.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ipaddress
import os
import socket
import ssl
import threading
from collections.abc import Sequence
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


def _ca_builder(key: ec.EllipticCurvePrivateKey, name: x509.Name, days: float
                ) -> x509.CertificateBuilder:
    """A self-signed CA certificate's builder, everything but the extensions a caller adds."""
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
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
    )


def make_ca(common_name: str, days: int = 3650) -> tuple[bytes, bytes]:
    """A self-signed P-256 certificate authority: (cert_pem, key_pem)."""
    key = _new_key()
    cert = _ca_builder(key, _name(common_name), days).sign(key, hashes.SHA256())
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
    """A leaf for the CSR's key with CN = DNS name = peer_id; refuses a CSR naming someone else.

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
    # The leaf names the peer id only, whatever names the CSR asks for: a CSR listing another
    # peer's id or COORDINATOR_TLS_NAME must not yield a certificate that could impersonate it.
    hosts = [peer_id]
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


# ---------------------------------------------------------------- the swarm's CA and its links

COORDINATOR_TLS_NAME = "shoal-coordinator"  # the DNS name in the coordinator's certificate
FINGERPRINT_PREFIX = "sha256:"
#: lifetime of a peer's leaf: a re-join renews it, and CoordinatorClient re-joins a day before
#: it ends, so a run of any length keeps its links
LEAF_DAYS = 30.0
# a UUID-based OID (ITU-T X.667, no registration): the coordinator's raw Ed25519 public key
_COORDINATOR_KEY_OID = x509.ObjectIdentifier("2.25.329800735698586629295641978511506172918")
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


class TlsTrustError(ValueError):
    """A coordinator's TLS material does not match what the peer was told to trust."""


def make_coordinator_ca(coordinator_public_key: bytes, days: int = 3650) -> tuple[bytes, bytes]:
    """The swarm's P-256 CA, bound to the coordinator's Ed25519 key: (cert_pem, key_pem).

    The same certificate is the coordinator's TLS server certificate (DNS name
    COORDINATOR_TLS_NAME; no extended key usage, so it may sign client and server leaves).
    """
    if len(coordinator_public_key) != 32:
        raise ValueError("the coordinator's public key must be 32 raw bytes (Ed25519)")
    key = _new_key()
    tag = hashlib.sha256(coordinator_public_key).hexdigest()[:16]
    cert = (
        _ca_builder(key, _name(f"{COORDINATOR_TLS_NAME} CA {tag}"), days)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(COORDINATOR_TLS_NAME)]),
                       critical=False)
        .add_extension(x509.UnrecognizedExtension(_COORDINATOR_KEY_OID,
                                                  bytes(coordinator_public_key)), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _load_cert(pem_or_der: bytes) -> x509.Certificate:
    try:
        if pem_or_der.lstrip().startswith(b"-----"):
            return x509.load_pem_x509_certificate(pem_or_der)
        return x509.load_der_x509_certificate(pem_or_der)
    except ValueError as exc:
        raise TlsTrustError(f"not an X.509 certificate: {exc}") from None


def coordinator_key_of(ca_pem: bytes) -> bytes:
    """The coordinator Ed25519 key a swarm CA (make_coordinator_ca) names."""
    cert = _load_cert(ca_pem)
    try:
        ext = cert.extensions.get_extension_for_oid(_COORDINATOR_KEY_OID).value
    except x509.ExtensionNotFound:
        raise TlsTrustError("this certificate is not a Shoal swarm CA (no coordinator key in "
                            "it)") from None
    key = bytes(ext.value)  # type: ignore[attr-defined]
    if len(key) != 32:
        raise TlsTrustError("the swarm CA names a coordinator key that is not 32 bytes")
    return key


def fingerprint(ca_pem: bytes) -> str:
    """"sha256:HEX" over the coordinator's Ed25519 key and the CA's public key (SPKI)."""
    cert = _load_cert(ca_pem)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashlib.sha256(b"shoal-coordinator-fingerprint-v1\0" + coordinator_key_of(ca_pem)
                            + spki).hexdigest()
    return FINGERPRINT_PREFIX + digest


def check_fingerprint(text: str) -> str:
    """A fingerprint as given by an operator, normalised; ValueError with the expected form."""
    fp = text.strip().lower()
    if not fp.startswith(FINGERPRINT_PREFIX):
        fp = FINGERPRINT_PREFIX + fp
    digest = fp[len(FINGERPRINT_PREFIX):]
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"{text.strip()[:80]!r} is not a coordinator fingerprint: expected "
                         f"sha256: and 64 hex digits, as `shoal coordinator` prints it")
    return fp


def verify_coordinator_ca(ca_pem: bytes, expected_fingerprint: str,
                          coordinator_public_key: bytes | None = None) -> None:
    """Raise TlsTrustError unless `ca_pem` has the expected fingerprint (and, when given, names
    `coordinator_public_key`)."""
    got = fingerprint(ca_pem)
    if got != expected_fingerprint:
        raise TlsTrustError(f"the coordinator presents fingerprint {got}, not the "
                            f"{expected_fingerprint} in this peer's token / "
                            f"--coordinator-fingerprint: it is another "
                            f"coordinator (or an impostor); check the address and the token")
    if coordinator_public_key is not None and coordinator_key_of(ca_pem) != coordinator_public_key:
        raise TlsTrustError("the coordinator's Ed25519 key is not the one its swarm CA names")


def coordinator_server_credentials(ca_pem: bytes, ca_key_pem: bytes) -> grpc.ServerCredentials:
    """TLS for the coordinator's gRPC port, served with the swarm CA itself. Clients are not asked
    for a certificate: a joining peer has none yet, and every call is signed anyway."""
    return grpc.ssl_server_credentials([(ca_key_pem, ca_pem)], root_certificates=None,
                                       require_client_auth=False)


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an IP, no port) is this machine's loopback."""
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def link_is_local(host: str) -> bool:
    """Whether a link to or on `host` may stay plaintext: loopback, unless the environment sets
    SHOAL_TLS_ON_LOOPBACK=1 (tests and benchmarks use it to run TLS on 127.0.0.1)."""
    return is_loopback(host) and os.environ.get("SHOAL_TLS_ON_LOOPBACK", "") not in ("1", "true")


def fetch_server_certificate(address: str, timeout_s: float = 5.0) -> bytes | None:
    """The DER certificate a server at HOST:PORT presents, or None when it does not speak TLS.

    Blocking (run it in a thread). Raises OSError when nothing answers at the address. The
    certificate is NOT verified here: the caller checks it against a fingerprint.
    """
    host, port = split_host_port(address)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, port), timeout_s) as sock:
        try:
            with ctx.wrap_socket(sock, server_hostname=COORDINATOR_TLS_NAME) as conn:
                return conn.getpeercert(binary_form=True)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            return None  # a plaintext HTTP/2 server answers a ClientHello with garbage or EOF


def der_to_pem(der: bytes) -> bytes:
    return _load_cert(der).public_bytes(serialization.Encoding.PEM)


def coordinator_channel_credentials(ca_pem: bytes) -> grpc.ChannelCredentials:
    """TLS to the coordinator, trusting only the pinned swarm CA (dial with the channel option
    ("grpc.ssl_target_name_override", COORDINATOR_TLS_NAME))."""
    return grpc.ssl_channel_credentials(root_certificates=ca_pem)


@dataclass(frozen=True)
class PeerTls:
    """A peer's TLS material in its swarm: the CA, its leaf (CN = its peer id), its key."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem,
                                            private_key=self.key_pem,
                                            certificate_chain=self.cert_pem)


def new_tls_key() -> bytes:
    """A fresh P-256 private key (PEM), kept only in memory (observers: export, generate)."""
    return _key_pem(_new_key())


def load_or_create_tls_key(path: str | os.PathLike[str]) -> bytes:
    """This peer's P-256 TLS key at `path`: made (0600) on first use, never overwritten."""
    p = Path(path)
    if not p.exists():
        p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # another process made it first: use it
            _write_new(p, _key_pem(_new_key()), 0o600)
    if os.name == "posix" and p.stat().st_mode & 0o077:
        raise PermissionError(f"TLS key {p} is accessible to group or others; run "
                              f"`chmod 600 {p}`")
    data = p.read_bytes()
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{p} is not an ECDSA (P-256) key; delete it to have a new one made")
    return data


def csr_for_key(common_name: str, key_pem: bytes) -> bytes:
    """A CSR naming `common_name` (a peer id) for an existing P-256 key."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("a TLS key must be an ECDSA (P-256) key")
    csr = (x509.CertificateSigningRequestBuilder().subject_name(_name(common_name))
           .add_extension(_san([common_name]), critical=False).sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def leaf_common_name(cert_pem: bytes) -> str:
    names = _load_cert(cert_pem).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def leaf_not_after(cert_pem: bytes) -> float:
    return _load_cert(cert_pem).not_valid_after_utc.timestamp()


class PeerServerTls:
    """mTLS server credentials for a peer's server, made before the peer has its leaf.

    Until `update()` hands over the leaf, the server presents a throwaway self-signed certificate
    and trusts a throwaway CA: every handshake fails, nothing is served in the clear. After it,
    the next handshake uses the leaf and requires a client certificate from the swarm CA.
    """

    def __init__(self) -> None:
        ca, ca_key = make_ca("shoal placeholder (no swarm certificate yet)", days=1)
        cert, key = issue_leaf(ca, ca_key, "shoal-placeholder", [], days=1)
        self._lock = threading.Lock()
        self._next: grpc.ServerCertificateConfiguration | None = None
        self.current: PeerTls | None = None
        self.credentials = grpc.dynamic_ssl_server_credentials(
            grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca),
            self._fetch, require_client_authentication=True)

    def update(self, tls: PeerTls) -> None:
        with self._lock:
            if self.current == tls:
                return
            self.current = tls
            self._next = grpc.ssl_server_certificate_configuration(
                [(tls.key_pem, tls.cert_pem)], root_certificates=tls.ca_pem)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:  # gRPC asks on every new handshake; None = keep the current one
            config, self._next = self._next, None
            return config


def peer_channel(address: str, peer_id: str, tls: PeerTls | None, *,
                 interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
                 options: Sequence[tuple[str, object]] = ()) -> grpc.aio.Channel:
    """THE channel from one peer (or an observer) to the peer `peer_id` at `address`.

    mTLS when `tls` is given and the address is not loopback (link_is_local): the swarm CA is
    the only root, this caller's leaf its client certificate, and the callee must present a leaf
    naming `peer_id`.
    Plaintext for loopback links and when `tls` is None (`--plaintext`, or not joined yet).
    """
    opts = list(options)
    host = address
    with contextlib.suppress(ValueError):
        host, _ = split_host_port(address)
    if tls is None or link_is_local(host):
        return grpc.aio.insecure_channel(address, options=opts, interceptors=list(interceptors))
    if not peer_id:
        raise ValueError(f"dialing {address} over mTLS needs the callee's peer id")
    opts.append(("grpc.ssl_target_name_override", peer_id))
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=opts,
                                   interceptors=list(interceptors))
