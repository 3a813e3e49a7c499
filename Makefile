# moe-specialist: `make demo` runs the main job on the embedded default, `make test` runs the test suite.
# Both set up everything on a fresh machine (a virtualenv in .venv with the CPU build of torch).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
check_dirs := moe_specialist tests benchmarks
export OMP_NUM_THREADS ?= 2
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test lint style demo demo-full demo-train clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install -q "$(TORCH)"  # the CPU build (never let pip resolve a multi-GB CUDA torch)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/

lint: install
	$(BIN)/ruff check $(check_dirs) && $(BIN)/ruff format --check $(check_dirs)

style: install
	$(BIN)/ruff format $(check_dirs) && $(BIN)/ruff check --fix $(check_dirs)

# The main job: a sweep of pruning ratios x methods on the demo generalist (Bible en->fr), with a short recovery
# (distillation from the generalist) at the high ratios. Outputs land in outputs/demo-sweep (results.csv/json, plots).
DEMO_OUTPUT ?= outputs/demo-sweep
demo: install
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(BIN)/moe-specialist sweep --config recipes/demo/en-fr/sweep.yaml \
		--output_dir $(DEMO_OUTPUT) $(ARGS)

# The full grid (about 4x longer): six ratios x nine methods, random over 3 seeds, 200 recovery steps.
DEMO_FULL_OUTPUT ?= outputs/demo-sweep-full
demo-full: install
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(BIN)/moe-specialist sweep --config recipes/demo/en-fr/sweep.yaml \
		--output_dir $(DEMO_FULL_OUTPUT) --wandb_run_group demo-sweep-full --ratios 0 0.25 0.5 0.625 0.75 0.875 \
		--criteria gate_mass@sensitivity gate_mass@search gate_mass@sensitivity+none gate_mass@search+none \
		language_aware@sensitivity+none frequency@sensitivity+none reap@sensitivity+none frequency@uniform+none \
		random@uniform+none --random_seeds 3 --max_steps 200 $(ARGS)

# Re-train the embedded generalist from scratch (hours on 2 CPU cores; resumable), then export it into the package.
demo-train: install
	$(BIN)/python -m moe_specialist.demo.train_generalist --output_dir runs/generalist $(ARGS)
	$(BIN)/python -m moe_specialist.demo.export --run_dir runs/generalist

clean:
	rm -rf $(VENV) outputs .pytest_cache
