"""The relayed peer's end of a relay (protocols.relay): one outbound stream, kept open.

`RelayTunnel` attaches to a relay's Relay service, learns the address others now dial for this
peer (the first frame), and for every connection the relay opens dials `target` (this peer's own
gRPC server, e.g. 127.0.0.1:PORT) and pumps the bytes both ways, unchanged. A keep-alive goes
at least every keepalive_s (under NAT mapping timeouts); nothing from the relay for
idle_timeout_s counts as a dead stream. Whenever the stream ends (the relay restarted, refused,
or the path broke), the tunnel attaches again after a capped exponential back-off with jitter and
reports the (possibly new) address through `on_address` ("" while it has none).

    tunnel = RelayTunnel("203.0.113.5:7000", "127.0.0.1:7001", lambda: channel,
                         on_address=lambda a: ...)
    tunnel.start()
    ...
    await tunnel.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable

import grpc

from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg
from protocols.relay_conns import (
    DEFAULT_LIMITS,
    MAX_DATA_BYTES,
    Conns,
    RelayLimits,
    RelayProtocolError,
)

log = logging.getLogger("shoal.relay")


class RelayTunnel:
    """Keeps this peer attached to the relay at `relay` and carries its connections to `target`.

    Args:
        relay: HOST:PORT of the relay's Relay service (for logs; `channel` dials it).
        target: HOST:PORT the carried connections go to (this peer's own server).
        channel: the grpc.aio channel to the relay, signed (protocols.auth.client_interceptors);
            called at each attach, so it may hand out the same channel or a new one.
        on_address: called on the event loop with the address others dial for this peer, each
            time a stream starts, and with "" when the stream ends.
        limits: frame and connection bounds, keep-alive and idle timeout (RelayLimits).
        backoff_s, backoff_cap_s: the first and the largest wait between attach attempts; each
            wait is drawn from [0.5, 1.5) times min(cap, first * 2**failures).

    Event loop only. `start()` returns at once; `stop()` ends the stream and every connection.
    """

    def __init__(self, relay: str, target: str, channel: Callable[[], grpc.aio.Channel], *,
                 on_address: Callable[[str], None] = lambda address: None,
                 limits: RelayLimits = DEFAULT_LIMITS, backoff_s: float = 0.5,
                 backoff_cap_s: float = 30.0,
                 rng: Callable[[], float] = random.random) -> None:
        self.relay = relay
        self.target = target
        self._channel = channel
        self._on_address = on_address
        self.limits = limits
        self._backoff_s = backoff_s
        self._backoff_cap_s = backoff_cap_s
        self._rng = rng
        self.address = ""  # what others dial for this peer now ("" while not attached)
        self.relayed_bytes = 0  # data carried both ways, all streams together
        self.attaches = 0  # streams that got an address
        self.failures = 0  # attach attempts in a row that got no address
        self.last_error = ""  # why the last stream ended, in words
        self._task: asyncio.Task | None = None
        self._call: grpc.aio.StreamStreamCall | None = None
        self.conns: Conns | None = None  # the current stream's connections

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"shoal-relay-tunnel-{self.relay}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._set_address("")

    def connections(self) -> int:
        return len(self.conns) if self.conns is not None else 0

    # ---------------------------------------------------------------- the loop

    async def _run(self) -> None:
        while True:
            try:
                attached = await self._attach_once()
            except Exception as exc:  # e.g. no channel to the relay: retry, never stop trying
                log.exception("relay %s: attaching failed", self.relay)
                self.last_error, attached = f"attaching failed: {exc}", False
            self.failures = 0 if attached else self.failures + 1
            self._set_address("")
            delay = (min(self._backoff_cap_s, self._backoff_s * 2 ** min(self.failures, 30))
                     * (0.5 + self._rng()))
            log.warning("relay %s: %s; attaching again in %.1f s", self.relay,
                        self.last_error or "the stream ended", delay)
            await asyncio.sleep(delay)

    async def _attach_once(self) -> bool:
        """One stream, from attach to its end; True when it got an address."""
        self.last_error = ""
        conns = self.conns = Conns(self.limits, self._count, connect=self._dial)
        got_address = False
        call = self._call = pbg.RelayStub(self._channel()).Attach(
            conns.frames(pb.RelayFrame(keepalive=True)))  # the first (signed) frame
        try:
            frames = call.__aiter__()
            while True:
                try:
                    frame = await asyncio.wait_for(frames.__anext__(),
                                                   self.limits.idle_timeout_s)
                except StopAsyncIteration:
                    self.last_error = self.last_error or "the relay ended the stream"
                    break
                if frame.error:
                    self.last_error = f"the relay says: {frame.error}"
                    break
                if frame.address:
                    got_address = True
                    self.attaches += 1
                    self._set_address(frame.address)
                    log.info("relayed by %s: others reach this peer at %s", self.relay,
                             frame.address)
                    continue
                await conns.receive(frame)
        except TimeoutError:
            self.last_error = (f"nothing from the relay for {self.limits.idle_timeout_s:g} s "
                               f"(the path or the relay is down)")
        except RelayProtocolError as exc:
            self.last_error = f"the relay sent a malformed frame: {exc}"
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            self.last_error = f"{getattr(code, 'name', code)}: {details}"
        finally:
            conns.close_all()
            conns.finish()
            call.cancel()
        return got_address

    async def _dial(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, _, port = self.target.rpartition(":")
        return await asyncio.open_connection(host.strip("[]"), int(port), limit=MAX_DATA_BYTES)

    def _count(self, n: int) -> None:
        self.relayed_bytes += n

    def _set_address(self, address: str) -> None:
        if address == self.address:
            return
        self.address = address
        try:
            self._on_address(address)
        except Exception:  # the callback's failure must not end the tunnel
            log.exception("relay %s: on_address(%r) failed", self.relay, address)
