"""Issue #12's attacks on the coordinator, against real `python -m coordinator.main` processes:
each refused with the status the attacker gets, while honest members keep heartbeating.

Rows: 5 (a Join flood of strangers fills the replay memory), 6 (heartbeat keys and rate),
8 (Join's stage hint, step hint and address), 11 (SPSA posts), 14 (re-join at once, bans, the
HTTP API's token, SSE clients, secrets, file modes); and contract 1 (the attested stage state:
one liar, even with a key ground to sort first, moves neither the stage's hash nor its step).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pb_grpc
from protocols.auth import CallSigner, client_interceptors, token_proof
from protocols.coordinator_client import (
    Benchmark,
    CoordinatorClient,
    CoordinatorRefused,
    PeerStats,
)
from protocols.identity import Identity
from protocols.runspec import RunSpec
from tests.polling import poll_until
from tests.sim_peer import REPO, CoordinatorProcess

INVALID = grpc.StatusCode.INVALID_ARGUMENT
DENIED = grpc.StatusCode.PERMISSION_DENIED
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
JOIN = "/shoal.v1.Coordinator/Join"
HB_S, LEASE_S = 1.0, 10.0


def spec_file(tmp: Path, **changes: object) -> Path:
    path = tmp / "run.toml"
    path.write_text(RunSpec().replace(**{"pipeline.stages": 2, "membership.heartbeat_s": HB_S,
                                          "membership.lease_s": LEASE_S, **changes}).to_toml())
    return path


def stub_for(address: str, identity: Identity, cert: Callable[[], pb.SignedCertificate | None],
             clock: Callable[[], float] = time.time) -> pb_grpc.CoordinatorStub:
    """A Coordinator stub whose calls `identity` signs (dated by `clock`)."""
    channel = grpc.aio.insecure_channel(
        address, interceptors=client_interceptors(CallSigner(identity, cert, clock=clock)))
    stub = pb_grpc.CoordinatorStub(channel)
    stub.channel = channel  # type: ignore[attr-defined]  # a collected channel closes itself
    return stub


async def code_of(call: Awaitable[object]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def refused(call: Awaitable[object], code: grpc.StatusCode, match: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    assert match.lower() in info.value.details().lower(), info.value.details()
    return info.value.details()


class Honest:
    """Members that heartbeat every HB_S in the background and record every failure."""

    def __init__(self, coord: CoordinatorProcess) -> None:
        self.coord = coord
        self.clients: list[CoordinatorClient] = []
        self.stats: dict[str, PeerStats] = {}
        self.failures: list[str] = []
        self.beats = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def join(self, port: int, stats: PeerStats, stage_hint: int = -1,
                   identity: Identity | None = None) -> CoordinatorClient:
        c = CoordinatorClient(self.coord.grpc_address, identity or Identity.generate(),
                              self.coord.token)
        await c.join(Benchmark(samples_per_s=5.0, device="test"), f"127.0.0.1:{port}",
                     stage_hint=stage_hint)
        self.clients.append(c)
        self.stats[c.identity.peer_id] = stats
        await c.heartbeat(stats)
        self._tasks.append(asyncio.create_task(self._beat(c)))
        return c

    async def _beat(self, c: CoordinatorClient) -> None:
        while not self._stop.is_set():
            try:
                await c.heartbeat(self.stats[c.identity.peer_id], retry_s=0)
                self.beats += 1
            except Exception as exc:  # every failure is the test's finding
                self.failures.append(f"{c.identity.peer_id}: {exc}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), HB_S)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for c in self.clients:
            await c.close()


def status(coord: CoordinatorProcess, token: str | None = None) -> dict:
    req = urllib.request.Request(coord.http_url + "api/status")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.load(r)


def http_code(url: str, token: str | None = None, method: str = "GET",
              body: bytes | None = None) -> int:
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            r.read(1)
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


# ------------------------------------------------------------------------------ row 5


def test_a_join_flood_of_strangers_cannot_starve_members(tmp_path: Path) -> None:
    """Row 5: tokenless Joins from fresh keys dated +110 s fill the replay memory for Joins of
    non-members only: the flood gets RESOURCE_EXHAUSTED, members' heartbeats never do."""
    capacity = 30
    with CoordinatorProcess(tmp_path / "state", config=spec_file(tmp_path),
                            extra=["--join-nonce-capacity", str(capacity)]) as coord:
        async def scenario() -> None:
            honest = Honest(coord)
            await honest.join(9000, PeerStats(state="training", samples_per_s=5.0))
            await honest.join(9001, PeerStats(state="training", samples_per_s=5.0))
            codes = []
            for i in range(capacity + 20):
                ident = Identity.generate()
                stub = stub_for(coord.grpc_address, ident, lambda: None,
                                clock=lambda: time.time() + 110)
                req = pb.JoinRequest(public_key=ident.public_key, timestamp=time.time() + 110,
                                     address=f"127.0.0.1:{10000 + i}", stage_hint=-1,
                                     benchmark=pb.Benchmark(samples_per_s=5.0))
                codes.append(await code_of(stub.Join(req)))
                await stub.channel.close()
            assert set(codes) <= {DENIED, EXHAUSTED}, codes  # no token: never admitted
            assert codes.count(EXHAUSTED) >= 10, codes  # the flood met the bound
            # members' calls are untouched: a heartbeat now, and none failed meanwhile
            await honest.clients[0].heartbeat(PeerStats(state="training"), retry_s=0)
            await asyncio.sleep(HB_S * 1.5)
            await honest.stop()
            assert honest.failures == [] and honest.beats >= 2

        asyncio.run(scenario())


