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
HOST ?= 127.0.0.1
# where pip takes torch from (default PyPI: its CUDA build on Linux); the CPU container image uses
# TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlruns.db
# in the recipes' environment, not on their command lines: make echoes those (a URI may hold a password)
export MLFLOW_TRACKING_URI

SELECT = --dataset $(DATASET) --loss $(LOSS) --backbone $(BACKBONE) \
	$(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(DATA_DIR),--data-dir "$(DATA_DIR)") \
	$(if $(LOSS_ARGS),--loss-args "$(LOSS_ARGS)") $(if $(SPLIT_FILE),--split-file "$(SPLIT_FILE)")

.PHONY: install train test ui list clean demo-data bench-data

install: $(STAMP)

$(STAMP): pyproject.toml
	@echo "Installing into $(VENV) (once; a few minutes on a fresh machine)..."
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.13.0
	$(PY) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
		print('\n'.join(p['dependencies'] + p['optional-dependencies']['dev']))" > $(VENV)/requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r $(VENV)/requirements.txt
	rm -f $(VENV)/.installed-*
	touch $@

## train one model: make train DATASET=mni LOSS=mbls BACKBONE=unet EPOCHS=… LOSS_ARGS="margin=8" ARGS="--set seed=1"
##   NPROC=n: n processes on this machine (torchrun, DDP: one GPU each, or CPU processes with gloo)
## continue a killed run from its last checkpoint: make train RESUME=<run folder | MLflow run id | run name>
NPROC ?=
LAUNCH = $(PY) -m pipeline train $(if $(NPROC),--nproc $(NPROC))
train: $(STAMP)
	$(LAUNCH) $(if $(RESUME),--resume "$(RESUME)",$(SELECT)) $(ARGS)

.PHONY: sync-mlflow
## write what a run could not log while MLflow was down (its metrics.jsonl) into MLflow: make sync-mlflow RUN=<run>
sync-mlflow: $(STAMP)
	@test -n "$(RUN)" || { echo "usage: make sync-mlflow RUN=<run folder, MLflow run id or run name>"; exit 2; }
	$(PY) -m pipeline sync-mlflow "$(RUN)"

## run the test suite
test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

## serve the MLflow UI on http://$(HOST):$(PORT) (default local only; a container binds HOST=0.0.0.0)
ui: $(STAMP)
	@$(PY) -m pipeline ui-links --host $(HOST) --port $(PORT) || true
	$(PY) -m mlflow ui --backend-store-uri "$$MLFLOW_TRACKING_URI" --host $(HOST) --port $(PORT)

## list datasets, losses and backbones
list: $(STAMP)
	@$(PY) -m pipeline list

clean:
	rm -rf $(VENV) .pytest_cache

## benchmark every backbone: parameters, forward+backward time and peak memory at 80×96 and 224×224 (batch 4)
.PHONY: bench-backbones
bench-backbones: $(STAMP)
	$(PY) -m pipeline.benchmarks.backbones $(ARGS)

.PHONY: evaluate bench-evaluation

## evaluate a trained run again and log into the same MLflow run: make evaluate RUN=<MLflow run id | runs/<name> | checkpoint> ARGS="--set evaluation::noise::sigmas=[]"
evaluate: $(STAMP)
	@test -n "$(RUN)" || { echo "usage: make evaluate RUN=<MLflow run id, run folder or checkpoint file> [ARGS=…]"; exit 2; }
	$(PY) -m pipeline evaluate "$(RUN)" $(ARGS)

## time the test evaluation of one volume against the network alone: make bench-evaluation [RUN=…]
bench-evaluation: $(STAMP)
	$(PY) -m pipeline.benchmarks.evaluation $(if $(RUN),--run "$(RUN)") $(ARGS)

## write a synthetic sample in a dataset's official layout (default data/demo/<dataset>):
##   make demo-data DATASET=acdc [DATA_DIR=…] [ARGS="--cases 6 --option layout=promise12"]
demo-data: $(STAMP)
	$(PY) -m pipeline demo-data --dataset $(DATASET) $(if $(DATA_DIR),--data-dir "$(DATA_DIR)") $(ARGS)

## time and peak memory of validating and caching a dataset (default: its demo sample): make bench-data DATASET=acdc
bench-data: $(STAMP)
	$(PY) -m pipeline bench-data --dataset $(DATASET) $(if $(DATA_DIR),--data-dir "$(DATA_DIR)")

