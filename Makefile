# Two entry points (see README): `make run` sets everything up and runs the main job,
# `make test` runs the checks and the test suite. Both install on first use.
# `make bench` runs the benchmark suite by hand (bench/README.md; not part of CI);
# `make reproduce` runs the paper's experiments and writes their report (README).
VENV ?= .venv
STAMP := $(VENV)/.curvx-installed
SOURCES := pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu)

.PHONY: setup run test bench reproduce

setup: $(STAMP)

$(STAMP): $(SOURCES) scripts/setup.sh
	bash scripts/setup.sh
	touch $@

run: $(STAMP)
	$(VENV)/bin/curvx train $(ARGS)

test: $(STAMP)
	bash scripts/test.sh

reproduce: $(STAMP)
	$(VENV)/bin/curvx reproduce $(ARGS)

bench: $(STAMP)
	bash bench/run.sh
