# Two commands do everything on a fresh machine (see README):
#   make run    set up .venv, then run the default preset end to end
#   make test   set up .venv, then run the test suite
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup run test test-infra site lock clean-results

setup: $(STAMP)

# Reinstalled only when the pins change.
$(STAMP): envs/requirements.txt envs/constraints.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -r envs/requirements.txt -c envs/constraints.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

run: setup
	$(VENV)/bin/snakemake --cores all

test: setup test-infra
	$(PY) -m pytest

# Debian packages of the container, SLURM and browser tests (Podman, SLURM, Chromium, ...), if missing.
test-infra:
	scripts/test-infra.sh

site: setup
	$(VENV)/bin/snakemake --cores all site

# Refresh the full lock after changing envs/requirements.txt.
lock: setup
	{ echo "# Full lock of the environment resolved from envs/requirements.txt (pip freeze)."; \
	  echo "# Regenerate: make lock"; \
	  $(PY) -m pip freeze --exclude-editable | grep -v '^privbench'; } > envs/constraints.txt
