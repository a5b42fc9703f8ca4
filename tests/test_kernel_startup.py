"""Kernels started by papermill (`pmoe reproduce`, `make demo`) print nothing at start-up, while a
notebook's own errors still reach the report."""

import nbformat

from pmoe import reproduce


def write_notebook(path, *sources) -> None:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in sources]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)


def test_kernel_start_up_is_quiet_and_errors_still_reach_the_report(tmp_path, capfd):
    write_notebook(tmp_path / "nb.ipynb", "x = 1", "x / 0")
    outcome = reproduce.run_notebook(tmp_path / "nb.ipynb", tmp_path / "out.ipynb", {})
    assert not outcome.ok and outcome.error.startswith("ZeroDivisionError")
    err = capfd.readouterr().err
    assert "[IPKernelApp]" not in err and "frozen modules" not in err, f"the kernel printed at start-up:\n{err}"
