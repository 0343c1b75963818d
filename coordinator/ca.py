"""The swarm's certificate authority: the coordinator issues each peer its TLS certificate.

On first start the coordinator makes a P-256 CA bound to its Ed25519 key
(protocols.tls.make_coordinator_ca) and keeps it in its state folder: tls-ca.pem and tls-ca.key
(0600, never overwritten, reused on every restart, so peers' pinned fingerprints stay valid). At
Join a peer sends a CSR in the signed call; `sign` checks that the CSR names the calling peer and
issues a leaf (CN and DNS name = peer id, client and server use, LEAF_DAYS).

The CA certificate is also the coordinator's TLS server certificate (see protocols.tls), and
`fingerprint` is what a join token carries so that peers can verify this coordinator.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from protocols import tls

log = logging.getLogger("shoal.coordinator")

CA_CERT_FILE = "tls-ca.pem"
CA_KEY_FILE = "tls-ca.key"


class CaError(RuntimeError):
    """The CA in the state folder cannot be used; the message says what to do."""


@dataclass(frozen=True)
class CoordinatorCA:
    cert_pem: bytes
    key_pem: bytes
    fingerprint: str

    @classmethod
    def load_or_create(cls, state_dir: str | os.PathLike[str],
                       coordinator_public_key: bytes) -> CoordinatorCA:
        d = Path(state_dir)
        cert_path, key_path = d / CA_CERT_FILE, d / CA_KEY_FILE
        if not cert_path.exists() and not key_path.exists():
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            cert, key = tls.make_coordinator_ca(coordinator_public_key)
            tls._write_new(key_path, key, 0o600)
            tls._write_new(cert_path, cert, 0o644)
        elif not (cert_path.exists() and key_path.exists()):
            missing = cert_path if not cert_path.exists() else key_path
            raise CaError(f"{missing} is missing but its pair is there: restore it from a backup "
                          f"(peers pinned this CA's fingerprint), or start a new run with a new "
                          f"--state-dir")
        if os.name == "posix" and key_path.stat().st_mode & 0o077:
            raise CaError(f"the CA key {key_path} is accessible to group or others; run "
                          f"`chmod 600 {key_path}`")
        cert, key = cert_path.read_bytes(), key_path.read_bytes()
        try:
            named = tls.coordinator_key_of(cert)
        except tls.TlsTrustError as exc:
            raise CaError(f"{cert_path}: {exc}") from None
        if named != coordinator_public_key:
            raise CaError(f"{cert_path} belongs to another coordinator key than "
                          f"{d / 'coordinator.key'}: the state folder was mixed up")
        return cls(cert, key, tls.fingerprint(cert))

    def sign(self, csr_pem: bytes, peer_id: str) -> bytes:
        """A leaf for the CSR's key naming `peer_id` (the verified signer of the Join call);
        ValueError when the CSR is malformed or names someone else."""
        if len(csr_pem) > 8192:
            raise ValueError(f"tls_csr is {len(csr_pem)} bytes; a P-256 CSR is under 1 kB")
        try:
            x509.load_pem_x509_csr(csr_pem)
        except Exception as exc:  # ValueError, and a few other types from the parser
            raise ValueError(f"tls_csr is not a PEM certificate signing request ({exc}); make "
                             f"it with protocols.tls.csr_for_key") from None
        return tls.sign_csr(self.cert_pem, self.key_pem, csr_pem, peer_id, days=tls.LEAF_DAYS)

    def stamp_token_file(self, path: str | os.PathLike[str]) -> str:
        """Make the token file carry this CA's fingerprint ("SECRET sha256:HEX", see
        protocols.admission.parse_token), replacing it atomically (0600) when it does not yet;
        returns the token text peers should be given."""
        from protocols.admission import parse_token, token_with_fingerprint

        p = Path(path)
        text = p.read_text().strip()
        secret, fp = parse_token(text)
        if fp == self.fingerprint:
            return text
        new = token_with_fingerprint(secret, self.fingerprint)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write(new + "\n")
            os.replace(tmp, p)
        except OSError as exc:  # a read-only secret (Docker, Kubernetes): say what peers need
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.warning("cannot write the fingerprint into the token file %s (%s): give peers "
                        "--coordinator-fingerprint %s (or SHOAL_COORDINATOR_FINGERPRINT), or "
                        "append it to their copy of the token after a space", p,
                        exc.strerror or exc, self.fingerprint)
            return new
        return new
