"""Who may join, and who is calling: admission, membership certificates, signed calls.

Admission (coordinator, Join): a peer proves it knows the swarm's join token with
`token_proof`, or its public key is on an allow-list. The coordinator then issues a short-lived
membership certificate (`issue_certificate`): its own Ed25519 signature over a serialized
`Certificate` naming the peer's key, the swarm and a validity window.

Every call (every service, every arity) is signed by the caller's identity. The client
interceptors from `client_interceptors` add metadata:

    x-shoal-cert-bin  serialized SignedCertificate   (or, for key-only methods such as Join and
    x-shoal-key-bin   for the coordinator's own calls, the raw 32-byte key that signs for itself)
    x-shoal-time      unix seconds as a decimal string
    x-shoal-nonce     32 lowercase hex characters, fresh per call
    x-shoal-sig-bin   Ed25519 over b"shoal-rpc-v1\\n" + method + b"\\n" + time + b"\\n" + nonce
                      + b"\\n" + sha256(body)  (the 32 raw digest bytes)

where body is the serialized request (unary requests) or the serialized first message (streaming
requests; in tensor streams it is a CallHeader carrying the payload's SHA-256, so the whole payload
is bound). `AuthInterceptor` checks all of it on the server before the real handler runs, and
exposes the verified caller to handlers through `current_caller()`.

Invariants:
- No handler runs for a call whose signature, time, nonce, certificate or membership failed; the
  call ends with UNAUTHENTICATED (who are you?) or PERMISSION_DENIED (not allowed here), with a
  message that says what to do, and the server keeps serving.
- The server digests the exact bytes it received (it wraps the request deserializer), so
  re-serialization order of protobuf maps cannot break signatures.
- A certificate's Ed25519 signature is checked once per process (bounded cache); later calls only
  recheck validity window, swarm and membership. Each call still costs one Ed25519 verify
  (~0.3 ms on one core here; the rest of the checks ~15 us).
- A refused request stream is read to its end (at most 2 s / 256 MiB) before the abort: grpc.aio
  clients still writing when a call ends report INTERNAL instead of our status (grpc#36066).
- A (peer, nonce) pair is accepted once while its timestamp is within the skew window.

Limits: the signature does not name the server, so a captured call could be replayed to another
server within the skew window; use mTLS (protocols.tls) on untrusted networks. Signed streaming
calls need a request iterator on the client (not `call.write()`): the first message must be known
before the call starts. Server handlers may use the request iterator or `context.read()`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import hashlib
import heapq
import hmac
import inspect
import logging
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from protocols import shoal_pb2
from protocols.identity import Identity, peer_id_of, verify_signature

CERT_KEY = "x-shoal-cert-bin"
PUBLIC_KEY_KEY = "x-shoal-key-bin"
TIME_KEY = "x-shoal-time"
NONCE_KEY = "x-shoal-nonce"
SIGNATURE_KEY = "x-shoal-sig-bin"
SIGNING_CONTEXT = b"shoal-rpc-v1\n"
JOIN_METHOD = "/shoal.v1.Coordinator/Join"
DEFAULT_KEY_ONLY_METHODS = frozenset({JOIN_METHOD})
ROLES = ("peer", "observer")
COORDINATOR_ROLE = "coordinator"

_EMPTY_DIGEST = hashlib.sha256(b"").digest()
_TIME_RE = re.compile(r"^[0-9]{1,12}(\.[0-9]{1,9})?$")
_NONCE_RE = re.compile(r"^[0-9a-f]{32}$")
_MAX_CERT_BYTES = 4096
_DRAIN_MAX_S, _DRAIN_MAX_BYTES = 2.0, 256 << 20  # reading the rest of a refused request stream
_log = logging.getLogger(__name__)

Status = grpc.StatusCode


class AuthError(Exception):
    """Base of the errors here; `code` is the gRPC status a server answers with."""

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


class CallRejected(AuthError):
    """A signed call failed a check; `code` is UNAUTHENTICATED or PERMISSION_DENIED."""


def _utc(t: float) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
    except (OverflowError, ValueError, OSError):
        return f"{t!r} (unix seconds)"


# ---------------------------------------------------------------- admission


def new_token() -> str:
    """A fresh join token: 32 random bytes, url-safe base64 without padding."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")


