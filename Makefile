# The tasks people and CI share. After ./install.sh --dev --engines all (CI: .ci/run):
#   make lint          ruff, ruff format --check, mypy over src, tests and benchmarks
#   make unit          the tests without a model (seconds)
#   make integration   the real server with the real model, on every installed engine
#   make test          all three, as CI runs them
#   make format        let ruff fix and format what it can
#   make screenshots   the web page's browser tests, saving README's screenshots (docs/images)
VENV ?= .venv
PY := $(VENV)/bin/python
CODE := src tests benchmarks

.PHONY: lint unit integration test format screenshots

lint:
	$(PY) -m ruff check $(CODE)
	$(PY) -m ruff format --check $(CODE)
	$(PY) -m mypy

unit:
	$(PY) -m pytest -m unit

integration:
	$(PY) -m pytest -m integration

test: lint unit integration

format:
	$(PY) -m ruff check --fix $(CODE)
	$(PY) -m ruff format $(CODE)

screenshots:
	SCREENSHOTS_DIR=docs/images $(PY) -m pytest tests/integration/test_web_ui.py
