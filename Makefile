# ditq: `make demo` (sets up, then exports, validates, samples and judges the shipped digits model) / `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
ORT     ?= cpu          # cpu | gpu  (which ONNX Runtime build to install)
OUT     ?= out
D       := $(OUT)/digits-w4a8

.PHONY: setup demo eval bench bench-export-memory train-digits train-digits-t2i test test-all clean

# The stamp is remade when pyproject.toml changes; torch is pinned so pip never pulls a CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[$(strip $(ORT)),dev]"
	touch $@

setup: $(VENV)/.installed

# The shipped digits DiT at W4A8: export, prove it in ONNX Runtime, draw a grid, and judge it next to float.
demo: setup
	$(BIN)/ditq export --model digits --wbits 4 --abits 8 --group-size 64 --out $(D)
	$(BIN)/ditq validate $(D) --json $(D)/validation.json
	$(BIN)/ditq sample $(D) --steps 50 --cfg 1.5 --seed 0 --out $(D)/grid.png
	$(BIN)/ditq eval --model digits --configs fp,w4a8 --num-samples 500 --json $(OUT)/demo-eval.json --grid $(OUT)/demo-eval.png

# The quality table of the model card: five configurations, three seed sets of 500 samples (about 25 min).
eval: setup
	$(BIN)/ditq eval --model digits --configs fp,w8a8,w6a8,w4a8,w4a16 --seeds 0,1,2 --json $(OUT)/eval.json --grid $(OUT)/eval.png

# Speed, size, memory and error of the ort target against float ONNX Runtime and ONNX Runtime's own
# quantizers: digits with quality columns, then DiT-XL/2 at batch 1 (256x256 latents; about 12 min),
# which exits 1 if a goal of the ort target is not met (--check).
bench: setup
	$(BIN)/ditq bench --model digits --group-size 64 --variants float,ort-int8,ort-int4,w8a8,w4a8,w4a8@qdq --runs 20 --quality 500 --json $(OUT)/bench-digits.json
	$(BIN)/ditq bench --model dit-xl-2 --runs 10 --profile --check --json $(OUT)/bench-dit-xl-2.json

# Peak RSS of `ditq export` over the model's float32 weight bytes, each export in its own process
# (ditq.workflows.export_memory): digits, DiT-S/2, DiT-B/2 and DiT-XL/2 (3.0 GB of weights); about 10 min.
bench-export-memory: setup
	$(BIN)/python -m ditq.workflows.export_memory --models digits,dit-s-2,dit-b-2,dit-xl-2 --variants w4a8,w8a8@ort --json $(OUT)/export-memory.json

# Recreate the shipped judge and digits DiT from scratch (seeded; about 30 min on 2 CPU cores; resumable).
train-digits: setup
	$(BIN)/ditq train-digits --checkpoint $(OUT)/train-digits.pt

# The text-conditioned digits-t2i (ditq/assets/digits-t2i): seeded, resumable from its checkpoint.
train-digits-t2i: setup
	$(BIN)/ditq train-digits-t2i --checkpoint $(OUT)/train-digits-t2i.pt

# The fast lane (the README's command): every package, without the tests marked slow (DiT-S/2 exports,
# the wheel install, real exports and searches killed and resumed), on every core (pytest-xdist).
# `make test-all` (CI) runs everything.
test: setup
	$(BIN)/python -m pytest -q -n auto -m "not slow"

test-all: setup
	$(BIN)/python -m pytest -q -n auto

clean:
	rm -rf $(OUT) .pytest_cache
