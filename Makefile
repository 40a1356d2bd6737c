# Two commands do all the set-up:  `make demo` (one claim answered on the embedded data + tables) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# exact versions the README's numbers were made with; LOCK=requirements.txt installs from the ranges instead
LOCK   ?= requirements-lock.txt

.PHONY: setup demo tables reference test test-fast test-lowest prices perf selfcheck gpu-check slurm-up slurm-down clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-lock.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# The demo answers a claim: KD's gap on the embedded data (the degradation suite's weak-augmentation setting, the
# student alone and KD, each tuned on held-out data), at the 10 seeds that `run.py --seeds-for gap` computes from the
# reference runs (their paired SD, the suite's smallest effect of interest 1.9 points, 80% power): 50 runs, ~7 min
DEMO ?= --suite degradation --filter augment=weak --filter method=ce,kd --axis seed=0..9
demo: $(STAMP)            ## answer one claim on this machine's CPU (~7 min on 2 cores), then the tables and the scoreboard
	$(PY) benchmarks/run.py $(DEMO)
	$(PY) analysis/make_tables.py
	$(PY) analysis/make_tables.py --claims

tables: $(STAMP)
	$(PY) analysis/make_tables.py

reference: $(STAMP)       ## rebuild the committed reference reports (every suite's, the claims scoreboard) from the committed reference runs
	rm -rf .cache/reference
	$(PY) analysis/make_tables.py --results docs/reference/runs --out .cache/reference --format md
	cp .cache/reference/*_tiny.md .cache/reference/claims.md docs/reference/

test: $(STAMP)            ## every test, two workers (the Slurm ones need root + slurm/local_cluster.sh install)
	$(PY) -m pytest -q -n 2 --dist loadgroup

test-fast: $(STAMP)       ## the tests not marked slow or slurm (a few minutes)
	$(PY) -m pytest -q -m "not slurm and not slow"

LOWEST ?= .venv-lowest
test-lowest: $(STAMP)     ## the fast tests at the lowest versions requirements.txt allows (uv --resolution lowest-direct)
	$(PY) -m pip install -q uv
	rm -rf $(LOWEST) && $(VENV)/bin/uv venv -q $(LOWEST) --python $(PY)
	# wheels only: each bound's lowest version built for this Python (3.10/3.11: torch 2.4.0, numpy 1.24.1, pandas
	# 2.0.0; on 3.12 the first with cp312 wheels, e.g. numpy 1.26.0, pandas 2.1.1), never a source build
	$(VENV)/bin/uv pip install -q --python $(LOWEST)/bin/python --resolution lowest-direct --only-binary :all: -r requirements.txt
	$(LOWEST)/bin/python -c "import torch, timm, numpy, pandas; print('lowest direct versions: torch', torch.__version__, 'timm', timm.__version__, 'numpy', numpy.__version__, 'pandas', pandas.__version__)"
	$(LOWEST)/bin/python -m pytest -q -n 2 -p no:cacheprovider -m "not slurm and not slow"

prices: $(STAMP)          ## regenerate benchmarks/prices.json (the price book the claims scoreboard reads)
	$(PY) benchmarks/prices.py

perf: $(STAMP)
	$(PY) benchmarks/perf.py --json perf.json

selfcheck: $(STAMP)
	$(PY) -m mkd.selfcheck

gpu-check: $(STAMP)       ## GPU acceptance check: what the price needs (rates, real pairs, cohort, memory, checkpoint, loader), self-check, compile+bf16 MKD, DDP; CPU-sized on a CPU; GPU_CHECK_ARGS=--record keeps it
	$(PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

slurm-up:
	slurm/local_cluster.sh start && slurm/local_cluster.sh env

slurm-down:
	slurm/local_cluster.sh stop

clean:
	rm -rf results tables/*.md tables/*.tex tables/*.html tables/*.csv tables/*.png tables/*.pdf
	git checkout -- tables/paper_reference.csv
