"""Departure: the rules for members going, and for who may not come back (yet).

Membership (coordinator/membership.py) applies these when a member leaves, is banned, or
expires; they are kept here, apart from joining and placement, because they are the swarm's
safety rules and each is tested on its own:

- Expiry: a live member whose lease lapsed more than a grace ago is lost (`lapsed`); the grace
  covers the coordinator's own overload (service.py).
- A departed member's peer id is *revoked* until its last certificate expires, so peers refuse
  its calls (`Exclusions.revoke`); revocations are forgotten once the certificate is dead.
- A member that left may join again only after `rejoin_cooldown_s` (`CoolingDown`); a banned
  peer id (`ban`, persisted by the store) never (`Banned`).
- A stage that empties after training (step > 0) gets a `rebuild` method (CheckFree for inner
  block stages with both neighbours live, CheckFree+ for edge stages when the run uses it,
  otherwise a snapshot) that the next holder reads from the view, and a "skip" event
  (`rebuild_after`, `skip_event`).
- A departed member stays listed (state "left" or "lost") for the dashboard, at most
  `max_departed` of them, the oldest dropped first (`overflow`).

No I/O and no clock of its own: every rule takes `now`.
"""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.assignment import rebuild_method
from coordinator.events import Event
from coordinator.member import Member
from coordinator.stages import StageTable
from protocols.coordinator_client import READY_STATES

DEFAULT_REJOIN_COOLDOWN_S = 5.0


class Banned(Exception):
    """The peer's key was banned by the operator (`shoal ban`); it may not join."""


class CoolingDown(Exception):
    """The peer left moments ago; it may join again in `retry_in_s` seconds."""

    def __init__(self, message: str, retry_in_s: float) -> None:
        super().__init__(message)
        self.retry_in_s = retry_in_s


@dataclass(frozen=True, slots=True)
class Ban:
    """An operator's ban of one peer id (so of one key: the id is a digest of the key)."""

    peer_id: str
    t: float
    reason: str


class Exclusions:
    """The peer ids refused now: banned for good, cooling down after a Leave, or revoked
    until their last certificate expires. O(1) a question; `forget_lapsed` is O(entries)."""

    def __init__(self, swarm_id: str, rejoin_cooldown_s: float) -> None:
        self.swarm_id = swarm_id
        self.rejoin_cooldown_s = rejoin_cooldown_s
        self._banned: dict[str, Ban] = {}
        self._unsaved_bans: list[Ban] = []
        self._cooldown: dict[str, float] = {}  # peer id -> when it may join again (after Leave)
        self._revoked: dict[str, float] = {}  # peer id -> when its last certificate expires

    def revoked(self) -> list[str]:
        return sorted(self._revoked)

    def is_revoked(self, peer_id: str) -> bool:
        return peer_id in self._revoked or peer_id in self._banned

    def is_banned(self, peer_id: str) -> bool:
        return peer_id in self._banned

    def bans(self) -> list[Ban]:
        return sorted(self._banned.values(), key=lambda b: (b.t, b.peer_id))

    def check_may_join(self, peer_id: str, now: float) -> None:
        """Raise Banned or CoolingDown when `peer_id` may not join now."""
        ban = self._banned.get(peer_id)
        if ban is not None:
            raise Banned(f"peer {peer_id} is banned from swarm {self.swarm_id!r} by its operator"
                         + (f" ({ban.reason})" if ban.reason else "")
                         + "; its key cannot join again")
        until = self._cooldown.get(peer_id)
        if until is not None and until > now:
            raise CoolingDown(f"peer {peer_id} left {self.rejoin_cooldown_s - (until - now):.1f} s "
                              f"ago; it may join again in {until - now:.1f} s", until - now)

    def ban(self, peer_id: str, reason: str, now: float) -> None:
        """Refuse `peer_id` from now on (a repeated ban keeps the first); persisted through
        `take_bans`."""
        if peer_id not in self._banned:
            ban = Ban(peer_id, now, reason)
            self._banned[peer_id] = ban
            self._unsaved_bans.append(ban)

    def restore_bans(self, bans: list[Ban]) -> None:
        """Bans read back from the store (already saved)."""
        for b in bans:
            self._banned[b.peer_id] = b

    def take_bans(self) -> list[Ban]:
        """Bans not yet persisted."""
        out, self._unsaved_bans = self._unsaved_bans, []
        return out

    def revoke(self, peer_id: str, cert_expires: float, now: float) -> None:
        """A member departed: refuse its id while a certificate it holds is valid."""
        if cert_expires > now:
            self._revoked[peer_id] = cert_expires

    def unrevoke(self, peer_id: str) -> None:
        """It joined again (with a new certificate)."""
        self._revoked.pop(peer_id, None)

    def cool_down(self, peer_id: str, now: float) -> None:
        """It left: it may not join again for `rejoin_cooldown_s`."""
        if self.rejoin_cooldown_s > 0:
            self._cooldown[peer_id] = now + self.rejoin_cooldown_s

    def end_cooldown(self, peer_id: str) -> None:
        self._cooldown.pop(peer_id, None)

    def forget_lapsed(self, now: float) -> None:
        """Drop revocations whose certificate expired and cooldowns that ended."""
        for peer_id in [p for p, until in self._revoked.items() if until < now]:
            del self._revoked[peer_id]
        for peer_id in [p for p, until in self._cooldown.items() if until <= now]:
            del self._cooldown[peer_id]


def lapsed(members: dict[str, Member], now: float, grace_s: float) -> list[Member]:
    """The live members whose lease lapsed more than `grace_s` before `now`, in listing
    order."""
    return [m for m in members.values() if m.live and m.lease_expires + grace_s < now]


def rebuild_after(stage: int, stages: StageTable, members: dict[str, Member], n_stages: int,
                  checkfree_plus: bool) -> str:
    """The rebuild method `stage` needs now that a member left it ("" when it needs none).

    It needs one when no replica left holds the stage's state and the stage was trained. A
    newcomer still fetching the state (not ready, never reported a step) does not count: it has
    no one left to fetch from and waits for this mark to rebuild (peer/recovery/rebuild.py).
    """
    st = stages[stage]
    holders = [p for p in st.replicas if members[p].state in READY_STATES
               or members[p].stats.step > 0]
    if holders or not (st.step > 0 or st.trained):
        return ""
    live = {i for i, x in enumerate(stages) if x.replicas}
    return rebuild_method(stage, live, n_stages, checkfree_plus)


def skip_event(now: float, stage: int, method: str) -> Event:
    """What the event log says when block stage `stage` emptied: stage-0 drivers bypass it."""
    return Event(now, "skip", "", stage,
                 f"no live replica: paths bypass stage {stage} until a new holder rebuilds it "
                 f"({method})")


def overflow(members: dict[str, Member], max_departed: int) -> list[str]:
    """The departed members to forget so that at most `max_departed` stay listed: the oldest
    first (dicts keep insertion order)."""
    departed = [p for p, x in members.items() if not x.live]
    return departed[: max(0, len(departed) - max_departed)]
