"""The lab's fault language, its chaos generator and runner, and its refusal without root.

No namespaces here: the runner drives a stand-in swarm that records what it was asked to do.
"""

from __future__ import annotations

import argparse

import pytest

from shoal.lab import command as lab_main
from shoal.lab import network as lab
from shoal.lab.scenario import ScenarioError, ScenarioRunner, chaos, parse, parse_line


def test_lines_parse_into_faults():
    f = parse_line("at step 12 kill peer3 respawn=20  # spot reclaim")
    assert (f.action, f.target, f.at_step, f.options) == ("kill", "peer3", 12, {"respawn": 20.0})
    f = parse_line("at 30s partition random for=15s")
    assert (f.action, f.target, f.at_s, f.options["for"]) == ("partition", "random", 30.0, 15.0)
    f = parse_line("restart")
    assert (f.action, f.target, f.at_step, f.at_s) == ("restart", "coordinator", None, None)
    assert parse_line("   # only a comment") is None
    assert [x.action for x in parse("kill peer1\n\nshape peer2 mbit=5\n")] == ["kill", "shape"]


@pytest.mark.parametrize("line, words", [
    ("explode peer1", "unknown action"),
    ("kill", "needs a target"),
    ("at noon kill peer1", "at step N"),
    ("kill peer1 respawn=soon", "needs a number"),
    ("kill peer1 colour=red", "bad option"),
    ("shape peer1", "mbit="),
    ("restart peer2", "only the coordinator"),
])
def test_bad_lines_say_what_is_wrong(line, words):
    with pytest.raises(ScenarioError, match=words):
        parse(f"\n{line}\n")


def test_chaos_is_seeded_and_hits_a_third_of_the_peers():
    text = chaos(8, 60, seed=3)
    assert text == chaos(8, 60, seed=3)
    faults = parse(text)
    victims = [f for f in faults if f.action in ("kill", "preempt")]
    assert len(victims) == 3 and len({f.target for f in victims}) == 3
    assert all("respawn" in f.options for f in victims)
    kinds = [f.action for f in faults]
    assert kinds.count("partition") == 1 and kinds.count("restart") == 1
    assert all(12 <= f.at_step <= 42 for f in faults)


class FakeNet:
    def __init__(self, hosts):
        self.hosts = {h: None for h in ["coord", *hosts]}
        self.calls = []

    def shape(self, host, mbit):
        self.calls.append(("shape", host, mbit))


class FakeSwarm:
    def __init__(self, hosts):
        self.peer_hosts = hosts
        self.net = FakeNet(hosts)
        self.live = set(hosts)
        self.calls = []
        self.grace_s = 5.0

    def live_peer_hosts(self):
        return sorted(self.live)

    def kill(self, h):
        self.live.discard(h)
        self.calls.append(("kill", h))
        return 100

    def preempt(self, h, grace):
        self.live.discard(h)
        self.calls.append(("preempt", h, grace))
        return 101

    def freeze(self, h):
        self.calls.append(("freeze", h))
        return 102

    def thaw(self, h):
        self.calls.append(("thaw", h))
        return 102

    def partition(self, h):
        self.calls.append(("partition", h))

    def heal(self, h):
        self.calls.append(("heal", h))

    def restart_coordinator(self):
        self.calls.append(("restart",))

    def spawn_peer(self, h):
        self.live.add(h)
        self.calls.append(("spawn", h))

        class P:
            pid = 103
        return P()


def test_runner_fires_due_faults_and_their_follow_ups():
    swarm = FakeSwarm(["peer1", "peer2", "peer3"])
    runner = ScenarioRunner(swarm, parse("at step 2 kill peer1 respawn=10\n"
                                         "at step 3 freeze peer2 for=5\n"
                                         "at 4s partition random for=3\n"
                                         "at step 5 restart\n"
                                         "at step 5 shape peer9 mbit=1\n"), seed=0)
    assert runner.poll(1, 0.0) == []
    assert [r.action for r in runner.poll(2, 1.0)] == ["kill"]
    assert [r.action for r in runner.poll(3, 2.0)] == ["freeze"]
    part = runner.poll(3, 4.0)
    assert [r.action for r in part] == ["partition"]
    assert part[0].target == "peer3"  # the only live host without a fault in progress
    done = runner.poll(5, 12.0)
    assert {r.action for r in done} >= {"thaw", "heal", "restart", "spawn", "shape"}
    bad = next(r for r in done if r.action == "shape")
    assert bad.detail.startswith("failed") and "no host 'peer9'" in bad.detail
    assert ("spawn", "peer1") in swarm.calls and ("thaw", "peer2") in swarm.calls
    assert runner.pending == []


def test_lab_refuses_to_run_without_root(monkeypatch, capsys):
    monkeypatch.setattr(lab.os, "geteuid", lambda: 1000)
    with pytest.raises(lab.LabError, match="needs root"):
        lab.check_root()
    args = argparse.Namespace(clean=False)
    assert lab_main.main(args) == 2
    assert "needs root" in capsys.readouterr().err


def test_host_addresses_stay_in_the_benchmarking_range():
    assert lab.host_address(0) == "198.18.0.1"
    assert lab.host_address(254) == "198.18.0.255"
    assert lab.host_address(255) == "198.18.1.0"
    assert lab.host_address(70000).startswith("198.19.")
