#!/usr/bin/env bash
# Idempotent set-up: the CPU torch wheel first (otherwise pip resolves a multi-GB CUDA build),
# then this package with everything the tests, examples and benchmarks need.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install -q --disable-pip-version-check -e '.[dev]'
"$PY" -c "import torch, lightning, lightning_lookahead; print('torch', torch.__version__, '| lightning', lightning.__version__)"
