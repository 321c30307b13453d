"""`taskres report EXP`: the paper's tables and figures from an experiment folder. Reads run folders, never trains.

EXP/report/results.csv     dataset,backbone,method,shots,n_seeds,mean,std[,eval_dataset]   (std: numpy, ddof=0,
                           as CoOp's parse_test_res.py)
EXP/report/results.md      per backbone: methods x shots per dataset, the average over datasets, the DG table
EXP/report/accuracy_vs_shots.{png,svg}        one panel per dataset plus the average, +- std bands (Fig. 3)
EXP/report/residual_vs_difficulty.{png,svg}   TaskRes residual magnitude against transfer difficulty (Fig. 4)
EXP/report/index.html      one self-contained page: what was run, the tables (sortable), the figures (inline SVG),
                           per-class accuracy against zero-shot and confusions per dataset (page.py, drilldown.py)

records.py reads the run folders, summary.py computes every mean and std (one convention), tables.py, figures.py and
page.py draw them; `taskres demo` uses the same summaries, table code and figures.
"""

from __future__ import annotations

import os
from pathlib import Path

from taskres.app.experiment import RUNS, DamagedFile, read_grid, read_json
from taskres.app.report.figures import plot_accuracy, plot_difficulty
from taskres.app.report.page import Page, write_page
from taskres.app.report.records import ZERO_SHOT, collect, failures, imported_runs, method_label
from taskres.app.report.summary import correlations, difficulty_points, mean_std, summarise
from taskres.app.report.tables import console_table, load_published, markdown, published_index, write_csv
from taskres.atomic import write_text
from taskres.errors import TaskResValueError

__all__ = [
    "ZERO_SHOT",
    "collect",
    "console_table",
    "correlations",
    "difficulty_points",
    "mean_std",
    "method_label",
    "plot_accuracy",
    "plot_difficulty",
    "summarise",
    "write_html",
    "write_report",
]


def write_report(exp: str | Path, out: str | Path | None = None, compare_published: bool = False) -> dict:
    """Write results.csv, results.md and the figures under ``out`` (default EXP/report), each file atomically (a
    failed write leaves the file of a previous report whole)."""
    exp = Path(exp)
    records = collect(exp)
    rows = summarise(records)
    grid = read_grid(exp) or {}
    out = report_folder(exp, out)  # made once the experiment has been read
    files = [write_csv(rows, out / "results.csv")]
    published = published_index(load_published()) if compare_published else {}
    md, summary = markdown(rows, records, grid, published)
    write_text(out / "results.md", md)
    files.append(out / "results.md")
    files += plot_accuracy(rows, out / "accuracy_vs_shots")
    files += plot_difficulty(records, out / "residual_vs_difficulty")
    files.append(write_html(exp, out, rows, records, published, grid))
    return {"files": files, "summary": summary, "rows": rows}


def write_html(
    exp: Path,
    out: Path,
    rows: list[dict],
    records: list[dict],
    published: dict | None = None,
    grid: dict | None = None,
) -> Path:
    """``out/index.html`` from the summary rows and records that results.csv and the figures come from; ``grid``:
    EXP/sweep.json's record (default: read, a damaged one an error naming it)."""
    if grid is None:
        grid = read_grid(exp) or {}
    page = Page(exp, out, rows, records, grid, published or {}, failures(exp), imported_runs(exp))
    return write_page(page)


def report_folder(exp: Path, out: str | Path | None) -> Path:
    """The report folder, made: not a file, nor a run folder or a folder inside one (its files would make the run
    one that `taskres train --overwrite` refuses to replace), nor inside EXP/runs."""
    out = Path(out) if out is not None else exp / "report"
    shown = Path(os.path.abspath(out))
    for folder in (shown, *shown.parents):
        if _is_run(folder):
            raise TaskResValueError(
                f"out {str(out)!r} is inside the run folder {str(folder)!r}; report files there would make it a "
                "folder that `taskres train --overwrite` refuses to replace. Choose another folder (default "
                "EXP/report).",
                param="out",
            )
    runs = (exp / RUNS).resolve()
    if out.resolve() == runs or runs in out.resolve().parents:
        raise TaskResValueError(
            f"out {str(out)!r} is inside {str(exp / RUNS)!r}, which holds the run folders only; choose another "
            "folder (default EXP/report).",
            param="out",
        )
    if out.exists() and not out.is_dir():
        raise TaskResValueError(f"out {str(out)!r} exists and is not a folder; choose another path.", param="out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TaskResValueError(
            f"out {str(out)!r} cannot be made ({err.strerror or err}); choose another path.", param="out"
        ) from None
    return out


def _is_run(folder: Path) -> bool:
    """A run folder of taskres: its config.json says which taskres wrote it."""
    try:
        config = read_json(folder / "config.json")
    except DamagedFile:
        return False
    return isinstance(config, dict) and "taskres_version" in config