# ------------------------------------------------------------------------------ row 6


def test_heartbeat_keys_are_fixed_and_the_rate_is_limited(tmp_path: Path) -> None:
    """Row 6: invented bytes_by_kind keys are INVALID_ARGUMENT and /api/status stays the size it
    was; a member beating far faster than membership.heartbeat_s gets RESOURCE_EXHAUSTED."""
    with CoordinatorProcess(tmp_path / "state", config=spec_file(tmp_path)) as coord:
        async def scenario() -> None:
            honest = Honest(coord)
            await honest.join(9000, PeerStats(state="training", samples_per_s=5.0,
                                              bytes_by_kind={"activations": 10,
                                                             "sync:allreduce": 20}))
            attacker = CoordinatorClient(coord.grpc_address, Identity.generate(), coord.token)
            await attacker.join(Benchmark(samples_per_s=5.0), "127.0.0.1:9100")
            stub = stub_for(coord.grpc_address, attacker.identity, lambda: attacker.certificate)
            before = len(json.dumps(status(coord)))
            for n in range(3):
                kinds = {f"k{n}-{i}": 10**12 for i in range(32)}
                hb = pb.HeartbeatRequest(stats=pb.PeerStats(state="training",
                                                            bytes_by_kind=kinds))
                await refused(stub.Heartbeat(hb), INVALID, "bytes_by_kind key")
                await asyncio.sleep(0.05)
            await refused(stub.Heartbeat(pb.HeartbeatRequest(stats=pb.PeerStats(
                state="training", bytes_by_kind={"sync:demo": 1}))), INVALID, "sync:demo")
            # the keys peers really send are fine, a recovery report included
            ok = pb.HeartbeatRequest(stats=pb.PeerStats(state="training", bytes_by_kind={
                "activations": 1, "state": 2, "sync:allreduce": 3,
                "recovery:weighted_average:1,2": 4}))
            await stub.Heartbeat(ok)
            await asyncio.sleep(0.6)  # the status document is rebuilt at most twice a second
            after = len(json.dumps(status(coord)))
            assert after < before + 2000, (before, after)  # one more member, no invented keys
            # a flood of heartbeats: the first ones fit the bucket, then RESOURCE_EXHAUSTED
            hb = pb.HeartbeatRequest(stats=pb.PeerStats(state="training"))
            codes = [await code_of(stub.Heartbeat(hb)) for _ in range(60)]
            assert set(codes) <= {grpc.StatusCode.OK, EXHAUSTED}, codes
            assert codes.count(EXHAUSTED) >= 20 and codes[0] == grpc.StatusCode.OK, codes
            await asyncio.sleep(HB_S * 1.5)
            await honest.stop()
            assert honest.failures == [] and honest.beats >= 2
            await stub.channel.close()
            await attacker.close()

        asyncio.run(scenario())


