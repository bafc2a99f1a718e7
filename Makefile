# congressctl — quick start: `make demo` (the main job) and `make test` (lint, then the whole suite).
# Both install what they need: Debian packages (as root) and a virtualenv in .venv.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
BIN := $(VENV)/bin
# Debian's python3, the interpreter `congressctl deploy` runs the nodes with on the hosts, so that the tests and
# benchmarks measure what ships. It is also a faster build than a plain source build such as pyenv's, which a
# bare `python3` may find first on PATH (bench/bus.py: about 5% less CPU per change).
PYTHON := /usr/bin/python3
DEB_PACKAGES := redis-server haproxy pacemaker pacemaker-cli-utils corosync resource-agents \
	openssh-server openssh-client iproute2 procps psmisc nftables util-linux python3-venv \
	curl socat iptables
PYTEST_ARGS ?=

.PHONY: install debs venv lint test test-fast demo bench render-demo clean lab-down

install: debs venv

debs:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$(echo $$missing)" >&2; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >&2; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py Makefile
	@test "$$($(PY) -c 'import sys; print(sys.base_prefix)' 2>/dev/null)" = /usr || rm -rf $(VENV)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel >&2
	$(PIP) install -q -e '.[test]' >&2
	@touch $@

# ruff and mypy on congressctl/, both configured in pyproject.toml and pinned in setup.py; a finding fails
# `make test`. What is relaxed, and why:
# - mypy is --strict but for disallow_any_generics: a bare dict/list/tuple stays allowed. A payload is a plain
#   JSON dict that its dataclass's to_dict/from_dict pair checks; dict[str, Any] on ~160 signatures would add
#   the key type only, and touch nearly every module.
# - mypy lets typed code call redis-py's few unannotated methods (untyped_calls_exclude: PubSub.aclose).
# - mypy needs no ignore_missing_imports: every third-party module is typed or has a pinned stub package.
# - ruff ignores N818 (exceptions are named for what happened: NoHostAnswered, StaleEpoch), B905 (zip()
#   truncation is relied on; strict=True would add raises no caller expects) and RUF023 (__slots__ are listed
#   in the order the fields are used, not A-Z).
lint: venv
	$(BIN)/ruff check congressctl
	$(BIN)/mypy congressctl

# Two pytest runs, one after the other, both always run: the unit tests on three workers (they mostly wait on
# the processes they start: 230 s on three, 430 s on two), then the lab tests on one shared lab, serially
# (conftest's order; a test using the lab is marked `lab` there). Running the two side by side was tried: the
# unit tests' timing-sensitive cases (Ctrl-C at a prompt, SIGTERM without the bus) failed under the lab's load;
# so did two workers sharing one lab (pytest-xdist's groups).
# PYTEST_ARGS goes to both; with a selection, a run left with no test (pytest's exit 5) is not a failure. Each
# run lists its 15 slowest tests: the suite is held under 25 minutes, and that list says where its time goes.
UNIT_WORKERS ?= 3
test: install lint
	@rc=0; \
	run() { $(BIN)/pytest "$$@" $(PYTEST_ARGS); s=$$?; \
		if [ $$s -ne 0 ] && { [ $$s -ne 5 ] || [ -z "$(PYTEST_ARGS)" ]; }; then rc=$$s; fi; }; \
	run -m "not lab" -n $(UNIT_WORKERS) --durations=15; \
	run -m lab --durations=15; \
	exit $$rc

test-fast: install
	$(BIN)/pytest -m "not lab" $(PYTEST_ARGS)

render-demo: install
	$(BIN)/congressctl validate -i inventory.example.yaml
	$(BIN)/congressctl render -i inventory.example.yaml -o out/example

LAB_DIR ?= labs/lab

# The main job: check the example inventory with the real tools, make a 3-host lab, deploy onto it over SSH,
# show its status, then fail it five ways under load and report what was measured.
demo: render-demo
	@echo "== 1/6 making a 3-host lab (network + mount namespaces, own sshd each) in $(LAB_DIR)" >&2
	$(BIN)/congressctl lab up --nodes 3 --name lab --dir $(LAB_DIR)
	@echo "== 2/6 deploying over SSH: corosync, pacemaker, redis (bus), haproxy + VIP, api-pe nodes, one DSD" >&2
	$(BIN)/congressctl deploy -i $(LAB_DIR)/inventory.yaml
	@echo "== 3/6 a second deploy changes nothing and restarts nothing" >&2
	$(BIN)/congressctl deploy -i $(LAB_DIR)/inventory.yaml
	@echo "== 4/6 status: hosts, Pacemaker placement, HAProxy backends, congress nodes, the DSD and its leader PE" >&2
	$(BIN)/congressctl status -i $(LAB_DIR)/inventory.yaml
	@echo "== 5/6 failover-test: kill/pause the leader PE, cut the DSD host, kill an api-pe host, cut the VIP host," >&2
	@echo "==     cut the promoted Redis's host, kill -9 the promoted Redis, bring a cut bus host back under load," >&2
	@echo "==     each under 50 pushes/s and 50 GETs/s; every action counted at a sink by its id" >&2
	@$(BIN)/congressctl failover-test -i $(LAB_DIR)/inventory.yaml --yes --report $(LAB_DIR)/failover-report; \
	rc=$$?; \
	echo "== 6/6 status after the faults" >&2; \
	$(BIN)/congressctl status -i $(LAB_DIR)/inventory.yaml >/dev/null && echo "healthy again" >&2; \
	echo "== timelines and raw events: $(LAB_DIR)/failover-report/<scenario>.html, summary.json" >&2; \
	echo "== done. Tear the lab down with: $(BIN)/congressctl lab down --name lab --dir $(LAB_DIR)" >&2; \
	exit $$rc

bench: install
	$(PY) bench/render.py
	$(PY) bench/engine.py
	$(PY) bench/bus.py
	$(PY) bench/deploy.py
	$(PY) bench/failover.py

clean:
	rm -rf out build dist *.egg-info
