"""Tables and plots from result records (dicts with task, method, shots, seed, accuracy, ...). Reads, never trains."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path


def summarise(records: Sequence[dict]) -> dict[tuple[str, str, int], tuple[float, float, int]]:
    """(task, method, shots) -> (mean accuracy, std over seeds, number of seeds)."""
    groups: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in records:
        groups[(r["task"], r["method"], int(r["shots"]))].append(float(r["accuracy"]))
    return {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for k, v in groups.items()}


def accuracy_table(records: Sequence[dict], shots: Sequence[int]) -> str:
    """One row per task: zero-shot, then TaskRes at each shot count (mean +- std over seeds), and the 16-shot gain."""
    summary = summarise(records)
    tasks = list(dict.fromkeys(r["task"] for r in records))
    head = f"{'task':<18}{'zero-shot':>10}" + "".join(f"{f'{k}-shot':>14}" for k in shots) + f"{'gain':>8}"
    lines = [head, "-" * len(head)]
    for task in tasks:
        zs = summary.get((task, "zero-shot", 0), (float("nan"), 0.0, 0))[0]
        cells = []
        for k in shots:
            mean, std, n = summary.get((task, "taskres", k), (float("nan"), 0.0, 0))
            cells.append(f"{mean:6.1f} +-{std:4.1f}" if n > 1 else f"{mean:10.1f}    ")
        top = summary.get((task, "taskres", max(shots)), (float("nan"), 0, 0))[0]
        lines.append(f"{task:<18}{zs:>10.1f}" + "".join(f"{c:>14}" for c in cells) + f"{top - zs:>+8.1f}")
    return "\n".join(lines)


def _figure(width: float, height: float):
    """A figure and its axes, without pyplot: no global backend or figure registry is touched."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot()


def plot_accuracy_vs_shots(records: Sequence[dict], path: str | Path) -> None:
    summary = summarise(records)
    tasks = list(dict.fromkeys(r["task"] for r in records))
    fig, ax = _figure(9, 4.5)
    for i, task in enumerate(tasks):
        colour = f"C{i}"
        ks = sorted(k for (t, m, k) in summary if t == task and m == "taskres")
        means = [summary[(task, "taskres", k)][0] for k in ks]
        stds = [summary[(task, "taskres", k)][1] for k in ks]
        ax.errorbar(ks, means, yerr=stds, marker="o", color=colour, label=f"{task} (TaskRes)", capsize=3)
        if (task, "zero-shot", 0) in summary:
            ax.axhline(summary[(task, "zero-shot", 0)][0], color=colour, linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 2, 4, 8, 16], labels=["1", "2", "4", "8", "16"])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("TaskRes against shots (dashed: zero-shot)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_residual_vs_difficulty(points: Sequence[dict], path: str | Path) -> None:
    """points: {"task", "difficulty" (relative transfer difficulty), "residual" (mean |x| at the top shot count)}."""
    fig, ax = _figure(6, 4.5)
    for i, p in enumerate(points):
        ax.scatter(p["difficulty"], p["residual"], color=f"C{i}", s=40)
        ax.annotate(p["task"], (p["difficulty"], p["residual"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("relative transfer difficulty = (1 / C) / zero-shot accuracy")
    ax.set_ylabel("mean |residual| at 16 shots")
    ax.set_title("Residual magnitude against transfer difficulty")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
