# Everything runs from the project's own virtual environment.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup lint test test-slow demo quality rehearsal

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Lint and format check (ruff, pinned in the dev extra): part of `make test`, so CI runs it.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

demo: setup
	RESUME=none bash launch/pretrain_local.sh eval.captions=32

# Learning quality (issue 12): shapes set -> VAE -> shards -> train -> generate -> score.
quality: setup
	$(PY) -m benchmarks.learning_quality --out runs/quality --curve

# Full-shape rehearsal (issue 13.3): 256-px images and long documents -> shards -> the 0.16B
# preset's shapes under sbatch on a local Slurm -> stop, requeue, resume -> mtf-generate.
# Needs root (it installs and starts Slurm); 5-7 min on 2 cores. Also part of test-slow.
rehearsal: setup
	$(PY) -m benchmarks.rehearsal --out runs/rehearsal
