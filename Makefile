# Two commands a newcomer needs: `make run` (start the service) and `make test` (run the tests).
# Both create .venv and install everything on a fresh machine first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

INFINITY_VENV := .venv-infinity
INFINITY_STAMP := $(INFINITY_VENV)/.installed

.PHONY: run test bench lint install clean nginx chromium

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a CPU build from this machine's local file; an open range would pull CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,bench,fit]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m serve_app

test: $(STAMP) nginx chromium
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The benchmark (bench/compare.py): our service against the raw forward pass, sentence-transformers and
# Infinity. Infinity pins an older transformers, so it gets a virtualenv of its own (torch pinned first, as
# above; its torchvision wheel breaks BERT imports on CPU torch, so it goes). GPU=1: the same on the CUDA card.
$(INFINITY_STAMP):
	test -d $(INFINITY_VENV) || $(PYTHON) -m venv $(INFINITY_VENV)
	$(INFINITY_VENV)/bin/pip install -q --upgrade pip
	$(INFINITY_VENV)/bin/pip install -q torch==2.13.0
	$(INFINITY_VENV)/bin/pip install -q "infinity-emb[all]==0.0.78" torch==2.13.0
	$(INFINITY_VENV)/bin/pip uninstall -q -y torchvision
	touch $@

bench: $(STAMP) $(INFINITY_STAMP)
	$(BIN)/python -m bench.compare $(if $(GPU),--gpu,)

# tests/test_nginx.py runs the load-balancer config (deploy/nginx.conf) through a real nginx, so `make test`
# installs Debian's nginx where it is missing (sudo only when not root). `make run` does not need it.
# nginx-light is bookworm's small flavour; later releases dropped it, hence the fallback to nginx.
nginx:
	@if command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx; then :; else \
	  SUDO=$$(test "$$(id -u)" -eq 0 || echo sudo); \
	  echo "nginx not found: installing Debian's nginx-light for tests/test_nginx.py"; \
	  $$SUDO apt-get update -q && \
	  { $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nginx-light || \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nginx; }; \
	fi

# tests/test_playground.py drives serve_app/static/playground.html in headless Chromium through Selenium, so
# `make test` installs Debian's chromium and chromium-driver where either is missing (sudo only when not root).
chromium:
	@if test -x /usr/bin/chromium && test -x /usr/bin/chromedriver; then :; else \
	  SUDO=$$(test "$$(id -u)" -eq 0 || echo sudo); \
	  echo "chromium/chromedriver not found: installing Debian's chromium and chromium-driver for tests/test_playground.py"; \
	  $$SUDO apt-get update -q && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check serve_app tests bench
	$(BIN)/ruff format --check serve_app tests bench

clean:
	rm -rf $(VENV) $(INFINITY_VENV) .run .pytest_cache
