# Set-up is part of every target: `make demo` and `make test` work on a fresh clone.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed-stamp
export TF_CPP_MIN_LOG_LEVEL ?= 2
export NO_MKDOCS_2_WARNING ?= 1

.PHONY: demo test docs install clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e ".[test,examples,docs]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python examples/quickstart.py

# The docs site must build without a warning (broken links, anchors, API references), then
# two pytest workers, one test file each at a time (module fixtures train once per file):
# the suite is mostly single-threaded tracing, so two files at once use both CI cores.
# --no-loadscope-reorder keeps the file order of tests/conftest.py (longest files first);
# xdist's default order, most tests first, left the long example files for last.
test: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --quiet --site-dir build/site
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=10

# The documentation site at http://127.0.0.1:8000, rebuilt on every edit.
docs: $(STAMP)
	$(VENV)/bin/mkdocs serve

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache
