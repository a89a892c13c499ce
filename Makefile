# The two commands: `make serve` and `make test`. Each creates .venv if missing and installs
# what it needs (torch first, from the CPU wheel on disk, so no dependency drags in another).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
MODEL  ?= smollm2-135m-instruct
PYTEST_ARGS ?=

.PHONY: serve test test-all install pull lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

pull: $(STAMP)
	$(VENV)/bin/llamatron pull $(MODEL)

serve: $(STAMP)
	$(VENV)/bin/llamatron serve $(MODEL)

# CI: the whole suite except tests marked big/slow (those need the 491 MB model or minutes).
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q -m "" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
