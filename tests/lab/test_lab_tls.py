"""A lab swarm's links are TLS by default, and it trains (root only).

Host coord runs the coordinator (bound to 0.0.0.0: TLS with the swarm CA), peer1 and peer2 one
peer each (advertised on their 198.18.x addresses: mTLS servers). Checked from inside peer2's
namespace, as another machine on that network sees them: the coordinator's port answers a TLS
handshake with the CA whose fingerprint the token carries; each peer's port answers with a leaf
naming that peer's id; a plaintext gRPC client gets UNAVAILABLE from a peer (the handshake never
completes); meanwhile the swarm trains (steps advance on stage 0).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from protocols import tls
from protocols.admission import parse_token
from protocols.runspec import RunSpec
from shoal.lab.network import LabNetwork, in_netns, netns_available
from shoal.lab.swarm import COORD_HOST, GRPC_PORT, LabSwarm
from shoal.swarm import read_metrics
from tests.polling import poll_until

pytestmark = pytest.mark.root
REPO = Path(__file__).resolve().parents[2]

PLAINTEXT_CALL = """
import sys, grpc
from protocols import shoal_pb2 as pb, shoal_pb2_grpc as pbg
with grpc.insecure_channel(sys.argv[1]) as ch:
    try:
        for _ in pbg.StateStub(ch).Download(pb.StateRequest(stage=0), timeout=10):
            break
        print("SERVED")
    except grpc.RpcError as e:
        print(e.code().name)
"""


def test_lab_links_are_tls_and_it_trains(tmp_path):
    why = netns_available()
    if why:
        pytest.skip(why)
    spec = RunSpec().replace(**{"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 4,
                                "model.seq_len": 32, "pipeline.stages": 1,
                                "pipeline.microbatch": 4, "pipeline.target_batch": 8,
                                "membership.heartbeat_s": 0.5, "membership.lease_s": 10.0})
    net = LabNetwork([COORD_HOST, "peer1", "peer2"], mbit=100.0)
    swarm = None
    try:
        net.create()
        swarm = LabSwarm(tmp_path, spec, net, delay_ms=5.0)  # (the relays carry every link)
        swarm.start(stages={"peer1": 0, "peer2": 1})
        live = poll_until(lambda: len([p for p in (swarm.status() or {}).get("peers", [])
                                       if p["live"] and p["state"] == "training"]) == 2
                          and swarm.status()["peers"], 180)
        assert live, (swarm.logs / "coordinator.log").read_text()[-3000:]
        assert poll_until(lambda: max((r["step"] for r in read_metrics(swarm.logs)),
                                      default=0) >= 3, 240), "the lab swarm does not train"

        ns = net.hosts["peer2"].netns
        coord = f"{net.hosts[COORD_HOST].address}:{GRPC_PORT}"
        der = in_netns(ns, lambda: tls.fetch_server_certificate(coord))
        assert der is not None, "the coordinator's port does not speak TLS"
        assert tls.fingerprint(tls.der_to_pem(der)) == parse_token(
            swarm.token_file.read_text())[1]
        assert "gRPC TLS" in (swarm.logs / "coordinator.log").read_text()
        for p in (p for p in live if p["live"]):
            leaf = in_netns(ns, lambda a=p["address"]: tls.fetch_server_certificate(a))
            assert leaf is not None, f"peer {p['peer_id']} at {p['address']} is not TLS"
            assert tls.leaf_common_name(tls.der_to_pem(leaf)) == p["peer_id"]
            got = subprocess.run([*net.exec_prefix("peer2"), sys.executable, "-c",
                                  PLAINTEXT_CALL, p["address"]], capture_output=True,
                                 text=True, timeout=60, cwd=REPO)
            assert got.stdout.strip() == "UNAVAILABLE", (got.stdout, got.stderr[-2000:])
    finally:
        if swarm is not None:
            swarm.stop(grace=5.0)
        net.destroy()
