"""The paper's own numbers, read from the tidy CSVs in ``results/paper/``.

Usage::

    from pmoe.paper import load_paper, load_variants
    table1 = load_paper(1)          # 7 methods x 15 datasets x 2 metrics, percent as printed
    labels = load_variants(3)       # Table 3's variants in paper order with their printed labels

Every table of the paper with results (Tables 1-6 and 8-12; Table 7 lives in the data
registry) is one CSV with the columns ``table, dataset, cls, method, variant, metric, value``.
The printed "Average" rows are not stored: :mod:`pmoe.tables` computes them.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

import pmoe
from pmoe.errors import DataError, PmoeError

COLUMNS = ["table", "dataset", "cls", "method", "variant", "metric", "value"]
VARIANT_COLUMNS = ["table", "variant", "label"]
PAPER_TABLES = (1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12)
ABLATION_TABLES = (2, 3, 4, 5, 6)
PER_CLASS_TABLES = (8, 9, 10, 11, 12)
PAPER_METHOD = "PromptMoE"


def paper_dir() -> Path:
    """The folder holding the paper's CSVs: ``results/paper/`` of the source checkout."""
    folder = Path(pmoe.__file__).resolve().parents[1] / "results" / "paper"
    if not folder.is_dir():
        raise PmoeError(
            f"the paper's numbers are not at {folder}: they ship with the source checkout, "
            "not with an installed wheel. Clone the repository and install it with "
            "`pip install -e .` to compare against the paper."
        )
    return folder


def table_number(table) -> int:
    """Normalise ``1``, ``"1"`` or ``"table1"`` to the table number, checking it has results."""
    text = str(table).lower().removeprefix("table").strip()
    if not text.isdigit() or int(text) not in PAPER_TABLES:
        raise PmoeError(
            f"no paper results for table {table!r}: choose one of {list(PAPER_TABLES)} "
            "(Table 7, the dataset statistics, is in pmoe.data)."
        )
    return int(text)


def _read(path: Path, columns: list) -> pd.DataFrame:
    """Read one paper CSV as strings (so BTAD's class "01" stays "01"), checking its header."""
    if not path.is_file():
        raise PmoeError(f"{path} is missing: restore it from the repository (git checkout -- {path.name}).")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(frame.columns) != columns:
        raise DataError(f"{path} has columns {list(frame.columns)}, expected {columns}: restore it from git.")
    frame["table"] = frame["table"].astype(int)
    return frame


def load_paper(table) -> pd.DataFrame:
    """The paper's numbers of one table as a tidy frame (``value`` in percent, float)."""
    number = table_number(table)
    path = paper_dir() / f"table{number}.csv"
    frame = _read(path, COLUMNS)
    values = pd.to_numeric(frame["value"], errors="coerce")
    if values.isna().any():
        bad = frame.loc[values.isna(), "value"].tolist()
        raise DataError(f"{path} holds non-numeric values {bad[:5]}: fix them to the printed numbers.")
    return frame.assign(value=values)


def load_variants(table=None) -> pd.DataFrame:
    """The ablation variants (preset names) with their printed labels, in paper order."""
    frame = _read(paper_dir() / "variants.csv", VARIANT_COLUMNS)
    if table is None:
        return frame
    number = table_number(table)
    if number not in ABLATION_TABLES:
        raise PmoeError(f"table {number} is not an ablation: variants exist for tables {list(ABLATION_TABLES)}.")
    return frame[frame["table"] == number].reset_index(drop=True)
