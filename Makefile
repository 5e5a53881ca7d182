# Set-up is part of every target: `make demo` and `make test` work on a fresh clone.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed-stamp
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test install clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e ".[test,examples]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python examples/quickstart.py

# Two pytest workers, one test file each at a time (module fixtures train once per file):
# the suite is mostly single-threaded tracing, so two files at once use both CI cores.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile --durations=10

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
