#!/usr/bin/env bash
# Create .venv (Python 3.11) and install picard-policy (and its robot-side client, client/) with
# every extra. Idempotent.
# torch is installed first and pinned to the CPU build (torch==2.13.0): an unpinned torch would
# pull several GB of CUDA wheels, and nothing later may replace it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
# the robot-side client (client/: numpy, msgpack, websockets) first: the main package depends
# on it, and it must come from this repository, never from a package index
.venv/bin/python -m pip install -q -e ./client
.venv/bin/python -m pip install -q -e ".[all]"
.venv/bin/python - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"torch {torch.__version__} replaced the pinned 2.13.0"
print(f"picard-policy installed: torch {torch.__version__}, python in .venv")
PY
