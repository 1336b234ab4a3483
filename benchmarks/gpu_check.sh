#!/usr/bin/env bash
# GPU validation in one go, for the lent GPU machine: its python3 (3.12) already holds torch, torchvision,
# pytest, hypothesis, networkx and tqdm; nothing can be fetched there. Make the wheelhouse here first with
# `make gpu-wheels` (the python graphviz package and an fxforge wheel of this tree) and carry .gpu-wheels.
# Runs the whole test suite against that machine's torch (CPU tests + CUDA tests), then the GPU benchmark,
# and prints a short table last.
set -uo pipefail
cd "$(dirname "$0")/.."
SITE=${SITE:-/tmp/fxforge-site}
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" .gpu-wheels/*.whl || exit 1
export PYTHONPATH="$SITE" PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, torchvision, fxforge; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'fxforge from', fxforge.__file__)"
python3 -m pytest -q -p no:cacheprovider -o pythonpath=tests tests 2>&1 | tail -25
status=${PIPESTATUS[0]}
python3 benchmarks/bench_cuda.py "$@"
exit "$status"
