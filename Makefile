# Two commands on a fresh machine: `make demo` and `make test`. Both create the venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision pinned to the releases these machines serve from local disk; override on other hosts,
# e.g. `make test TORCH_SPEC="torch torchvision"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.fxforge-installed
BENCH_STAMP := $(VENV)/.fxforge-bench-installed
# The oldest torch pyproject.toml accepts (torch>=...): CI runs the suite on it too, in a venv of its own.
# torchvision 0.28.0 pairs with it; here torch 2.13.0 is served as a CPU build and that torchvision wheel links
# the CUDA one, so it is removed when it cannot load, and the tests that need it skip.
TORCH_OLDEST_SPEC ?= torch==2.13.0 torchvision==0.28.0
VENV_OLDEST ?= .venv-torch-oldest
OLDEST_STAMP := $(VENV_OLDEST)/.fxforge-installed

.PHONY: demo test test-oldest-torch lint bench bench-int8 bench-cuda graphviz chromium clean gpu-wheels

# the test extra only (pytest, hypothesis, torchvision, transformers, onnx, openvino...): the benchmark peers are not needed
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[test]" $(TORCH_SPEC)
	touch $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e ".[bench]" $(TORCH_SPEC)
	touch $(BENCH_STAMP)

# torch pinned in both pip calls so that no dependency moves it
$(OLDEST_STAMP): pyproject.toml
	test -x $(VENV_OLDEST)/bin/python || $(PYTHON) -m venv $(VENV_OLDEST)
	$(VENV_OLDEST)/bin/pip install --quiet $(TORCH_OLDEST_SPEC)
	$(VENV_OLDEST)/bin/pip install --quiet -e ".[test]" $(TORCH_OLDEST_SPEC)
	$(VENV_OLDEST)/bin/python -c "import torchvision" 2>/dev/null || $(VENV_OLDEST)/bin/pip uninstall -y -q torchvision
	touch $(OLDEST_STAMP)

# The `dot` binary comes from the OS package graphviz; install it when we can (root), otherwise say how.
graphviz:
	@command -v dot >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz >/dev/null) \
	      || echo "warning: could not install graphviz; graphs will be written as .dot only"; \
	  else \
	    echo "note: 'dot' not found; install the graphviz OS package (e.g. 'sudo apt-get install graphviz') to render SVG/PNG; .dot files are written meanwhile"; \
	  fi; }

# Headless chromium opens the HTML report in the tests (tests/viz/test_html_report.py; skipped without it).
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "warning: could not install chromium; the HTML report's browser test will be skipped"; \
	  else \
	    echo "note: 'chromium' not found; install it (e.g. 'sudo apt-get install chromium') to run the HTML report's browser test"; \
	  fi; }

demo: $(STAMP) graphviz
	$(BIN)/python examples/demo.py

# pytest-xdist: one worker per core, at most 4 (the suite's tests are independent; on 2 cores 5 min instead of 7)
PYTEST_WORKERS ?= -n auto --maxprocesses 4

test: $(STAMP) graphviz chromium lint
	$(BIN)/python -m pytest -q $(PYTEST_WORKERS)

# the suite on the oldest supported torch (pyproject's lower bound)
test-oldest-torch: $(OLDEST_STAMP) graphviz chromium
	$(VENV_OLDEST)/bin/python -m pytest -q $(PYTEST_WORKERS)

lint: $(STAMP)
	$(BIN)/ruff check compiler passes backends viz tests benchmarks examples

bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/bench_cpu.py

bench-int8: $(BENCH_STAMP)
	$(BIN)/python benchmarks/bench_int8.py

# needs a CUDA GPU (on the lent GPU machine use benchmarks/gpu_check.sh); --dry-run checks the script on CPU
bench-cuda: $(STAMP)
	$(BIN)/python benchmarks/bench_cuda.py

clean:
	rm -rf $(VENV) $(VENV_OLDEST) fxforge-report .pytest_cache .hypothesis

# Wheelhouse for benchmarks/gpu_check.sh on the GPU machine (Python 3.12 with torch, pytest, hypothesis,
# networkx, tqdm; no network there): the python graphviz package and a wheel of this tree.
gpu-wheels: $(STAMP)
	rm -rf .gpu-wheels build && mkdir -p .gpu-wheels
	$(BIN)/pip download -q --no-deps -d .gpu-wheels --only-binary=:all: --python-version 3.12 graphviz
	$(BIN)/pip wheel -q --no-deps -w .gpu-wheels .
	rm -rf build

# Long fuzzing run of the graph fuzzer and property tests (tests/fuzz), new random graphs on every run (the
# "fuzz" hypothesis profile; CI's is derandomized): FUZZ_EXAMPLES per fuzz target (CI runs a few hundred in
# all), with hypothesis statistics. Failures print a FuzzGraph(...) to paste into a regression test.
FUZZ_EXAMPLES ?= 2000
.PHONY: fuzz
fuzz: $(STAMP)
	FXFORGE_HYPOTHESIS_PROFILE=fuzz FXFORGE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q tests/fuzz --hypothesis-show-statistics
