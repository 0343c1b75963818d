"""CoordinatorClient's failure behaviour against real coordinator processes: waiting for a
coordinator that is not up yet, giving up with a clear error, re-joining when forgotten, and
following a rebalancing move."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from protocols import shoal_pb2_grpc as pb_grpc
from protocols.coordinator_client import (
    Benchmark,
    CoordinatorClient,
    CoordinatorRefused,
    CoordinatorUnavailable,
    NotJoined,
    PeerStats,
)
from protocols.identity import Identity
from protocols.runspec import RunSpec
from tests.sim_peer import CoordinatorProcess

BENCH = Benchmark(samples_per_s=5.0, device="test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_spec(path: Path, **changes: object) -> Path:
    base = {"membership.heartbeat_s": 0.3, "membership.lease_s": 1.0}
    path.write_text(RunSpec().replace(**{**base, **changes}).to_toml())
    return path


class ManualClock:
    """The client's clock: it moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class Unavailable(pb_grpc.CoordinatorServicer):
    """A coordinator that answers every Join with UNAVAILABLE (it is "not up yet") and counts
    the attempts; at the `spend_at`-th it moves the client's clock past its retry budget."""

    def __init__(self, clock: ManualClock, spend_at: int) -> None:
        self.clock = clock
        self.spend_at = spend_at
        self.attempts = 0

    async def Join(self, request, context):
        self.attempts += 1
        if self.attempts == self.spend_at:
            self.clock.now += 3600.0
        await context.abort(grpc.StatusCode.UNAVAILABLE, "starting")


