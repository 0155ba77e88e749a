# The README's commands. `make run` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help

UV_VERSION := 0.13.9
UV := .tools/bin/uv
# On a GPU host: make install UV_EXTRAS="--extra and-cuda" (and keep passing it: a plain sync drops the extra).
UV_EXTRAS ?=
# One install stamp per set of extras, so changing UV_EXTRAS re-syncs ("-pyc": environments made before
# the bytecode was compiled at install are synced once more).
STAMP := .venv/.installed-pyc$(shell printf '%s' '$(UV_EXTRAS)' | tr -c 'A-Za-z0-9' '_')
PY := .venv/bin/python
LOCAL_MIRROR := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Keep Prefect's state (and its temporary server's SQLite file) inside the project, and stay offline.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export GX_ANALYTICS_ENABLED := false
# Use the machine's Python (3.11-3.13); never download one.
export UV_PYTHON_DOWNLOADS := never

# The operator's Prefect server (make server) and what talks to it.
PREFECT := .venv/bin/prefect
PREFECT_PORT ?= 4200
PREFECT_HOST ?= 127.0.0.1
SERVER := PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api
CPU_POOL := fashion-mnist-cpu
GPU_POOL := fashion-mnist-gpu
# The rollout judge and the champion's watch: on a pool of their own, never queued behind a retrain; two at
# once (each deployment one at a time), so that the judge never waits behind a long watch either.
WATCH_POOL := fashion-mnist-watch
PARAMS ?= {}
DEPLOYMENT ?= adhoc
# The server's database: sqlite (one person; under PREFECT_HOME) or postgres (a cluster of its own under
# $(PREFECT_HOME)/postgres: initdb once, loopback only, a free port, a generated password kept there, 0600;
# as root, its data under ~postgres when the postgres user cannot reach that folder: no folder is widened).
DB ?= sqlite
# How long a worker, a deploy or a run waits for the API to answer, trying visibly, before it fails.
API_WAIT_S ?= 60
WAIT_FOR_API = $(SERVER) $(FASHION_MNIST) wait-for-api --timeout-s $(API_WAIT_S)
# Seconds between flow-run heartbeats (Prefect's minimum is 30); a run silent for three is marked Crashed.
FMNIST_HEARTBEAT_S ?= 60
# FMNIST_START_WINDOW_S=N: a run handed to a worker that has not started N s later is marked Crashed
# (unset: fmnist.ops.automations.START_WINDOW_S).
FASHION_MNIST := .venv/bin/fashion-mnist
# The prediction server (make serve): the registry it serves from, and where it listens.
REGISTRY ?= artifacts
SERVE_HOST ?= 127.0.0.1
SERVE_PORT ?= 8501
SERVE_GRPC_PORT ?= 8500

# The cluster deployments (hosts that share no disk): where the code and the data are.
FMNIST_REPO_URL ?= $(shell git remote get-url origin 2>/dev/null)
FMNIST_COMMIT ?= $(shell git rev-parse HEAD 2>/dev/null)
FMNIST_GPU_REQUIREMENTS ?= requirements/gpu.txt
FMNIST_DATA_ROOT ?=
FMNIST_REGISTRY_ROOT ?=

# The per-run install step of the cluster deployments reads these, exported from uv.lock.
EXPORT := $(UV) export --frozen --no-default-groups --no-emit-project --no-header -q
REQUIREMENTS_HEADER := \# Generated from uv.lock by make requirements; the cluster deployments install it on each run.

.PHONY: help install data postgres edge run test test-recovery test-slow test-quick test-all lint format docs docs-serve bench bench-storage bench-review bench-serve loop-demo bench-train bench-presets bench-scale bench-estimates bench-rollout serve server pools deploy deploy-cluster worker-cpu worker-gpu worker-watch \
	retrain-now requirements automations webhook prune

