"""The coordinator relays for unreachable peers by default (coordinator/main.py): its Relay
service on the gRPC port, --relay-ports / --relay-host / --no-relay, and the relayed bytes on
/metrics. A real coordinator served in-process on 127.0.0.1; the "peer" is a member's
RelayTunnel carrying connections to a local echo server."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.admission_files import CoordinatorStartError
from coordinator.command import build_parser
from coordinator.main import serve as serve_coordinator
from peer.relayed import coordinator_channel
from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg
from protocols.coordinator_client import Benchmark, CoordinatorClient
from protocols.identity import Identity
from protocols.relay import RelayTunnel
from protocols.runspec import RunSpec
from tests.polling import until


async def _metrics(url: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(url + "metrics") as r:
        text = await r.text()
    return {f"{x.name}{sorted(x.labels.items()) if x.labels else ''}": x.value
            for f in text_string_to_metric_families(text) for x in f.samples}


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    writer.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_coordinator_relays_by_default_and_counts_on_metrics(tmp_path: Path) -> None:
    async def main() -> None:
        port = _free_port()
        coord = await serve_coordinator(RunSpec(), 0, 0, tmp_path / "s", None, None, False,
                                        "127.0.0.1", relay_ports=f"{port}-{port}",
                                        relay_host="localhost")
        echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
        client = CoordinatorClient(coord.grpc_address, Identity.generate(), coord.token)
        tunnel = None
        try:
            assert coord.service.relay_address == coord.grpc_address
            await client.join(Benchmark(samples_per_s=1.0, device="test"), "127.0.0.1:20000")
            ch = coordinator_channel(client, coord.grpc_address)
            tunnel = RelayTunnel(coord.grpc_address,
                                 f"127.0.0.1:{echo.sockets[0].getsockname()[1]}", lambda: ch)
            tunnel.start()
            assert await until(lambda: tunnel.address) == f"localhost:{port}"
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"x" * 100_000)
            assert await reader.readexactly(100_000) == b"x" * 100_000
            seen = await _metrics(coord.http_url)
            assert seen["shoal_relayed_bytes_total"] >= 200_000
            assert seen["shoal_relay_attached_peers"] == 1
            assert seen["shoal_relay_connections"] == 1
            key = f"shoal_peer_relayed_bytes_total{[('peer', client.identity.peer_id)]}"
            assert seen[key] == seen["shoal_relayed_bytes_total"]
            writer.close()
            await tunnel.stop()
            await ch.close()
        finally:
            if tunnel is not None:
                await tunnel.stop()
            await client.close()
            echo.close()
            await coord.stop()

    asyncio.run(main())


def test_no_relay_serves_none_and_bad_ports_are_refused(tmp_path: Path) -> None:
    args = build_parser().parse_args(["--no-relay", "--relay-ports", "40000-40999",
                                      "--relay-host", "203.0.113.5"])
    assert (args.no_relay, args.relay_ports, args.relay_host) == (True, "40000-40999",
                                                                   "203.0.113.5")

    async def main() -> None:
        with pytest.raises(CoordinatorStartError, match="--relay-ports"):
            await serve_coordinator(RunSpec(), 0, 0, tmp_path / "bad", None, None, False,
                                    "127.0.0.1", relay_ports="9-1")
        coord = await serve_coordinator(RunSpec(), 0, 0, tmp_path / "s", None, None, False,
                                        "127.0.0.1", relay=False)
        client = CoordinatorClient(coord.grpc_address, Identity.generate(), coord.token)
        try:
            assert coord.relay is None and coord.service.relay_address == ""
            await client.join(Benchmark(samples_per_s=1.0, device="test"), "127.0.0.1:20000")
            async with coordinator_channel(client, coord.grpc_address) as ch:
                call = pbg.RelayStub(ch).Attach(iter([pb.RelayFrame(keepalive=True)]))
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in call:
                        pass
                assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert not any(k.startswith("shoal_relay") for k in await _metrics(coord.http_url))
        finally:
            await client.close()
            await coord.stop()

    asyncio.run(main())
