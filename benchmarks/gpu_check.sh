#!/usr/bin/env bash
# GPU validation in one go, for the lent GPU machine (Python 3.12, torch + torchvision preinstalled, no network).
# Needs the wheelhouse made here first:  make gpu-wheels   (pytest, hypothesis, networkx, graphviz, tqdm, fxforge)
# Runs: the whole test suite against the machine's torch (CPU tests + CUDA tests), then the GPU benchmark,
# and prints a short table last.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/fxforge-gpu-venv}
python3 -m venv --system-site-packages "$VENV"  # reuse the preinstalled torch/torchvision
"$VENV/bin/pip" install -q --no-index --find-links .gpu-wheels pytest hypothesis networkx graphviz tqdm
"$VENV/bin/pip" install -q --no-index --find-links .gpu-wheels --no-deps --force-reinstall fxforge
nvidia-smi -L
"$VENV/bin/python" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
# `import fxforge` resolves to the installed wheel (the source folders are named compiler/, passes/, ...).
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -o pythonpath=tests tests 2>&1 | tail -25
status=${PIPESTATUS[0]}
"$VENV/bin/python" benchmarks/bench_cuda.py "$@"
exit "$status"
