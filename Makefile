# ditq: `make setup` then `make demo` / `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
ORT     ?= cpu          # cpu | gpu  (which ONNX Runtime build to install)
MODEL   ?= dit-s-2
OUT     ?= out

.PHONY: setup demo test clean

# The stamp is remade when pyproject.toml changes; torch is pinned so pip never pulls a CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[$(strip $(ORT)),dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/ditq export --model $(MODEL) --wbits 4 --abits 8 --group-size 64 --out $(OUT)/$(MODEL)-w4a8
	$(BIN)/ditq validate $(OUT)/$(MODEL)-w4a8 --json $(OUT)/$(MODEL)-w4a8/validation.json

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(OUT) .pytest_cache
