"""Evaluation (taskres.evaluate) against the metrics computed by brute force here: accuracy, per-class accuracy
and its mean over the classes with test images, and batched prediction."""

from __future__ import annotations

import pytest
import torch

from taskres.evaluate import accuracy_metrics, evaluate, predict_logits
from taskres.methods.base import CosineHead, cosine_logits


def brute_metrics(logits, labels, c):
    pred = [max(range(c), key=lambda j: (float(row[j]), -j)) for row in logits]
    right = [int(p == int(y)) for p, y in zip(pred, labels)]
    per = []
    for k in range(c):
        idx = [i for i, y in enumerate(labels) if int(y) == k]
        per.append(None if not idx else 100.0 * sum(right[i] for i in idx) / len(idx))
    scored = [p for p in per if p is not None]
    return 100.0 * sum(right) / len(right), sum(right), per, sum(scored) / len(scored)


def test_accuracy_metrics_by_brute_force():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(37, 4, generator=g)
    labels = torch.tensor([0, 1, 1, 2] * 9 + [1])  # label 3 has no test image
    acc, n_correct, per, mean = brute_metrics(logits, labels, 4)
    m = accuracy_metrics(logits, labels, ["a", "b", "b", "d"])
    assert m["accuracy"] == pytest.approx(acc) and m["n_correct"] == n_correct and m["n_test"] == 37
    assert [p["accuracy"] for p in m["per_class_accuracy"]] == pytest.approx(per)
    assert [p["n"] for p in m["per_class_accuracy"]] == [9, 19, 9, 0]
    assert [(p["label"], p["class"]) for p in m["per_class_accuracy"]] == [(0, "a"), (1, "b"), (2, "b"), (3, "d")]
    assert m["mean_per_class_accuracy"] == pytest.approx(mean)
    assert 0 < n_correct < 37 and m["mean_per_class_accuracy"] != pytest.approx(m["accuracy"])
    empty = accuracy_metrics(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), ["a", "b"])
    assert empty["n_test"] == 0 and empty["accuracy"] != empty["accuracy"] and empty["mean_per_class_accuracy"] == 0


def test_mean_per_class_accuracy_with_one_scored_class():
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    m = accuracy_metrics(logits, torch.tensor([0, 0, 0]), ["a", "b"])  # only class a has test images
    assert m["mean_per_class_accuracy"] == pytest.approx(100.0 * 2 / 3) == pytest.approx(m["accuracy"])


def test_predict_logits_batches_and_evaluate():
    g = torch.Generator().manual_seed(6)
    base, feats = torch.randn(3, 5, generator=g), torch.randn(11, 5, generator=g)
    head = CosineHead(base, 10.0)
    head.train()
    full = cosine_logits(feats, base, 10.0)  # checked against the pairwise formula in test_methods.py
    for batch in (1, 4, 11, 4096):
        torch.testing.assert_close(predict_logits(head, feats, batch_size=batch), full, rtol=1e-5, atol=1e-5)
    assert not head.training
    assert predict_logits(head, feats[:0]).shape == (0, 0)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1])
    assert evaluate(head, feats, labels, ["x", "y", "z"]) == accuracy_metrics(full, labels, ["x", "y", "z"])


def test_confusions_count_every_misclassified_pair_by_brute_force():
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(60, 5, generator=g), torch.randint(0, 5, (60,), generator=g)
    m = accuracy_metrics(logits, labels, list("abcde"))
    pred = logits.argmax(1).tolist()
    want: dict[tuple[int, int], int] = {}
    for t, p in zip(labels.tolist(), pred):
        if t != p:
            want[(t, p)] = want.get((t, p), 0) + 1
    assert {(t, p): n for t, p, n in m["confusions"]} == want and m["confusions_complete"]
    assert [n for *_, n in m["confusions"]] == sorted(want.values(), reverse=True)
    assert sum(want.values()) == m["n_test"] - m["n_correct"]


def test_confusions_of_a_large_dataset_keep_the_most_frequent():
    from taskres.evaluate import CONFUSIONS_KEPT

    labels = torch.arange(1000).repeat(2)  # (2000,)
    pred = (labels + 1) % 1000
    pred[:3] = 7  # classes 0, 1, 2 -> 7 once each; class 7 -> 8 twice
    logits = torch.nn.functional.one_hot(pred, 1000).float()
    m = accuracy_metrics(logits, labels, [str(i) for i in range(1000)])
    assert len(m["confusions"]) == CONFUSIONS_KEPT and not m["confusions_complete"]
    assert all(n == 2 for *_, n in m["confusions"][:10]) and m["confusions"][0] == [3, 4, 2]