# ------------------------------------------------------------------------------ row 8, contract 1


def test_join_hints_and_addresses_are_bounded_and_the_stage_state_is_attested(
        tmp_path: Path) -> None:
    """Row 8 and contract 1: Join with stage 0, step_hint 2**53 and 169.254.169.254:80; a liar
    with a key ground to sort first heartbeating the victim stage's step with another hash."""
    with CoordinatorProcess(tmp_path / "state", config=spec_file(tmp_path)) as coord:
        async def scenario() -> None:
            honest = Honest(coord)
            # stage 0 (the driver) strong, the block stages weaker: assignment never picks 0
            driver = await honest.join(9000, PeerStats(state="training", samples_per_s=50.0,
                                                       step=12, state_hash="aa00"))
            block1 = await honest.join(9001, PeerStats(state="training", samples_per_s=5.0,
                                                       step=12, state_hash="bb01"))
            await honest.join(9002, PeerStats(state="training", samples_per_s=6.0,
                                              step=12, state_hash="bb02"))
            assert [c.stage for c in honest.clients] == [0, 1, 2]
            token = coord.token
            assert token is not None

            async def join(ident: Identity, **fields: object) -> pb.JoinReply:
                stub = stub_for(coord.grpc_address, ident, lambda: None)
                now = time.time()
                req = pb.JoinRequest(public_key=ident.public_key, timestamp=now,
                                     token_proof=token_proof(token, ident.public_key, now),
                                     benchmark=pb.Benchmark(samples_per_s=1.0), **fields)
                try:
                    return await stub.Join(req)
                finally:
                    await stub.channel.close()

            bad = Identity.generate()
            for address in ("169.254.169.254:80", "[fe80::1]:80", "0.0.0.0:7000",
                            "224.0.0.251:5353", "255.255.255.255:80", "2852039166:80",
                            "[::ffff:169.254.169.254]:80", "metadata.google.internal:80"):
                await refused(join(bad, address=address, stage_hint=0), INVALID, "address")
            # the stage hint is subject to assignment, and step_hint cannot move the swarm
            liar = Identity.generate()
            while liar.peer_id > block1.identity.peer_id:  # grind a key that sorts first
                liar = Identity.generate()
            reply = await join(liar, address="127.0.0.1:9100", stage_hint=0, step_hint=2**53)
            assert reply.stage == 1, reply.stage  # the weakest stage, not the driver's
            await refused(join(Identity.generate(), address="127.0.0.1:9101", stage_hint=7),
                          INVALID, "stage_hint")
            stub = stub_for(coord.grpc_address, liar, lambda: reply.certificate)
            driver_stub = stub_for(coord.grpc_address, driver.identity,
                                   lambda: driver.certificate)
            # the liar reports the victim stage's step with its own hash, and a huge step
            for stats in (pb.PeerStats(state="training", step=12, state_hash="ff"),
                          pb.PeerStats(state="training", step=2**53 - 1, state_hash="ee")):
                await stub.Heartbeat(pb.HeartbeatRequest(stats=stats))
                await asyncio.sleep(0.3)
                view = await driver_stub.GetSwarmView(pb.SwarmViewRequest())
                st1 = next(s for s in view.stages if s.stage == 1)
                # one honest replica against one liar: seniority, not the id the liar ground
                assert (st1.attested_hash, st1.attested_step, st1.step) == ("bb01", 12, 12)
                assert next(s for s in view.stages if s.stage == 0).attested_step == 12
            await asyncio.sleep(0.6)
            st = status(coord)
            assert st["totals"]["step"] == 12
            assert st["stages"][1]["attested_hash"] == "bb01"
            # after the liar leaves, the swarm's step is still the honest one
            await stub.Leave(pb.LeaveRequest(reason="bye"))
            await asyncio.sleep(0.6)
            assert status(coord)["totals"]["step"] == 12
            event = next(e for e in reversed(status(coord)["events"])
                         if e["peer_id"] == liar.peer_id and e["kind"] == "join")
            assert "clamped" in event["detail"] and "stage 0 asked for" in event["detail"]
            await honest.stop()
            assert honest.failures == []
            await stub.channel.close()
            await driver_stub.channel.close()

        asyncio.run(scenario())


