# The two front-door commands: `make demo` (the main job) and `make test` (the test suite).
# Each sets up .venv by itself on a fresh machine.
SHARED := $(abspath ../shared/datasets)
export TINYLM_DATA_DIR ?= $(if $(wildcard $(SHARED)),$(SHARED),)
BIN := .venv/bin

.PHONY: setup demo test test-avx2 lint bench-quick clean

setup:
	@bash scripts/setup.sh

# Prepare Tiny Shakespeare, train tinylm's CPU record recipe (cpu-record: a 2-layer LLaMA with QK-norm, Muon + NorMuon + AdamW,
# 225 steps, validation loss about 1.84 on the full split in about 19 s of one core), evaluate it, save its loss plot, print samples.
demo: setup
	$(BIN)/tinylm prepare shakespeare --tokenizer char --out data/shakespeare-char
	rm -rf runs/demo
	$(BIN)/tinylm train --data data/shakespeare-char --preset cpu-record --out runs/demo
	$(BIN)/tinylm eval runs/demo --no-progress
	$(BIN)/tinylm plot runs/demo --out runs/demo/loss.png
	$(BIN)/tinylm generate runs/demo --prompt "ROMEO:" --max-new-tokens 300 --num-samples 2 --seed 1 --no-progress

test: setup
	$(BIN)/python -m pytest tests

# Style: ruff lint and format check (configured in pyproject.toml).
lint: setup
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

# The floating-point comparisons again on PyTorch's AVX2 kernels (the AVX-512 ones round differently).
test-avx2: setup
	ATEN_CPU_CAPABILITY=avx2 $(BIN)/python -m pytest tests -m numerics

clean:
	rm -rf .venv data runs .pytest_cache
