"""Signed calls on the wire: the metadata each call carries, and the gRPC plumbing that moves it.

The wire format (every service, every arity; protocols.auth describes the whole scheme):

    x-shoal-cert-bin  serialized SignedCertificate   (or, for key-only methods such as Join and
    x-shoal-key-bin   for the coordinator's own calls, the raw 32-byte key that signs for itself)
    x-shoal-time      unix seconds as a decimal string
    x-shoal-nonce     32 lowercase hex characters, fresh per call
    x-shoal-sig-bin   Ed25519 over `signing_payload(method, time, nonce, sha256(body))`

Client side: `CallSigner` makes that metadata for one call, and `client_interceptors` add it to
every call of a grpc.aio channel, pulling a request stream's first message early so it can be
signed before the call starts. Server side: the mirror image, `_Replay` and `_ReplayContext`,
which let protocols.auth.AuthInterceptor read a stream's first message early to check it and then
hand the handler the whole stream, and `_drain`, which empties a refused stream before the abort.
The checks themselves live in protocols.auth, which re-exports the public names here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc

from protocols import shoal_pb2
from protocols.identity import Identity
from protocols.tensor_stream import MalformedStream

CERT_KEY = "x-shoal-cert-bin"
PUBLIC_KEY_KEY = "x-shoal-key-bin"
TIME_KEY = "x-shoal-time"
NONCE_KEY = "x-shoal-nonce"
SIGNATURE_KEY = "x-shoal-sig-bin"
SIGNING_CONTEXT = b"shoal-rpc-v1\n"
JOIN_METHOD = "/shoal.v1.Coordinator/Join"
DEFAULT_KEY_ONLY_METHODS = frozenset({JOIN_METHOD})
_DRAIN_MAX_S, _DRAIN_MAX_BYTES = 2.0, 256 << 20  # reading the rest of a refused request stream
# A request stream's first message must arrive this soon after the call starts: the server reads
# it before authenticating the call (its bytes are what the signature covers), so a caller that
# opens streams and sends nothing would otherwise hold a handler each, forever. Honest clients
# send it at once (the client interceptors pull it before the call starts).
FIRST_MESSAGE_TIMEOUT_S = 10.0
# While this many streams (in this process) wait for their first message, newer ones get only
# FIRST_MESSAGE_PRESSED_S: a flood of silent streams cannot keep many handlers for long.
MAX_WAITING_FIRST = 128
FIRST_MESSAGE_PRESSED_S = 1.0


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


# ---------------------------------------------------------------- replaying streams (server)


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


class FirstMessageTimeout(MalformedStream):
    """A request stream sent no message within the deadline after the call started.

    A MalformedStream (so a CodecError): the tensor services answer it INVALID_ARGUMENT.
    """


class _Replay:
    """A server request iterator whose first message was read early (to check the signature).

    `prefetch` waits at most FIRST_MESSAGE_TIMEOUT_S (FIRST_MESSAGE_PRESSED_S while more than
    MAX_WAITING_FIRST streams of this process wait): past it the stream is over for the server.
    The call is then authenticated over an empty body, which a signature over a real first
    message fails (UNAUTHENTICATED); a call signed over an empty body reaches its handler, whose
    first read raises FirstMessageTimeout (`timed_out` holds its message).
    """

    _NOTHING = object()
    waiting = 0  # streams of this process waiting for their first message now

    def __init__(self, messages: AsyncIterator[Any]) -> None:
        self._messages = messages
        self._first: Any = self._NOTHING
        self.timed_out: str | None = None

    async def prefetch(self) -> None:
        limit = (FIRST_MESSAGE_TIMEOUT_S if _Replay.waiting < MAX_WAITING_FIRST
                 else FIRST_MESSAGE_PRESSED_S)
        _Replay.waiting += 1
        try:
            self._first = await asyncio.wait_for(self._messages.__anext__(), limit)
        except StopAsyncIteration:
            pass
        except TimeoutError:
            self.timed_out = (f"no request message arrived within {limit:g} s of the call's "
                              "start; send the first message (the CallHeader) at once")
        finally:
            _Replay.waiting -= 1

    def __aiter__(self) -> _Replay:
        return self

    async def __anext__(self) -> Any:
        if self._first is not self._NOTHING:
            first, self._first = self._first, self._NOTHING
            return first
        if self.timed_out is not None:
            raise FirstMessageTimeout(self.timed_out)
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

