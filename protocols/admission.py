"""Who may join: join-token admission and the membership certificates the coordinator issues.

Admission (coordinator, Join): a peer proves it knows the swarm's join token with
`token_proof`, or its public key is on an allow-list (`Admission.check`). The coordinator then
issues a short-lived membership certificate (`issue_certificate`): its own Ed25519 signature over
a serialized `Certificate` naming the peer's key, the swarm and a validity window. Every later call
carries that certificate, and `verify_certificate` checks it (protocols.auth.AuthInterceptor on
servers, CoordinatorClient on the peer that receives it).

Invariant: a certificate's Ed25519 signature is checked once per process (a bounded cache of
certificates that checked out; failures are never cached); later checks only recheck the validity
window and the swarm.

`AuthError`, the base of every refusal in protocols.auth, lives here because admission and
certificate errors are its first subclasses. Everything here is re-exported by protocols.auth.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import grpc
from google.protobuf.message import DecodeError

from protocols import shoal_pb2
from protocols.identity import Identity, peer_id_of, verify_signature

ROLES = ("peer", "observer")

Status = grpc.StatusCode


class AuthError(Exception):
    """Base of the refusals here and in protocols.auth; `code` is the gRPC status to answer."""

    code: grpc.StatusCode = Status.UNAUTHENTICATED

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class AdmissionDenied(AuthError):
    """Join refused: wrong token proof, stale proof, or key not on the allow-list."""

    code = Status.PERMISSION_DENIED


class CertificateInvalid(AuthError):
    """A membership certificate is malformed, wrongly signed, out of its window or swarm."""

    code = Status.UNAUTHENTICATED


def _utc(t: float) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
    except (OverflowError, ValueError, OSError):
        return f"{t!r} (unix seconds)"


# ---------------------------------------------------------------- admission


def new_token() -> str:
    """A fresh join token: 32 random bytes, url-safe base64 without padding."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")


def parse_token(text: str) -> tuple[str, str | None]:
    """(secret, coordinator fingerprint or None) of a join token as a token file holds it.

    A token file is "SECRET" (old form, and `shoal token new`) or "SECRET sha256:HEX": the
    coordinator adds its fingerprint (protocols.tls.fingerprint) so that a peer can verify the
    coordinator it reaches, as a kubeadm token carries the CA hash. Only the secret is proved.
    """
    fields = text.split()
    if not fields:
        return "", None
    fp = next((f for f in fields[1:] if f.lower().startswith("sha256:")), None)
    return fields[0], fp.lower() if fp else None


def token_with_fingerprint(secret: str, fingerprint: str) -> str:
    """The token file's text that carries `fingerprint` (see parse_token)."""
    return f"{parse_token(secret)[0]} {fingerprint}"


def token_proof(token: str, public_key: bytes, timestamp: float) -> bytes:
    """HMAC-SHA256(secret, public_key || repr(float(timestamp))) — proves the token, not sends it.

    `token` may carry a fingerprint (parse_token); only its secret is used. The timestamp is
    rendered with Python's float repr (shortest round-trip form, e.g. "1700000000.25"); a double
    survives the protobuf wire exactly, so both sides agree.
    """
    message = bytes(public_key) + repr(float(timestamp)).encode("ascii")
    return hmac.new(parse_token(token)[0].encode("utf-8"), message, hashlib.sha256).digest()


class Admission:
    """The coordinator's admission policy: a join token, an allow-list of keys, or both.

    With both, a peer must pass both. With neither, construction fails: an open swarm is not a
    mode Shoal offers.
    """

    def __init__(
        self,
        token: str | None = None,
        allowed_keys: set[bytes] | None = None,
        max_skew_s: float = 120.0,
    ) -> None:
        if token is None and allowed_keys is None:
            raise ValueError(
                "Admission needs a join token (protocols.auth.new_token()) or an allow-list of "
                "public keys; refusing to admit anyone who asks"
            )
        if token is not None:
            token = parse_token(token)[0]  # a token file's fingerprint is for peers
            if not token:
                raise ValueError("the join token is empty; make one with "
                                 "protocols.auth.new_token()")
        self.token = token
        self.allowed_keys = None if allowed_keys is None else {bytes(k) for k in allowed_keys}
        self.max_skew_s = max_skew_s

    def check(self, public_key: bytes, proof: bytes, timestamp: float, now: float) -> None:
        """Return if the peer may join; raise AdmissionDenied saying why not."""
        public_key = bytes(public_key)
        try:
            peer_id = peer_id_of(public_key)
        except ValueError as e:
            raise AdmissionDenied(f"join refused: {e}") from None
        if self.allowed_keys is not None and public_key not in self.allowed_keys:
            raise AdmissionDenied(
                f"peer {peer_id} (public key {public_key.hex()}) is not on the coordinator's "
                f"allow-list; add that key to the allow-list and retry"
            )
        if self.token is None:
            return
        if not proof:
            raise AdmissionDenied(
                f"peer {peer_id} sent no join token proof; start it with the swarm's join token "
                f"(from the coordinator's --token-file)"
            )
        skew = now - float(timestamp)
        if not abs(skew) <= self.max_skew_s:
            raise AdmissionDenied(
                f"join proof of peer {peer_id} is dated {_utc(timestamp)}, {abs(skew):.0f} s "
                f"from the coordinator's clock ({_utc(now)}, max {self.max_skew_s:.0f} s); "
                f"sync the clocks (NTP) and retry"
            )
        if not hmac.compare_digest(bytes(proof), token_proof(self.token, public_key, timestamp)):
            raise AdmissionDenied(
                f"peer {peer_id}: the join token does not match; get it from the coordinator's "
                f"--token-file"
            )


