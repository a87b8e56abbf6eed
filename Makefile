# Two entry points (see README): `make run` sets everything up and runs the main job,
# `make test` runs the checks and the test suite. Both install on first use.
# `make bench` runs the benchmark suite by hand (bench/README.md; not part of CI).
VENV ?= .venv
STAMP := $(VENV)/.curvx-installed
SOURCES := pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu)

.PHONY: setup run test bench

setup: $(STAMP)

$(STAMP): $(SOURCES) scripts/setup.sh
	bash scripts/setup.sh
	touch $@

run: $(STAMP)
	$(VENV)/bin/curvx train $(ARGS)

test: $(STAMP)
	bash scripts/test.sh

bench: $(STAMP)
	bash bench/run.sh
