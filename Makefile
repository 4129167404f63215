# Everything runs from the project's own virtual environment, at the versions in the lock.
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements/constraints.txt
EXTRAS := dev,metrics

.PHONY: setup lock lint test test-slow demo quality rehearsal

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) --upgrade pip setuptools wheel
	$(PY) -m pip install -q -c $(LOCK) -e '.[$(EXTRAS)]'
	$(PY) -m pip check
	touch $@

# Refresh the lock: resolve the extras afresh (the newest versions setup.py allows) in a
# scratch venv and freeze it, pip and setuptools included. Review the diff, make test, commit.
lock:
	rm -rf .lock-venv
	python3 -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip setuptools wheel
	.lock-venv/bin/python -m pip install -q -e '.[$(EXTRAS)]'
	.lock-venv/bin/python -m pip check
	{ echo "# What make setup installs (pip install -c $(LOCK)): .[$(EXTRAS)] as make lock"; \
	  echo "# resolved it afresh on $$(.lock-venv/bin/python -c 'import platform as p; \
	  print("python", p.python_version(), p.system(), p.machine())'). Refresh: make lock."; \
	  .lock-venv/bin/python -m pip freeze --all --exclude-editable; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .lock-venv

# Lint and format check (ruff, pinned in the dev extra): part of `make test`, so CI runs it.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

demo: setup
	RESUME=none bash launch/pretrain_local.sh eval.captions=32 eval.samples=8

# Learning quality (issue 12): shapes set -> VAE -> shards -> train -> generate -> score.
quality: setup
	$(PY) -m benchmarks.learning_quality --out runs/quality --curve

# Full-shape rehearsal (issue 13.3): 256-px images and long documents -> shards -> the 0.16B
# preset's shapes under sbatch on a local Slurm -> stop, requeue, resume -> mtf-generate.
# Needs root (it installs and starts Slurm); 5-7 min on 2 cores. Also part of test-slow.
rehearsal: setup
	$(PY) -m benchmarks.rehearsal --out runs/rehearsal
