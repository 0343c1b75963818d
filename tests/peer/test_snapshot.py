"""peer/snapshot.py SnapshotBuffers: a buffer held (being sent) is never handed out again, a
given-back one is reused for the same size, idle ones are freed after keep_s and bounded."""

from __future__ import annotations

import time

import pytest

from peer.snapshot import SnapshotBuffers

MIB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_held_buffer_is_never_handed_out_and_a_given_back_one_is_reused() -> None:
    buffers = SnapshotBuffers(keep_s=60.0, max_idle_bytes=64 * MIB)
    try:
        first, fresh = buffers.take(MIB)
        assert fresh and first.nbytes == MIB and buffers.holds(first)
        second, fresh = buffers.take(MIB)  # the first is still held (being sent)
        assert fresh and second is not first and buffers.held == 2
        buffers.give_back(first)
        assert not buffers.holds(first) and buffers.idle_bytes == MIB
        third, fresh = buffers.take(MIB)
        assert third is first and not fresh  # mapped already
        other, fresh = buffers.take(2 * MIB)  # another size: never a buffer of the wrong size
        assert fresh and other.nbytes == 2 * MIB
        assert (buffers.fresh, buffers.reused) == (3, 1)
        for b in (second, third, other):
            buffers.give_back(b)
        assert buffers.held == 0
    finally:
        buffers.close()


def test_giving_back_twice_or_a_stranger_is_an_error() -> None:
    buffers = SnapshotBuffers()
    try:
        buffer, _ = buffers.take(4096)
        buffers.give_back(buffer)
        with pytest.raises(ValueError, match="not held"):
            buffers.give_back(buffer)  # would let two snapshots share it
        with pytest.raises(ValueError, match="not held"):
            buffers.give_back(bytearray(4096))
        again, _ = buffers.take(4096)
        assert again is buffer and buffers.held == 1
        buffers.give_back(again)
    finally:
        buffers.close()


def test_idle_buffers_are_freed_after_keep_s_and_bounded_in_bytes() -> None:
    clock = Clock()
    buffers = SnapshotBuffers(keep_s=10.0, max_idle_bytes=2 * MIB, clock=clock)
    try:
        held = [buffers.take(MIB)[0] for _ in range(3)]
        for b in held:  # three idle MiB over a bound of two: the oldest goes
            buffers.give_back(b)
            clock.now += 1.0
        assert buffers.idle_bytes == 2 * MIB
        assert buffers.take(MIB)[0] is held[1]  # the oldest kept one, the first was freed
        buffers.give_back(held[1])
        clock.now += 9.5  # held[2] idle 10.5 s, held[1] 9.5 s
        buffers.trim()
        assert buffers.idle_bytes == MIB
        clock.now += 1.0
        buffers.trim()
        assert buffers.idle_bytes == 0
        none_kept = SnapshotBuffers(max_idle_bytes=0)
        none_kept.give_back(none_kept.take(MIB)[0])
        assert none_kept.idle_bytes == 0
    finally:
        buffers.close()


def test_the_timer_frees_idle_buffers_without_another_download() -> None:
    buffers = SnapshotBuffers(keep_s=0.05, max_idle_bytes=64 * MIB)
    try:
        buffers.give_back(buffers.take(MIB)[0])
        assert buffers.idle_bytes == MIB
        deadline = time.monotonic() + 5.0
        while buffers.idle_bytes and time.monotonic() < deadline:
            time.sleep(0.02)
        assert buffers.idle_bytes == 0
    finally:
        buffers.close()
