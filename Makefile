# sshwrap: `make demo` runs the main job against a throwaway local sshd; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: install sshd test lint bench demo clean

install: $(STAMP) sshd

# OpenSSH's client and server from Debian's packages when missing (as root), and iproute2 (the
# fault-injection tests' network namespaces and veth pairs) and sudo (the sudo tests); otherwise say
# what to install.
sshd:
	@if [ ! -x /usr/sbin/sshd ] || ! command -v ssh >/dev/null 2>&1 || ! command -v ssh-keygen >/dev/null 2>&1 \
	    || { [ "$$(id -u)" = 0 ] && { ! command -v ip >/dev/null 2>&1 || ! command -v sudo >/dev/null 2>&1; }; }; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing openssh-server, openssh-client, iproute2 and sudo (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client iproute2 sudo >/dev/null; \
	  else \
	    echo "sshwrap needs OpenSSH: install openssh-client and openssh-server (e.g. sudo apt-get install openssh-client openssh-server)" >&2; exit 1; \
	  fi; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $@

test: install
	$(PY) -m pytest -q -p no:randomly $(PYTEST_ARGS)

lint: $(BENCH_STAMP)
	$(VENV)/bin/ruff check sshwrap tests bench
	$(VENV)/bin/ruff format --check sshwrap tests bench
	$(VENV)/bin/mypy --strict sshwrap tests bench

bench: install $(BENCH_STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)

demo: install
	@$(PY) -m sshwrap.demo

clean:
	rm -rf $(VENV) build dist *.egg-info
