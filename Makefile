# lmforge — every target sets up .venv first if needed, so each is one command on a fresh machine.
#   make demo   tokenizer -> shards -> 2-rank DeepSpeed training -> HF export -> generation (runs/demo/)
#   make test   the full test suite (make test-quick: without the slow end-to-end tests)
#   make lint   ruff

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lmforge-setup
# CPU machines get the pinned CPU torch; with an NVIDIA GPU the same version's default (CUDA) build.
# On a CPU machine whose index serves CUDA builds by default, add the CPU wheel index, e.g.
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_VERSION ?= 2.13.0
HAS_CUDA      := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_INDEX   ?=
PYTEST_ARGS   ?=
# Test files run on this many pytest-xdist workers, a whole file per worker (its module fixtures built once).
# Most of a test's time is process start-up and the launchers' polling, so 2 workers finish a 2-core run in
# about two thirds of the serial time; TEST_WORKERS=0 runs serially.
TEST_WORKERS  ?= 2
# The build tools are pinned too, and lmforge is installed without build isolation so that pip does not
# fetch whatever setuptools is newest at the time: a new release cannot break a fresh set-up.
BUILD_TOOLS   := pip==26.3 setuptools==84.2.1 wheel==0.48.0
# DeepSpeed JIT-builds its CPU ops (shared-memory all-reduce, CPU Adam) into TORCH_EXTENSIONS_DIR; keep
# them per checkout so two checkouts on one machine do not rebuild each other's ops over and over.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: setup demo test test-quick lint format golden clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-lock.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(BUILD_TOOLS)
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	grep -v '^deepspeed==' requirements-lock.txt > $(VENV)/lock-without-deepspeed.txt
	$(PY) -m pip install -q -r $(VENV)/lock-without-deepspeed.txt
	# DeepSpeed from source with its CPU ops compiled now, not JIT-built at run time: without CUDA every
	# rank of every run would otherwise (re)build the shared-memory all-reduce op in the first collective.
	# DS_ENABLE_NINJA compiles each op's sources in parallel (1m41s instead of 2m51s on 2 cores) where a
	# ninja binary is on PATH; without one torch falls back to the sequential build.
	$(if $(HAS_CUDA),,DS_BUILD_SHM_COMM=1 DS_BUILD_CPU_ADAM=1 DS_ENABLE_NINJA=1 MAX_JOBS=$$(nproc)) \
	  $(PY) -m pip install -q --no-build-isolation --no-deps --no-cache-dir \
	  "$$(grep '^deepspeed==' requirements-lock.txt)"
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import torch, deepspeed, sentencepiece, transformers, mpi4py; print('setup ok: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| cuda', torch.cuda.is_available())"
	touch $@

demo: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash launch_scripts/demo.sh

test: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-quick: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

# Regenerate tests/data/golden/ after a change that is meant to change the training numbers (say why in
# the commit); tests/test_train.py compares against it.
golden: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m tests.helpers.golden --write

lint: setup
	$(VENV)/bin/ruff check .

format: setup
	$(VENV)/bin/ruff format .

clean:
	rm -rf runs/demo .pytest_cache .ruff_cache
