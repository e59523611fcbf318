# Two commands do all set-up on a fresh machine:  `make run` (main job)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run test clean

# torch is installed first, pinned to the CPU build (2.13.0), so nothing pulls a multi-GB CUDA wheel.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# the main job: synthetic data -> semantic IDs -> AR-NTP / FV-MLE / parallel heads -> report.md
run: $(STAMP)
	$(VENV)/bin/sidrec run --out runs/synthetic

test: $(STAMP)
	$(PY) -m pytest -q -n 2

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