help:
	@echo "make run     install, get the data, run the pipeline once"
	@echo "make test    install, get the data, run the tests (make test-slow: the real-data training too)"
	@echo "make test-recovery   the end-to-end failures and their recovery (restarts, stopped workers, crashed runs); CI runs them too"
	@echo "make test-quick / test-all   without training, the Prefect stack or server processes (minutes) / every tier"
	@echo "make lint    ruff check and format check"
	@echo "make docs    build the docs site into site/ (strict: a broken link fails); make docs-serve: on 127.0.0.1:8000"
	@echo "make bench   data-stage timings on the real data; make bench-storage: local disk against S3"
	@echo "make bench-train   training speed and a whole run against the tutorial script; make bench-presets: each preset's accuracy"
	@echo "make bench-scale   data stages, memory and an epoch at 1x, 10x and 100x the training set"
	@echo "make bench-estimates   the label-free accuracy estimates' error and the drift tests on shifted test images"
	@echo "make bench-rollout   a canary rollout's time to the judge's decision, the watch's drift delay and false alarms, evidence's serving cost"
	@echo "make serve   serve the champion through the edge (nginx) on $(SERVE_HOST): REST $(SERVE_PORT), gRPC $(SERVE_GRPC_PORT) (make bench-serve: its load test)"
	@echo "make loop-demo   the feedback loop step by step: serve with capture, review, submit, the retrain, the new champion served"
	@echo "make server  start a Prefect server and UI on 127.0.0.1:$(PREFECT_PORT) (DB=postgres: on a PostgreSQL of its own)"
	@echo "make deploy  create the work pools, deploy the single-host deployments and apply automations.yaml"
	@echo "make webhook WEBHOOK_URL=https://...   where failures, crashes and promotions are POSTed (then make deploy)"
	@echo "make deploy-cluster FMNIST_DATA_ROOT=s3://... FMNIST_REGISTRY_ROOT=s3://...   the cluster deployments"
	@echo "make worker-cpu / worker-gpu / worker-watch   start a worker for the CPU / GPU pool, or for the rollout judge and the champion's watch"
	@echo "make retrain-now PARAMS='{\"training\": {\"epochs\": 10}}'   run the ad-hoc deployment"
	@echo "make prune   delete old run folders (KEEP_LAST=20 KEEP_DAYS=14; never a version's or a running one)"
	@echo "make requirements   export requirements/*.txt from uv.lock (after changing the lock)"

$(UV):
	python3 -m pip install --quiet --disable-pip-version-check --target .tools uv==$(UV_VERSION)

