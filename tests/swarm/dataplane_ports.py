"""Start a local swarm's peer with `--dataplane-port` at a port picked free, and wait until its
data plane listens there.

A port `free_port` found can be taken before the peer binds it (as the local port of some
other connection on this shared machine: shoal/swarm.py's Swarm.start meets the same race for
the coordinator). The peer then stops before joining and says so; only that case is retried,
with a new port, under the same peer index (it never joined: its identity is unused).
"""

from __future__ import annotations

import subprocess
import time

from shoal.swarm import Swarm, free_port

IN_USE = "cannot serve the data plane on"


def add_peer_at_dataplane_port(swarm: Swarm, i: int, extra: list[str], *, tls: bool = False,
                               timeout: float = 90.0, tries: int = 3
                               ) -> tuple[subprocess.Popen, int]:
    """(process, port) of peer `i` started with `extra` and a fixed --dataplane-port, once its
    log says its data plane listens at 127.0.0.1:port (mTLS when `tls`). AssertionError with the
    log's tail when it does not within `timeout` seconds, or exits for another reason."""
    log = swarm.logs / f"peer{i}.log"
    for _ in range(tries):
        port = free_port()
        seen = log.read_text(errors="replace") if log.exists() else ""
        peer = swarm.add_peer(i, [*extra, "--dataplane-port", str(port)])
        line = f"data plane at 127.0.0.1:{port} ({'mTLS' if tls else 'plaintext'})"
        deadline = time.monotonic() + timeout
        while True:
            text = log.read_text(errors="replace")[len(seen):] if log.exists() else ""
            if line in text:
                return peer, port
            if peer.poll() is not None:
                assert f"{IN_USE} 127.0.0.1:{port}" in text, text[-3000:]
                swarm.peers.remove(peer)
                break  # taken meanwhile: another port
            assert time.monotonic() < deadline, f"no {line!r} in {timeout:.0f} s:\n" + text[-3000:]
            time.sleep(0.3)
    raise AssertionError(f"peer {i}: {tries} free ports in a row were taken before it bound them")