.PHONY: export verify-bundle shipped-bundle
## export a trained run as a MONAI bundle in bundles/<name>/ (and into its MLflow run):
##   make export RUN=<run id | run name | runs/<name> | checkpoint> [NAME=<bundle>] [ARGS="--calibration lts --overwrite"]
export: $(STAMP)
	@test -n "$(RUN)" || { echo "usage: make export RUN=<MLflow run id or name, run folder or checkpoint file> [NAME=<bundle>] [ARGS=…]"; exit 2; }
	$(PY) -m pipeline export "$(RUN)" $(if $(NAME),--name "$(NAME)") $(ARGS)

## check an exported bundle offline with MONAI's tools, one line per check: make verify-bundle NAME=<bundle | folder>
##   the checks that run the bundle's configs and scripts (code) run only with TRUST=1: for a bundle you trust
verify-bundle: $(STAMP)
	@test -n "$(NAME)" || { echo "usage: make verify-bundle NAME=<bundle name under bundles/ or bundle folder> [TRUST=1]"; exit 2; }
	$(PY) -m pipeline.export "$(NAME)" $(if $(TRUST),--trust-code)

## retrain the default model (mni, mbls, unet), re-export the shipped bundle (calibration auto, the run's cases in data/) over
## the old one, verify it
ifndef SHIPPED_RUN
SHIPPED_RUN := shipped-mni-mbls-unet-$(shell date +%Y%m%d-%H%M%S)
endif
shipped-bundle: $(STAMP)
	$(PY) -m pipeline train --dataset mni --loss mbls --backbone unet \
		--run-name "$(SHIPPED_RUN)" --quiet
	$(PY) -m pipeline export "$(SHIPPED_RUN)" \
		--name mni_brain_tissue_mbls_unet --calibration auto --with-data --overwrite
	$(PY) -m pipeline.export mni_brain_tissue_mbls_unet --trust-code

.PHONY: bench
## training throughput (slices/s, ratio to the bare network, data wait), 1 vs 2 processes; on CUDA also AMP on/off:
##   make bench [ARGS="--processes 1,2,4 --epochs 6 --json bench/training.json"]
bench: $(STAMP)
	$(PY) -m pipeline.benchmarks.training $(ARGS)

.PHONY: bench-losses
## time every loss (forward + backward on 4×4×224×224 logits) relative to CE: make bench-losses ARGS="--repeats 41"
bench-losses: $(STAMP)
	$(PY) -m pipeline.benchmarks.losses $(ARGS)

.PHONY: compare
## the paper's comparison in one command: make compare DATASET=mni GRID=paper [SEEDS=0-9] [JOBS=n] [SHARD=i/n]
##   [EPOCHS=n] [BACKBONES=a,b] [REPORT=only] [MARGINS=ece=0.003,dsc=0.02]; the report goes to reports/<dataset>/<grid>/
GRID ?= paper
compare: $(STAMP)
	$(PY) -m pipeline compare --dataset $(DATASET) --grid $(GRID) \
		$(if $(SEEDS),--seeds $(SEEDS)) $(if $(JOBS),--jobs $(JOBS)) $(if $(SHARD),--shard $(SHARD)) \
		$(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(BACKBONES),--backbones $(BACKBONES)) \
		$(if $(REPORT),--report $(REPORT)) $(if $(DATA_DIR),--data-dir "$(DATA_DIR)") \
		$(if $(MARGINS),--margins "$(MARGINS)") $(ARGS)

.PHONY: reanalyse
## the seed-level verdict of an existing report from its folder alone (per_volume.csv, summary.json), into
##   <folder>/reanalysis.md: make reanalyse REPORT_DIR=reports/mni/penalties [MARGINS=ece=0.003]
reanalyse: $(STAMP)
	@test -n "$(REPORT_DIR)" || { echo "usage: make reanalyse REPORT_DIR=reports/<dataset>/<grid> [MARGINS=…]"; exit 2; }
	$(PY) -m pipeline.compare.reanalyse "$(REPORT_DIR)" $(if $(MARGINS),--margins "$(MARGINS)")

.PHONY: check-statistics
## the verdict's procedure on simulated comparisons: false-positive rate, interval coverage and false equivalence of
##   the seed-level statistics against the (seed, volume)-pair ones: make check-statistics [ARGS="--sims 500"]
check-statistics: $(STAMP)
	$(PY) -m pipeline.compare.simulation $(ARGS)

.PHONY: screenshots
## PNGs of a comparison in the MLflow UI (runs table, compare view) for the README, by a headless Chromium:
##   make screenshots [RUN=<parent run id | comparison id, e.g. mni/paper>] [OUT=docs/img]
##   needs (not installed by `make install`): apt-get install -y chromium && .venv/bin/pip install playwright
screenshots: $(STAMP)
	$(PY) -m pipeline.compare.screenshots $(if $(RUN),--run "$(RUN)") \
		$(if $(OUT),--out "$(OUT)") $(ARGS)
