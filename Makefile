# Two entry points that set themselves up on a fresh machine with only Python 3.10+:
#   make test    create .venv, install ca2vdm with its test extra, run the test suite
#   make serve   create .venv if needed, serve on http://127.0.0.1:8000 (MODEL=... picks the model)
# torch: a CUDA build where `nvidia-smi` works, otherwise torch==$(TORCH_VERSION); set TORCH_INDEX_URL to a
# CPU-only wheel index to force a CPU build on machines whose default index serves CUDA wheels.

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ca2vdm-installed

# Empty MODEL serves the packaged default model (server/weights/default, 32x32 sprites); pass MODEL=DIR,
# MODEL=ckpt.pt PRESET=XL/2, or MODEL=random:PRESET (random weights: the real pipeline, noise for video).
MODEL ?=
PRESET ?=
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: test lint serve clean

test: $(STAMP)
	$(PY) -m pytest -q

serve: $(STAMP)
	$(VENV)/bin/ca2vdm serve --host $(HOST) --port $(PORT) $(if $(MODEL),--model $(MODEL)) $(if $(PRESET),--preset $(PRESET))

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "GPU found: installing a CUDA build of torch"; \
		$(PY) -m pip install -q "torch>=2.4"; \
	else \
		echo "no GPU: installing torch==$(TORCH_VERSION)"; \
		$(PY) -m pip install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)); \
	fi
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
