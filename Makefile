# pmoe — make install | make demo | make test   (see README.md)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
NBTEST := build/notebook-tests

.PHONY: install demo test test-unit test-notebooks clean

install: $(BIN)/pmoe

$(BIN)/pmoe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# The whole pipeline end to end on synthetic data with a tiny random CLIP (< 10 min on 2 CPU cores).
demo: install
	$(BIN)/pmoe reproduce --preset demo

# Unit tests, then every notebook (tiny preset) prepared by papermill and executed by nbval.
test: install
	rm -rf $(NBTEST)
	$(BIN)/pmoe reproduce --preset tiny --prepare-only --executed-dir $(NBTEST)
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(BIN)/python -m pytest tests $(NBTEST) --nbval-lax -p no:cacheprovider

test-unit: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests

clean:
	rm -rf build data/tiny data/demo results/run-tiny results/run-demo results/executed
