# One-command entry points. `make train` and `make test` install what they need first (a local .venv with the
# pinned dependencies of pyproject.toml), so a fresh clone needs nothing but Python 3.11 and make.
# The project itself is not installed: commands run from the repository root (python -m pipeline).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml 2>/dev/null | cut -c1-12)

DATASET ?= mni
LOSS ?= mbls
BACKBONE ?= unet
EPOCHS ?=
DATA_DIR ?=
LOSS_ARGS ?=
SPLIT_FILE ?=
ARGS ?=
PORT ?= 5000
MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlruns.db

SELECT = --dataset $(DATASET) --loss $(LOSS) --backbone $(BACKBONE) \
	$(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(DATA_DIR),--data-dir "$(DATA_DIR)") \
	$(if $(LOSS_ARGS),--loss-args "$(LOSS_ARGS)") $(if $(SPLIT_FILE),--split-file "$(SPLIT_FILE)")

.PHONY: install train test ui list clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@echo "Installing into $(VENV) (once; a few minutes on a fresh machine)..."
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
		print('\n'.join(p['dependencies'] + p['optional-dependencies']['dev']))" > $(VENV)/requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r $(VENV)/requirements.txt
	rm -f $(VENV)/.installed-*
	touch $@

## train one model: make train DATASET=mni LOSS=mbls BACKBONE=unet EPOCHS=… LOSS_ARGS="margin=8" ARGS="--set seed=1"
train: $(STAMP)
	MLFLOW_TRACKING_URI=$(MLFLOW_TRACKING_URI) $(PY) -m pipeline train $(SELECT) $(ARGS)

## run the test suite
test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

## serve the MLflow UI on http://127.0.0.1:$(PORT) (local only)
ui: $(STAMP)
	$(PY) -m mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host 127.0.0.1 --port $(PORT)

## list datasets, losses and backbones
list: $(STAMP)
	@$(PY) -m pipeline list

clean:
	rm -rf $(VENV) .pytest_cache

.PHONY: bench-losses
## time every loss (forward + backward on 4×4×224×224 logits) relative to CE: make bench-losses ARGS="--repeats 11"
bench-losses: $(STAMP)
	$(PY) -m pipeline.benchmarks.losses $(ARGS)