# ------------------------------------------------------------------------------ row 11


def test_spsa_posts_only_for_the_open_step_once_per_peer(tmp_path: Path) -> None:
    """Row 11: a stage-0 member posts step 1e15, far-future steps, 4,096 invented replicas in
    `expect`, and other codes for a step it posted: all INVALID_ARGUMENT; history intact."""
    config = spec_file(tmp_path, **{"pipeline.stages": 1, "sync.mode": "spsa"})
    directions = RunSpec.load(config).sync.spsa.samples_per_step
    codes = bytes(range(1, directions + 1))
    with CoordinatorProcess(tmp_path / "state", config=config) as coord:
        async def scenario() -> None:
            honest = Honest(coord)
            driver = await honest.join(9000, PeerStats(state="training", samples_per_s=1.0,
                                                       step=3, state_hash="0a",
                                                       bytes_by_kind={"sync:spsa": 5}))
            await honest.join(9001, PeerStats(state="training", samples_per_s=50.0, step=3,
                                              state_hash="0b"))
            for step in (1, 2, 3):
                await driver.post_spsa(pb.SpsaPost(step=step, codes=codes))
            ledger = await driver.spsa_ledger(pb.SpsaLedgerRequest(from_step=1))
            assert [s.step for s in ledger.steps] == [1, 2, 3]
            # the attacker lands on stage 0 by assignment (the weakest stage) and never trains
            attacker = CoordinatorClient(coord.grpc_address, Identity.generate(), coord.token)
            joined = await attacker.join(Benchmark(samples_per_s=1.0), "127.0.0.1:9100")
            assert joined.stage == 0
            stub = stub_for(coord.grpc_address, attacker.identity, lambda: attacker.certificate)
            await refused(stub.PostSpsa(pb.SpsaPost(step=10**15, codes=codes)), INVALID, "step")
            for step in (6, 50, 203):  # not open (nothing open: beyond the swarm's step)
                await refused(stub.PostSpsa(pb.SpsaPost(step=step, codes=codes)), INVALID,
                              f"step {step} is")
            fake = [f"{i:016x}" for i in range(4096)]
            await refused(stub.PostSpsa(pb.SpsaPost(step=4, codes=codes, expect=fake)), INVALID,
                          "not a live stage-0 member")
            await refused(stub.PostSpsa(pb.SpsaPost(step=4, codes=codes, expect=fake * 2)),
                          INVALID, "at most")
            await stub.PostSpsa(pb.SpsaPost(step=4, codes=codes,
                                            expect=[driver.identity.peer_id]))
            await refused(stub.PostSpsa(pb.SpsaPost(step=4, codes=bytes(c ^ 1 for c in codes))),
                          INVALID,
                          "one post per peer")
            ledger = await driver.spsa_ledger(pb.SpsaLedgerRequest(from_step=1))
            assert ledger.base_step == 1 and [s.step for s in ledger.steps][:3] == [1, 2, 3]
            await driver.post_spsa(pb.SpsaPost(step=4, codes=codes))  # honest: still works
            ledger = await driver.spsa_ledger(pb.SpsaLedgerRequest(from_step=1))
            assert [s.step for s in ledger.steps] == [1, 2, 3, 4]
            await honest.stop()
            assert honest.failures == []
            await stub.channel.close()
            await attacker.close()

        asyncio.run(scenario())


