# `make test` and `make demo` work on a fresh machine: they install uv (with pip) if it is
# missing and create .venv from the committed uv.lock.
SHELL := /bin/bash
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
VENV_STAMP := .venv/.synced-stamp

.PHONY: test lint demo bench clean

$(VENV_STAMP): pyproject.toml uv.lock
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 \
		|| python3 -m pip install --quiet uv
	$(UV) sync --frozen --all-groups
	@touch $@

lint: $(VENV_STAMP)
	$(UV) run --frozen --no-sync ruff check pipeline tests scripts

test: lint
	$(UV) run --frozen --no-sync pytest -q

demo: $(VENV_STAMP)
	$(UV) run --frozen --no-sync wsiseg demo --out demo-out

clean:
	rm -rf .venv demo-out .pytest_cache .ruff_cache
