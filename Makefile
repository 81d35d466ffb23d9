# vpt-serve: `make serve` runs the embedded server, `make test` runs the suite.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install serve test compose-test bench lint clean

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "python3.11 not found; set PYTHON=..."; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml client/pyproject.toml
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]' -e ./client
	@touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)  # front-end processes + one engine process (VPT_FRONTEND_WORKERS=0: one process)
	$(VENV)/bin/vpt-serve serve

test: $(STAMP)
	@command -v redis-server >/dev/null 2>&1 || { echo "redis-server is needed by the tests: apt-get install -y redis-server"; exit 1; }
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The compose stack for real on this host's Docker engine (stand-in base images, no Docker Hub
# needed; the first build downloads torch into the image). Not part of `make test`. docs/deploy.md.
compose-test: $(STAMP)
	@command -v docker >/dev/null 2>&1 || { echo "docker is needed: apt-get install -y docker.io docker-compose debootstrap"; exit 1; }
	nice -n 10 $(PY) -m pytest -q -s -p no:cacheprovider -m docker tests/deploy $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/engine.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
