"""CheckFree in a real swarm on 127.0.0.1 (coordinator and peer daemons as separate processes).

kill -9 every replica of the middle block stage mid-run: the stage-0 driver bypasses the empty
stage and training goes on; the coordinator logs a "skip" event and marks the stage for a
CheckFree rebuild; a new peer joins the stage and rebuilds it from its two neighbours' weights.

What tells CheckFree from a random re-init (on this tiny model a random block behaves much like
skipping it, so the loss alone cannot): the stage-0 driver is frozen (SIGSTOP) before the new
peer joins, so stages 1 and 3 hold still; then the rebuilt stage 2, downloaded from the new
peer, must equal (w1 * W1 + w3 * W3) / (w1 + w3) of the neighbours' weights downloaded at the
same moment, with w the neighbours' gradient norms as the coordinator reports them, clipped, plus
CheckFree's floor (optim/checkfree.py), at the neighbours' step; and the coordinator's rebuild
event must name CheckFree and the two neighbours. After the thaw, paths go through stage 2
again, the loss returns to its pre-failure level, and a periodic snapshot of stage 2 is written.
"""

from __future__ import annotations

import asyncio
import re
import signal

import grpc
import pytest
import torch

from optim.checkfree import CheckFreeConfig, post_clip_norm
from peer.pipeline.stage_state import tensor_hash
from protocols import auth, tensor_stream
from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg
from protocols.codec import Limits
from protocols.coordinator_client import OBSERVER_STAGE, READY_STATES, Benchmark, CoordinatorClient
from protocols.identity import Identity
from shoal.swarm import Swarm, read_metrics
from tests.swarm.local_swarm import (
    check_replicas_of_an_endless_run,
    frozen,
    holders,
    spec_with,
    step_of,
    wait_for,
)

# 3 block stages of one layer each: stage 2's neighbours have the same layout, so they average.
# Leases long enough that a stalled shared machine does not expire the survivors, nor the
# driver while it is frozen for the rebuild.
SPEC = {"model.n_layers": 3, "pipeline.stages": 3, "run.steps": 0,
        "membership.heartbeat_s": 1.0, "membership.lease_s": 30.0}
REBUILD_EVENT = re.compile(r"stage rebuilt \(checkfree\): weighted_average of stages 1,3 "
                           r"at step (\d+)")


def losses(swarm) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(swarm.logs) if r.get("loss") is not None]


def mean_loss(rows: list[tuple[int, float]]) -> float:
    return sum(v for _, v in rows) / len(rows)


def stage_state(swarm, stage: int) -> dict:
    status = swarm.status() or {}
    return next((s for s in status.get("stages", []) if s["stage"] == stage), {})


async def download_stages(swarm: Swarm, stages: list[int]
                          ) -> dict[int, tuple[dict[str, torch.Tensor], int]]:
    """{stage: (its parameters, its step)} from its one live holder, as `shoal export` gets
    them (an observer's State.Download, the sender's state hash checked)."""
    identity = Identity.generate()
    client = CoordinatorClient(f"127.0.0.1:{swarm.port}", identity,
                               token=swarm.token_file.read_text().strip())
    out: dict[int, tuple[dict[str, torch.Tensor], int]] = {}
    try:
        await client.join(Benchmark(declared=True), "", stage_hint=OBSERVER_STAGE)
        view = await client.view()
        signer = auth.CallSigner(identity, lambda: client.certificate)
        for stage in stages:
            reps = [p for p in view.replicas(stage) if p.state in READY_STATES]
            assert len(reps) == 1, (stage, reps)
            async with grpc.aio.insecure_channel(
                    reps[0].address, options=tensor_stream.grpc_options(),
                    interceptors=auth.client_interceptors(signer)) as ch:
                call = pbg.StateStub(ch).Download(
                    pb.StateRequest(stage=stage, include_optimizer=False), timeout=60)
                header, arrays = await tensor_stream.receive(call, Limits())
            state = {k[6:]: torch.from_numpy(a.copy()) for k, a in arrays.items()
                     if k.startswith("model.")}
            assert tensor_hash(state) == header.meta["state_hash"], stage
            out[stage] = (state, header.step)
    finally:
        await client.leave("test download done")
        await client.close()
    return out


def layer_key(name: str, layer: int) -> str:
    """`layers.<i>.rest` of another stage's layer: the same position in its one-layer stage."""
    return re.sub(r"^layers\.\d+\.", f"layers.{layer}.", name)


