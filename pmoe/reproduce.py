"""Run the numbered notebooks in order with papermill (``pmoe reproduce``).

Each notebook declares its inputs in one cell tagged ``parameters``. A preset fixes the
common ones (``preset``, ``data_root``, ``clip_weights``, ``out_dir``, ``datasets``,
``seeds``); each notebook receives those it declares. Executed copies go to
``results/executed/<preset>/``. A failing notebook (or a notebook whose datasets or ablation
runs partly failed: it draws what it can, then fails) is recorded and the run goes on; the
summary names every failure, why, and the executed copy that holds its log.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from pmoe.errors import PmoeError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
RESULTS = REPO / "results"

PRESETS = {
    "paper": {"clip_weights": "openai", "data_root": None, "parallel": 1, "seeds": [111]},
    "demo": {"clip_weights": "random", "data_root": "data/demo", "parallel": 2, "seeds": [0, 1]},
    "tiny": {"clip_weights": "random", "data_root": "data/tiny", "parallel": 2, "seeds": [0]},
}


@dataclass
class Outcome:
    notebook: str
    seconds: float
    error: str = ""
    log: str = ""  # the executed copy, which holds the notebook's output and traceback

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass
class Report:
    outcomes: list = field(default_factory=list)

    @property
    def failed(self) -> list:
        return [o for o in self.outcomes if not o.ok]

    def summary(self) -> str:
        lines = [f"{'ok' if o.ok else 'FAILED':>6}  {o.seconds:7.1f} s  {o.notebook}" for o in self.outcomes]
        for outcome in self.failed:
            lines.append(f"\n{outcome.notebook} failed (log: {outcome.log}):\n{outcome.error}")
        verdict = f"{len(self.failed)} of {len(self.outcomes)} notebooks failed" if self.failed else \
            f"all {len(self.outcomes)} notebooks ran"
        return "\n".join(lines + [verdict])


def notebook_paths(selection=None) -> list:
    """The numbered notebooks in order, optionally only those whose name contains a selection item."""
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if selection:
        paths = [p for p in paths if any(item in p.stem for item in selection)]
        if not paths:
            raise PmoeError(f"no notebook matches {selection}; available: {[p.stem for p in notebook_paths()]}")
    return paths


def preset_inputs(preset: str, data_root=None, clip_weights=None, out_dir=None) -> tuple:
    """``(data_root, clip_weights, out_dir)`` with the empty ones taken from the known ``preset``:
    its data folder (None for paper, which has none), its CLIP weights, ``results/run-<preset>``."""
    defaults = PRESETS[preset]
    return (data_root or defaults["data_root"], clip_weights or defaults["clip_weights"],
            out_dir or f"results/run-{preset}")


def common_parameters(preset: str, data_root=None, clip_weights=None, out_dir=None, datasets=None,
                      seeds=None) -> dict:
    """The parameters every notebook may declare, resolved to absolute paths."""
    if preset not in PRESETS:
        raise PmoeError(f"unknown preset {preset!r} for reproduce; use one of {', '.join(PRESETS)}.")
    defaults = PRESETS[preset]
    data_root, clip_weights, out_dir = preset_inputs(preset, data_root, clip_weights, out_dir)
    if data_root is None:
        raise PmoeError("--preset paper needs --data-root PATH: the folder holding one sub-folder per dataset "
                        "(mvtec, visa, ...), see README 'Real data'.")
    params = {
        "preset": preset,
        "data_root": str((REPO / data_root).resolve()),
        "clip_weights": clip_weights,
        "out_dir": str((REPO / out_dir).resolve()),
        "parallel": defaults["parallel"],
        "seeds": [int(seed) for seed in (seeds or defaults["seeds"])],
    }
    if datasets:
        params["datasets"] = list(datasets)
    return params


def declared_parameters(path) -> set:
    """Names declared in a notebook's ``parameters`` cell."""
    import papermill

    return set(papermill.inspect_notebook(str(path)))


def kernel_config():
    """Jupyter settings for the kernels papermill starts: encrypted channels where possible.

    ipykernel >= 7 warns at every start of a kernel whose local TCP channels are unencrypted,
    once per notebook run. Recent jupyter_client versions provision CurveZMQ keys for kernels that
    declare support, as the native ``python3`` kernel does, when asked for ``auto`` encryption.
    """
    import zmq
    from jupyter_client import KernelManager
    from traitlets.config import Config

    if "transport_encryption" not in KernelManager.class_trait_names() or not zmq.has("curve"):
        return Config()
    return Config({"KernelManager": {"transport_encryption": "auto"}})


def run_notebook(source, target, parameters: dict, prepare_only: bool = False, progress: bool = False) -> Outcome:
    """Execute one notebook with the parameters it declares; failures become an Outcome, not an exception."""
    import papermill

    source, target = Path(source), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    declared = declared_parameters(source)
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(source), str(target), parameters={k: v for k, v in parameters.items() if k in declared},
            prepare_only=prepare_only, cwd=str(REPO), progress_bar=progress, kernel_name="python3",
            config=kernel_config(),
        )
    except papermill.PapermillExecutionError as error:
        return Outcome(source.name, time.perf_counter() - start, f"{error.ename}: {error.evalue}", str(target))
    except Exception as error:  # a dead kernel or unreadable notebook: recorded, the others still run
        return Outcome(source.name, time.perf_counter() - start, f"{type(error).__name__}: {error}", str(target))
    return Outcome(source.name, time.perf_counter() - start, log=str(target))


def reproduce(preset: str, *, data_root=None, clip_weights=None, datasets=None, out_dir=None,
              executed_dir=None, notebooks=None, seeds=None, prepare_only=False, echo=print) -> Report:
    """Run (or only prepare) the notebooks in order; returns a Report of every outcome."""
    params = common_parameters(preset, data_root, clip_weights, out_dir, datasets, seeds)
    executed = Path(executed_dir) if executed_dir else RESULTS / "executed" / preset
    report = Report()
    for path in notebook_paths(notebooks):
        echo(f"[{preset}] {'preparing' if prepare_only else 'running'} {path.name}")
        outcome = run_notebook(path, executed / path.name, params, prepare_only=prepare_only)
        report.outcomes.append(outcome)
        if not outcome.ok:
            echo(f"[{preset}] {path.name} FAILED: {outcome.error.splitlines()[0] if outcome.error else ''}")
    return report


def run_batch(notebook: str, parameter_sets: dict, executed_dir, parallel: int = 1, echo=print) -> Report:
    """Run one notebook once per named parameter set (e.g. per dataset), recording each outcome.

    ``parameter_sets`` maps a label to the parameters of that run; a failure is recorded and
    the batch continues. ``parallel`` runs that many kernels at once (CPU demos; keep 1 when
    the runs share one GPU). Executed copies are ``executed_dir/<notebook>_<label>.ipynb``;
    outcomes are reported in the order of ``parameter_sets``.
    """
    from concurrent.futures import ThreadPoolExecutor

    source = NOTEBOOKS / notebook
    if not source.is_file():
        raise PmoeError(f"notebook {source} does not exist; expected one of {[p.name for p in notebook_paths()]}")

    def run_one(label):
        echo(f"running {source.name} for {label}")
        outcome = run_notebook(source, Path(executed_dir) / f"{source.stem}_{label}.ipynb", parameter_sets[label])
        outcome.notebook = f"{source.stem} [{label}]"
        return outcome

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        return Report(list(pool.map(run_one, parameter_sets)))
