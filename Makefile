# The two commands: `make demo` (the main job) and `make test` (the whole test suite).
# Both create or reuse .venv (tools/setup_env.sh) and build the extension in place.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_STAMP := $(VENV)/.torch-ready
STAMP := $(VENV)/.mmkernels-ready
EXT_SOURCES := $(wildcard setup.py mmkernels/_build.py csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.cpp)
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: demo test test-suite bench cuda-check setup clean

$(TORCH_STAMP): tools/setup_env.sh
	VENV=$(VENV) bash tools/setup_env.sh --torch-only
	touch $@

$(STAMP): $(TORCH_STAMP) tools/setup_env.sh $(EXT_SOURCES)
	VENV=$(VENV) bash tools/setup_env.sh
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m mmkernels demo $(DEMO_ARGS)

# benchmarks/ runs each pytest-benchmark entry once (--benchmark-disable) so the entries stay working.
# Locally, PYTEST_ARGS='-m "not slow"' leaves out the slow tests (the pip install tests of tests/test_install.py among them); CI runs all.
# Two jobs at a time: the CUDA compile check (it needs only torch's headers) runs beside the setup and the
# suite, in the time the setup waits for pip and the suite for its last file; either failing fails `make test`.
# With pytest-xdist (tools/setup_env.sh installs it) the suite runs on two workers, each test file on one
# worker (--dist loadfile), so a module-scoped fixture (the DDP runs, the wheel build) runs once.
test:
	$(MAKE) --no-print-directory -j2 test-suite cuda-check

test-suite: $(STAMP)
	$(PY) -m pytest tests benchmarks -q --benchmark-disable \
	  $$($(PY) -c "import xdist" 2>/dev/null && echo "-n 2 --dist loadfile") $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m mmkernels bench

# Compiles every CUDA source to an object file for sm_80 and sm_90 (nothing runs them here).
cuda-check: $(TORCH_STAMP)
	PY=$(PY) bash tools/cuda_check.sh

clean:
	rm -rf build mmkernels/*.so build_ext.log *.egg-info $(STAMP) $(TORCH_STAMP)