# ---------------------------------------------------------------- membership certificates


def issue_certificate(
    issuer: Identity,
    peer_public_key: bytes,
    swarm_id: str,
    ttl_s: float,
    now: float,
    serial: int,
    role: str = "peer",
) -> shoal_pb2.SignedCertificate:
    """The issuer's signed statement that `peer_public_key` is a member from now to now+ttl_s."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be positive, got {ttl_s}")
    cert = shoal_pb2.Certificate(
        peer_public_key=bytes(peer_public_key),
        peer_id=peer_id_of(bytes(peer_public_key)),
        swarm_id=swarm_id,
        not_before=now,
        not_after=now + ttl_s,
        role=role,
        serial=serial,
    )
    body = cert.SerializeToString()
    return shoal_pb2.SignedCertificate(certificate=body, signature=issuer.sign(body))


class _VerifiedCertificates:
    """A bounded LRU of (issuer key, certificate bytes, signature) whose signature checked out."""

    def __init__(self, capacity: int = 8192) -> None:
        self._capacity = capacity
        self._seen: OrderedDict[tuple[bytes, bytes, bytes], None] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, issuer_public_key: bytes, body: bytes, signature: bytes,
              verify: Callable[[bytes, bytes, bytes], bool] = verify_signature) -> bool:
        key = (issuer_public_key, body, signature)
        with self._lock:
            if key in self._seen:
                self._seen.move_to_end(key)
                return True
        if not verify(issuer_public_key, signature, body):
            return False  # failures are not cached: only the issuer's key can make entries
        with self._lock:
            self._seen[key] = None
            if len(self._seen) > self._capacity:
                self._seen.popitem(last=False)
        return True


_verified_certificates = _VerifiedCertificates()


def verify_certificate(
    signed: shoal_pb2.SignedCertificate,
    issuer_public_key: bytes,
    now: float,
    swarm_id: str | None = None,
    *,
    max_skew_s: float = 120.0,
    verify: Callable[[bytes, bytes, bytes], bool] = verify_signature,
) -> shoal_pb2.Certificate:
    """The certificate inside `signed`, if the issuer signed it and it is valid at `now`.

    `max_skew_s` tolerates an issuer clock ahead of ours for not_before only; expiry is strict.
    The signature check is cached per (issuer, bytes), so repeated calls cost microseconds.
    `verify` is the Ed25519 check used on a cache miss (protocols.identity.verify_signature;
    AuthInterceptor passes protocols.auth's, so one name covers every signature a server checks).

    Raises:
        CertificateInvalid: bad signature, malformed, expired, not yet valid, or other swarm.
    """
    issuer_public_key = bytes(issuer_public_key)
    if not issuer_public_key:
        raise CertificateInvalid(
            "this server does not know its coordinator's public key yet (it has not joined); "
            "retry once it has joined the swarm"
        )
    body, signature = bytes(signed.certificate), bytes(signed.signature)
    if not _verified_certificates.check(issuer_public_key, body, signature, verify):
        raise CertificateInvalid(
            f"the membership certificate is not signed by this swarm's coordinator (key "
            f"{peer_id_of(issuer_public_key) if len(issuer_public_key) == 32 else '?'}); it "
            f"may come from another coordinator or be damaged: re-join this swarm's coordinator"
        )
    try:
        cert = shoal_pb2.Certificate.FromString(body)
    except DecodeError as e:
        raise CertificateInvalid(f"signed certificate does not parse ({e})") from None
    if len(cert.peer_public_key) != 32 or cert.peer_id != peer_id_of(cert.peer_public_key):
        raise CertificateInvalid(
            f"certificate serial {cert.serial} names a key that does not match peer id "
            f"{cert.peer_id!r}; the coordinator that issued it is broken"
        )
    if now >= cert.not_after:
        raise CertificateInvalid(
            f"certificate of peer {cert.peer_id} expired at {_utc(cert.not_after)} "
            f"({now - cert.not_after:.0f} s ago); re-join the coordinator to get a new one"
        )
    if now + max_skew_s < cert.not_before:
        raise CertificateInvalid(
            f"certificate of peer {cert.peer_id} is valid only from {_utc(cert.not_before)}, "
            f"{cert.not_before - now:.0f} s ahead of this clock; sync the clocks (NTP)"
        )
    if swarm_id is not None and cert.swarm_id != swarm_id:
        raise CertificateInvalid(
            f"certificate of peer {cert.peer_id} is for swarm {cert.swarm_id!r}, but this is "
            f"swarm {swarm_id!r}; join this swarm's coordinator"
        )
    return cert