# --compile-bytecode: uv, unlike pip, leaves the .pyc files to the first import, and where Python may not
# write them (PYTHONDONTWRITEBYTECODE, a read-only environment) every process would compile TensorFlow,
# Prefect and GX from source again, in every run, worker and test process: importing them took 6.7, 1.9
# and 5.4 s here instead of 2.4, 0.7 and 2.2 s. About 12 s once, at install.
$(STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --compile-bytecode $(UV_EXTRAS)
	@touch $@

install: $(STAMP)

# Debian's dataset-fashion-mnist is the first (offline) mirror; elsewhere the upstream mirrors serve.
data:
	@if [ -f $(LOCAL_MIRROR)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST local mirror: $(LOCAL_MIRROR)"; \
	elif command -v apt-get >/dev/null; then \
	  echo "Installing Debian's dataset-fashion-mnist into $(LOCAL_MIRROR)"; \
	  $(SUDO) apt-get install -y -q dataset-fashion-mnist \
	    || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist; } \
	    || echo "Could not install dataset-fashion-mnist: the pipeline will try the upstream mirrors"; \
	else \
	  echo "No apt-get here: the pipeline will download from the upstream mirrors"; \
	fi

# PostgreSQL for the Prefect server (make server DB=postgres, and the end-to-end tests): Debian's package.
POSTGRES_FOUND := command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
postgres:
	@if $(POSTGRES_FOUND); then \
	  echo "PostgreSQL: $$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | tail -1 || command -v initdb)"; \
	elif command -v apt-get >/dev/null; then \
	  echo "Installing Debian's postgresql (the server's database in the end-to-end tests)"; \
	  $(SUDO) apt-get install -y -q postgresql \
	    || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q postgresql; }; \
	else \
	  echo "No PostgreSQL and no apt-get: install PostgreSQL (initdb, postgres), then run this again"; exit 1; \
	fi

run: install data
	$(PY) -m flows.run_once

# Test files run in parallel, each whole in one of TEST_WORKERS processes (pytest-xdist): the e2e
# files spend most of their time waiting on servers, workers and triggers, so three processes keep 2 cores
# busy (two left a quarter of the CPU idle). The e2e files go first (tests/conftest.py); xdist would
# otherwise hand out the files with the most tests first, and the e2e files ran last, one after another.
# (One process for all the e2e files, --dist loadgroup, was slower.) The slowest tests are listed at the
# end, to keep the tier in its budget.
TEST_WORKERS ?= 3
# The tests start hundreds of Python processes (servers, workers, flow runs, CLIs): where
# PYTHONDONTWRITEBYTECODE is set, each compiled the project's modules again, and each test process
# rewrote every test module's asserts again. Here the project's bytecode is written (its __pycache__ is ignored by git).
PYTEST := env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest
PARALLEL = -n $(1) --dist loadfile --no-loadscope-reorder
PYTEST_PARALLEL := $(call PARALLEL,$(TEST_WORKERS))

test: install data postgres edge
	$(PYTEST) -m "not slow and not recovery" $(PYTEST_PARALLEL) --durations=15

# The end-to-end failures and what recovers from them, a minute or more each: servers and databases
# restarted mid-training, workers stopped or never started, crashed training runs, a replacement GPU host.
# CI runs them after make test. Two processes: their failures are timed (missed heartbeats, restarts),
# and the tier is measured at two.
RECOVERY_WORKERS ?= 2
test-recovery: install data postgres edge
	$(PYTEST) -m "recovery and not slow" $(call PARALLEL,$(RECOVERY_WORKERS)) --durations=10

# An hour of training on the real 70,000 images (three seeds each of dnn, dnn-tuned and cnn), and the
# end-to-end tests that wait minutes: a lost GPU host, the whole feedback loop, servers down for long.
test-slow: install data postgres edge
	$(PYTEST) -m slow

# Tiers you can run alone: the readers, registry, storage and data stages without training, a
# Prefect stack or server processes (about two minutes); and everything, slow tier included.
test-quick: install data
	$(PYTEST) -m "not slow and not e2e and not training and not processes" $(PYTEST_PARALLEL)

test-all: install data postgres edge
	$(PYTEST)

lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	@diff -q <(echo "$(REQUIREMENTS_HEADER)"; $(EXPORT)) requirements/cpu.txt >/dev/null \
	  && diff -q <(echo "$(REQUIREMENTS_HEADER)"; $(EXPORT) --extra and-cuda) requirements/gpu.txt >/dev/null \
	  || { echo "requirements/*.txt do not match uv.lock: run make requirements"; exit 1; }

requirements: $(UV)
	mkdir -p requirements
	{ echo "$(REQUIREMENTS_HEADER)"; $(EXPORT); } > requirements/cpu.txt
	{ echo "$(REQUIREMENTS_HEADER)"; $(EXPORT) --extra and-cuda; } > requirements/gpu.txt

format: install
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .

# The docs site; its reference pages are generated from the code at every build (docs/hooks.py).
docs: install
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet
	@echo "docs built in site/ (open site/index.html)"

docs-serve: install
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs serve --strict --dev-addr 127.0.0.1:8000

bench: install data
	$(PY) bench/data_stages.py

bench-storage: install data
	$(PY) bench/storage.py

# Review on a full feedback folder: the offer chosen streamed against every record read whole, and a submit's drain.
bench-review: install
	$(PY) bench/review.py

# The prediction server under 16 concurrent clients against a bare model.predict loop (needs a champion: make run).
bench-serve: install
	$(PY) bench/serve_load.py --registry $(REGISTRY)

# The closed loop, step by step, on this machine's champion and data (after make run), with make server,
# make deploy, make worker-cpu and make worker-gpu running: serve with capture, review, submit, retrain.
loop-demo: install
	$(SERVER) $(PY) bench/loop_demo.py --registry $(REGISTRY)

# The dnn recipe's epoch and a whole cold run against the tutorial's script, side by side (about 7 minutes).
bench-train: install data
	$(PY) bench/train_speed.py

# The data stages, cache and training epochs at 1x, 10x and 100x the training set, and one more batch on top (about 20 minutes, 12 GB of disk).
bench-scale: install data
	$(PY) bench/scale.py

# Each preset's test accuracy and training time on the real data, seeds 0-2 (about 50 minutes on 2 cores).
bench-presets: install data
	$(PY) bench/preset_accuracy.py

# The label-free accuracy estimates (ATC, CBPE, class mix) against the truth on shifted test images, and whether
# the drift tests flag each shift, with a dnn trained 5 epochs on the real data (a few minutes on 2 cores).
bench-estimates: install data
	$(PY) bench/estimates.py

# After the gate: registration to the judge's decision for an equal and a worse canary (a real server, fixed-rate
# traffic), the watch's periods to drift and its false alarms, and serving throughput with evidence on and off,
# with three dnn versions trained 3 epochs on the real data (about 4 minutes on 2 cores).
bench-rollout: install data
	$(PY) bench/rollout.py

# Serve the registry's champion on $(SERVE_HOST):$(SERVE_PORT) (REST) and $(SERVE_GRPC_PORT) (gRPC) through the edge
# (nginx, which clients meet; the server listens behind it on loopback); follows promotions.
serve: install edge
	$(FASHION_MNIST) --registry $(REGISTRY) serve --edge --host $(SERVE_HOST) --port $(SERVE_PORT) --grpc-port $(SERVE_GRPC_PORT)

# nginx, the edge in front of the prediction server (make serve, and the serving tests): Debian's package.
edge:
	@if command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; then \
	  echo "nginx: $$(command -v nginx || echo /usr/sbin/nginx)"; \
	elif command -v apt-get >/dev/null; then \
	  echo "Installing Debian's nginx (the edge in front of the prediction server)"; \
	  $(SUDO) apt-get install -y -q nginx || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q nginx; }; \
	else \
	  echo "No nginx and no apt-get: install nginx, then run this again"; exit 1; \
	fi

