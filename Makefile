# lenet_sweep — every target installs what it needs first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A GPU machine gets the CUDA build of TensorFlow; everything else the CPU build.
TF_EXTRA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
# The dataset folder (train/ and val/); empty: download Imagenette into the Keras cache.
DATA ?= $(wildcard ../shared/datasets/imagenette)
ARGS ?=

.PHONY: install browser postgres lint fmt test sweep sweep-chief sweep-worker mlflow-server distributed-demo report ui \
	reproduce bench replay clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(TF_EXTRA),test]"
	touch $@

# Debian's Chromium for the end-to-end test of the MLflow UI (tests/test_ui.py drives it with Playwright;
# no browser download). Where it cannot be installed (not root, no apt) that test is skipped, saying why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "Chromium could not be installed: the browser test will be skipped"

# Debian's PostgreSQL server for the distributed tests (tests/test_distributed.py starts a private cluster of
# it as the postgres user, on a free port, and removes it after). Where it cannot be installed, say so.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } \
		|| echo "PostgreSQL could not be installed: the distributed tests will run on SQLite only"

# ruff (configured in pyproject.toml): `make lint` checks only, `make fmt` rewrites.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# pytest-xdist: TEST_WORKERS processes, each test file kept in one (its module fixtures are built once); many
# tests wait on processes they start, so two workers on two cores take ~60 % of the serial time.
TEST_WORKERS ?= 2
test: install browser postgres lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

# The default sweep (conf/sweep.yaml): KerasTuner over conf/search/default.yaml, every trial in MLflow.
sweep: install
	$(PY) -m lenet_sweep.sweep $(if $(DATA),'data.root="$(DATA)"') $(ARGS)

# Distributed sweeps (docs/DISTRIBUTED.md): one chief, any number of workers, one MLflow tracking server.
# CHIEF is the chief's HOST:PORT (gRPC, plaintext: loopback or a private network); WORKER names a worker.
CHIEF ?= 127.0.0.1:8000
WORKER ?= $(shell hostname)-w0
sweep-chief: install
	$(PY) -m lenet_sweep.sweep sweep.role=chief sweep.chief=$(CHIEF) $(if $(DATA),'data.root="$(DATA)"') $(ARGS)

sweep-worker: install
	$(PY) -m lenet_sweep.sweep sweep.role=worker sweep.worker_id=$(WORKER) sweep.chief=$(CHIEF) \
		$(if $(DATA),'data.root="$(DATA)"') $(ARGS)

# MLflow's tracking server on 127.0.0.1:$(PORT) (5001): SQLite under mlruns/server/, or PostgreSQL when
# MLFLOW_BACKEND_STORE_URI=postgresql+psycopg://USER@HOST:PORT/DB is set (conf/server.yaml).
mlflow-server: install
	$(PY) -m lenet_sweep.server $(ARGS)

# A tracking server, a chief and 2 workers on 127.0.0.1 over DATA, then one line per check (conf/demo.yaml).
distributed-demo: install
	$(PY) -m lenet_sweep.demo $(if $(DATA),'data.root="$(DATA)"') $(ARGS)

# The sweep report (conf/report.yaml) of the latest sweep in the store: reports/<sweep>/report.{md,html}.
report: install
	$(PY) -m lenet_sweep.report $(ARGS)

# One recorded trial (ARGS="sweep.name=NAME trial=ID") or `best` retraining (ARGS="run=RUN_ID") trained again and
# compared epoch by epoch with what it recorded (conf/replay.yaml); non-zero exit when it differs.
replay: install
	$(PY) -m lenet_sweep.replay $(ARGS)

# The MLflow UI on the project's store (mlruns/, or MLFLOW_TRACKING_URI) at http://127.0.0.1:$(PORT) (5000).
ui: install
	$(PY) -m lenet_sweep.ui $(ARGS)  # conf/ui.yaml reads PORT and MLFLOW_TRACKING_URI (env or make's)

reproduce: install
	$(PY) -m lenet_sweep.reproduce $(if $(DATA),'data.root="$(DATA)"') $(ARGS)

# Seconds per epoch of lenet_sweep vs plain Keras, and GFLOP/s vs matmul (lenet_sweep/bench.py).
bench: install
	$(PY) -m lenet_sweep.bench $(if $(DATA),'data.root="$(DATA)"') $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
