"""Few-shot sampling (taskres.data.sampling) against the official rule written out with the global random stream."""

import random
from dataclasses import replace
from pathlib import Path

import pytest

from taskres.data.sampling import sample_fewshot
from taskres.data.splits import DatasetSplits, Entry
from taskres.errors import TaskResError


def reference_official(train, val, shots, seed):
    """The SPEC rule written out with the global stream, as Dassl's generate_fewshot_dataset does after seeding."""
    random.seed(seed)

    def draw(items, k):
        groups = {}
        for item in items:
            groups.setdefault(item[1], []).append(item)
        picked = []
        for label in groups:
            picked += random.sample(groups[label], k) if len(groups[label]) >= k else groups[label]
        return picked

    return draw(train, shots), draw(val, min(shots, 4))


def toy_splits(n_train=(7, 3, 12, 5), n_val=(5, 2, 6, 4)):
    # Labels appear in the order 2, 0, 3, 1 so that first-appearance order differs from sorted order.
    order = [2, 0, 3, 1]

    def make(counts, split):
        items = []
        for i in range(max(counts)):
            for label in order:
                if i < counts[label]:
                    items.append([f"{split}/{label}/{i}.jpg", label, f"class_{label}"])
        return items

    train, val = make(n_train, "train"), make(n_val, "val")
    to_entries = lambda xs: tuple(Entry(*x) for x in xs)  # noqa: E731
    ds = DatasetSplits(
        "toy",
        image_dir=Path("."),
        train=to_entries(train),
        val=to_entries(val),
        test=to_entries(train[:4]),
        classnames=tuple(f"class_{i}" for i in range(4)),
    )
    return ds, train, val


@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 17])
def test_sampling_matches_the_official_rule(shots, seed):
    ds, train, val = toy_splits()
    ref_train, ref_val = reference_official(train, val, shots, seed)
    got = sample_fewshot(ds, shots, seed)
    assert [e.to_json() for e in got["train"]] == ref_train
    assert [e.to_json() for e in got["val"]] == ref_val


def test_sampling_ignores_global_random_state():
    ds, _, _ = toy_splits()
    random.seed(123)
    a = sample_fewshot(ds, 4, 1)
    random.random()
    b = sample_fewshot(ds, 4, 1)
    assert a == b
    assert sample_fewshot(ds, 4, 2) != a


def test_classes_with_fewer_images_than_k_keep_all_and_first_appearance_order():
    ds, _, _ = toy_splits()
    got = sample_fewshot(ds, 4, 1)["train"]
    labels = [e.label for e in got]
    assert labels[:4] == [2] * 4 and labels[4:8] == [0] * 4 and labels[8:12] == [3] * 4
    assert labels[12:] == [1, 1, 1]  # class 1 has only 3 training images


def test_no_val_draw_when_the_dataset_says_so():
    ds, _, _ = toy_splits()
    assert sample_fewshot(replace(ds, sample_val=False), 4, 1)["val"] == []


@pytest.mark.parametrize("shots", [0, -1, True, False, 2.0, "3", None])
def test_shots_must_be_a_plain_integer_of_at_least_one(shots):
    ds, _, _ = toy_splits()
    with pytest.raises(TaskResError, match="--shots must be an integer >= 1"):
        sample_fewshot(ds, shots, 1)