server: install $(if $(filter postgres,$(DB)),postgres)
	@case "$(DB)" in sqlite|postgres) ;; *) echo "DB=$(DB): choose sqlite or postgres"; exit 2;; esac
	# The UI must be told the port: prefect 3.8 otherwise points it at 4200 whatever --port says.
	# PREFECT_UI_URL: the links in notifications.
	PREFECT_UI_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api PREFECT_UI_URL=http://$(PREFECT_HOST):$(PREFECT_PORT) \
	  $(if $(filter postgres,$(DB)),$(PY) -m fmnist.ops.postgres $(PREFECT_HOME)/postgres --) \
	  $(PREFECT) server start --host $(PREFECT_HOST) --port $(PREFECT_PORT)

# Process pools, one run at a time each (the watch pool two), created or updated: safe to repeat.
pools: install
	$(WAIT_FOR_API)
	$(SERVER) $(FASHION_MNIST) pools --pool $(CPU_POOL)=1 --pool $(GPU_POOL)=1 --pool $(WATCH_POOL)=2

deploy: pools
	$(SERVER) FMNIST_PROJECT_DIR=$(CURDIR) FMNIST_HEARTBEAT_S=$(FMNIST_HEARTBEAT_S) \
	  $(PREFECT) --no-prompt deploy --name nightly --name adhoc --name gpu --name judge --name watch
	$(MAKE) --no-print-directory automations

