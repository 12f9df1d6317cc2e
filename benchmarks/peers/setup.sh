#!/usr/bin/env bash
# One command: TRL in a virtual environment of its own (benchmarks/peers/.venv), so twofold's pins
# (torch, transformers for vLLM's CPU build) stay untouched. CPU torch first, as twofold's Makefile does.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q "trl==1.16.0" datasets accelerate
# trl_tooluse.py plays twofold's own tool-use env (the repository on PYTHONPATH): what its imports need
.venv/bin/pip install -q jsonschema gymnasium
.venv/bin/python -c "import trl, transformers, torch; print('trl', trl.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
