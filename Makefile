# ganforge: the two commands a newcomer runs are `make demo` and `make test`.
# Both create .venv when missing and install the project into it.

VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	# torch==2.14.1 / torchvision==0.29.1 come from this machine's wheel cache via pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/ganforge shard
	@echo "shards written to data/shards (see data/shards/manifest.json)"

test: install
	$(BIN)/pytest -q

bench: install
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_metrics.py

clean:
	rm -rf data/shards runs mlruns mlartifacts mlflow.db .cache