def token_proof(token: str, public_key: bytes, timestamp: float) -> bytes:
    """HMAC-SHA256(token, public_key || repr(float(timestamp))) — proves the token, not sends it.

    The timestamp is rendered with Python's float repr (shortest round-trip form, e.g.
    "1700000000.25"); a double survives the protobuf wire exactly, so both sides agree.
    """
    message = bytes(public_key) + repr(float(timestamp)).encode("ascii")
    return hmac.new(token.encode("utf-8"), message, hashlib.sha256).digest()


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
        if token is not None and not token:
            raise ValueError("the join token is empty; make one with protocols.auth.new_token()")
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

    def check(self, issuer_public_key: bytes, body: bytes, signature: bytes) -> bool:
        key = (issuer_public_key, body, signature)
        with self._lock:
            if key in self._seen:
                self._seen.move_to_end(key)
                return True
        if not verify_signature(issuer_public_key, signature, body):
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
) -> shoal_pb2.Certificate:
    """The certificate inside `signed`, if the issuer signed it and it is valid at `now`.

    `max_skew_s` tolerates an issuer clock ahead of ours for not_before only; expiry is strict.
    The signature check is cached per (issuer, bytes), so repeated calls cost microseconds.

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
    if not _verified_certificates.check(issuer_public_key, body, signature):
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


# ---------------------------------------------------------------- signing calls (client)


def signing_payload(method: str, timestamp: str, nonce: str, body_digest: bytes) -> bytes:
    """The exact bytes a call signature covers."""
    fields = "\n".join((method, timestamp, nonce)).encode()
    return SIGNING_CONTEXT + fields + b"\n" + body_digest


class CallSigner:
    """Makes the metadata that signs one call as `identity`.

    `certificate` returns the current membership certificate, or None before joining; calls to
    key-only methods (Join) and calls made without a certificate carry the raw public key.
    """

    def __init__(
        self,
        identity: Identity,
        certificate: Callable[[], shoal_pb2.SignedCertificate | None],
        *,
        key_only_methods: frozenset[str] = DEFAULT_KEY_ONLY_METHODS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.identity = identity
        self._certificate = certificate
        self._key_only = key_only_methods
        self._clock = clock

    def metadata(self, method: str, body: bytes) -> tuple[tuple[str, str | bytes], ...]:
        """Metadata for a call to `method` whose (first) request serializes to `body`.

        `body` must be the bytes that go on the wire: serialize the very message object you send
        (protobuf maps have no canonical order, so a re-parsed copy may serialize differently).
        The client interceptors do this for you.
        """
        timestamp = f"{self._clock():.6f}"
        nonce = secrets.token_hex(16)
        digest = hashlib.sha256(body).digest()
        signature = self.identity.sign(signing_payload(method, timestamp, nonce, digest))
        cert = None if method in self._key_only else self._certificate()
        if cert is None:
            credential: tuple[str, str | bytes] = (PUBLIC_KEY_KEY, self.identity.public_key)
        else:
            credential = (CERT_KEY, cert.SerializeToString())
        return (credential, (TIME_KEY, timestamp), (NONCE_KEY, nonce), (SIGNATURE_KEY, signature))


def _serialized(message: Any) -> bytes:
    return bytes(message) if isinstance(message, bytes | bytearray) else message.SerializeToString()


class _Signing:
    def __init__(self, signer: CallSigner) -> None:
        self._signer = signer

    def _details(self, details: grpc.aio.ClientCallDetails, body: bytes) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        for key, value in self._signer.metadata(method, body):
            metadata.add(key, value)
        return details._replace(metadata=metadata)

    async def _first(self, requests: Any) -> tuple[bytes, Any]:
        """Pull the first request to sign it; return its bytes and an iterator re-yielding it."""
        if requests is None or getattr(requests, "__qualname__", "").endswith(
            "_proxy_writes_as_request_iterator"
        ):
            raise ValueError(
                "signed streaming calls need a request iterator: pass one to the stub instead of "
                "using call.write(), so the first message can be signed before the call starts"
            )
        if hasattr(requests, "__aiter__"):
            it = requests.__aiter__()
            try:
                first = await it.__anext__()
            except StopAsyncIteration:
                return b"", it
            return _serialized(first), _prepend_async(first, it)
        it = iter(requests)
        for first in it:
            return _serialized(first), _prepend_sync(first, it)
        return b"", it


async def _prepend_async(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield first
    async for message in rest:
        yield message


def _prepend_sync(first: Any, rest: Iterable[Any]) -> Iterable[Any]:
    yield first
    yield from rest


class _SignUnaryUnary(_Signing, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details, _serialized(request)), request)


class _SignUnaryStream(_Signing, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details, _serialized(request)), request)


class _SignStreamUnary(_Signing, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        body, requests = await self._first(request_iterator)
        return await continuation(self._details(client_call_details, body), requests)


class _SignStreamStream(_Signing, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        body, requests = await self._first(request_iterator)
        return await continuation(self._details(client_call_details, body), requests)


def client_interceptors(signer: CallSigner) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for `grpc.aio.*_channel(..., interceptors=...)` that sign every call."""
    return [_SignUnaryUnary(signer), _SignUnaryStream(signer), _SignStreamUnary(signer),
            _SignStreamStream(signer)]


