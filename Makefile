# `make demo` and `make test` each do the whole set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: install demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Keep a torch that is already importable; otherwise take the CPU build pinned above
# (installing plain `torch` would pull a multi-GB CUDA build).
$(VENV)/.installed: $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/expertkit demo

test: install
	$(PY) -m pytest

bench: install
	$(PY) benchmarks/run.py specialize --out benchmarks/results/specialize.json

clean:
	rm -rf $(VENV) .expertkit-cache build
