# cryptsnap developer entry points. Run as root: the tests mount, attach loop devices and boot a VM.
PY := /usr/bin/python3
VENV := .venv

.PHONY: deps test test-long test-fast lint demo soak man deb clean

deps:                     ## Debian packages the tests and the demo need
	scripts/install-deps

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv --system-site-packages $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

test: deps $(VENV)/.installed   ## every tier: unit, host (sshd/sshfs/loop), guest (QEMU)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-long:                ## every test, with the long guest tests (about 3 h; docs/testing.md)
	CRYPTSNAP_VM_TEST_TIMEOUT=$${CRYPTSNAP_VM_TEST_TIMEOUT:-14400} $(MAKE) test PYTEST_ARGS="--long $(PYTEST_ARGS)"

test-fast: $(VENV)/.installed   ## unit tests only
	$(VENV)/bin/python -m pytest tests/unit $(PYTEST_ARGS)

demo: deps                 ## the main job end to end in a throwaway guest (demo/demo.sh)
	$(PY) -m tests.harness demo

soak: deps                 ## faults drawn by a seeded generator, run after run, in the guest (tests/soak.py)
	$(PY) -m tests.harness run --timeout 7200 --results build/soak-results -- python3 -m tests.soak $(SOAK_ARGS)

man: $(VENV)/.installed    ## the man pages, generated from the parser, the schema and the D-Bus XML, in build/man
	$(VENV)/bin/python -m cryptsnap.manpages build/man

deb:                       ## the Debian package, built from a copy of the tree, then lintian: build/deb/
	scripts/build-deb build/deb

clean:
	rm -rf $(VENV) build src/*.egg-info