def test_unreachable_coordinator_raises_after_the_retry_budget() -> None:
    """The retry budget is counted on the client's clock, not by attempts or wall time: while
    the clock stands still the client keeps retrying; the attempt after which the clock is past
    the budget is the last one, and the error says so."""
    async def scenario() -> None:
        clock = ManualClock()
        coordinator = Unavailable(clock, spend_at=4)
        server = grpc.aio.server()
        pb_grpc.add_CoordinatorServicer_to_server(coordinator, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            client = CoordinatorClient(f"127.0.0.1:{port}", Identity.generate(), "t",
                                       clock=clock)
            with pytest.raises(NotJoined):
                await client.heartbeat(PeerStats())
            with pytest.raises(CoordinatorUnavailable, match="did not answer Join for 60 s"):
                await client.join(BENCH, "127.0.0.1:9000", retry_s=60.0)
            assert coordinator.attempts == 4
            await client.close()
            # and nothing answers at all (no server): the same error, on the same clock
            gone = CoordinatorClient(f"127.0.0.1:{free_port()}", Identity.generate(), "t",
                                     clock=clock)
            joining = asyncio.create_task(gone.join(BENCH, "127.0.0.1:9000", retry_s=60.0))
            await asyncio.sleep(0.5)
            assert not joining.done()  # the clock stands still: the budget is not spent
            clock.now += 3600.0
            with pytest.raises(CoordinatorUnavailable, match="did not answer Join"):
                await joining
            await gone.close()
        finally:
            await server.stop(None)

    asyncio.run(scenario())


def test_join_waits_for_a_coordinator_that_starts_later(tmp_path: Path) -> None:
    port = free_port()
    token_file = tmp_path / "token"
    token_file.write_text("a-shared-join-token\n")
    coord = CoordinatorProcess(tmp_path / "state", port=port,
                               extra=["--token-file", str(token_file)])

    async def scenario() -> None:
        client = CoordinatorClient(f"127.0.0.1:{port}", Identity.generate(),
                                   "a-shared-join-token")
        joining = asyncio.create_task(client.join(BENCH, "127.0.0.1:9000", retry_s=30))
        await asyncio.sleep(1.0)
        assert not joining.done()
        await asyncio.to_thread(coord.start)
        result = await asyncio.wait_for(joining, 20)
        assert result.stage == 0 and result.spec == RunSpec()
        await client.close()

    try:
        asyncio.run(scenario())
    finally:
        coord.kill()


def test_forgotten_peer_rejoins_with_its_stage(tmp_path: Path) -> None:
    config = write_spec(tmp_path / "run.toml", **{"pipeline.stages": 3})
    with CoordinatorProcess(tmp_path / "state", config=config) as coord:
        async def scenario() -> None:
            clients = [CoordinatorClient(coord.grpc_address, Identity.generate(), coord.token)
                       for _ in range(3)]
            for i, c in enumerate(clients):
                await c.join(BENCH, f"127.0.0.1:{9000 + i}")
            napper = clients[2]
            stage = napper.stage
            assert stage == 2
            await asyncio.sleep(2.5)  # > lease + one sweep: the coordinator forgets it
            result = await napper.heartbeat(PeerStats(state="training", step=12))
            assert result.action == "rejoin" and result.stage == stage
            assert napper.rejoins == 1
            again = await napper.heartbeat(PeerStats(state="training", step=13))
            assert again.action == "" and again.stage == stage
            for c in clients:
                await c.close()

        asyncio.run(scenario())



def test_a_silent_peer_reported_unreachable_is_expired_before_its_lease(tmp_path: Path) -> None:
    """Heartbeats name the peers that refused calls (coordinator/suspicion.py): the coordinator
    expires one only when it also missed two of its own beats (2 s each here), long before its
    lease (60 s) would lapse; more than 16 names is refused with a clear error."""
    config = write_spec(tmp_path / "run.toml", **{"pipeline.stages": 2,
                                                  "membership.heartbeat_s": 2.0,
                                                  "membership.lease_s": 60.0})
    with CoordinatorProcess(tmp_path / "state", config=config) as coord:
        async def scenario() -> None:
            reporter, other = (CoordinatorClient(coord.grpc_address, Identity.generate(),
                                                 coord.token) for _ in range(2))
            await reporter.join(BENCH, "127.0.0.1:9000")
            await other.join(BENCH, "127.0.0.1:9001")
            gone = other.identity.peer_id
            await other.heartbeat(PeerStats(state="training"))
            # it has just beaten: a report changes nothing
            await reporter.heartbeat(PeerStats(state="training"), unreachable=[gone])
            again = await other.heartbeat(PeerStats(state="training"))
            assert again.action == "" and other.rejoins == 0
            await asyncio.sleep(4.5)  # > 2 beats, far inside the lease
            await reporter.heartbeat(PeerStats(state="training"), unreachable=[gone])
            back = await other.heartbeat(PeerStats(state="training"))
            assert back.action == "rejoin" and other.rejoins == 1
            with urllib.request.urlopen(coord.http_url + "api/status", timeout=30) as r:
                events = json.load(r)["events"]
            (expired,) = [e for e in events if e["kind"] == "expire"]  # not a lapsed lease:
            assert f"unreachable (reported by peer {reporter.identity.peer_id})" in \
                expired["detail"], expired  # the sweep's would say "silent for"
            with pytest.raises(CoordinatorRefused, match="at most 16 unreachable peers"):
                await reporter.heartbeat(PeerStats(state="training"),
                                         unreachable=[f"{i:016x}" for i in range(17)])
            await reporter.close()
            await other.close()

        asyncio.run(scenario())

def test_rebalancing_moves_a_peer_and_tells_it_by_heartbeat(tmp_path: Path) -> None:
    config = write_spec(tmp_path / "run.toml", **{
        "pipeline.stages": 1, "membership.rebalance_s": 1.0, "membership.lease_s": 30.0})
    with CoordinatorProcess(tmp_path / "state", config=config,
                            extra=["--trust-stage-hints"]) as coord:
        async def scenario() -> None:
            clients = [CoordinatorClient(coord.grpc_address, Identity.generate(), coord.token)
                       for _ in range(4)]
            for i, c in enumerate(clients):  # everyone crowds stage 0; stage 1 stays empty
                await c.join(BENCH, f"127.0.0.1:{9000 + i}", stage_hint=0)
            moved: list[tuple[CoordinatorClient, int]] = []
            stop = asyncio.Event()

            async def watch(c: CoordinatorClient) -> None:
                def on_reply(result) -> None:
                    if result.action == "move":
                        moved.append((c, result.stage))
                        stop.set()

                await c.run_heartbeats(lambda: PeerStats(state="training", samples_per_s=5.0),
                                       on_reply, stop)

            tasks = [asyncio.create_task(watch(c)) for c in clients]
            await asyncio.wait_for(stop.wait(), 60)  # a bound for a loaded machine
            await asyncio.gather(*tasks)
            assert len(moved) == 1 and moved[0][1] == 1 and moved[0][0].stage == 1
            view = await clients[0].view()
            assert [len(s.replicas) for s in view.stages] == [3, 1]
            for c in clients:
                await c.close()

        asyncio.run(scenario())


def test_view_carries_fresh_stats_without_a_membership_change(tmp_path: Path) -> None:
    """Steps and gradient norms move without moving the epoch; the view must not keep serving
    the ones of the swarm's start (a driver decides from them whether a stage ever trained)."""
    config = write_spec(tmp_path / "run.toml", **{"pipeline.stages": 1, "membership.lease_s": 30.0})
    with CoordinatorProcess(tmp_path / "state", config=config) as coord:
        async def scenario() -> None:
            c = CoordinatorClient(coord.grpc_address, Identity.generate(), coord.token)
            await c.join(BENCH, "127.0.0.1:9000", stage_hint=1)
            await c.heartbeat(PeerStats(state="training", samples_per_s=5.0, step=1,
                                        state_hash="01"))
            # the state change moved the epoch, and so will the dial-back's verdict on this
            # member (nothing listens at its address: unreachable); let both settle first
            deadline = time.monotonic() + 60
            while True:
                view = await c.view()
                me = next(p for p in view.peers if p.peer_id == c.identity.peer_id)
                if me.reach or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert me.reach == "unreachable", me
            await asyncio.sleep(0.3)
            epoch = (await c.view()).epoch
            await c.heartbeat(PeerStats(state="training", samples_per_s=5.0, step=7,
                                        grad_norm=0.5, state_hash="07"))
            deadline = time.monotonic() + 10
            while True:
                view = await c.view()
                stage = next(s for s in view.stages if s.stage == 1)
                if stage.step == 7 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert view.epoch == epoch, "the test needs a membership that did not change"
            assert (stage.step, stage.grad_norm) == (7, 0.5), stage
            await c.close()

        asyncio.run(scenario())


def test_certificates_are_renewed_by_heartbeats(tmp_path: Path) -> None:
    config = write_spec(tmp_path / "run.toml", **{"membership.certificate_s": 3.0})
    with CoordinatorProcess(tmp_path / "state", config=config) as coord:
        async def scenario() -> None:
            client = CoordinatorClient(coord.grpc_address, Identity.generate(), coord.token)
            await client.join(BENCH, "127.0.0.1:9000")
            first = client.certificate_expires
            deadline = first + 1.0  # well past the first certificate's expiry
            while time.time() < deadline:
                result = await client.heartbeat(PeerStats(state="training"))
                assert result.action == ""  # never had to re-join
                await asyncio.sleep(0.3)
            assert client.certificate_expires > first + 1.0 and client.rejoins == 0
            await client.close()

        asyncio.run(scenario())


def test_peer_follows_a_coordinator_that_lost_its_state(tmp_path: Path) -> None:
    """A wiped state directory means a new coordinator key and swarm: peers re-join it."""
    port = free_port()
    config = write_spec(tmp_path / "run.toml", **{"membership.lease_s": 30.0})
    token = tmp_path / "token"
    token.write_text("shared-token\n")
    extra = ["--token-file", str(token)]
    first = CoordinatorProcess(tmp_path / "a", config=config, port=port, extra=extra).start()
    second = CoordinatorProcess(tmp_path / "b", config=config, port=port, extra=extra)
    try:
        async def scenario() -> None:
            client = CoordinatorClient(f"127.0.0.1:{port}", Identity.generate(), "shared-token")
            joined = await client.join(BENCH, "127.0.0.1:9000")
            await asyncio.to_thread(first.kill)
            await asyncio.to_thread(second.start)
            result = await client.heartbeat(PeerStats(state="training", step=5))
            assert result.action == "rejoin" and result.stage == joined.stage
            assert client.swarm_id != joined.swarm_id
            assert client.coordinator_public_key != joined.coordinator_public_key
            await client.close()

        asyncio.run(scenario())
    finally:
        first.kill()
        second.kill()


def test_mtls_coordinator_and_client(tmp_path: Path) -> None:
    from protocols import tls

    tls.write_tls_dir(tmp_path / "coord-tls", ["127.0.0.1", "localhost"],
                      common_name="coordinator")
    tls.write_tls_dir(tmp_path / "peer-tls", [], common_name="peer", ca_dir=tmp_path / "coord-tls")
    with CoordinatorProcess(tmp_path / "state",
                            extra=["--tls-dir", str(tmp_path / "coord-tls")]) as coord:
        async def scenario() -> None:
            client = CoordinatorClient(coord.grpc_address, Identity.generate(), coord.token,
                                       tls_dir=str(tmp_path / "peer-tls"))
            result = await client.join(BENCH, "127.0.0.1:9000")
            assert result.stage == 0
            await client.heartbeat(PeerStats(state="training"))
            await client.close()
            plain = CoordinatorClient(coord.grpc_address, Identity.generate(), coord.token)
            # its port speaks TLS with a hand-made CA, not the swarm CA the token names: refused
            with pytest.raises(CoordinatorRefused, match="not a Shoal swarm CA"):
                await plain.join(BENCH, "127.0.0.1:9001", retry_s=1.0)
            await plain.close()

        asyncio.run(scenario())
