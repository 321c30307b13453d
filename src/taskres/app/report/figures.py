"""The figures, for `taskres report` and `taskres demo` alike: accuracy against shots (Fig. 3: one panel per dataset
plus their average, ± std bands) and TaskRes's residual magnitude against transfer difficulty (Fig. 4).

Drawn on a bare ``matplotlib.figure.Figure``: no pyplot, so no global backend or figure registry is touched.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np

from taskres.app.report.records import ZERO_SHOT, readable
from taskres.app.report.summary import correlations, difficulty_points
from taskres.atomic import atomic_path

BOTH = (".png", ".svg")


def plot_accuracy(rows: list[dict], stem: Path, suffixes: tuple[str, ...] = BOTH) -> list[Path]:
    """Fig. 3 from the summary rows of the first backbone, saved as ``stem`` + each suffix."""
    return save(accuracy_figure(rows), stem, suffixes)


def accuracy_figure(rows: list[dict]):
    """Fig. 3 from the summary rows of the first backbone: one panel per dataset plus their average."""
    few = [r for r in rows if not r["eval_dataset"]]
    backbone = sorted({r["backbone"] for r in few})[0]
    few = [r for r in few if r["backbone"] == backbone]
    datasets = list(dict.fromkeys(r["dataset"] for r in few)) + ["average"]
    methods = sorted({r["method"] for r in few if r["method"] != ZERO_SHOT})
    cols = min(4, len(datasets))
    nrows = -(-len(datasets) // cols)
    fig = _figure(4 * cols, 3.2 * nrows)
    index = {(r["dataset"], r["method"], r["shots"]): r for r in few}
    for i, dataset in enumerate(datasets):
        ax = fig.add_subplot(nrows, cols, i + 1)
        sources = datasets[:-1] if dataset == "average" else [dataset]
        for j, m in enumerate(methods):
            ks = sorted({r["shots"] for r in few if r["method"] == m})
            pts = _average_points(index, sources, m, ks) if dataset == "average" else _points(index, dataset, m, ks)
            if not pts:
                continue
            k, mean, std = (np.array(v, dtype=float) for v in zip(*pts))
            ax.plot(k, mean, marker="o", color=f"C{j}", label=readable(m))
            ax.fill_between(k, mean - std, mean + std, color=f"C{j}", alpha=0.2)
        _zero_shot_line(ax, [index.get((d, ZERO_SHOT, 0)) for d in sources])
        ax.set_xscale("log", base=2)
        shots = sorted({r["shots"] for r in few if r["shots"]})
        ax.set_xticks(shots, [str(k) for k in shots])  # 1, 2, 4 rather than 2^0, 2^1, 2^2
        ax.minorticks_off()
        ax.set_title(readable(dataset))
        ax.set_xlabel("shots per class")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _points(index: dict, dataset: str, method: str, shots: list[int]) -> list[tuple[Any, Any, Any]]:
    """(shots, mean, std) of the dataset's cells."""
    return [
        (k, index[(dataset, method, k)]["mean"], index[(dataset, method, k)]["std"])
        for k in shots
        if (dataset, method, k) in index
    ]


def _average_points(index: dict, datasets: list[str], method: str, shots: list[int]) -> list[tuple[Any, Any, Any]]:
    """(shots, mean over datasets, no band) where every dataset has the cell."""
    groups = [(k, [index.get((d, method, k)) for d in datasets]) for k in shots]
    return [(k, np.mean([p["mean"] for p in ps if p is not None]), 0.0) for k, ps in groups if all(ps)]


def _zero_shot_line(ax, zero_shot: list[dict | None]) -> None:
    if all(zero_shot):
        ax.axhline(
            np.mean([z["mean"] for z in zero_shot if z is not None]),
            color="gray",
            linestyle="--",
            linewidth=1,
            label="zero-shot",
        )


def plot_difficulty(records: list[dict], stem: Path, suffixes: tuple[str, ...] = BOTH) -> list[Path]:
    """Fig. 4: mean |residual| of TaskRes at the largest shot count against (1/C) / zero-shot accuracy, one colour
    per (backbone, TaskRes label) with its correlations; nothing when no run has a residual."""
    fig = difficulty_figure(records)
    return [] if fig is None else save(fig, stem, suffixes)


def difficulty_figure(records: list[dict]):
    """The Fig. 4 figure, or None when no run has a residual."""
    sets = difficulty_points(records)
    if not sets:
        return None
    stats = {c["label"]: c for c in correlations(records)}
    fig = _figure(6.5, 4.5)
    ax = fig.add_subplot()
    for j, ((backbone, label), points) in enumerate(sets.items()):
        c = stats.get(f"{backbone} {label}")
        legend = f"{backbone} {label}" + (f": r={c['pearson']:.2f}, rho={c['spearman']:.2f}, n={c['n']}" if c else "")
        ax.scatter([p[1] for p in points], [p[2] for p in points], color=f"C{j % 10}", label=readable(legend))
        if j == 0:
            for d, x, y in points:
                ax.annotate(readable(d), (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("relative transfer difficulty = (1 / C) / zero-shot accuracy")
    ax.set_ylabel("mean |residual| at the largest shot count")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def save(fig, stem: Path, suffixes: tuple[str, ...] = BOTH) -> list[Path]:
    """``stem`` + each suffix, each written atomically (the format named, as the temporary file's name has none);
    PNG at 110 dpi."""
    paths = [stem.with_suffix(s) for s in suffixes]
    for path in paths:
        with atomic_path(path) as tmp:
            if path.suffix == ".png":
                fig.savefig(tmp, format="png", dpi=110)
            else:
                fig.savefig(tmp, format=path.suffix[1:])
    return paths


def svg_text(fig) -> str:
    """The figure as an ``<svg>`` element to inline in HTML (glyphs as paths: no font needed), without the XML
    prolog and the creator metadata."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    text = buf.getvalue()
    return re.sub(r"\s*<metadata>.*?</metadata>", "", text[text.index("<svg") :], flags=re.S)
