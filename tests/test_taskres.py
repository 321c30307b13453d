import pytest
import torch

from taskres.engine import OptimConfig, fit
from taskres.errors import TaskResError
from taskres.methods.base import cosine_logits as zero_shot_logits
from taskres.methods.taskres import TaskResConfig, TaskResHead


def problem(n=24, c=3, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(c, d, generator=g) * 3
    feats = torch.randn(n, d, generator=g) * 2
    labels = torch.arange(n) % c
    return base, feats, labels


@pytest.mark.parametrize("variant", ["text", "image", "both"])
@pytest.mark.parametrize("learn_alpha", [False, True])
def test_identity_at_init(variant, learn_alpha):
    base, feats, _ = problem()
    head = TaskResHead(base, 100.0, TaskResConfig(alpha=0.5, variant=variant, learn_alpha=learn_alpha))
    expected = 100.0 * torch.nn.functional.normalize(feats, dim=-1) @ torch.nn.functional.normalize(base, dim=-1).t()
    assert torch.equal(head(feats), zero_shot_logits(feats, base, 100.0))
    torch.testing.assert_close(head(feats), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "variant,learn_alpha,trainable",
    [
        ("text", False, {"text_feature_residuals"}),
        ("image", False, {"image_feature_residual"}),
        ("both", True, {"text_feature_residuals", "image_feature_residual", "alpha"}),
    ],
)
def test_only_the_residuals_change(variant, learn_alpha, trainable):
    base, feats, labels = problem()
    head = TaskResHead(base, 100.0, TaskResConfig(variant=variant, learn_alpha=learn_alpha))
    before = {k: v.clone() for k, v in head.state_dict().items()}
    assert {n for n, p in head.named_parameters()} == trainable
    fit(head, feats, labels, OptimConfig(lr=1e-2, epochs=5, batch_size=8), seed=0, quiet=True)
    after = head.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trainable
    assert torch.equal(after["base_text_features"], base)
    assert torch.isfinite(head(feats)).all()


def test_training_improves_the_fit():
    base, feats, labels = problem()
    head = TaskResHead(base, 100.0)
    loss0 = torch.nn.functional.cross_entropy(head(feats), labels).item()
    fit(head, feats, labels, OptimConfig(lr=5e-2, epochs=100, batch_size=256), seed=0, quiet=True)
    assert torch.nn.functional.cross_entropy(head(feats), labels).item() < loss0 * 0.5


def test_export_round_trip():
    base, feats, labels = problem()
    head = TaskResHead(base, 50.0, TaskResConfig(alpha=0.7, variant="both", learn_alpha=True))
    fit(head, feats, labels, OptimConfig(lr=1e-2, epochs=3, batch_size=8), seed=0, quiet=True)
    tensors, meta = head.export()
    assert tensors["text_feature_residuals"].shape == base.shape
    assert tensors["image_feature_residual"].shape == (1, base.shape[1])
    again = TaskResHead.from_export(tensors, meta)
    assert torch.equal(again(feats), head(feats))


def test_bad_config_names_the_parameter_and_is_a_value_error():
    with pytest.raises(ValueError, match="^variant must be one of text, image, both") as err:
        TaskResConfig(variant="texts")
    assert isinstance(err.value, TaskResError) and err.value.param == "variant"
    with pytest.raises(ValueError, match="^alpha must be > 0") as err:
        TaskResConfig(alpha=0)
    assert err.value.param == "alpha"


def test_paper_presets_per_dataset():
    from taskres.config import TrainConfig

    pets = TrainConfig.preset("taskres", shots=16, seed=1, dataset="oxford_pets")
    assert (pets.optim.lr, pets.optim.epochs, pets.method_config.alpha) == (2e-3, 200, 0.5)
    assert TrainConfig.preset("taskres", shots=4, seed=1, dataset="imagenet").optim.lr == 2e-4
    assert TrainConfig.preset("taskres", shots=4, seed=1, dataset="imagenet").optim.epochs == 100
    assert TrainConfig.preset("taskres", shots=1, seed=1, dataset="oxford_flowers").method_config.alpha == 1.0
