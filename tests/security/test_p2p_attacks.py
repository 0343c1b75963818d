"""Peer-to-peer hops (peer/pipeline/p2p.py) against real `shoal coordinator` and `shoal peer`
processes: what an admitted identity off a microbatch's route can do to it.

One swarm: a stage-0 driver and one replica of the one block stage, `pipeline.hops = "p2p"`. The
attackers (tests/security/attacker.py) are an observer and a *member* that joined stage 1 and
heartbeats as "syncing" (listed at stage 1, so the policy knows it as a block replica). While
the honest replica is frozen, the driver waits for the last activations of its microbatches,
whose ids are guessable (`<driver id[:12]>-<step>-<i>`): the member delivers forged ones naming
itself as the route's last replica. The driver refuses them (their nonce, drawn per microbatch
and seen only by the replicas on its route, is missing); the observer is refused by role. Then
the honest swarm trains on and its loss stays finite.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator

import grpc
import pytest

from protocols import shoal_pb2 as pb
from protocols.identity import Identity
from shoal.swarm import Swarm, read_metrics
from tests.security.attacker import Attacker, activations, identity_at
from tests.swarm.local_swarm import frozen, holders, spec_with, step_of, wait_for

pytestmark = pytest.mark.security

PD = grpc.StatusCode.PERMISSION_DENIED
SPEC = spec_with(**{"model.d_model": 128, "model.n_layers": 2, "model.n_heads": 4,
                    "model.seq_len": 64, "pipeline.stages": 1, "pipeline.microbatch": 8,
                    "pipeline.target_batch": 32, "pipeline.hops": "p2p",
                    "membership.lease_s": 30.0})
D, SEQ = SPEC.model.d_model, SPEC.model.seq_len


@pytest.fixture(scope="module")
def swarm(tmp_path_factory) -> Iterator[Swarm]:
    s = Swarm(tmp_path_factory.mktemp("p2p_attacks"), SPEC, 0, None, "cpu")
    (s.work / "attackers").mkdir(parents=True, exist_ok=True)
    try:
        s.start(0)
        for i, stage in enumerate([0, 1]):
            s.add_peer(i, ["--stage", str(stage), "--grace", "5"])
        wait_for("3 steps", lambda: step_of(s) >= 3, 120, s)
        yield s
    finally:
        s.stop(grace=5)


def forged(driver_id: str, step: int, i: int, kind: str, taken: str) -> pb.CallHeader:
    h = pb.CallHeader(kind=kind, microbatch_id=f"{driver_id[:12]}-{step}-{i}", step=step,
                      stage=1, sent_at=time.time())
    h.meta["taken"] = taken
    return h


def test_a_peer_off_the_route_cannot_deliver_into_it(swarm: Swarm) -> None:
    keys = swarm.work / "keys"
    driver_id = Identity.load_or_create(str(keys / "peer0.key")).peer_id
    driver = next(p for p in holders(swarm)[0] if p["peer_id"] == driver_id)
    token = swarm.token_file.read_text().strip()
    coordinator = f"127.0.0.1:{swarm.port}"

    async def attack() -> dict[str, list]:
        member = Attacker(coordinator, token, identity_at(swarm.work / "attackers" / "m.key"))
        observer = Attacker(coordinator, token, identity_at(swarm.work / "attackers" / "o.key"))
        out: dict[str, list] = {"member": [], "observer": []}
        try:
            assert await member.join(stage=1) == 1
            member.keep_alive()
            await observer.join()
            await asyncio.sleep(1.5)  # the driver's view lists the member (a refresh at most)
            with frozen(swarm.peers[1:2]):  # the honest replica: the driver's microbatches wait
                # (each step, the one microbatch the driver still sends it waits out a timeout)
                end = time.monotonic() + 8.0
                while time.monotonic() < end:
                    step = step_of(swarm)
                    calls = [member.deliver(driver["address"],
                                            forged(driver_id, s, i, kind,
                                                   f"1:{member.peer_id}"),
                                            activations(8, SEQ, D, 1e3))
                             for s in range(step - 1, step + 5) for i in range(4)
                             for kind in ("forward", "backward")]
                    out["member"] += await asyncio.gather(*calls)
                out["observer"].append(await observer.deliver(
                    driver["address"], forged(driver_id, step, 0, "forward", ""),
                    activations(8, SEQ, D)))
        finally:
            await member.close()
            await observer.close()
        return out

    out = asyncio.run(attack())
    assert out["member"] and all(o.code == PD for o in out["member"]), \
        [(o.code, o.details) for o in out["member"] if o.code != PD]
    # some were awaited: refused for their nonce, not only as unknown microbatches
    assert any("nonce" in o.details for o in out["member"]), [o.details for o in out["member"]]
    assert all(o.code == PD and o.details for o in out["observer"]), out["observer"]
    at = step_of(swarm)
    wait_for("3 more steps", lambda: step_of(swarm) >= at + 3, 120, swarm)
    late = [r for r in read_metrics(swarm.logs) if r["step"] > at and r.get("loss") is not None]
    assert late and all(math.isfinite(r["loss"]) and r["loss"] < 10 for r in late), late
