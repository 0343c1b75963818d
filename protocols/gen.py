"""Regenerate the gRPC stubs from protocols/proto/*.proto: `python -m protocols.gen`.

The generated modules are committed (protocols/shoal_pb2.py, shoal_pb2_grpc.py, shoal_pb2.pyi)
so that a user needs no protoc. `python -m protocols.gen --check` exits 1 when they are stale;
tests/test_stubs.py runs it.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_DIR = HERE / "proto"
OUTPUTS = ("shoal_pb2.py", "shoal_pb2_grpc.py", "shoal_pb2.pyi")


def _generate(out_dir: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc  # only needed by developers, not at run time

    include = Path(grpc_tools.__file__).parent / "_proto"
    for proto in sorted(PROTO_DIR.glob("*.proto")):
        rc = protoc.main([
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(proto),
        ])
        if rc != 0:
            raise SystemExit(f"protoc failed on {proto} (exit {rc})")
    # Generated grpc code imports `shoal_pb2` as a top-level module; make it package-relative.
    grpc_file = out_dir / "shoal_pb2_grpc.py"
    text = grpc_file.read_text()
    grpc_file.write_text(text.replace("import shoal_pb2 as", "from protocols import shoal_pb2 as"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed stubs are stale")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _generate(out)
        stale = []
        for name in OUTPUTS:
            new = (out / name).read_text()
            old_path = HERE / name
            old = old_path.read_text() if old_path.exists() else ""
            if new != old:
                if args.check:
                    stale.append(name)
                    diff = difflib.unified_diff(old.splitlines(), new.splitlines(), lineterm="")
                    sys.stderr.write("\n".join(list(diff)[:40]) + "\n")
                else:
                    old_path.write_text(new)
        if stale:
            sys.stderr.write(
                f"stale generated stubs: {', '.join(stale)}; run `python -m protocols.gen`\n"
            )
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
