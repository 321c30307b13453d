"""Few-shot sampling, bit-for-bit as the official TaskRes/CoOp code draws it (docs/protocol.md#few-shot-sampling).

A pure function of (entries, K, seed): a private ``random.Random(seed)`` plays the role of the official code's
freshly seeded global stream, so nothing drawn elsewhere can shift the selection.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from taskres.data.splits import DatasetSplits, Entry
from taskres.errors import TaskResValueError


def _draw(rng: random.Random, entries: Sequence[Entry], shots: int) -> list[Entry]:
    by_label: dict[int, list[Entry]] = {}
    for e in entries:  # dict order = order of first appearance, as the official split_dataset_by_label
        by_label.setdefault(e.label, []).append(e)
    out: list[Entry] = []
    for items in by_label.values():
        out.extend(rng.sample(items, shots) if len(items) >= shots else items)
    return out


def sample_fewshot(splits: DatasetSplits, shots: int, seed: int) -> dict[str, list[Entry]]:
    """Return ``{"train": [...], "val": [...]}``: K train shots per class, then min(K, 4) val shots per class.

    The val draw continues the same random stream after the train draw, as in the official code.
    """
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise TaskResValueError(f"--shots must be an integer >= 1 (images per class); got {shots!r}.")
    rng = random.Random(seed)
    train = _draw(rng, splits.train, shots)
    val = _draw(rng, splits.val, min(shots, 4)) if (splits.sample_val and splits.val) else []
    return {"train": train, "val": val}
