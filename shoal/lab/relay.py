"""The lab's delay relay: an asyncio TCP relay that holds every chunk for a fixed one-way delay.

    python -m shoal.lab.relay --listen 0.0.0.0:7999 --delay-ms 40            (transparent)
    python -m shoal.lab.relay --listen 198.18.0.2:7100 --to 127.0.0.1:7100 --delay-ms 40

It runs inside one lab host (shoal/lab/network.py). In transparent mode an iptables REDIRECT
(nat OUTPUT) sends every TCP connection the host opens to another host here, and the relay dials
the connection's original destination (SO_ORIGINAL_DST) from the same host, its socket marked
RELAY_MARK so that this second connection is not redirected again. Relaying on the dialling side
keeps the source address honest: the far end sees the dialling host's address (or, for a host
behind the lab's NAT, its router's), as a server that observes its callers' addresses must. With
`--to` it dials a fixed target instead (the fallback where iptables is missing: the peer
listens on loopback and advertises the relay).

Each direction of a connection is a reader and a writer joined by a bounded queue: the reader
stamps each chunk with `arrival + delay`, the writer sleeps until that time and writes. Order is
kept and delays do not add up, so the link's bandwidth survives (the tbf caps, not the relay,
limit it); the queue bound applies backpressure so a slow receiver never grows memory. EOF is
delayed like data, so half-closes work. tc has no netem here; this is how the lab adds latency.

`--stats FILE` rewrites FILE once a second with the bytes relayed per destination port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import struct
import time

log = logging.getLogger("shoal.lab.relay")
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
CHUNK = 64 * 1024
QUEUE_CHUNKS = 64  # at most 4 MiB in flight per direction
RELAY_MARK = 0x5E1A  # SO_MARK of the relay's own outgoing connections (not redirected again)


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where a REDIRECTed connection was going before netfilter sent it here."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


class DelayRelay:
    """Accepts connections and relays both directions with `delay_s` added to each."""

    def __init__(self, delay_s: float, target: tuple[str, int] | None = None) -> None:
        self.delay_s = delay_s
        self.target = target
        self.own: tuple[str, int] | None = None
        self.bytes_by_port: dict[int, list[int]] = {}  # port -> [to target, from target]
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.CancelledError):  # the relay is shutting down
            await self._relay(reader, writer)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            dest = self.target or original_destination(sock)
        except OSError as exc:
            log.warning("no original destination for %s: %s", writer.get_extra_info("peername"),
                        exc)
            writer.close()
            return
        if self.own and dest[1] == self.own[1] and self.target is None:
            writer.close()  # a direct call to the relay's own port would loop forever
            return
        try:
            up_reader, up_writer = await self._dial(dest)
        except OSError as exc:
            log.info("cannot reach %s:%d: %s", *dest, exc)
            writer.close()
            return
        self.connections += 1
        counts = self.bytes_by_port.setdefault(dest[1], [0, 0])
        tasks = [asyncio.ensure_future(self._direction(reader, up_writer, counts, 0)),
                 asyncio.ensure_future(self._direction(up_reader, writer, counts, 1))]
        # Both directions end at their EOF; an error in either (a reset) ends the pair.
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in (writer, up_writer):
            with contextlib.suppress(Exception):
                w.close()

    async def _dial(self, dest: tuple[str, int]
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to `dest`; in transparent mode with RELAY_MARK set, so the host's REDIRECT
        of outgoing connections lets this one through instead of sending it back here."""
        if self.target is not None:
            return await asyncio.open_connection(*dest)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, RELAY_MARK)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, dest)
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    async def _direction(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         counts: list[int], index: int) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)

        async def receive() -> None:
            try:
                while True:
                    data = await reader.read(CHUNK)
                    await queue.put((loop.time() + self.delay_s, data))
                    if not data:
                        return
            except (ConnectionError, OSError):
                await queue.put((loop.time(), b""))

        async def release() -> None:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    with contextlib.suppress(OSError, RuntimeError):
                        if writer.can_write_eof():
                            writer.write_eof()
                    return
                writer.write(data)
                counts[index] += len(data)
                await writer.drain()

        rx = asyncio.ensure_future(receive())
        try:
            await release()
        finally:
            rx.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await rx


async def serve(host: str, port: int, delay_s: float, target: tuple[str, int] | None,
                stats: str | None) -> None:
    relay = DelayRelay(delay_s, target)
    relay.own = (host, port)
    server = await asyncio.start_server(relay.handle, host, port, reuse_address=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("relaying %s:%d -> %s with %.1f ms each way", host, port,
             f"{target[0]}:{target[1]}" if target else "the original destination",
             delay_s * 1e3)
    async with server:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            if stats:
                _write_stats(stats, relay)


def _write_stats(path: str, relay: DelayRelay) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"t": time.time(), "connections": relay.connections,
                   "bytes_by_port": {str(k): v for k, v in relay.bytes_by_port.items()}}, f)
    os.replace(tmp, path)


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shoal.lab.relay", description=__doc__.split(
        "\n")[0])
    ap.add_argument("--listen", type=_addr, required=True, help="HOST:PORT to accept on")
    ap.add_argument("--to", type=_addr, help="fixed target (default: the original destination)")
    ap.add_argument("--delay-ms", type=float, required=True, help="added delay each way")
    ap.add_argument("--stats", help="rewrite this JSON file once a second")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s relay %(message)s")
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(serve(args.listen[0], args.listen[1], args.delay_ms / 1e3, args.to, args.stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