# ------------------------------------------------------------------------------ row 14


def test_no_rejoin_at_once_and_a_ban_is_for_good(tmp_path: Path) -> None:
    """Row 14: a peer that left cannot re-join at once (an honest restart just waits); `shoal
    ban` revokes a member and refuses its key, across a coordinator restart."""
    state = tmp_path / "state"
    config = spec_file(tmp_path)
    extra = ["--rejoin-cooldown", "3"]
    coord = CoordinatorProcess(state, config=config, extra=extra).start()
    try:
        async def first() -> Identity:
            honest = Honest(coord)
            await honest.join(9000, PeerStats(state="training", samples_per_s=5.0))
            quitter = Identity.generate()
            c = CoordinatorClient(coord.grpc_address, quitter, coord.token)
            await c.join(Benchmark(samples_per_s=5.0), "127.0.0.1:9100")
            await c.leave("restart")
            now = time.time()
            stub = stub_for(coord.grpc_address, quitter, lambda: None)
            req = pb.JoinRequest(public_key=quitter.public_key, timestamp=now,
                                 token_proof=token_proof(coord.token, quitter.public_key, now),
                                 address="127.0.0.1:9100", stage_hint=-1,
                                 benchmark=pb.Benchmark(samples_per_s=5.0))
            await refused(stub.Join(req), UNAVAILABLE, "may join again")
            await stub.channel.close()
            await c.join(Benchmark(samples_per_s=5.0), "127.0.0.1:9100")  # retries, then in
            # the operator bans it: `shoal ban` on the coordinator's machine (no HTTP token)
            out = subprocess.run(
                [sys.executable, "-m", "shoal.cli", "ban", quitter.peer_id[:8], "--reason",
                 "garbage gradients", "--coordinator-http", coord.http_url], cwd=REPO,
                env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                timeout=60)
            assert out.returncode == 0, out.stderr
            assert quitter.peer_id in out.stdout and "revoked at once" in out.stdout
            banned = stub_for(coord.grpc_address, quitter, lambda: c.certificate)
            await refused(banned.Heartbeat(pb.HeartbeatRequest(stats=pb.PeerStats(
                state="training"))), DENIED, "")
            await honest.stop()
            assert honest.failures == []
            await banned.channel.close()
            return quitter

        quitter = asyncio.run(first())
        assert status(coord)["banned"][0]["peer_id"] == quitter.peer_id
        assert coord.stop() == 0
        coord = CoordinatorProcess(state, config=config, extra=extra).start()

        async def after_restart() -> None:
            c = CoordinatorClient(coord.grpc_address, quitter, coord.token)
            with pytest.raises(CoordinatorRefused, match="banned") as info:
                await c.join(Benchmark(samples_per_s=5.0), "127.0.0.1:9100", retry_s=5)
            assert info.value.code == DENIED
            await c.close()
            honest = Honest(coord)  # others still join and beat
            await honest.join(9001, PeerStats(state="training", samples_per_s=5.0))
            await honest.stop()
            assert honest.failures == []

        asyncio.run(after_restart())
    finally:
        coord.kill()