# ---------------------------------------------------------------- checking calls (server)


@dataclass(frozen=True)
class Caller:
    """The verified caller of the current call.

    role: the certificate's role ("peer" | "observer"); "coordinator" when the issuer's own key
    signed the call (no certificate needed); "" for key-only methods (Join), where the caller has
    proven only that it holds the key, and certificate is None.
    """

    peer_id: str
    public_key: bytes
    certificate: shoal_pb2.Certificate | None
    method: str
    role: str = ""


_current_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar(
    "shoal_current_caller", default=None
)


def current_caller() -> Caller | None:
    """The verified caller of the call this handler is serving, or None outside a call."""
    return _current_caller.get()


def _reset_caller(token: contextvars.Token[Caller | None]) -> None:
    # ValueError: an async generator closed from another context; its task ends anyway.
    with contextlib.suppress(ValueError):
        _current_caller.reset(token)


class _Nonces:
    """(peer id, nonce) pairs seen recently, each kept until its call time leaves the window."""

    def __init__(self, window_s: float, capacity: int) -> None:
        self._window_s = window_s
        self._capacity = capacity
        self._seen: set[tuple[str, str]] = set()
        self._expiry: list[tuple[float, tuple[str, str]]] = []
        self._lock = threading.Lock()

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._seen

    def add(self, key: tuple[str, str], call_time: float, now: float) -> bool:
        """Record `key`; False if it was already there."""
        with self._lock:
            while self._expiry and self._expiry[0][0] < now:
                self._seen.discard(heapq.heappop(self._expiry)[1])
            if key in self._seen:
                return False
            if len(self._seen) >= self._capacity:
                raise CallRejected(
                    f"more than {self._capacity} signed calls arrived within the replay window "
                    f"({self._window_s:.0f} s); retry in a few seconds",
                    Status.RESOURCE_EXHAUSTED,
                )
            self._seen.add(key)
            heapq.heappush(self._expiry, (call_time + self._window_s, key))
            return True


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks every call's signature, time, nonce, certificate and membership before its handler.

    Args:
        issuer_public_key: the coordinator's raw public key (b"" while unknown: calls then fail).
        swarm_id: the swarm this server belongs to; certificates for other swarms are refused.
        is_member: whether a peer id is a current member (False for revoked and lost peers).
        key_only_methods: methods the caller's key signs for itself, without a certificate
            (Join); the handler must then decide admission (current_caller().public_key).
            Calls signed by the issuer's own key (the coordinator calling peers) need no
            certificate on any method either.
        max_skew_s: how far a call's time may be from this clock, and how long nonces are kept.
        is_revoked: optional; a revoked peer gets a message saying so rather than "not a member".
        max_nonces: bound on remembered nonces; beyond it calls get RESOURCE_EXHAUSTED.
    """

    def __init__(
        self,
        *,
        issuer_public_key: Callable[[], bytes],
        swarm_id: Callable[[], str],
        is_member: Callable[[str], bool],
        key_only_methods: frozenset[str] = DEFAULT_KEY_ONLY_METHODS,
        max_skew_s: float = 120.0,
        clock: Callable[[], float] = time.time,
        is_revoked: Callable[[str], bool] | None = None,
        max_nonces: int = 1_000_000,
    ) -> None:
        self._issuer_public_key = issuer_public_key
        self._swarm_id = swarm_id
        self._is_member = is_member
        self._is_revoked = is_revoked
        self._key_only = key_only_methods
        self._max_skew_s = max_skew_s
        self._clock = clock
        self._nonces = _Nonces(max_skew_s, max_nonces)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: let gRPC answer UNIMPLEMENTED
        return self._guard(handler, handler_call_details.method,
                           tuple(handler_call_details.invocation_metadata or ()))

    def authenticate(self, method: str, metadata: Iterable[tuple[str, Any]],
                     body_digest: bytes) -> Caller:
        """The verified caller of a call, or CallRejected/CertificateInvalid saying why not."""
        md: dict[str, Any] = {}
        for key, value in metadata:
            if key.startswith("x-shoal-"):
                if key in md:
                    raise CallRejected(f"call to {method} repeats metadata {key}; send it once")
                md[key] = value
        missing = [k for k in (TIME_KEY, NONCE_KEY, SIGNATURE_KEY) if k not in md]
        if CERT_KEY not in md and PUBLIC_KEY_KEY not in md:
            missing.append(CERT_KEY)
        if missing:
            raise CallRejected(
                f"call to {method} is not signed (missing {', '.join(missing)}); open the channel "
                f"with interceptors=protocols.auth.client_interceptors(CallSigner(...))"
            )
        stamp, nonce, signature = md[TIME_KEY], md[NONCE_KEY], md[SIGNATURE_KEY]
        if not (isinstance(stamp, str) and _TIME_RE.match(stamp)):
            raise CallRejected(f"{TIME_KEY} must be unix seconds as a decimal string")
        if not (isinstance(nonce, str) and _NONCE_RE.match(nonce)):
            raise CallRejected(f"{NONCE_KEY} must be 32 lowercase hex characters")
        now, call_time = self._clock(), float(stamp)
        if abs(now - call_time) > self._max_skew_s:
            raise CallRejected(
                f"call to {method} is dated {_utc(call_time)}, {abs(now - call_time):.0f} s from "
                f"this server's clock ({_utc(now)}; max {self._max_skew_s:.0f} s): sync the "
                f"clocks (NTP); if the clocks agree, this is a replayed call"
            )
        key_only = method in self._key_only
        cert, role = None, ""
        if CERT_KEY in md:
            signed = _parse_signed_certificate(md[CERT_KEY])
            if key_only:  # the key signs for itself; the certificate only carries it
                public_key = _parse_certificate(signed.certificate).peer_public_key
            else:
                cert = verify_certificate(signed, self._issuer_public_key(), now,
                                          self._swarm_id(), max_skew_s=self._max_skew_s)
                public_key, role = cert.peer_public_key, cert.role
        elif key_only:
            public_key = md[PUBLIC_KEY_KEY]
        elif md[PUBLIC_KEY_KEY] and md[PUBLIC_KEY_KEY] == self._issuer_public_key():
            public_key, role = md[PUBLIC_KEY_KEY], COORDINATOR_ROLE  # the issuer vouches for itself
        else:
            raise CallRejected(
                f"{method} needs a membership certificate ({CERT_KEY}); join the coordinator "
                f"first and sign calls with the certificate it returns"
            )
        if PUBLIC_KEY_KEY in md and md[PUBLIC_KEY_KEY] != public_key:
            raise CallRejected(f"{PUBLIC_KEY_KEY} and the certificate name different keys")
        if not isinstance(public_key, bytes) or len(public_key) != 32:
            raise CallRejected(f"{PUBLIC_KEY_KEY} must be a raw 32-byte Ed25519 public key")
        peer_id = peer_id_of(public_key)
        replay = (
            f"call to {method} from peer {peer_id} reuses nonce {nonce}: a replayed call is "
            f"refused; sign each call afresh (CallSigner makes a new nonce per call)"
        )
        if (peer_id, nonce) in self._nonces:
            raise CallRejected(replay)
        payload = signing_payload(method, stamp, nonce, body_digest)
        if not verify_signature(public_key, signature, payload):
            raise CallRejected(
                f"signature of the call to {method} by peer {peer_id} does not match its method, "
                f"time, nonce and body: the request was altered in transit or signed with "
                f"another key or over other bytes"
            )
        if not self._nonces.add((peer_id, nonce), call_time, now):
            raise CallRejected(replay)
        if cert is not None:
            swarm = self._swarm_id()
            if self._is_revoked is not None and self._is_revoked(peer_id):
                raise CallRejected(
                    f"peer {peer_id} was revoked from swarm {swarm!r}; its calls are refused. "
                    f"Ask the coordinator's operator why before re-joining",
                    Status.PERMISSION_DENIED,
                )
            if not self._is_member(peer_id):
                raise CallRejected(
                    f"peer {peer_id} is not a member of swarm {swarm!r} here (revoked, or its "
                    f"lease lapsed); re-join the coordinator",
                    Status.PERMISSION_DENIED,
                )
        return Caller(peer_id=peer_id, public_key=public_key, certificate=cert, method=method,
                      role=role)

    def _guard(self, handler: grpc.RpcMethodHandler, method: str, metadata: tuple) -> Any:
        """The same handler, but its behavior first authenticates the call and sets the caller."""
        digest: list[bytes] = []  # per call: sha256 of the first request's wire bytes
        received = [0]  # per call: request bytes so far
        deserializer = handler.request_deserializer

        def deserialize(raw: bytes) -> Any:
            if not digest:
                digest.append(hashlib.sha256(raw).digest())
            received[0] += len(raw)
            return raw if deserializer is None else deserializer(raw)

        streaming_in, streaming_out = handler.request_streaming, handler.response_streaming
        inner = {
            (False, False): handler.unary_unary, (False, True): handler.unary_stream,
            (True, False): handler.stream_unary, (True, True): handler.stream_stream,
        }[(streaming_in, streaming_out)]

        async def admit(request: Any, context: grpc.aio.ServicerContext) -> tuple[Any, Any, Any]:
            if streaming_in:  # pull the first message so its bytes are digested, then replay it
                request = _Replay(request.__aiter__())
                await request.prefetch()
                context = _ReplayContext(context, request)
            try:
                caller = self.authenticate(method, metadata, digest[0] if digest else _EMPTY_DIGEST)
            except AuthError as e:
                _log.info("refused %s from %s: %s", method, context.peer(), e)
                if streaming_in:
                    await _drain(request, received)
                await context.abort(e.code, str(e))
                raise  # abort always raises; this line is never reached
            return request, context, _current_caller.set(caller)

        if streaming_out and (inspect.isasyncgenfunction(inner)
                              or inspect.isgeneratorfunction(inner)):
            async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
                request, context, token = await admit(request, context)
                try:
                    responses = inner(request, context)
                    if hasattr(responses, "__aiter__"):
                        async for response in responses:
                            yield response
                    else:
                        for response in responses:
                            yield response
                finally:
                    _reset_caller(token)
        else:
            async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
                request, context, token = await admit(request, context)
                try:
                    result = inner(request, context)
                    return await result if inspect.isawaitable(result) else result
                finally:
                    _reset_caller(token)

        factory = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(streaming_in, streaming_out)]
        return factory(behavior, request_deserializer=deserialize,
                       response_serializer=handler.response_serializer)


async def _drain(requests: AsyncIterator[Any], received: list[int]) -> None:
    """Read and drop the rest of a refused request stream, within bounds, before aborting.

    A grpc.aio client still writing when the server ends the call reports INTERNAL ("Internal
    error from Core") instead of the server's status (grpc/grpc#36066), which would hide why the
    call was refused. Bounded so that a refused caller cannot hold the server for long.
    """

    async def drop() -> None:
        async for _ in requests:
            if received[0] > _DRAIN_MAX_BYTES:
                return

    with contextlib.suppress(Exception):  # timeout or a broken stream: abort anyway
        await asyncio.wait_for(drop(), _DRAIN_MAX_S)


class _Replay:
    """A server request iterator whose first message was read early (to check the signature)."""

    _NOTHING = object()

    def __init__(self, messages: AsyncIterator[Any]) -> None:
        self._messages = messages
        self._first: Any = self._NOTHING

    async def prefetch(self) -> None:
        with contextlib.suppress(StopAsyncIteration):
            self._first = await self._messages.__anext__()

    def __aiter__(self) -> _Replay:
        return self

    async def __anext__(self) -> Any:
        if self._first is not self._NOTHING:
            first, self._first = self._first, self._NOTHING
            return first
        return await self._messages.__anext__()

    async def read(self) -> Any:
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            return grpc.aio.EOF


class _ReplayContext:
    """The call's context, except that read() also starts with the prefetched first message."""

    def __init__(self, context: grpc.aio.ServicerContext, requests: _Replay) -> None:
        self._context = context
        self.read = requests.read

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _parse_signed_certificate(data: Any) -> shoal_pb2.SignedCertificate:
    if not isinstance(data, bytes) or len(data) > _MAX_CERT_BYTES:
        raise CallRejected(f"{CERT_KEY} must be a serialized SignedCertificate under 4 KiB")
    try:
        return shoal_pb2.SignedCertificate.FromString(data)
    except DecodeError as e:
        raise CallRejected(f"{CERT_KEY} does not parse as a SignedCertificate ({e})") from None


def _parse_certificate(data: bytes) -> shoal_pb2.Certificate:
    try:
        return shoal_pb2.Certificate.FromString(data)
    except DecodeError as e:
        raise CallRejected(f"the certificate in {CERT_KEY} does not parse ({e})") from None
