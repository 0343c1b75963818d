"""What survives a coordinator restart: one SQLite file in WAL mode under --state-dir.

Tables: `meta` (run spec TOML, swarm id, epoch, certificate serial, restart count), `members`
(peer id, key, address, stage, state, benchmark, stats, lease and certificate times, whether
live), `events` (the last EVENTS_KEPT), `history` (the training curve, appended at most once
a second), `bans` (the operator's `shoal ban`s: peer id, time, reason; kept for good) and
`spsa` (the SPSA ledger's closed steps, the last SPSA_KEPT: coordinator/ledger.py).

The database and its WAL / shared-memory files are mode 0600 and the state directory 0700:
they hold the members' keys and addresses, which are nobody else's business on the machine.

Writes go through a `Journal`: one writer thread, group commit. A handler that changed the
membership calls `await journal.commit()`; every change made before that call is durable when it
returns, and concurrent commits share one transaction. Heartbeats never write: the journal's
periodic flush (every few seconds) saves lease times and stats of the members that heartbeated,
in one transaction. So SIGKILL loses at most a few seconds of stats, never a join or a leave.

Threading: the sqlite connection is used only from the journal's single writer thread (and
from the loading thread before the journal starts). That thread reads Member objects the event
loop keeps updating; it only reads fields the loop replaces whole (a heartbeat swaps in a new
PeerStats, it never edits one), so a row is always a consistent, maybe slightly old, state.
Progress rows update only the columns heartbeats change: encoding every member in full every
few seconds cost ~35 ms of GIL time per thousand members, felt as heartbeat latency.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.departure import Ban
from coordinator.events import Event, HistoryPoint
from coordinator.ledger import ClosedStep
from coordinator.member import Member
from protocols.coordinator_client import Benchmark, PeerStats

log = logging.getLogger("shoal.coordinator.store")

SCHEMA_VERSION = "1"
EVENTS_KEPT = 10_000
HISTORY_LOADED = 2_000
SPSA_KEPT = 10_000  # closed SPSA ledger steps kept (coordinator/ledger.py's keep_steps)
DB_NAME = "coordinator.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS members (
    peer_id TEXT PRIMARY KEY, public_key BLOB NOT NULL, address TEXT NOT NULL,
    stage INTEGER NOT NULL, state TEXT NOT NULL, benchmark TEXT NOT NULL, stats TEXT NOT NULL,
    joined_at REAL NOT NULL, last_seen REAL NOT NULL, lease_expires REAL NOT NULL,
    cert_expires REAL NOT NULL, live INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, t REAL NOT NULL, kind TEXT NOT NULL,
    peer_id TEXT NOT NULL, stage INTEGER NOT NULL, detail TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS history (
    t REAL NOT NULL, step INTEGER NOT NULL, loss REAL, tokens_per_s REAL, bytes_per_step REAL);
CREATE TABLE IF NOT EXISTS bans (
    peer_id TEXT PRIMARY KEY, t REAL NOT NULL, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS spsa (
    step INTEGER PRIMARY KEY, peers TEXT NOT NULL, codes BLOB NOT NULL);
"""
PRIVATE_MODE = 0o600


class StoreError(RuntimeError):
    """The state directory cannot be used; the message says which file and what to do."""


@dataclass
class Batch:
    """Everything one transaction writes. Empty batches are skipped."""

    meta: dict[str, str] = field(default_factory=dict)
    members: list[Member] = field(default_factory=list)  # written whole
    progress: list[Member] = field(default_factory=list)  # only state, stats, lease times
    deleted: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    history: list[HistoryPoint] = field(default_factory=list)
    bans: list[Ban] = field(default_factory=list)
    spsa: list[ClosedStep] = field(default_factory=list)  # closed SPSA ledger steps
    spsa_reset: bool = False  # drop the saved ledger first (it started afresh)

    def __bool__(self) -> bool:
        return bool(self.meta or self.members or self.progress or self.deleted or self.events
                    or self.history or self.bans or self.spsa or self.spsa_reset)


@dataclass
class Snapshot:
    """The persisted state, as read back at start-up."""

    meta: dict[str, str]
    members: list[Member]
    events: list[Event]
    history: list[HistoryPoint]
    bans: list[Ban] = field(default_factory=list)
    spsa: list[ClosedStep] = field(default_factory=list)


