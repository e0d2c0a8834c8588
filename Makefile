# The two quick-start commands. Each sets up its own virtualenv on first use.
#   make serve   - serve the bundled default model on http://127.0.0.1:8000 (OpenAI API)
#   make test    - run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
# The CPU build of torch (installed first, so that pip never pulls a multi-GB CUDA build).
TORCH ?= torch==2.13.0

.PHONY: serve test install clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e .
	touch $@

# The tests' extras: pytest and friends, and Ray for the Ray tensor-parallel test.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test,ray]"
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/freight serve --host 127.0.0.1 --port $(PORT)

test: $(VENV)/.installed-test
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV)
