"""bench/hops.py's pieces that need no lab: the two arms' specs and the byte sums."""

from __future__ import annotations

from bench import hops


def test_the_arms_differ_only_in_their_hops() -> None:
    hub, p2p = hops.spec_for("hub", 10), hops.spec_for("p2p", 10)
    assert not hub.peer_to_peer and p2p.peer_to_peer
    assert hub.replace(**{"pipeline.hops": "p2p", "run.name": "hops-p2p"}) == p2p
    assert hub.pipeline.stages == 2 and set(hops.STAGES.values()) == {0, 1, 2}


def test_activation_bytes_sum_what_each_peer_sent() -> None:
    status = {"peers": [{"bytes_by_kind": {"activations": 100, "state": 7}},
                        {"bytes_by_kind": {"activations": 50}}, {"bytes_by_kind": {}}, {}]}
    assert hops.activation_bytes(status) == 150
    assert hops.activation_bytes({}) == 0


def test_ratios_need_both_figures() -> None:
    assert hops._ratio(2.0, 1.0) == 2.0
    assert hops._ratio(None, 1.0) is None and hops._ratio(2.0, 0.0) is None
