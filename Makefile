# Quick start: `make run` (the main job), `make test` (the test suite).
# Both create .venv and install pinned dependencies on first use.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test sweep compare schema clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

run: install
	$(BIN)/pocketfl simulate

test: install
	$(BIN)/python -m pytest

# Accuracy against uplink bits per parameter (about 20 minutes on 2 cores).
sweep: install
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[bench]"
	$(BIN)/python benchmarks/har_sweep.py --output-dir runs/sweep

# Uncompressed FedAvg against the default compression on 1,000 simulated
# cellular phones, 10% a round: writes runs/compare/compare.md and three PNG
# plots (about 5 minutes on 2 cores). Phones with a few windows each learn
# faster at learning rate 0.5 than at the main job's 0.05.
compare: install
	$(BIN)/pocketfl compare --devices cellular --clients 1000 --partitioning dirichlet:0.5 \
		--fraction-train 0.1 --over-selection 1.3 --rounds 40 --learning-rate 0.5 \
		--output-dir runs --name compare

# Regenerate docs/report-schema.json after changing server/report.py.
schema: install
	$(BIN)/python -c "from pocketfl.server.report import report_json_schema; print(report_json_schema(), end='')" > docs/report-schema.json

clean:
	rm -rf $(VENV) runs .pytest_cache