class Store:
    """The SQLite file. Synchronous; use it from one thread at a time (see `Journal`)."""

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create state directory {self.state_dir}: {exc.strerror}; "
                             f"pass a writable --state-dir") from exc
        self.path = self.state_dir / DB_NAME
        _make_private(self.state_dir, self.path)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            # SQLite gives the WAL and shared-memory files the database file's mode; files an
            # older version left behind are tightened here
            for extra in ("-wal", "-shm"):
                sidecar = self.path.with_name(self.path.name + extra)
                if sidecar.exists():
                    sidecar.chmod(PRIVATE_MODE)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not a usable coordinator database ({exc}); move it "
                             f"away to start a new run, or point --state-dir elsewhere") from exc
        version = self._meta_get("schema")
        if version is None:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        elif version != SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema {version}, this coordinator reads "
                             f"{SCHEMA_VERSION}; use a matching shoal version")

    def _meta_get(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def load(self) -> Snapshot | None:
        """The persisted run, or None when this state directory has never held one."""
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if "spec_toml" not in meta:
            return None
        members = [_member_from_row(r) for r in self._db.execute(
            "SELECT peer_id, public_key, address, stage, state, benchmark, stats, joined_at,"
            " last_seen, lease_expires, cert_expires, live FROM members")]
        events = [Event(*r) for r in reversed(self._db.execute(
            "SELECT t, kind, peer_id, stage, detail FROM events ORDER BY id DESC LIMIT 1000"
        ).fetchall())]
        (count,) = self._db.execute("SELECT COUNT(*) FROM history").fetchone()
        every = max(1, math.ceil(count / HISTORY_LOADED))
        history = [HistoryPoint(t, step, _nan(loss), _nan(tps), _nan(bps))
                   for t, step, loss, tps, bps in self._db.execute(
                       "SELECT t, step, loss, tokens_per_s, bytes_per_step FROM history"
                       " WHERE rowid % ? = 0 OR rowid = (SELECT MAX(rowid) FROM history)"
                       " ORDER BY rowid", (every,))]
        bans = [Ban(*r) for r in self._db.execute(
            "SELECT peer_id, t, reason FROM bans ORDER BY t")]
        return Snapshot(meta, members, events, history, bans, self.load_spsa())

    def load_spsa(self) -> list[ClosedStep]:
        """The saved SPSA ledger steps, oldest first."""
        return [ClosedStep(step, tuple(json.loads(peers)), bytes(codes))
                for step, peers, codes in reversed(self._db.execute(
                    "SELECT step, peers, codes FROM spsa ORDER BY step DESC LIMIT ?",
                    (SPSA_KEPT,)).fetchall())]

    def write(self, batch: Batch) -> None:
        """Write `batch` in one transaction (all or nothing)."""
        if not batch:
            return
        db = self._db
        db.execute("BEGIN")
        try:
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", batch.meta.items())
            db.executemany(
                "INSERT OR REPLACE INTO members VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                [_member_row(m) for m in batch.members])
            db.executemany(
                "UPDATE members SET state = ?, stats = ?, last_seen = ?, lease_expires = ?,"
                " cert_expires = ? WHERE peer_id = ?",
                [(m.state, json.dumps(m.stats.to_json()), m.last_seen, m.lease_expires,
                  m.cert_expires, m.peer_id) for m in batch.progress])
            db.executemany("DELETE FROM members WHERE peer_id = ?", [(p,) for p in batch.deleted])
            db.executemany("INSERT INTO events (t, kind, peer_id, stage, detail)"
                           " VALUES (?,?,?,?,?)",
                           [(e.t, e.kind, e.peer_id, e.stage, e.detail) for e in batch.events])
            db.executemany("INSERT INTO history VALUES (?,?,?,?,?)",
                           [(p.t, p.step, _finite(p.loss), _finite(p.tokens_per_s),
                             _finite(p.bytes_per_step)) for p in batch.history])
            db.executemany("INSERT OR REPLACE INTO bans VALUES (?,?,?)",
                           [(b.peer_id, b.t, b.reason) for b in batch.bans])
            if batch.spsa_reset:
                db.execute("DELETE FROM spsa")
            db.executemany("INSERT OR REPLACE INTO spsa VALUES (?,?,?)",
                           [(c.step, json.dumps(list(c.peers)), c.codes) for c in batch.spsa])
            if batch.spsa:
                db.execute("DELETE FROM spsa WHERE step <= ?", (batch.spsa[-1].step - SPSA_KEPT,))
            if batch.events:
                db.execute("DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?",
                           (EVENTS_KEPT,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self._db.close()


def _make_private(state_dir: Path, db: Path) -> None:
    """The state directory 0700 and the database file 0600 (created so before SQLite opens
    it, so it is never readable by others, not even for a moment)."""
    try:
        if state_dir.stat().st_uid == _uid():
            state_dir.chmod(0o700)
        fd = os.open(db, os.O_RDWR | os.O_CREAT, PRIVATE_MODE)
        os.close(fd)
        db.chmod(PRIVATE_MODE)
    except OSError as exc:
        raise StoreError(f"cannot make {db} private (mode 0600): {exc.strerror}; pass a "
                         f"--state-dir this user owns") from exc


def _uid() -> int:
    return os.getuid() if hasattr(os, "getuid") else -1


def _nan(x: float | None) -> float:
    return math.nan if x is None else x


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _member_row(m: Member) -> tuple:
    return (m.peer_id, m.public_key, m.address, m.stage, m.state,
            json.dumps(_bench_json(m.benchmark)),
            json.dumps(m.stats.to_json()), m.joined_at, m.last_seen, m.lease_expires,
            m.cert_expires, int(m.live))


def _bench_json(b: Benchmark) -> dict:
    return {"samples_per_s": b.samples_per_s, "bandwidth_mbps": b.bandwidth_mbps,
            "device": b.device, "memory_bytes": b.memory_bytes, "declared": b.declared,
            "memory_available_bytes": b.memory_available_bytes}


def _member_from_row(r: tuple) -> Member:
    (peer_id, key, address, stage, state, bench, stats, joined_at, last_seen, lease_expires,
     cert_expires, live) = r
    return Member(peer_id=peer_id, public_key=bytes(key), address=address, stage=stage,
                  state=state, benchmark=Benchmark(**json.loads(bench)),
                  stats=PeerStats.from_json(json.loads(stats)), joined_at=joined_at,
                  last_seen=last_seen, lease_expires=lease_expires, cert_expires=cert_expires,
                  live=bool(live))


class Journal:
    """Group-committing writer: `commit()` returns once every change made before it is on disk.

    `collect(progress)` is called on the event loop right before each transaction and must
    return the batch of changes made since the last one (with lease times and stats when
    `progress` is true). The write itself runs on the journal's one thread.
    """

    def __init__(self, store: Store, collect: Callable[[bool], Batch],
                 flush_every_s: float = 3.0) -> None:
        self.store = store
        self._collect = collect
        self._flush_every_s = flush_every_s
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shoal-store")
        self._waiting: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()
        self._progress_due = False
        self._task: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.transactions = 0
        self.last_write_s = 0.0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="shoal-journal")
        self._ticker = asyncio.create_task(self._tick(), name="shoal-journal-tick")

    async def commit(self) -> None:
        """Wait until all changes made so far are durable."""
        if self._task is None or self._task.done():
            raise RuntimeError("the journal is not running; call start() first")
        fut = asyncio.get_running_loop().create_future()
        self._waiting.append(fut)
        self._wake.set()
        await fut

    async def write(self, batch: Batch) -> None:
        """Write `batch` now, on the journal's thread (for data outside the collect hook)."""
        await asyncio.get_running_loop().run_in_executor(self._pool, self.store.write, batch)

    def request(self) -> None:
        """Ask for a commit soon without waiting for it (changes that may lag a moment)."""
        self._wake.set()

    async def flush(self) -> None:
        """Commit now including lease times and stats (used at shutdown)."""
        self._progress_due = True
        await self.commit()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._flush_every_s)
            self._progress_due = True
            self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            waiting, self._waiting = self._waiting, []
            progress, self._progress_due = self._progress_due, False
            try:
                batch = self._collect(progress)
                t0 = time.perf_counter()
                await loop.run_in_executor(self._pool, self.store.write, batch)
                self.last_write_s = time.perf_counter() - t0
                self.transactions += 1
            except Exception as exc:  # keep serving; the waiters learn it failed
                log.exception("writing coordinator state to %s failed", self.store.path)
                for fut in waiting:
                    if not fut.done():
                        fut.set_exception(StoreError(f"could not persist state: {exc}"))
                continue
            for fut in waiting:
                if not fut.done():
                    fut.set_result(None)

    async def close(self) -> None:
        """Flush everything, stop the writer and close the database."""
        if self._task is not None and not self._task.done():
            await self.flush()
        for task in (self._task, self._ticker):
            if task is not None:
                task.cancel()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self.store.close)
        self._pool.shutdown(wait=True)
