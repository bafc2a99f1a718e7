# congressctl — quick start: `make demo` (the main job) and `make test` (the whole suite).
# Both install what they need: Debian packages (as root) and a virtualenv in .venv.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
BIN := $(VENV)/bin
DEB_PACKAGES := redis-server haproxy pacemaker pacemaker-cli-utils corosync resource-agents \
	openssh-server openssh-client iproute2 procps psmisc nftables util-linux python3-venv \
	curl socat
PYTEST_ARGS ?=

.PHONY: install debs venv test test-fast demo bench render-demo clean lab-down

install: debs venv

debs:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$(echo $$missing)" >&2; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >&2; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel >&2
	$(PIP) install -q -e '.[test]' >&2
	@touch $@

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/pytest -m "not lab" $(PYTEST_ARGS)

render-demo: install
	$(BIN)/congressctl validate -i inventory.example.yaml
	$(BIN)/congressctl render -i inventory.example.yaml -o out/example

LAB_DIR ?= labs/lab

# The main job: check the example inventory with the real tools, make a 3-host lab, deploy onto it over SSH.
demo: render-demo
	@echo "== making a 3-host lab (network + mount namespaces, own sshd each) in $(LAB_DIR)" >&2
	$(BIN)/congressctl lab up --nodes 3 --name lab --dir $(LAB_DIR)
	@echo "== deploying over SSH: corosync, pacemaker, redis, haproxy, api-pe and dsd nodes" >&2
	$(BIN)/congressctl deploy -i $(LAB_DIR)/inventory.yaml
	@echo "== a second deploy changes nothing" >&2
	$(BIN)/congressctl deploy -i $(LAB_DIR)/inventory.yaml
	@echo "== where Pacemaker placed everything (from n1)" >&2
	$(BIN)/congressctl lab exec n1 --name lab --dir $(LAB_DIR) -- crm_mon -1
	@echo "== the API through the VIP" >&2
	curl -s http://10.213.0.100:1789/v1/status; echo
	@echo "== done. Tear the lab down with: $(BIN)/congressctl lab down --name lab --dir $(LAB_DIR)" >&2

bench: install
	$(PY) bench/render.py
	$(PY) bench/engine.py
	$(PY) bench/bus.py

clean:
	rm -rf out build dist *.egg-info
