"""peer/pipeline/unreachable.py: what a heartbeat reports of the peers that refused calls."""

from __future__ import annotations

import grpc

from peer.pipeline.unreachable import MAX_REPORTED, UnreachableLog


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "x")


def test_refused_calls_are_reported_once_each_and_taken_once() -> None:
    log = UnreachableLog()
    log.note_error("aa", rpc_error(grpc.StatusCode.UNAVAILABLE))
    log.note_error("aa", rpc_error(grpc.StatusCode.UNAVAILABLE))
    log.note("bb")
    assert log.take() == ["aa", "bb"]
    assert log.take() == [] and len(log) == 0


def test_a_slow_or_refusing_but_live_peer_is_not_reported() -> None:
    log = UnreachableLog()
    for code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.PERMISSION_DENIED,
                 grpc.StatusCode.INVALID_ARGUMENT):
        log.note_error("aa", rpc_error(code))
    log.note_error("bb", KeyError("bb"))  # not in the view: nothing was called
    assert log.take() == []


def test_at_most_max_reported_per_heartbeat() -> None:
    log = UnreachableLog()
    for i in range(MAX_REPORTED + 5):
        log.note(f"{i:016x}")
    taken = log.take()
    assert len(taken) == MAX_REPORTED and taken[0] == f"{0:016x}"
