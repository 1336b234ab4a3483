#!/usr/bin/env bash
# GPU validation in one go, for the lent GPU machine: its python3 (3.12) already holds torch (2.11), torchvision,
# pytest, hypothesis, networkx and tqdm; nothing can be fetched there. Make the wheelhouse here first with
# `make gpu-wheels` (the python graphviz package and an fxforge wheel of this tree) and carry .gpu-wheels.
#
# 1. the CUDA backend's tests against that machine's torch (CPU-side and GPU tests; $TESTS overrides the list,
#    TESTS=tests runs the whole suite), at most $TEST_TIMEOUT seconds;
# 2. benchmarks/bench_cuda.py (resnet50 and mobilenet_v2 at bs 1 and 64, all peers; extra arguments go to it),
#    at most $BENCH_TIMEOUT seconds; it writes its block of benchmarks/RESULTS.md;
# 3. a short summary last: the tests' result line and fxforge cuda against torch.compile reduce-overhead.
# The defaults keep the whole run under 9 minutes. With $OUT set (the device runner's output folder), the test
# log, the benchmark log and RESULTS.md are copied there.
set -uo pipefail
cd "$(dirname "$0")/.."
SITE=${SITE:-/tmp/fxforge-site}
TESTS=${TESTS:-"tests/backends/test_cuda_backend.py tests/backends/test_cuda_graphs.py tests/benchmarks/test_bench_cuda.py"}
TEST_TIMEOUT=${TEST_TIMEOUT:-180}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-330}
LOGS=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" .gpu-wheels/*.whl || exit 1
export PYTHONPATH="$SITE" PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, torchvision, fxforge; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'fxforge from', fxforge.__file__)"

# shellcheck disable=SC2086  # TESTS is a list of paths
timeout "$TEST_TIMEOUT" python3 -m pytest -q -rs -p no:cacheprovider -o pythonpath="tests" $TESTS \
  -s 2>&1 | tee "$LOGS/tests.log" | grep -E "dB|passed|failed|error|SKIPPED|FAILED|ERROR|Error" | tail -40
test_status=${PIPESTATUS[0]}

timeout "$BENCH_TIMEOUT" python3 benchmarks/bench_cuda.py --summary "$LOGS/short.md" "$@" 2>&1 | tee "$LOGS/bench.log"
bench_status=${PIPESTATUS[0]}

if [ -n "${OUT:-}" ]; then cp "$LOGS/tests.log" "$LOGS/bench.log" benchmarks/RESULTS.md "$OUT/" 2>/dev/null; fi
echo
echo "== summary =="
echo "tests (exit $test_status): $(grep -E '^[0-9]+ (passed|failed)|(passed|failed|error).* in [0-9.]+s' "$LOGS/tests.log" | tail -1)"
[ "$test_status" = 124 ] && echo "tests: stopped after ${TEST_TIMEOUT}s"
echo "benchmark (exit $bench_status):"
if [ -s "$LOGS/short.md" ]; then cat "$LOGS/short.md"; else echo "no table: see the benchmark log above"; fi
[ "$test_status" = 0 ] && [ "$bench_status" = 0 ]
