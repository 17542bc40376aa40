# Set-up and the two documented commands. `make demo` trains the default recipe; `make test` runs the
# whole suite and the strict docs build. Both create .venv on first use (CPU torch first, so no CUDA
# build is pulled).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,docs,data]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/adaptive train recipes/mor_expert.yaml

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir $(VENV)/site

docs: $(STAMP)
	$(VENV)/bin/mkdocs serve

clean:
	rm -rf $(VENV) site .pytest_cache .hypothesis
