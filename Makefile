# The two commands of the README: `make run` (the notebook, headless, on the embedded dataset) and `make test`;
# `make run-digits` runs it on the colored scikit-learn digits, `make bench` the benchmarks; `make studies` runs the
# paper's studies (paper_studies.ipynb) headless on the embedded dataset with small grids.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_DIR := logging/notebook
STUDIES_DIR := logging/studies

.PHONY: install test bench run run-digits studies clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name python3 >/dev/null
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest

bench: install
	@for f in bench/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done
	@cat bench/results.json

run: install
	mkdir -p $(RUN_DIR)
	$(BIN)/python -m papermill greedy_multimodal.ipynb $(RUN_DIR)/greedy_multimodal_embedded.ipynb \
		-k python3 -f notebook_embedded.yaml --cwd .

run-digits: install
	mkdir -p $(RUN_DIR)
	$(BIN)/python -m papermill greedy_multimodal.ipynb $(RUN_DIR)/greedy_multimodal_colored_digits.ipynb \
		-k python3 -f notebook_digits.yaml --cwd .

studies: install
	mkdir -p $(STUDIES_DIR)
	$(BIN)/python -m papermill paper_studies.ipynb $(STUDIES_DIR)/paper_studies.ipynb \
		-k python3 -f studies_embedded.yaml --cwd .

clean:
	rm -rf $(VENV) .pytest_cache
