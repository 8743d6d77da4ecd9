# The two commands: `make demo` (the main job on the embedded default) and `make test`.
# Both create the local virtualenv .venv on first use; nothing else needs installing by hand.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.convlora-installed

.PHONY: demo test test-slow test-all bench bench-breakdown bench-smoke clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[train,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/accelerate launch --config_file accelerate_config.yaml train_scripts/train_text_to_image_lora.py

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_lora.py

bench-breakdown: $(STAMP)
	$(PY) benchmarks/layer_breakdown.py

bench-smoke: $(STAMP)
	$(PY) benchmarks/bench_lora.py --smoke
	$(PY) benchmarks/layer_breakdown.py --smoke

clean-venv:
	rm -rf $(VENV)
