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
- A (peer, nonce) pair is accepted once while its timestamp is within the skew window. It is
  remembered only after every check passed, per identity for members (bounded per identity) and
  in a separate bounded store for key-only calls of non-members (Join): a flood of strangers'
  Joins can slow down other Joins (RESOURCE_EXHAUSTED), never members' calls.

Limits: the signature does not name the server, so a captured call could be replayed to another
server within the skew window; use mTLS (protocols.tls) on untrusted networks. Signed streaming
calls need a request iterator on the client (not `call.write()`): the first message must be known
before the call starts. Server handlers may use the request iterator or `context.read()`.

Layout: admission and certificates are in protocols.admission; the metadata format, `CallSigner`,
the client interceptors and the stream plumbing are in protocols.interceptors; this module checks
calls on the server (`AuthInterceptor`, `current_caller`) and re-exports the other two, so
`from protocols.auth import X` works for all of them.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import heapq
import inspect
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from protocols import shoal_pb2
from protocols.admission import (
    ROLES,
    Admission,
    AdmissionDenied,
    AuthError,
    CertificateInvalid,
    _utc,
    issue_certificate,
    new_token,
    token_proof,
    verify_certificate,
)
from protocols.identity import peer_id_of, verify_signature
from protocols.interceptors import (
    CERT_KEY,
    DEFAULT_KEY_ONLY_METHODS,
    JOIN_METHOD,
    NONCE_KEY,
    PUBLIC_KEY_KEY,
    SIGNATURE_KEY,
    SIGNING_CONTEXT,
    TIME_KEY,
    CallSigner,
    _drain,
    _Replay,
    _ReplayContext,
    client_interceptors,
    signing_payload,
)
from protocols.tls import tls_peer_id

__all__ = [
    "CERT_KEY", "COORDINATOR_ROLE", "DEFAULT_KEY_ONLY_METHODS", "JOIN_METHOD", "NONCE_KEY",
    "PUBLIC_KEY_KEY", "ROLES", "SIGNATURE_KEY", "SIGNING_CONTEXT", "TIME_KEY", "Admission",
    "AdmissionDenied", "AuthError", "AuthInterceptor", "CallRejected", "CallSigner", "Caller",
    "CertificateInvalid", "client_interceptors", "current_caller", "issue_certificate",
    "new_token", "signing_payload", "token_proof", "verify_certificate",
]

COORDINATOR_ROLE = "coordinator"

_EMPTY_DIGEST = hashlib.sha256(b"").digest()
_TIME_RE = re.compile(r"^[0-9]{1,12}(\.[0-9]{1,9})?$")
_NONCE_RE = re.compile(r"^[0-9a-f]{32}$")
_MAX_CERT_BYTES = 4096
_log = logging.getLogger(__name__)

Status = grpc.StatusCode


