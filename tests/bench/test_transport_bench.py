"""Smoke test of bench/transport.py at a small size: every path runs between two processes and the
last line is the ratio the project tracks (at 4 MiB the product's path is in-band, as a peer's
is for a state under 8 MiB; the bench checks that it took the path a peer takes)."""

from __future__ import annotations

import re

from bench import transport


def test_transport_bench_small(capsys) -> None:
    assert transport.main(["--mib", "4", "--repeats", "1", "--netns-mib", "0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("(p) PRODUCT") for line in lines)
    assert any(line.startswith("(p') product over a plaintext link") for line in lines)
    assert any(line.startswith("(a) data plane alone") for line in lines)
    assert any(line.startswith("(b) raw TCP socket") for line in lines)
    assert any(line.startswith("(c) sync gRPC") for line in lines)
    assert re.fullmatch(r"targets: grpc/raw = \d+\.\d\d \(target >= 0\.6: (met|NOT met)\)",
                        lines[-2])
    assert re.fullmatch(r"transport: grpc/raw = \d+\.\d\d", lines[-1])
