# Both targets bootstrap .venv from pinned dependencies (constraints.txt).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m orbax_nnx.demo

test: $(STAMP)
	$(BIN)/ruff check orbax_nnx tests bench
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python bench/bench_handler.py
	$(BIN)/python bench/bench_restore.py
	$(BIN)/python bench/bench_convert.py
	$(BIN)/python bench/bench_serving.py
	$(BIN)/python bench/bench_safetensors.py
	$(BIN)/python bench/bench_matrix.py
	$(BIN)/python bench/bench_leaves.py
	$(BIN)/python bench/bench_object_store.py
	$(BIN)/python bench/bench_cases.py

clean:
	rm -rf $(VENV) build *.egg-info