# prefect.yaml cannot hold automations: automations.yaml, created or updated by name (safe to repeat).
automations: install
	$(SERVER) $(FASHION_MNIST) automations apply --file automations.yaml --heartbeat-s $(FMNIST_HEARTBEAT_S) \
	  $(if $(FMNIST_START_WINDOW_S),--start-window-s $(FMNIST_START_WINDOW_S)) \
	  $(if $(RETRAIN_ON_DRIFT),--retrain-on-drift $(RETRAIN_ON_DRIFT))

webhook: install
	@[ -n "$(WEBHOOK_URL)" ] || { echo "set WEBHOOK_URL to the URL notifications are POSTed to"; exit 1; }
	$(SERVER) $(FASHION_MNIST) webhook '$(WEBHOOK_URL)'
	$(MAKE) --no-print-directory automations

KEEP_LAST ?= 20
KEEP_DAYS ?= 14
prune: install
	$(SERVER) $(FASHION_MNIST) --registry $(or $(FMNIST_REGISTRY_ROOT),artifacts) prune-runs \
	  --keep-last $(KEEP_LAST) --keep-days $(KEEP_DAYS)

# Whether every root given is shared by all hosts: the store's answer (no path on this host), not a scheme test.
define SHARED_ROOTS
import sys
from fmnist.storage import Store, normalize
sys.exit(any(Store().direct_path(normalize(root)) is not None for root in sys.argv[1:]))
endef
export SHARED_ROOTS

# Code from git at the pinned commit, everything else in object storage (see prefect.yaml).
deploy-cluster: pools
	@$(PY) -c "$$SHARED_ROOTS" "$(FMNIST_DATA_ROOT)" "$(FMNIST_REGISTRY_ROOT)" 2>/dev/null \
	  || { echo "set FMNIST_DATA_ROOT and FMNIST_REGISTRY_ROOT to locations every host can reach (s3://...)"; exit 1; }
	@[ -n "$(FMNIST_REPO_URL)" ] && [ -n "$(FMNIST_COMMIT)" ] \
	  || { echo "set FMNIST_REPO_URL (no git remote 'origin' here) and FMNIST_COMMIT"; exit 1; }
	@git diff --quiet HEAD 2>/dev/null \
	  || echo "warning: uncommitted changes are not deployed: workers run commit $(FMNIST_COMMIT)"
	$(SERVER) FMNIST_REPO_URL=$(FMNIST_REPO_URL) FMNIST_COMMIT=$(FMNIST_COMMIT) \
	  FMNIST_GPU_REQUIREMENTS=$(FMNIST_GPU_REQUIREMENTS) \
	  FMNIST_DATA_ROOT=$(FMNIST_DATA_ROOT) FMNIST_REGISTRY_ROOT=$(FMNIST_REGISTRY_ROOT) \
	  FMNIST_HEARTBEAT_S=$(FMNIST_HEARTBEAT_S) \
	  $(PREFECT) --no-prompt deploy --name nightly-cluster --name adhoc-cluster --name gpu-cluster \
	  --name judge-cluster --name watch-cluster
	$(MAKE) --no-print-directory automations

worker-cpu: install data
	$(WAIT_FOR_API)
	$(SERVER) $(FASHION_MNIST) worker --pool $(CPU_POOL)

worker-gpu: install
	$(WAIT_FOR_API)
	$(SERVER) $(FASHION_MNIST) worker --pool $(GPU_POOL)

worker-watch: install
	$(WAIT_FOR_API)
	$(SERVER) $(FASHION_MNIST) worker --pool $(WATCH_POOL)

retrain-now: install
	$(WAIT_FOR_API)
	$(SERVER) $(PREFECT) deployment run retrain-fashion-mnist/$(DEPLOYMENT) --param params='$(PARAMS)' --watch
