"""The Python API as the README shows it."""

import torch

import taskres


def test_readme_api_example(split_dataset, openai_rn_file, tmp_path):
    image_dir, split_file = split_dataset
    backbone = taskres.load_backbone(str(openai_rn_file), device="cpu")
    data = taskres.open_dataset(image_dir, split_file, templates=["a photo of a {}."])
    shots = taskres.sample_fewshot(data, shots=4, seed=1)  # {"train": [...], "val": [...]}

    cache = taskres.FeatureCache(tmp_path / "cache")
    train_x, _ = cache.features(backbone, [data.path(e) for e in shots["train"]])  # (N, D)
    train_y = torch.tensor([e.label for e in shots["train"]])
    test_x, _ = cache.features(backbone, [data.path(e) for e in data.test])
    test_y = torch.tensor([e.label for e in data.test])

    base = taskres.build_base_classifier(backbone, data.classnames, data.templates)  # (C, D)
    head = taskres.TaskResHead(base, backbone.logit_scale, taskres.TaskResConfig(alpha=0.5))
    zero_shot = taskres.accuracy_metrics(taskres.predict_logits(head, test_x), test_y, data.classnames)
    taskres.fit(head, train_x, train_y, taskres.OptimConfig(lr=2e-3, epochs=20), seed=1)
    tuned = taskres.accuracy_metrics(taskres.predict_logits(head, test_x), test_y, data.classnames)

    assert head.text_feature_residuals.abs().sum() > 0
    assert tuned["n_test"] == zero_shot["n_test"] == 12
    assert cache.encoded == len(shots["train"]) + len(data.test)
