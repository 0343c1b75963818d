"""The lab's delay relay passes bytes intact, in order, both ways, with half-closes (127.0.0.1).

Latency itself is measured by the lab tests and README, not asserted here (no timings in tests).
"""

from __future__ import annotations

import asyncio
import hashlib
import os

from shoal.lab.relay import DelayRelay


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    writer.write_eof()  # the client's EOF came through the relay: answer with ours
    await writer.drain()
    writer.close()


async def _round_trip(payload: bytes) -> tuple[bytes, DelayRelay]:
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = echo.sockets[0].getsockname()[1]
    relay = DelayRelay(0.005, ("127.0.0.1", port))
    front = await asyncio.start_server(relay.handle, "127.0.0.1", 0)
    r, w = await asyncio.open_connection("127.0.0.1", front.sockets[0].getsockname()[1])

    async def send() -> None:
        for i in range(0, len(payload), 100_000):
            w.write(payload[i:i + 100_000])
            await w.drain()
        w.write_eof()

    sender = asyncio.ensure_future(send())
    got = await asyncio.wait_for(r.read(), 30)  # to the relayed EOF
    await sender
    w.close()
    for s in (front, echo):
        s.close()
        await s.wait_closed()
    return got, relay


def test_relay_passes_bytes_intact_both_ways():
    payload = os.urandom(3_000_000)
    got, relay = asyncio.run(_round_trip(payload))
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert relay.connections == 1
    (to_target, from_target), = relay.bytes_by_port.values()
    assert to_target == from_target == len(payload)
