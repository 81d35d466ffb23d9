# vpt-serve: `make serve` runs the embedded server, `make test` runs the suite.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Linux wheels of torch on PyPI are CUDA builds (~5.5 GB with their NVIDIA libraries); on a CPU-only
# host: make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

.PHONY: install serve demo test compose-test bench lint clean

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "python3.11 not found; set PYTHON=..."; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml client/pyproject.toml
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[dev]' -e ./client
	@touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)  # front-end processes + one engine process (VPT_FRONTEND_WORKERS=0: one process)
	$(VENV)/bin/vpt-serve serve

demo: $(STAMP)
	$(VENV)/bin/vpt-serve demo demo

test: $(STAMP)
	@command -v redis-server >/dev/null 2>&1 || { echo "redis-server is needed by the tests: apt-get install -y redis-server"; exit 1; }
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The compose stack for real on this host's Docker engine (stand-in base images, no Docker Hub
# needed; the first build downloads torch into the image). Not part of `make test`. docs/deploy.md.
# COMPOSE chooses the Compose command ("docker compose", docker-compose, a v2 binary's path);
# empty: `docker compose` when the docker CLI has it, else docker-compose.
COMPOSE ?=
compose-test: $(STAMP)
	@command -v docker >/dev/null 2>&1 || { echo "docker is needed: apt-get install -y docker.io docker-compose debootstrap"; exit 1; }
	VPT_COMPOSE_TEST_COMMAND='$(COMPOSE)' nice -n 10 $(PY) -m pytest -q -s -p no:cacheprovider -m docker tests/deploy $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/engine.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