def test_http_token_sse_cap_and_no_secrets(tmp_path: Path) -> None:
    """Row 14: with --http-token-file every route but /healthz needs the token; at most
    --max-sse-clients event streams; status and metrics never show a secret; state files are
    0600."""
    token_file = tmp_path / "http.token"
    http_token = "t0ken-" + os.urandom(12).hex()
    token_file.write_text(http_token + "\n")
    state = tmp_path / "state"
    with CoordinatorProcess(state, config=spec_file(tmp_path), extra=[
            "--http-token-file", str(token_file), "--max-sse-clients", "2"]) as coord:
        base = coord.http_url
        for path in ("api/status", "metrics", "api/events", "", "static/app.js"):
            assert http_code(base + path) == 401, path
        assert http_code(base + "healthz") == 200
        assert http_code(base + "api/status", token="wrong-" + http_token) == 401
        assert http_code(base + "api/status", token=http_token) == 200
        assert http_code(base + BAN, method="POST", body=b'{"peer_id": "0123456789abcdef"}') \
            == 401
        # a web page in the operator's browser cannot ban: no JSON without a preflight, no
        # cross-site origin
        plain = urllib.request.Request(base + BAN, data=b'{"peer_id": "0123456789abcdef"}',
                                       method="POST", headers={
                                           "Content-Type": "text/plain",
                                           "Authorization": f"Bearer {http_token}"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(plain, timeout=5)
        assert info.value.code == 415
        cross = urllib.request.Request(base + BAN, data=b'{"peer_id": "0123456789abcdef"}',
                                       method="POST", headers={
                                           "Content-Type": "application/json",
                                           "Origin": "http://evil.example",
                                           "Authorization": f"Bearer {http_token}"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(cross, timeout=5)
        assert info.value.code == 403
        # the dashboard: /?token= sets an HttpOnly cookie and drops the token from the address
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        with opener.open(base + f"?token={http_token}", timeout=5) as r:
            assert r.status == 200 and r.url.rstrip("/") == base.rstrip("/")
        with opener.open(base + "api/status", timeout=5) as r:
            assert r.status == 200
        # SSE clients are capped
        streams = []
        for _ in range(2):
            req = urllib.request.Request(base + "api/events",
                                         headers={"Authorization": f"Bearer {http_token}"})
            resp = urllib.request.urlopen(req, timeout=5)
            assert resp.readline().startswith(b"retry:")
            streams.append(resp)
        assert http_code(base + "api/events", token=http_token) == 503
        for s in streams:
            s.close()

        def both_places_back() -> bool:  # closed streams give their places back
            opened = []
            try:
                for _ in range(2):
                    req = urllib.request.Request(
                        base + "api/events", headers={"Authorization": f"Bearer {http_token}"})
                    opened.append(urllib.request.urlopen(req, timeout=5))
                return all(r.readline().startswith(b"retry:") for r in opened)
            except urllib.error.HTTPError:
                return False
            finally:
                for r in opened:
                    r.close()

        assert poll_until(both_places_back, 30, interval=1.0)

        async def members() -> None:
            honest = Honest(coord)
            await honest.join(9000, PeerStats(state="training", samples_per_s=5.0))
            await asyncio.sleep(0.6)
            await honest.stop()

        asyncio.run(members())
        texts = []
        for path in ("api/status", "metrics"):
            req = urllib.request.Request(base + path,
                                         headers={"Authorization": f"Bearer {http_token}"})
            with urllib.request.urlopen(req, timeout=5) as r:
                texts.append(r.read().decode())
        join_token = coord.token
        assert join_token
        pem = (state / "coordinator.key").read_text().splitlines()
        secrets_ = [http_token, join_token, *(line for line in pem if "-----" not in line)]
        for text in texts:
            for secret in secrets_:
                assert secret not in text
        for f in [*state.glob("coordinator.sqlite*"), state / "coordinator.key",
                  state / "join.token"]:
            assert f.stat().st_mode & 0o777 == 0o600, f
        assert state.stat().st_mode & 0o777 == 0o700
        # `shoal status` reads a token-protected coordinator with the token, and says what is
        # missing without it
        http = base.split("//", 1)[1].rstrip("/")
        status = [sys.executable, "-m", "shoal.cli", "status", "--coordinator-http", http,
                  "--json"]
        env = {**os.environ, "SHOAL_HTTP_TOKEN_FILE": ""}
        ok = subprocess.run([*status, "--http-token-file", str(token_file)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0 and json.loads(ok.stdout)["stages"], ok.stderr
        refused = subprocess.run(status, cwd=REPO, env=env, capture_output=True, text=True,
                                 timeout=60)
        assert refused.returncode == 2 and "--http-token-file" in refused.stderr, refused.stderr


BAN = "api/ban"
