# Two commands: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Without an NVIDIA GPU, a CPU build of torch (0.9 GB) instead of PyPI's CUDA build (~5.5 GB with its libraries):
# CI disks are small. Override with `make TORCH_CPU= setup` to let pip pick torch itself.
TORCH_CPU ?= torch==2.13.0+cpu

.PHONY: demo test setup lint warm clean bench bench-vs-flower

setup: $(STAMP)

# Recreate the install when pyproject.toml is newer than the last install.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@if [ -n "$(TORCH_CPU)" ] && ! command -v nvidia-smi >/dev/null 2>&1 && ! $(BIN)/python -c 'import torch' 2>/dev/null; then \
	    echo "setup: no NVIDIA GPU: installing the CPU build of torch ($(TORCH_CPU))"; \
	    $(BIN)/python -m pip install --quiet '$(TORCH_CPU)' 2>/dev/null \
	        || echo "setup: $(TORCH_CPU) is not available here; pip picks torch (a CUDA build is ~5 GB)"; \
	fi
	$(BIN)/python -m pip install --quiet -e '.[all,dev]'
	@touch $(STAMP)

# numba compiles the entropic solver on its first use (~30 s; then cached on disk next to the source):
# done here, ahead of the demo's first FedWB fusion and of the tests' (a fresh clone's first fusion inside a
# test otherwise includes the compile: 60 s and more on a busy 2-core box). A cached load takes about a second.
warm: $(STAMP)
	@$(BIN)/python -c 'from aggregator.fusion.sinkhorn_wide import warm_up; \
	    print(f"entropic solvers compiled or loaded in {warm_up():.1f}s")'

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint warm
	$(BIN)/python -m pytest -q

demo: $(STAMP) warm
	$(BIN)/fedwb demo

bench: $(STAMP)
	$(BIN)/python -m bench.fusion --json --quick

# fedwb vs Flower vs a plain MQTT relay (creates .venv-flower with flwr 1.42.0 on first use).
bench-vs-flower: $(STAMP)
	$(BIN)/python -m bench.vs_flower --json --rounds 5

clean:
	rm -rf $(VENV) .venv-flower build *.egg-info .pytest_cache .ruff_cache
