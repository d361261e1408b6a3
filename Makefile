# One entry point: `make demo` (the main job) and `make test`; both set up .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: venv demo test test-fast compile bench clean

venv: $(VENV)/.installed

# constraints.txt pins the tested versions; the registry's torchvision only imports against its
# matching torch build, so torch and torchvision are always installed as the pinned pair
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -c constraints.txt -e ".[dev]"
	touch $@

demo: venv
	$(BIN)/camgate demo

test: venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# the inner loop: everything but the slow (demo, soak, large models), S3-server and kfp.local tests
test-fast: venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -m "not slow and not s3 and not kfp" $(PYTEST_ARGS)

compile: venv
	$(BIN)/camgate compile

bench: venv
	$(BIN)/camgate bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .cache
