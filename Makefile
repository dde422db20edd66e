# `make test` and `make demo` work on a fresh machine: they install uv (with pip) if it is
# missing and create .venv from the committed uv.lock.
SHELL := /bin/bash
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
VENV_STAMP := .venv/.synced-stamp

.PHONY: test lint demo bench clean web

$(VENV_STAMP): pyproject.toml uv.lock
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 \
		|| python3 -m pip install --quiet uv
	# Bytecode compiled once here (≈ 30 s on 2 cores), as pip does on install: otherwise every
	# process compiles its imports from source where PYTHONDONTWRITEBYTECODE is set (CI, this
	# sandbox): seconds per test subprocess and Dask worker, 0.2 s inside a run's first slide.
	$(UV) sync --frozen --all-groups --compile-bytecode
	@touch $@

# The browser viewer of `wsiseg serve`: OpenSeadragon from npm, pinned by web/package-lock.json,
# copied into the package (never into git). Without npm the server runs without its viewer.
OSD_DIR := pipeline/wsiseg/serve/static/vendor/openseadragon
OSD_STAMP := $(OSD_DIR)/.built-stamp

web: $(OSD_STAMP)

$(OSD_STAMP): web/package.json web/package-lock.json
	@if ! command -v npm >/dev/null 2>&1; then \
		echo "npm not found: the browser viewer of wsiseg serve is not built (make web)"; \
	elif ! (cd web && npm ci --no-audit --no-fund --loglevel=error); then \
		echo "npm ci failed (offline?): the browser viewer of wsiseg serve is not built"; \
	else \
		rm -rf $(OSD_DIR) && mkdir -p $(OSD_DIR) && \
		cp -R web/node_modules/openseadragon/build/openseadragon/openseadragon.min.js \
		      web/node_modules/openseadragon/build/openseadragon/images \
		      web/node_modules/openseadragon/LICENSE.txt $(OSD_DIR)/ && \
		touch $@; \
	fi

lint: $(VENV_STAMP)
	$(UV) run --frozen --no-sync ruff check pipeline tests scripts

test: lint web
	$(UV) run --frozen --no-sync pytest -q

demo: $(VENV_STAMP)
	$(UV) run --frozen --no-sync wsiseg demo --out demo-out

clean:
	rm -rf .venv demo-out .pytest_cache .ruff_cache web/node_modules $(OSD_DIR)
