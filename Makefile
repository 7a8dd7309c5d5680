# The two commands: `make demo` (the main job) and `make test` (the whole test suite).
# Both create or reuse .venv (tools/setup_env.sh) and build the extension in place.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmkernels-ready
EXT_SOURCES := $(wildcard setup.py mmkernels/_build.py csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.cpp)
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: demo test bench cuda-check setup clean

$(STAMP): tools/setup_env.sh $(EXT_SOURCES)
	VENV=$(VENV) bash tools/setup_env.sh
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m mmkernels demo $(DEMO_ARGS)

# benchmarks/ runs each pytest-benchmark entry once (--benchmark-disable) so the entries stay working.
# Locally, PYTEST_ARGS='-m "not slow"' leaves out the slow tests (the pip install tests of tests/test_install.py among them); CI runs all.
test: $(STAMP) cuda-check
	$(PY) -m pytest tests benchmarks -q --benchmark-disable $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m mmkernels bench

# Compiles every CUDA source to an object file for sm_80 and sm_90 (nothing runs them here).
cuda-check:
	bash tools/cuda_check.sh

clean:
	rm -rf build mmkernels/*.so build_ext.log *.egg-info $(STAMP)