class CallRejected(AuthError):
    """A signed call failed a check; `code` is UNAUTHENTICATED or PERMISSION_DENIED."""


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
    """(peer id, nonce) pairs seen recently, each kept until its call time leaves the window.

    `per_key` bounds the pairs one peer id may hold (None: only `capacity` bounds them); beyond
    either bound a call gets RESOURCE_EXHAUSTED, so one store's callers can only crowd each
    other. `what` names the store's callers in that message.
    """

    def __init__(self, window_s: float, capacity: int, per_key: int | None = None,
                 what: str = "signed calls") -> None:
        self._window_s = window_s
        self._capacity = capacity
        self._per_key = per_key
        self._what = what
        self._seen: set[tuple[str, str]] = set()
        self._count: dict[str, int] = {}
        self._expiry: list[tuple[float, tuple[str, str]]] = []
        self._lock = threading.Lock()

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._seen

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, key: tuple[str, str], call_time: float, now: float) -> bool:
        """Record `key`; False if it was already there."""
        with self._lock:
            while self._expiry and self._expiry[0][0] < now:
                old = heapq.heappop(self._expiry)[1]
                self._seen.discard(old)
                left = self._count.get(old[0], 0) - 1
                if left > 0:
                    self._count[old[0]] = left
                else:
                    self._count.pop(old[0], None)
            if key in self._seen:
                return False
            if len(self._seen) >= self._capacity:
                raise CallRejected(
                    f"more than {self._capacity} {self._what} arrived within the replay window "
                    f"({self._window_s:.0f} s); retry in a few seconds",
                    Status.RESOURCE_EXHAUSTED,
                )
            if self._per_key is not None and self._count.get(key[0], 0) >= self._per_key:
                raise CallRejected(
                    f"peer {key[0]} made more than {self._per_key} signed calls within the "
                    f"replay window ({self._window_s:.0f} s); slow down and retry",
                    Status.RESOURCE_EXHAUSTED,
                )
            self._seen.add(key)
            self._count[key[0]] = self._count.get(key[0], 0) + 1
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
        max_nonces: bound on the nonces remembered for identities that passed the certificate
            and membership checks (members, the issuer).
        max_nonces_per_peer: bound on one such identity's nonces within the window; beyond it
            that identity's calls (only) get RESOURCE_EXHAUSTED.
        max_stranger_nonces: bound on the nonces of key-only calls (Join) by keys that are not
            members: strangers filling it get RESOURCE_EXHAUSTED on Join, members never do.

    Replay memory: a nonce is recorded only once the call passed every check (signature,
    certificate, membership), in a store per kind of caller: members (and the issuer) in one,
    bounded per identity; key-only calls of non-members in another, bounded as a whole.
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
        max_nonces_per_peer: int = 100_000,
        max_stranger_nonces: int = 100_000,
    ) -> None:
        self._issuer_public_key = issuer_public_key
        self._swarm_id = swarm_id
        self._is_member = is_member
        self._is_revoked = is_revoked
        self._key_only = key_only_methods
        self._max_skew_s = max_skew_s
        self._clock = clock
        self._nonces = _Nonces(max_skew_s, max_nonces, max_nonces_per_peer)
        self._stranger_nonces = _Nonces(max_skew_s, max_stranger_nonces,
                                        what="calls by keys that are not members (Join)")

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
                # this module's verify_signature, looked up per call, so that the certificate's
                # check and the call's check go through one name (tests count them by patching it)
                cert = verify_certificate(signed, self._issuer_public_key(), now,
                                          self._swarm_id(), max_skew_s=self._max_skew_s,
                                          verify=verify_signature)
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
        # key-only calls of keys that are not members (Join) go to their own bounded store, so
        # that strangers filling it slow down other Joins only, never members' calls
        nonces = (self._stranger_nonces
                  if cert is None and role != COORDINATOR_ROLE and not self._is_member(peer_id)
                  else self._nonces)
        if (peer_id, nonce) in nonces:
            raise CallRejected(replay)
        payload = signing_payload(method, stamp, nonce, body_digest)
        if not verify_signature(public_key, signature, payload):
            raise CallRejected(
                f"signature of the call to {method} by peer {peer_id} does not match its method, "
                f"time, nonce and body: the request was altered in transit or signed with "
                f"another key or over other bytes"
            )
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
        # recorded last: only a call that passed every check above takes replay memory
        if not nonces.add((peer_id, nonce), call_time, now):
            raise CallRejected(replay)
        return Caller(peer_id=peer_id, public_key=public_key, certificate=cert, method=method,
                      role=role)

    def _guard(self, handler: grpc.RpcMethodHandler, method: str, metadata: tuple) -> Any:
        """The same handler, but its behavior first authenticates the call and sets the caller."""
        digest: list[bytes] = []  # per call: sha256 of the first request's wire bytes
        received = [0]  # per call: request bytes so far
        malformed: list[bool] = []  # per call: a request message did not parse
        deserializer = handler.request_deserializer

        def deserialize(raw: bytes) -> Any:
            if not digest:
                digest.append(hashlib.sha256(raw).digest())
            received[0] += len(raw)
            if deserializer is None:
                return raw
            try:
                return deserializer(raw)
            except DecodeError:  # grpc would answer UNKNOWN; the handler wrapper answers instead
                malformed.append(True)
                return None

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
            if malformed:
                await context.abort(Status.INVALID_ARGUMENT,
                                    f"the request to {method} does not parse as its protobuf "
                                    f"message; send a message of the method's request type")
            try:
                caller = self.authenticate(method, metadata, digest[0] if digest else _EMPTY_DIGEST)
                _check_tls_identity(context, caller)
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



_PEER_ID_RE = re.compile(r"[0-9a-f]{16}")


def _check_tls_identity(context: Any, caller: Caller) -> None:
    """Over mTLS with a swarm leaf (protocols.tls), the certificate's peer id must be the call's
    signer: a peer may not carry another identity's calls inside its own TLS session. (Swarm
    leaves always name a peer id; a hand-made certificate (`--tls-dir`) names a host.)"""
    tls_id = tls_peer_id(context)
    if tls_id is not None and _PEER_ID_RE.fullmatch(tls_id) and tls_id != caller.peer_id:
        raise CallRejected(
            f"the TLS client certificate names peer {tls_id} but the call to {caller.method} is "
            f"signed by {caller.peer_id}: sign calls with the identity the certificate was "
            f"issued to", Status.PERMISSION_DENIED)


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
