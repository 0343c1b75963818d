"""#12 rows 9 and 10 against real processes: every link mTLS, and a coordinator a peer verifies.

One swarm for the module (a `shoal coordinator` and three `shoal peer`s, one per stage), run with
SHOAL_TLS_ON_LOOPBACK=1 so that its 127.0.0.1 links behave as links between machines do (TLS is
otherwise skipped on loopback only). The test process talks to it as an observer would (it joins
with a CSR and gets a leaf) and as attackers would:

- the coordinator's port speaks TLS with the swarm CA that the token's fingerprint names;
- each peer serves a leaf issued for its own peer id (a TLS client that expects another id
  refuses it), and the private keys are 0600;
- a plaintext client is refused by a peer's server (the handshake never completes), while an
  mTLS client with a swarm leaf is served;
- a client whose TLS certificate names another identity than the key that signs its calls is
  refused PERMISSION_DENIED, and the coordinator refuses to sign a CSR for another peer id;
- `shoal peer` with a token carrying the wrong fingerprint (or with none, or a wrong
  --coordinator-fingerprint) exits non-zero saying so, and so does one that finds a coordinator
  by mDNS with another fingerprint.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from protocols import auth, tls
from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg
from protocols.admission import parse_token
from protocols.coordinator_client import (
    OBSERVER_STAGE,
    VERSION,
    Benchmark,
    CoordinatorClient,
    CoordinatorRefused,
    CoordinatorUntrusted,
)
from protocols.identity import Identity
from protocols.tensor_stream import grpc_options
from shoal.swarm import Swarm
from tests.swarm.local_swarm import holders, spec_with, wait_for

REPO = Path(__file__).resolve().parents[2]
WRONG_FP = "sha256:" + "0" * 64


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    old = os.environ.get("SHOAL_TLS_ON_LOOPBACK")
    os.environ["SHOAL_TLS_ON_LOOPBACK"] = "1"  # the processes inherit it; so does this one
    s = Swarm(tmp_path_factory.mktemp("tls"), spec_with(), 0, None, "cpu")
    try:
        s.start(0)
        for i, stage in enumerate((0, 1, 2)):
            s.add_peer(i, ["--stage", str(stage), "--grace", "5"])
        wait_for("one holder per stage", lambda: all(len(holders(s).get(st, [])) == 1
                                                      for st in (0, 1, 2)), 120, s)
        yield s
    finally:
        s.stop(grace=5)
        if old is None:
            os.environ.pop("SHOAL_TLS_ON_LOOPBACK", None)
        else:
            os.environ["SHOAL_TLS_ON_LOOPBACK"] = old


def coordinator(swarm: Swarm) -> str:
    return f"127.0.0.1:{swarm.port}"


def token(swarm: Swarm) -> str:
    return swarm.token_file.read_text().strip()


def peers(swarm: Swarm) -> list[dict]:
    return [p for p in (swarm.status() or {}).get("peers", []) if p["live"]]


async def observer(swarm: Swarm, identity: Identity | None = None) -> CoordinatorClient:
    client = CoordinatorClient(coordinator(swarm), identity or Identity.generate(), token(swarm))
    await client.join(Benchmark(declared=True), "", stage_hint=OBSERVER_STAGE)
    return client


def handshake(address: str, server_name: str, leaf: tls.PeerTls, tmp: Path) -> dict:
    """A TLS handshake that trusts only the swarm CA and expects `server_name`; the peer cert."""
    tmp.mkdir(exist_ok=True)
    (tmp / "c.pem").write_bytes(leaf.cert_pem)
    (tmp / "k.pem").write_bytes(leaf.key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=leaf.ca_pem.decode())
    ctx.load_cert_chain(tmp / "c.pem", tmp / "k.pem")
    ctx.set_alpn_protocols(["h2"])
    host, port = tls.split_host_port(address)
    with socket.create_connection((host, port), 10) as sock, \
            ctx.wrap_socket(sock, server_hostname=server_name) as conn:
        return conn.getpeercert()


async def download_first_chunk(channel: grpc.aio.Channel, stage: int) -> pb.TensorChunk:
    call = pbg.StateStub(channel).Download(pb.StateRequest(stage=stage, include_optimizer=False),
                                           timeout=30)
    async for chunk in call:
        call.cancel()
        return chunk
    raise AssertionError("Download sent nothing")


def test_coordinator_serves_tls_with_the_ca_the_token_names(swarm: Swarm) -> None:
    secret, fp = parse_token(token(swarm))
    assert secret and fp and fp.startswith("sha256:")
    der = tls.fetch_server_certificate(coordinator(swarm))
    assert der is not None, "the coordinator's gRPC port does not speak TLS"
    ca = tls.der_to_pem(der)
    assert tls.fingerprint(ca) == fp
    coord_key = Identity.load(swarm.work / "coordinator" / "coordinator.key").public_key
    assert tls.coordinator_key_of(ca) == coord_key
    state = swarm.work / "coordinator"
    assert stat.S_IMODE((state / "tls-ca.key").stat().st_mode) == 0o600
    assert (state / "tls-ca.pem").read_bytes() == ca
    for key in (swarm.work / "keys").glob("peer*.tls.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_each_peer_serves_a_leaf_issued_for_its_own_id(swarm: Swarm, tmp_path: Path) -> None:
    client = asyncio.run(observer(swarm))
    leaf = client.tls()
    assert leaf is not None and tls.leaf_common_name(leaf.cert_pem) == client.identity.peer_id
    members = peers(swarm)
    assert len(members) == 3
    for i, p in enumerate(members):
        cert = handshake(p["address"], p["peer_id"], leaf, tmp_path / str(i))
        assert dict(x[0] for x in cert["subject"])["commonName"] == p["peer_id"]
        assert cert["subjectAltName"] == (("DNS", p["peer_id"]),)
        other = members[(i + 1) % len(members)]["peer_id"]
        with pytest.raises(ssl.SSLCertVerificationError):  # it cannot pass for another peer
            handshake(p["address"], other, leaf, tmp_path / f"{i}x")


def test_plaintext_client_refused_by_a_peer_server(swarm: Swarm) -> None:
    holder = holders(swarm)[1][0]

    async def scenario() -> None:
        client = await observer(swarm)
        signer = auth.client_interceptors(auth.CallSigner(client.identity,
                                                          lambda: client.certificate))
        async with grpc.aio.insecure_channel(holder["address"], options=grpc_options(),
                                             interceptors=signer) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await download_first_chunk(ch, 1)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # the same call over mTLS with the observer's leaf is served
        async with tls.peer_channel(holder["address"], holder["peer_id"], client.tls(),
                                    options=grpc_options(), interceptors=signer) as ch:
            chunk = await download_first_chunk(ch, 1)
            assert chunk.header.stage == 1
        await client.close()

    asyncio.run(scenario())


def test_tls_certificate_of_another_identity_is_refused(swarm: Swarm) -> None:
    holder = holders(swarm)[1][0]

    async def scenario() -> None:
        mallory, accomplice = await observer(swarm), await observer(swarm)
        # mallory's TLS session, accomplice's signature and membership certificate
        signer = auth.client_interceptors(auth.CallSigner(accomplice.identity,
                                                          lambda: accomplice.certificate))
        async with tls.peer_channel(holder["address"], holder["peer_id"], mallory.tls(),
                                    options=grpc_options(), interceptors=signer) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await download_first_chunk(ch, 1)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "TLS client certificate names peer" in info.value.details()
        # and the coordinator signs no CSR that names another peer than the caller
        victim = holder["peer_id"]
        csr, _ = tls.make_csr(victim, [])
        now = mallory.clock()
        request = pb.JoinRequest(
            public_key=mallory.identity.public_key, timestamp=now, address="",
            benchmark=Benchmark(declared=True).to_proto(), stage_hint=OBSERVER_STAGE,
            version=VERSION, tls_csr=csr,
            token_proof=auth.token_proof(token(swarm), mallory.identity.public_key, now))
        with pytest.raises(CoordinatorRefused) as refused:
            await mallory._call("Join", request, 10.0, 1.0)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "not the calling peer" in str(refused.value)
        for c in (mallory, accomplice):
            await c.close()

    asyncio.run(scenario())
    assert len(holders(swarm).get(1, [])) == 1  # the honest replica still serves


def run_peer(tmp: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), SHOAL_TORCH_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "shoal.cli", "peer", "--identity", str(tmp / "peer.key"),
         "--port", "0", "--grace", "1", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_peer_refuses_a_coordinator_with_another_fingerprint(swarm: Swarm,
                                                             tmp_path: Path) -> None:
    secret = parse_token(token(swarm))[0]
    wrong = tmp_path / "wrong.token"
    wrong.write_text(f"{secret} {WRONG_FP}\n")
    done = run_peer(tmp_path / "a", "--coordinator", coordinator(swarm), "--token-file",
                    str(wrong))
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "fingerprint" in out and WRONG_FP in out and "not the" in out, out[-2000:]

    old = tmp_path / "old.token"  # a token without a fingerprint: told how to give one
    old.write_text(secret + "\n")
    done = run_peer(tmp_path / "b", "--coordinator", coordinator(swarm), "--token-file",
                    str(old))
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "--coordinator-fingerprint" in out, out[-2000:]

    # the flag overrides the token's fingerprint, and a wrong one is refused the same way
    done = run_peer(tmp_path / "c", "--coordinator", coordinator(swarm), "--token-file",
                    str(swarm.token_file), "--coordinator-fingerprint", WRONG_FP)
    assert done.returncode != 0 and WRONG_FP in done.stdout + done.stderr
    assert len(peers(swarm)) == 3  # none of them joined


IFF_UP, IFF_LOOPBACK, IFF_MULTICAST = 0x1, 0x8, 0x1000  # linux/if.h


def multicast_interfaces() -> list[str]:
    found = []
    for iface in sorted(Path("/sys/class/net").glob("*")):
        try:
            flags = int((iface / "flags").read_text(), 16)
        except (OSError, ValueError):
            continue
        if flags & IFF_UP and flags & IFF_MULTICAST and not flags & IFF_LOOPBACK:
            found.append(iface.name)
    return found


@pytest.mark.mdns
def test_mdns_discovery_refuses_another_fingerprint(swarm: Swarm, tmp_path: Path) -> None:
    if not multicast_interfaces():
        pytest.skip("no network interface here is up and multicast-capable (mDNS needs one); "
                    "under CI=true this skip fails the run")
    from protocols.discovery import discover, matching
    from tests.sim_peer import CoordinatorProcess

    with CoordinatorProcess(tmp_path / "state", mdns=True) as coord:  # TLS (the env var)
        good = coord.token_file.read_text().strip()
        fp = parse_token(good)[1]
        found = asyncio.run(discover(5.0))
        _, port, props = matching(found, fp)  # the real one is found by its fingerprint
        assert port == coord.grpc_port and props["tls_fp"] == fp
        wrong = tmp_path / "wrong.token"
        wrong.write_text(f"{parse_token(good)[0]} {WRONG_FP}\n")
        done = run_peer(tmp_path / "a", "--token-file", str(wrong))
        out = done.stdout + done.stderr
        assert done.returncode != 0, out
        assert f"none with fingerprint {WRONG_FP}" in out, out[-2000:]
        old = tmp_path / "old.token"
        old.write_text(parse_token(good)[0] + "\n")
        done = run_peer(tmp_path / "b", "--token-file", str(old))
        out = done.stdout + done.stderr
        assert done.returncode != 0 and "needs its fingerprint" in out, out[-2000:]


def test_plaintext_client_is_told_the_coordinator_serves_tls(swarm: Swarm) -> None:
    async def scenario() -> None:
        client = CoordinatorClient(coordinator(swarm), Identity.generate(), token(swarm),
                                   plaintext=True)
        with pytest.raises(CoordinatorUntrusted, match="drop --plaintext"):
            await client.join(Benchmark(declared=True), "", stage_hint=OBSERVER_STAGE,
                              retry_s=10)
        await client.close()

    asyncio.run(scenario())
