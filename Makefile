# The two commands at the top of README.md:
#   make demo   install everything and run the main job end to end
#   make test   install everything and run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WEIGHTS ?= auto
MODEL_DIR ?= artifacts/model
OUT ?= out

.PHONY: venv demo test lint proto bench clean

# One venv for everything; reinstalled when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[server,dev]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) scripts/demo.py --weights $(WEIGHTS) --model-dir $(MODEL_DIR) --out $(OUT)

test: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

proto: venv
	$(PY) scripts/gen_proto.py

clean:
	rm -rf $(VENV) artifacts $(OUT) .pytest_cache .ruff_cache
