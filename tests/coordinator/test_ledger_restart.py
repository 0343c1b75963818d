"""The coordinator's SPSA ledger survives its restart (coordinator/ledger.py, coordinator/store.py):
a stage-0 member posts three steps, the coordinator process stops and starts again on the same
--state-dir, and the steps are still there to replay; the next step goes on from them."""

from __future__ import annotations

import asyncio
from pathlib import Path

from protocols import shoal_pb2 as pb
from protocols.coordinator_client import PeerStats
from protocols.identity import Identity
from protocols.runspec import RunSpec
from tests.security.test_coordinator_attacks import Honest, spec_file
from tests.sim_peer import CoordinatorProcess


def test_the_spsa_ledger_survives_a_coordinator_restart(tmp_path: Path) -> None:
    config = spec_file(tmp_path, **{"pipeline.stages": 1, "sync.mode": "spsa"})
    codes = bytes(range(1, RunSpec.load(config).sync.spsa.samples_per_step + 1))
    driver_id = Identity.generate()
    stats = PeerStats(state="training", samples_per_s=1.0, step=3, state_hash="0a")

    async def before(coord: CoordinatorProcess) -> list[int]:
        honest = Honest(coord)
        driver = await honest.join(9000, stats, identity=driver_id)
        await honest.join(9001, PeerStats(state="training", samples_per_s=50.0, step=3,
                                          state_hash="0b"))
        for step in (1, 2, 3):
            await driver.post_spsa(pb.SpsaPost(step=step, codes=codes))
        ledger = await driver.spsa_ledger(pb.SpsaLedgerRequest(from_step=1))
        await honest.stop()
        return [s.step for s in ledger.steps]

    async def after(coord: CoordinatorProcess) -> tuple[list[int], int, list[int]]:
        honest = Honest(coord)
        driver = await honest.join(9000, stats, stage_hint=0, identity=driver_id)
        ledger = await driver.spsa_ledger(pb.SpsaLedgerRequest(from_step=1))
        steps = [s.step for s in ledger.steps]
        assert [bytes(s.codes.codes) for s in ledger.steps] == [codes] * 3
        await driver.post_spsa(pb.SpsaPost(step=4, codes=codes))
        ledger = await driver.spsa_ledger(pb.SpsaLedgerRequest(from_step=1))
        await honest.stop()
        return steps, ledger.base_step, [s.step for s in ledger.steps]

    with CoordinatorProcess(tmp_path / "state", config=config) as coord:
        assert asyncio.run(before(coord)) == [1, 2, 3]
        assert coord.stop() == 0
    with CoordinatorProcess(tmp_path / "state", config=config) as again:
        restored, base, going_on = asyncio.run(after(again))
    assert restored == [1, 2, 3]
    assert base == 1 and going_on == [1, 2, 3, 4]  # not a fresh start at step 4
