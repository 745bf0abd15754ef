# ganforge: the two commands a newcomer runs are `make demo` and `make test`.
# Both create .venv when missing and install the project into it.

VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install demo test bench repro mlflow-ui prefect-ui clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	# torch==2.14.1 / torchvision==0.29.1 come from this machine's wheel cache via pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# digits -> shards -> ProGAN 4..32 on local Ray -> FID/KID -> MLflow registry + champion gate,
# orchestrated by a Prefect flow on its embedded local server.
demo: install
	$(BIN)/ganforge pipeline

test: install
	$(BIN)/pytest -q

bench: install
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_metrics.py
	$(PY) benchmarks/bench_vqgan.py
	$(PY) benchmarks/bench_textbook.py
	$(PY) benchmarks/bench_biggan.py
	$(PY) benchmarks/bench_curve.py
	$(PY) benchmarks/bench_stylegan2.py
	$(PY) benchmarks/bench_cyclegan.py

# the same stages through DVC (dvc.yaml iterates dvc-stages.yaml, refreshed from params first); needs a git repository
repro: install
	$(BIN)/ganforge -q dvc-stages
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

mlflow-ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

prefect-ui: install
	$(BIN)/prefect server start --host 127.0.0.1

clean:
	rm -rf data/shards runs mlruns mlartifacts mlflow.db .cache
