"""The committed notebooks: clean, parameterised, orchestration only; and the papermill runner."""

import ast
import json

import nbformat
import pytest

from pmoe import reproduce
from pmoe.errors import PmoeError

NOTEBOOKS = reproduce.notebook_paths()
COMMON = {"preset", "data_root", "clip_weights", "out_dir"}


def cells(path):
    return nbformat.read(path, as_version=4).cells


def test_the_numbered_notebooks_exist():
    names = [path.stem for path in NOTEBOOKS]
    assert names[:6] == ["00_quickstart", "01_data_preparation", "02_training", "03_evaluation",
                         "04_table1", "05_ablations"]
    assert names[-1] == "11_known_answer_anomalyclip" and len(names) == 12


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs_or_execution_counts(path):
    raw = json.loads(path.read_text())
    for cell in raw["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{path.name}: a code cell carries outputs"
            assert cell["execution_count"] is None, f"{path.name}: a code cell carries an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_one_parameters_cell_of_literals_with_the_common_names(path):
    tagged = [c for c in cells(path) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: exactly one cell must be tagged 'parameters'"
    names = set()
    for node in ast.parse(tagged[0].source).body:
        assert isinstance(node, ast.Assign), f"{path.name}: the parameters cell holds assignments only"
        ast.literal_eval(node.value)  # raises for anything but a literal
        names.update(target.id for target in node.targets)
    assert COMMON <= names, f"{path.name}: parameters must include {sorted(COMMON - names)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_header_and_short_cells_without_definitions(path):
    notebook = cells(path)
    header = notebook[0]
    assert header.cell_type == "markdown"
    for part in ("Purpose", "Inputs", "Outputs", "Hardware", "papermill"):
        assert part in header.source, f"{path.name}: the header lacks {part!r}"
    for cell in notebook:
        if cell.cell_type != "code":
            continue
        tree = ast.parse(cell.source)
        defined = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Lambda))]
        assert not defined, f"{path.name}: define functions in pmoe/, not in notebooks"
        assert len(cell.source.splitlines()) <= 15, f"{path.name}: a cell longer than 15 lines"


def test_unknown_preset_and_missing_paper_data_root_are_clear_errors():
    with pytest.raises(PmoeError, match="unknown preset"):
        reproduce.common_parameters("huge")
    with pytest.raises(PmoeError, match="--data-root"):
        reproduce.common_parameters("paper")


def test_preset_inputs_fill_only_the_empty_values():
    assert reproduce.preset_inputs("demo") == ("data/demo", "random", "results/run-demo")
    assert reproduce.preset_inputs("paper", "", "", "") == (None, "openai", "results/run-paper")
    assert reproduce.preset_inputs("tiny", "d", "w.pt", "o") == ("d", "w.pt", "o")


def test_batch_records_failures_and_keeps_going(tmp_path, monkeypatch):
    """A batch over two 'datasets', the first failing: both outcomes recorded, the second ok."""
    source = tmp_path / "nb.ipynb"
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell("dataset = 'x'", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("assert dataset != 'broken', 'dataset broken is missing'"),
        nbformat.v4.new_code_cell("open('done_' + dataset, 'w').write('ok')"),
    ]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, source)
    monkeypatch.setattr(reproduce, "NOTEBOOKS", tmp_path)
    monkeypatch.setattr(reproduce, "REPO", tmp_path)
    report = reproduce.run_batch("nb.ipynb", {"broken": {"dataset": "broken"}, "good": {"dataset": "good"}},
                                 tmp_path / "executed", echo=lambda *_: None)
    assert [o.ok for o in report.outcomes] == [False, True]
    assert "dataset broken is missing" in report.outcomes[0].error
    assert (tmp_path / "done_good").exists() and not (tmp_path / "done_broken").exists()
    assert "1 of 2 notebooks failed" in report.summary()
    assert (tmp_path / "executed" / "nb_good.ipynb").is_file()


def test_a_missing_data_root_stops_the_first_cell_with_what_to_pass(tmp_path):
    source = reproduce.NOTEBOOKS / "03_evaluation.ipynb"
    outcome = reproduce.run_notebook(source, tmp_path / "out.ipynb", {"preset": "paper", "data_root": str(tmp_path / "none")})
    assert not outcome.ok and "Pass -p data_root" in outcome.error
    executed = [c for c in cells(tmp_path / "out.ipynb") if c.cell_type == "code"]
    failed = [i for i, c in enumerate(executed) if any(o.get("output_type") == "error" for o in c.outputs)]
    assert failed == [2]  # parameters, injected parameters, then the setup cell
