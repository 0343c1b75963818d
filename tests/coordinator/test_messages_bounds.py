"""The bounds on what a peer chooses (issue #12 rows 6 and 8), as pure functions: addresses,
the loopback test on gRPC's peer string, heartbeat byte-counter keys, the stage-hint rule."""

from __future__ import annotations

import pytest

from coordinator.assignment import StageLoad, stage_for_hint
from coordinator.messages import (
    BadRequest,
    check_address,
    check_kinds,
    heartbeat_kinds,
    is_loopback_peer,
    stats_from_wire,
)
from protocols import shoal_pb2 as pb


@pytest.mark.parametrize("address", [
    "169.254.169.254:80", "[fe80::1]:80", "[fe80::1%eth0]:80", "0.0.0.0:7000", "[::]:7000",
    "224.0.0.251:5353", "[ff02::1]:80", "255.255.255.255:80", "0.1.2.3:80", "2852039166:80",
    "0xa9fea9fe:80", "0251.0376.0251.0376:80", "[::ffff:169.254.169.254]:80",
    "metadata.google.internal:80", "METADATA:80", "host:0", "host", "a b:80",
])
def test_addresses_that_steer_the_swarm_are_refused(address: str) -> None:
    with pytest.raises(BadRequest, match="address"):
        check_address(address, caller_is_loopback=True)


@pytest.mark.parametrize("address", ["127.0.0.1:9000", "[::1]:9000", "localhost:9000",
                                     "127.1.2.3:9000"])
def test_loopback_only_for_a_caller_on_loopback(address: str) -> None:
    assert check_address(address, caller_is_loopback=True) == address
    with pytest.raises(BadRequest, match="loopback"):
        check_address(address, caller_is_loopback=False)


@pytest.mark.parametrize("address", ["10.0.0.5:7100", "198.18.0.3:7100", "[2001:db8::5]:7100",
                                     "peer-a.example:7100", "203.0.113.9:443"])
def test_ordinary_addresses_pass(address: str) -> None:
    assert check_address(address) == address


@pytest.mark.parametrize(("peer", "loopback"), [
    ("ipv4:127.0.0.1:5555", True), ("ipv6:[::1]:5555", True), ("ipv4:10.0.0.2:5555", False),
    ("ipv6:[::ffff:127.0.0.1]:5555", True), ("ipv6:[2001:db8::1]:5555", False),
    ("unix:/tmp/s", True), ("", False), ("ipv4:garbage", False),
])
def test_loopback_is_read_from_the_connection(peer: str, loopback: bool) -> None:
    assert is_loopback_peer(peer) is loopback


def test_heartbeat_kinds_are_a_fixed_set() -> None:
    kinds = heartbeat_kinds("demo")
    check_kinds({"activations": 1, "state": 2, "sync:demo": 3}, kinds, 4)
    check_kinds({"sync:demo": 3, "recovery:weighted_average:1,3": 9}, kinds, 4)
    check_kinds({"recovery:snapshot:": 9}, kinds, 4)
    for bad in ({"sync:allreduce": 1}, {"grads": 1}, {"recovery:evil:1": 1},
                {"recovery:copy_neighbor:7": 1},
                {"recovery:snapshot:": 1, "recovery:initial:": 1}):
        with pytest.raises(BadRequest, match="bytes_by_kind"):
            check_kinds(bad, kinds, 4)


def test_the_stage_a_peer_says_it_holds_must_be_one_of_the_run() -> None:
    assert stats_from_wire(pb.PeerStats(state="training"), None, 3).held_stage == -1  # unset
    assert stats_from_wire(pb.PeerStats(state="training", held_stage=0), None, 3).held_stage == 0
    for bad in (-1, 3, 2**31 - 1):
        with pytest.raises(BadRequest, match="held_stage"):
            stats_from_wire(pb.PeerStats(state="training", held_stage=bad), None, 3)


def test_a_stage_hint_is_honoured_only_where_it_takes_nothing() -> None:
    loads = {0: StageLoad({"a": 5.0}), 1: StageLoad({"b": 5.0}), 2: StageLoad({})}
    assert stage_for_hint(0, loads, held=None, rebuilding=set()) is None  # held by others
    assert stage_for_hint(0, loads, held=0, rebuilding=set()) == 0  # re-attach
    assert stage_for_hint(2, loads, held=None, rebuilding=set()) == 2  # empty
    assert stage_for_hint(1, loads, held=None, rebuilding={1}) == 1  # waiting for a rebuild
    assert stage_for_hint(1, loads, held=None, rebuilding=set(), trusted=True) == 1
    assert stage_for_hint(-1, loads, held=0, rebuilding=set()) is None
    assert stage_for_hint(9, loads, held=None, rebuilding=set(), trusted=True) is None
