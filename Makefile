# The two commands: `make demo` (the main job on the embedded default) and `make test`.
# Both create the local virtualenv .venv on first use, with exactly the versions in
# requirements.lock; nothing else needs installing by hand. `make lock` re-resolves the lock.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
UV      = $(VENV)/bin/uv
LOCK    = requirements.lock
STAMP   = $(VENV)/.convlora-installed
UV_VERSION = 0.13.9

# uv does not read pip's configuration. Where pip is set up with extra indexes or find-links (a
# local mirror), hand them to uv, so that both install from the same place.
UV_MIRROR = idx="$$($(PY) -m pip config get global.extra-index-url 2>/dev/null)"; \
	links="$$($(PY) -m pip config get global.find-links 2>/dev/null)"; \
	if [ -n "$$idx" ]; then export UV_EXTRA_INDEX_URL="$$idx" UV_INDEX_STRATEGY=unsafe-best-match; fi; \
	if [ -n "$$links" ]; then export UV_FIND_LINKS="$$links"; fi

.PHONY: demo test test-slow test-fuzz test-all lock bench bench-breakdown bench-lowmem bench-quant bench-kinds bench-kinds-demo bench-smoke clean-venv

# A changed lock or pyproject rebuilds the venv from nothing, so a stale one never stands in for it.
# --compile-bytecode: the .pyc files are written once, here. Python never writes them where
# PYTHONDONTWRITEBYTECODE is set (as on our machines), and then every process compiles torch,
# diffusers and transformers from source again: 36 s instead of 14 s before the script's --help.
$(STAMP): pyproject.toml $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv==$(UV_VERSION)
	$(UV_MIRROR); $(UV) pip install -q --compile-bytecode --python $(PY) -r $(LOCK) && \
		$(UV) pip install -q --compile-bytecode --python $(PY) --no-deps -e .
	touch $(STAMP)

# accelerate launch runs a CPU process on OMP_NUM_THREADS threads, 1 when unset: the demo takes every core.
DEMO_THREADS ?= $(shell nproc 2>/dev/null || echo 1)

demo: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$(DEMO_THREADS)} $(VENV)/bin/accelerate launch --config_file accelerate_config.yaml train_scripts/train_text_to_image_lora.py

# The tests run TEST_WORKERS at a time (pytest-xdist worker processes); `make test TEST_WORKERS=0`
# runs them in this one process. Tests marked xdist_group("name") run on one worker, one after
# another (they share a module fixture). Each test still uses one torch thread per process.
TEST_WORKERS ?= 2
PYTEST = $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

test: $(STAMP)
	$(PYTEST) -m "not slow and not fuzz"

test-slow: $(STAMP)
	$(PYTEST) -m slow

# The property-based suite at full length (the fast suite runs each property on a few dozen examples).
test-fuzz: $(STAMP)
	$(PYTEST) -m fuzz

test-all: $(STAMP)
	$(PYTEST)

# Re-resolve requirements.lock: the newest versions inside pyproject.toml's ranges, for every platform.
lock: $(STAMP)
	$(UV_MIRROR); $(UV) pip compile -q --universal --extra train --extra test pyproject.toml -o $(LOCK)

bench: $(STAMP)
	$(PY) benchmarks/bench_lora.py

bench-breakdown: $(STAMP)
	$(PY) benchmarks/layer_breakdown.py

bench-lowmem: $(STAMP)
	$(PY) benchmarks/lowmem.py

bench-quant: $(STAMP)
	$(PY) benchmarks/quant_base.py

# LoRA, DoRA, LoHa, LoKr at matched parameter counts: step-time ratios on the SD-shaped UNet, and the
# embedded run's concept score and drift for each (4 kinds x 3 seeds, about 40 minutes).
bench-kinds: $(STAMP)
	$(PY) benchmarks/adapter_kinds.py

bench-kinds-demo: $(STAMP)
	$(PY) benchmarks/kinds_demo.py

bench-smoke: $(STAMP)
	$(PY) benchmarks/bench_lora.py --smoke
	$(PY) benchmarks/layer_breakdown.py --smoke
	$(PY) benchmarks/lowmem.py --smoke
	$(PY) benchmarks/quant_base.py --smoke
	$(PY) benchmarks/adapter_kinds.py --smoke

clean-venv:
	rm -rf $(VENV)
