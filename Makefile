# pmoe — make install | make demo | make test | make lab   (see README.md)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
NBTEST := build/notebook-tests
KERNEL := $(VENV)/share/jupyter/kernels/pmoe/kernel.json

.PHONY: install demo test test-unit lab clean

install: $(BIN)/pmoe $(KERNEL)

$(BIN)/pmoe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# The environment as the Jupyter kernel "Python (pmoe)" (ipykernel turns frozen modules off for the debugger).
$(KERNEL): $(BIN)/pmoe
	$(BIN)/python -m ipykernel install --sys-prefix --name pmoe --display-name "Python (pmoe)"

# The whole pipeline end to end on synthetic data with a tiny random CLIP (< 10 min on 2 CPU cores).
demo: install
	$(BIN)/pmoe reproduce --preset demo

# Unit tests, then every notebook (tiny preset) prepared by papermill and executed by nbval.
# Tests that read ../shared/fixtures/real (or $PMOE_FIXTURES) skip without it; PMOE_REQUIRE_FIXTURES=1 fails them.
test: install
	rm -rf $(NBTEST)
	$(BIN)/pmoe reproduce --preset tiny --prepare-only --executed-dir $(NBTEST)
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(BIN)/python -m pytest tests $(NBTEST) --nbval-lax -p no:cacheprovider

test-unit: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests

# JupyterLab in the browser, opened on notebooks/ (the whole checkout is browsable, e.g. results/).
lab: install
	$(BIN)/jupyter lab --notebook-dir=. --ContentsManager.preferred_dir=notebooks

clean:
	rm -rf build data/tiny data/demo results/run-tiny results/run-demo results/executed
