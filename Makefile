# Every install step lives here: a fresh clone needs only `make demo` or `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel of this torch is on the build machines; an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_DISABLE_TELEMETRY := 1
export HF_HUB_OFFLINE := 1

# The Azure Blob emulator (Azurite, from the npm registry, pinned by its lock file) that the tests
# start on 127.0.0.1; the Google Cloud Storage emulator is a Python package of the dev extras.
EMULATORS := tests/emulators
AZURITE := $(EMULATORS)/node_modules/.bin/azurite-blob

# The benchmark gets a venv of its own: mergekit's dependencies must not move the tested ones.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed

.PHONY: install demo effect test test-fast fuzz docs bench bench-node clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,gcs,azure,docs]"
	touch $(STAMP)

$(AZURITE): $(EMULATORS)/package.json $(EMULATORS)/package-lock.json
	npm ci --prefix $(EMULATORS) --no-audit --no-fund --loglevel=error
	touch $(AZURITE)

# The main job on the embedded default (local files): example checkpoints, run, verify.
demo: install
	$(PY) -m graft.cluster.demo demo >/dev/null
	rm -rf demo/output
	$(VENV)/bin/graft run configs/demo.yaml
	$(VENV)/bin/graft verify demo/output >/dev/null
	@echo
	@echo "Output: $(CURDIR)/demo/output (verified against SHA256SUMS and graft.manifest.json)"
	@echo "Next:   $(VENV)/bin/graft report demo/output      # the transfer report, and a per-layer PNG"
	@echo "        $(VENV)/bin/graft inspect demo/output"
	@echo "        $(VENV)/bin/graft plan configs/demo.yaml --set alpha=0.5 --set output=demo/output-half"
	@echo "        point a copy of configs/demo.yaml at your own checkpoints and run: graft run my.yaml"

# The paper's effect at toy scale (examples/effect, docs/effect.md): tiny Llamas trained here on
# synthetic data, transfers with graft, evaluated; about 2 minutes on 2 cores, CPU only. Rewrites
# examples/effect/results/ (results.json, results.md, accuracy.png), which the docs page shows.
effect: install
	$(PY) -m examples.effect.run --out examples/effect/results

test: install $(AZURITE)
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q tests/unit

# The docs site into site/ (mkdocs.yml; the reference pages and benchmark tables are generated as it
# builds). `make test` builds it too, with --strict, in a temporary directory.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# The header and index fuzz tests with many more examples than `make test` runs (minutes, not seconds).
fuzz: install
	HYPOTHESIS_PROFILE=long $(PY) -m pytest -q tests/unit/test_fuzz_headers.py

$(BENCH_STAMP): pyproject.toml
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(BENCH_VENV)/bin/python -m pip install -q -e ".[bench]"
	touch $(BENCH_STAMP)

# Generates the checkpoints once (bench/data, ~10.5 GB with the node benchmark's), then measures
# everything in one run: bench/results.json, rendered into bench/results.md and the README's Measured
# block (bench/render.py), and bench/results.png.
bench: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python -m bench.run

# The node benchmark alone (bench/node.py): floors, graft local / CUDA / Ray rows on three generated
# trios; GPU rows when torch sees a GPU. SIZE: GB of inputs per trio.
SIZE ?= 3
bench-node: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python -m bench.node --size $(SIZE) --out bench

clean:
	rm -rf $(VENV) $(BENCH_VENV) build site *.egg-info demo .pytest_cache $(EMULATORS)/node_modules