def check_checkfree_average(swarm: Swarm, step: int) -> None:
    """Stage 2 as rebuilt equals the gradient-norm weighted average of stages 1 and 3 (all held
    still by the frozen driver), and that average is neither the uniform one nor either
    neighbour: a random re-init or a copy could not pass."""
    got = asyncio.run(download_stages(swarm, [1, 2, 3]))
    (w1, s1), (w2, s2), (w3, s3) = got[1], got[2], got[3]
    assert s1 == s2 == s3 == step, (s1, s2, s3, step)
    norms = {s["stage"]: s["grad_norm"] for s in (swarm.status() or {}).get("stages", [])}
    floor = CheckFreeConfig().norm_floor
    clip = swarm.spec.optim.grad_clip
    a, b = post_clip_norm(norms[1], clip) + floor, post_clip_norm(norms[3], clip) + floor
    assert len(w2) == len(w1) == len(w3) > 0
    for name, rebuilt in w2.items():
        p, n = w1[layer_key(name, 0)], w3[layer_key(name, 2)]
        expected = ((p.double() * a + n.double() * b) / (a + b)).float()
        torch.testing.assert_close(rebuilt, expected, rtol=1e-6, atol=1e-7,
                                   msg=lambda m, name=name: f"{name}: {m} (w1 {a}, w3 {b})")
    # the check can tell: weighted differs from uniform here, and from both neighbours
    name = next(k for k, v in w2.items() if v.dim() >= 2)
    p, n = w1[layer_key(name, 0)], w3[layer_key(name, 2)]
    for other in ((p + n) / 2, p, n):
        assert not torch.allclose(w2[name], other, rtol=1e-4, atol=1e-6), (name, a, b)


@pytest.mark.slow
def test_middle_stage_lost_bypassed_and_rebuilt_by_checkfree(swarm_factory) -> None:
    swarm = swarm_factory(spec_with(**SPEC), [0, 1, 2, 2, 3])
    driver = swarm.peers[0]
    wait_for("30 steps", lambda: step_of(swarm) >= 30, 240, swarm)
    before = mean_loss(losses(swarm)[-5:])
    for victim in swarm.peers[2:4]:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    at_kill = step_of(swarm)

    wait_for("stage 2 empty and marked for a rebuild",
             lambda: stage_state(swarm, 2).get("rebuild")
             and stage_state(swarm, 2).get("state") == "empty", 90, swarm)
    assert stage_state(swarm, 2)["rebuild"] == "checkfree", swarm.status()["stages"]
    events = (swarm.status() or {}).get("events", [])
    assert any(e["kind"] == "skip" and e["stage"] == 2 for e in events), events
    wait_for("5 steps through the bypass", lambda: step_of(swarm) >= at_kill + 5, 90, swarm)
    bypassed = [r for r in read_metrics(swarm.logs) if r["step"] > at_kill + 1]
    assert bypassed and all(r["visits"]["2"] == 0 for r in bypassed[-3:]), bypassed[-3:]
    assert all(r["completed"] > 0 for r in bypassed[-3:])
    bypass_level = mean_loss(losses(swarm)[-5:])  # stages 1 and 3 kept learning meanwhile

    snaps = swarm.work / "snapshots"
    with frozen([driver]):
        # No step can start: stages 1 and 3 hold still. Their last step's heartbeat (with its
        # gradient norm, which the rebuild will read from the view) is in once what the
        # coordinator shows of them stays the same over three heartbeats.
        seen: list[object] = []

        def neighbours_at_rest() -> bool:
            by = holders(swarm)
            seen.append([(p["step"], p["state_hash"], p["grad_norm"])
                         for s in (1, 3) for p in by.get(s, [])])
            polls = int(3 * swarm.spec.membership.heartbeat_s / 0.3) + 1
            return len(seen) >= polls and len(seen[-1]) == 2 and all(
                x == seen[-1] for x in seen[-polls:])
        wait_for("stages 1 and 3 at rest in the coordinator's view", neighbours_at_rest, 60,
                 swarm)
        swarm.add_peer(7, ["--stage", "2", "--grace", "10", "--snapshot-dir", str(snaps)])

        def rebuild_event() -> dict | None:
            return next((e for e in (swarm.status() or {}).get("events", [])
                         if e["kind"] == "rebuild" and e["stage"] == 2), None)
        event = wait_for("the rebuild event of stage 2", rebuild_event, 120, swarm)
        assert isinstance(event, dict)
        m = REBUILD_EVENT.fullmatch(event["detail"])
        assert m, event
        check_checkfree_average(swarm, int(m.group(1)))
    log = (swarm.logs / "peer7.log").read_text()
    assert "rebuilt without a replica: weighted_average from stages [1, 3]" in log, log[-2000:]
    assert "DEGRADED" not in log
    at_rebuild = step_of(swarm)

    def through_stage2_again() -> bool:
        rows = [r for r in read_metrics(swarm.logs) if r["step"] > at_rebuild]
        return len(rows) >= 3 and all(r["visits"]["2"] > 0 for r in rows[-3:])
    wait_for("paths through the rebuilt stage 2", through_stage2_again, 90, swarm)

    def recovered() -> bool:
        after = [x for x in losses(swarm) if x[0] > at_rebuild]
        level = mean_loss(after[-5:]) if len(after) >= 5 else float("inf")
        return level <= before + 0.02 and level <= bypass_level + 0.05
    wait_for(f"the loss back at its pre-failure level {before:.3f} (and at the bypass level "
             f"{bypass_level:.3f})", recovered, 150, swarm)
    wait_for("a periodic snapshot of stage 2", lambda: list(snaps.glob("stage2-step*.safetensors")),
             60, swarm)
    check_replicas_of_an_endless_run(swarm, [driver], {0: 1, 1: 1, 2: 1, 3: 1})
