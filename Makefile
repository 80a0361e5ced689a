# The README's commands: `make run` (the notebook, headless, on the embedded dataset) and `make test`. `make run-digits`
# runs it on the colored scikit-learn digits, `make studies` the paper's studies (paper_studies.ipynb), `make balancers`
# every method on the colored digits and the embedded dataset, MMTM and late fusion; `make bench` the benchmarks.
# `make publish` copies their results into docs/results and docs/figures, `make readme` writes the README's numbers
# from those files; `make lab` opens the notebooks in Jupyter.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
RUN_DIR := logging/notebook
STUDIES_DIR := logging/studies

.PHONY: install install-dev test bench run run-digits studies balancers publish readme lab clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name python3 >/dev/null
	touch $(STAMP)

$(DEV_STAMP): $(STAMP) requirements-dev.txt
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $(DEV_STAMP)

install: $(STAMP)

install-dev: $(DEV_STAMP)

test: install-dev
	$(BIN)/python -m pytest

bench: install-dev
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

# every registered two-branch method on the colored digits and the embedded dataset, for each fusion, 3 seeds;
# logs and results_<dataset>.json under logging/balancers/<fusion>/, checkpoints under checkpoints/balancers/ (a run's
# name does not hold its epoch budget, so make run-digits' 150-epoch runs must not stand in for 60-epoch ones)
BALANCER_FUSIONS ?= mmtm late_concat
balancers: install
	@for fusion in $(BALANCER_FUSIONS); do \
	  $(BIN)/python -m greedymm run --config balancers_digits.yaml --methods all --set FUSION=$$fusion \
	    --set LOG_DIR=logging/balancers/$$fusion --set CKPT_DIR=checkpoints/balancers || exit 1; \
	  $(BIN)/python -m greedymm run --config notebook_embedded.yaml --methods all --seeds 0 1 2 --set FUSION=$$fusion \
	    --set LOG_DIR=logging/balancers/$$fusion --set CKPT_DIR=checkpoints/balancers || exit 1; \
	done

publish: install
	$(BIN)/python tools/publish.py

readme: install
	$(BIN)/python tools/readme.py

lab: install-dev
	$(BIN)/jupyter lab

clean:
	rm -rf $(VENV) .pytest_cache
