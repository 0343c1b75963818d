#!/usr/bin/env bash
# Installs Shoal and what its tests need into the current Python (3.11+).
# torch: if none is installed, the CPU build 2.13.0 is taken (it is on this machine's disk and is
# small); on a GPU machine install the torch build you want first and this script keeps it.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[test]"
