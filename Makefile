# The two commands: `make run` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Worker counts for this machine (default: one media worker per core, two executors).
PBX_MEDIA_WORKERS ?= $(shell nproc)
PBX_IVR_EXECUTORS ?= 2
export PBX_MEDIA_WORKERS PBX_IVR_EXECUTORS

.PHONY: run run-perf test install tools lint sounds clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,docs]'
	touch $@

# Everything `supervisord -c supervisord.conf` needs: the venv, the per-machine workers
# file, and logs/ (supervisord's own log and the programs' are there; it does not
# create the directory).
install: $(VENV)/.installed run/workers.conf
	mkdir -p logs

# supervisord cannot default a count, so the per-machine part of its config is generated.
run/workers.conf: $(VENV)/.installed
	$(BIN)/python -m pbx.supervisor_conf --media-workers $(PBX_MEDIA_WORKERS) --executors $(PBX_IVR_EXECUTORS) --out $@

# Debian tools the tests use: sipp (sip-tester), sox, espeak-ng, sipvicious (the
# extension scanner and digest cracker the security tests run), baresip-core (an
# independent SIP stack: libre's digest, tests/e2e/test_baresip_register.py and the
# interop suite); linphone-cli (linphonec 5.1, liblinphone: the interop suite's
# third independent SIP stack); headless Chromium and its WebDriver
# (tests/e2e/test_debug_page.py drives the /debug page); venv support for
# Debian's own python3; and pyzmq for it (tests/security runs a ZeroMQ client as the
# unprivileged `nobody`, who cannot read the venv's interpreter); prometheus (with
# promtool), which tests/e2e/test_prometheus.py runs against the system and whose
# promtool checks deploy/prometheus/.
tools:
	@missing=""; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	/usr/bin/python3 -c 'import zmq' 2>/dev/null || missing="$$missing python3-zmq"; \
	command -v sipp >/dev/null || missing="$$missing sip-tester"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	command -v sox >/dev/null || missing="$$missing sox"; \
	command -v espeak-ng >/dev/null || missing="$$missing espeak-ng"; \
	command -v svwar >/dev/null || missing="$$missing sipvicious"; \
	command -v baresip >/dev/null || missing="$$missing baresip-core"; \
	command -v linphonec >/dev/null || missing="$$missing linphone-cli"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

run: install
	$(BIN)/supervisord -n -c supervisord.conf

# The same, with the perf scripts' config (loopback exempt from the per-source limits).
run-perf:
	PBX_CONFIG=perf/pbx-perf.toml $(MAKE) run

test: tools install
	$(BIN)/ruff check pbx workers media tests perf examples
	$(BIN)/mypy
	$(BIN)/python -m pytest

sounds: tools
	bash sounds/make_sounds.sh

clean:
	rm -rf $(VENV) run logs
