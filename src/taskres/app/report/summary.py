"""The numbers every table and figure shows, computed once: mean and std over seeds, the Fig. 4 points and their
correlations.

One convention for the spread over seeds everywhere (results.csv, results.md, the figures' bands, the demo's table):
``numpy.std`` with ddof=0, as CoOp's ``parse_test_res.py``, which the papers' ± follow.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard deviation of the values (numpy, ddof=0, as CoOp's parse_test_res.py)."""
    return float(np.mean(values)), float(np.std(values, ddof=0))


def summarise(records: list[dict]) -> list[dict]:
    """Rows (dataset, backbone, method, grid options, shots, eval_dataset) -> n_seeds, mean, std (ddof=0), in %,
    sorted by the key's text."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        groups[(r["dataset"], r["backbone"], r["method"], r.get("options", ()), r["shots"], r["eval_dataset"])].append(
            r["accuracy"]
        )
    rows = []
    for (d, b, m, o, k, e), v in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        mean, std = mean_std(v)
        rows.append(
            {
                "dataset": d,
                "backbone": b,
                "method": m,
                "options": o,
                "shots": k,
                "eval_dataset": e,
                "n_seeds": len(v),
                "mean": mean,
                "std": std,
            }
        )
    return rows


def transfer_difficulty(num_classes: int, zero_shot_accuracy: float) -> float:
    """The paper's relative transfer difficulty: chance accuracy over zero-shot accuracy, (1 / C) / acc."""
    return (1.0 / num_classes) / max(zero_shot_accuracy / 100.0, 1e-6)


def difficulty_points(records: list[dict]) -> dict[tuple[str, str], list[tuple[str, float, float]]]:
    """Fig. 4 points per (backbone, TaskRes label): (dataset, relative transfer difficulty, mean |residual| over
    seeds) at the largest shot count of that label."""
    tr = [
        r
        for r in records
        if r["method"].split(" (")[0] == "taskres"
        and not r["eval_dataset"]
        and r.get("residual_mean_abs") is not None
        and r.get("zero_shot_accuracy")
    ]
    out: dict[tuple[str, str], list[tuple[str, float, float]]] = {}
    for key in sorted({(r["backbone"], r["method"]) for r in tr}):
        mine = [r for r in tr if (r["backbone"], r["method"]) == key]
        top = max(r["shots"] for r in mine)
        by_dataset: dict[str, list[dict]] = defaultdict(list)
        for r in mine:
            if r["shots"] == top:
                by_dataset[r["dataset"]].append(r)
        out[key] = [
            (
                d,
                transfer_difficulty(rs[0]["num_classes"], rs[0]["zero_shot_accuracy"]),
                mean_std([r["residual_mean_abs"] for r in rs])[0],
            )
            for d, rs in sorted(by_dataset.items())
        ]
    return out


def correlations(records: list[dict]) -> list[dict]:
    """Pearson and Spearman correlation of the Fig. 4 points (scipy.stats), for each set of three or more datasets."""
    from scipy.stats import pearsonr, spearmanr

    out = []
    for (backbone, label), points in difficulty_points(records).items():
        if len(points) < 3:
            continue
        x, y = [p[1] for p in points], [p[2] for p in points]
        pr, sr = pearsonr(x, y), spearmanr(x, y)
        shots = max(r["shots"] for r in records if r["method"] == label)
        out.append(
            {
                "label": f"{backbone} {label}",
                "n": len(points),
                "pearson": float(pr.statistic),
                "pearson_p": float(pr.pvalue),
                "spearman": float(sr.statistic),
                "spearman_p": float(sr.pvalue),
                "shots": shots,
            }
        )
    return out
