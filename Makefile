# Two entry points on a fresh machine: `make study` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
SPEC ?= studies/smoke.yaml

.PHONY: study test venv bench clean

$(BIN)/dlmstudy: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(BIN)/dlmstudy

venv: $(BIN)/dlmstudy

study: venv
	$(BIN)/dlmstudy run $(SPEC)

test: venv
	$(BIN)/python -m pytest

bench: venv
	$(BIN)/dlmstudy bench --device cpu --config tiny

# The built-in study's runs and report; the committed studies under runs/ and reports/ stay.
clean:
	rm -rf runs/smoke reports/smoke
