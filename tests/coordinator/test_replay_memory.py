"""The coordinator's replay memory (issue #12 row 5), on AuthInterceptor.authenticate directly:
nonces are recorded only after every check, per identity for members, and strangers' Joins
fill a store of their own."""

from __future__ import annotations

import time

import grpc
import pytest

from protocols.auth import AuthInterceptor, CallRejected, CallSigner, issue_certificate
from protocols.identity import Identity

JOIN = "/shoal.v1.Coordinator/Join"
HEARTBEAT = "/shoal.v1.Coordinator/Heartbeat"
BODY = b"body"


def interceptor(issuer: Identity, members: set[str], **bounds: int) -> AuthInterceptor:
    return AuthInterceptor(issuer_public_key=lambda: issuer.public_key, swarm_id=lambda: "s",
                           is_member=lambda pid: pid in members, **bounds)


def call(auth: AuthInterceptor, signer: CallSigner, method: str) -> None:
    import hashlib

    auth.authenticate(method, signer.metadata(method, BODY), hashlib.sha256(BODY).digest())


def member(issuer: Identity, members: set[str]) -> CallSigner:
    ident = Identity.generate()
    cert = issue_certificate(issuer, ident.public_key, "s", 600.0, time.time(), 1)
    members.add(ident.peer_id)
    return CallSigner(ident, lambda: cert)


def test_strangers_joins_fill_their_own_store_only() -> None:
    issuer, members = Identity.generate(), set()
    auth = interceptor(issuer, members, max_stranger_nonces=5)
    alice = member(issuer, members)
    future = lambda: time.time() + 110  # noqa: E731  # kept for the longest window
    codes = []
    for _ in range(8):
        try:
            call(auth, CallSigner(Identity.generate(), lambda: None, clock=future), JOIN)
            codes.append("ok")
        except CallRejected as exc:
            codes.append(exc.code)
    assert codes == ["ok"] * 5 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
    for _ in range(20):  # a member's calls, and its re-Join, are untouched
        call(auth, alice, HEARTBEAT)
    call(auth, alice, JOIN)


def test_one_member_over_its_cap_is_refused_alone() -> None:
    issuer, members = Identity.generate(), set()
    auth = interceptor(issuer, members, max_nonces_per_peer=10)
    greedy, other = member(issuer, members), member(issuer, members)
    for _ in range(10):
        call(auth, greedy, HEARTBEAT)
    with pytest.raises(CallRejected) as info:
        call(auth, greedy, HEARTBEAT)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    for _ in range(10):
        call(auth, other, HEARTBEAT)


def test_a_refused_call_takes_no_replay_memory() -> None:
    issuer, members = Identity.generate(), set()
    auth = interceptor(issuer, members, max_nonces=3)
    gone = member(issuer, members)
    members.clear()  # its lease lapsed: its certificate is still valid, its calls are not
    for _ in range(10):
        with pytest.raises(CallRejected) as info:
            call(auth, gone, HEARTBEAT)
        assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    for _ in range(3):  # the store is as empty as before
        call(auth, member(issuer, members), HEARTBEAT)
