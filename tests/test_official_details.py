"""The official code's precision details (issue 28), each against OpenAI's own CLIP code (the ``clip`` package,
clip-anytorch) on tiny OpenAI-format models: the TaskRes trainer's fp16 base from the model that ``build_model``
converts, its fp16-rounded pixels for ResNets, and CoOp's ``ZeroshotCLIP`` in fp16.

The official repositories vendor an older ``clip/model.py`` whose ResNet attention pool attends from every position
and keeps the first (``query=x``, ``x[0]``); the package attends from the first only (``query=x[:1]``), which rounds
differently. The reference here is the package's code with the vendored pool (docs/protocol.md#precision).
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from taskres.backbones import load_backbone
from taskres.backbones.official import fp16_backbone, trainer_backbone, with_official
from taskres.text import build_base_classifier, zeroshot_clip_classifier

CLASSNAMES = ["red_car", "dog", "a b c"]
TEMPLATES = ["a photo of a {}.", "itap of a {}."]
CONTEXT = 16


def _clip_module(name: str):
    """``clip/<name>.py`` of the installed clip-anytorch, loaded alone (its ``__init__`` needs pkg_resources)."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the clip package (clip-anytorch, the test extra) is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / f"{name}.py"
    module_spec = importlib.util.spec_from_file_location(f"openai_clip_{name}", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def clip_model():
    module = _clip_module("model")
    module.AttentionPool2d.forward = _vendored_attention_pool
    return module


@pytest.fixture(scope="module")
def tokenize():
    tokenizer = _clip_module("simple_tokenizer").SimpleTokenizer()
    start, end = tokenizer.encoder["<|startoftext|>"], tokenizer.encoder["<|endoftext|>"]

    def tokenize(texts: list[str]) -> torch.Tensor:  # clip.tokenize, for texts that fit the context
        out = torch.zeros(len(texts), CONTEXT, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [start, *tokenizer.encode(text), end]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    return tokenize


def _vendored_attention_pool(self, x):
    """OpenAI's AttentionPool2d.forward as the TaskRes and CoOp repositories vendor it: every position a query."""
    x = x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3]).permute(2, 0, 1)  # NCHW -> (HW)NC
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
    x = x + self.positional_embedding[:, None, :].to(x.dtype)
    bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
    x, _ = F.multi_head_attention_forward(
        query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=self.num_heads,
        q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight,
        in_proj_weight=None, in_proj_bias=bias, bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0,
        out_proj_weight=self.c_proj.weight, out_proj_bias=self.c_proj.bias, use_separate_proj_weight=True,
        training=self.training, need_weights=False,
    )  # fmt: skip
    return x[0]


def openai_file(clip_model, tmp_path: Path, kind: str) -> tuple[Path, dict]:
    """A tiny OpenAI CLIP (ResNet or ViT; text width 256, 4 heads) with random norm layers, saved as OpenAI ships
    its weights (every tensor fp16); (path, state dict)."""
    torch.manual_seed(0)
    if kind == "rn":  # embed, image size, layers, width, patch, context, vocab, text width, heads, layers
        model = clip_model.CLIP(32, 64, (1, 1, 1, 1), 16, None, CONTEXT, 49408, 256, 4, 2)
    else:
        model = clip_model.CLIP(32, 32, 2, 128, 8, CONTEXT, 49408, 256, 4, 2)
    for module in model.modules():
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.5)
    state = {k: v.half() for k, v in model.state_dict().items()}
    path = tmp_path / f"tiny-{kind}.pt"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module", params=["rn", "vit"])
def pair(request, clip_model, tmp_path_factory):
    """(our backbone, OpenAI's model as ``clip.model.build_model`` builds it: converted to fp16) of one file."""
    path, state = openai_file(clip_model, tmp_path_factory.mktemp("weights"), request.param)
    return load_backbone(str(path)), clip_model.build_model(copy.deepcopy(state)).eval(), request.param


def images(size: int) -> torch.Tensor:
    return torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def test_the_fp16_base_is_the_official_trainers(pair, tokenize):
    ours, official, _ = pair
    rows = []  # TaskRes's _get_base_text_features: TextEncoder on the converted model, the mean in fp16
    for name in CLASSNAMES:
        tokens = tokenize([t.format(name) for t in TEMPLATES])
        x = official.token_embedding(tokens).type(official.dtype) + official.positional_embedding.type(official.dtype)
        x = official.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = official.ln_final(x).type(official.dtype)
        rows.append(x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ official.text_projection)
    expected = torch.stack(rows).mean(1).float()
    assert torch.equal(build_base_classifier(ours, CLASSNAMES, TEMPLATES, text_precision="fp16"), expected)


@torch.no_grad()
def test_the_trainer_encodes_fp16_rounded_pixels_with_resnets_and_the_fp32_image_with_vits(pair):
    ours, official, kind = pair
    encoder = copy.deepcopy(official).float().visual  # TaskRes.build_model: self.model.float() after the base
    pixels = images(ours.image_size)
    if kind == "rn":  # CustomCLIP.forward: image.type(fp16); ModifiedResNet casts it back to fp32
        expected = encoder(pixels.type(torch.float16))
    else:  # the ViT raises on the fp16 input, and the bare except encodes image.float()
        with pytest.raises(RuntimeError):
            encoder(pixels.type(torch.float16))
        expected = encoder(pixels.float())
    trainer = trainer_backbone(ours)
    assert trainer.identity.official == "trainer" and trainer.model.training is False
    assert torch.equal(trainer.encode_images(pixels), expected)
    assert not torch.equal(ours.encode_images(pixels), expected)  # pixels unrounded (rn), fused attention (vit)
    assert ours.identity.official is None  # the backbone given is left as it is


@torch.no_grad()
def test_zero_shot_runs_in_fp16_as_coops_zeroshot_clip(pair, tokenize):
    ours, official, _ = pair
    template = "a photo of a {}."
    text = official.encode_text(tokenize([template.format(n.replace("_", " ")) for n in CLASSNAMES]))
    text = text / text.norm(dim=-1, keepdim=True)  # ZeroshotCLIP.build_model, in fp16
    assert text.dtype == torch.float16
    classifier = zeroshot_clip_classifier(ours, CLASSNAMES, [template])
    assert torch.equal(classifier, text.float())
    pixels = images(ours.image_size)
    fp16 = fp16_backbone(ours)
    assert torch.equal(fp16.encode_images(pixels), official.encode_image(pixels).float())
    two = zeroshot_clip_classifier(ours, CLASSNAMES, TEMPLATES)  # ZeroshotCLIP2's ensemble, in fp16
    feats = [official.encode_text(tokenize([t.format(n.replace("_", " ")) for n in CLASSNAMES])) for t in TEMPLATES]
    mean = sum(f / f.norm(dim=-1, keepdim=True) for f in feats) / len(feats)
    assert torch.equal(two, (mean / mean.norm(dim=-1, keepdim=True)).float())


def test_the_official_modes_are_recorded_and_apply_to_openai_backbones_only(pair):
    ours, _, kind = pair
    trainer, fp16 = trainer_backbone(ours), fp16_backbone(ours)
    assert trainer.identity.to_json()["official"] == "trainer" and fp16.identity.official == "fp16"
    assert "official" not in ours.identity.to_json()  # runs of the default protocol record what they did before
    keys = {str(b.identity.weights_key()) for b in (ours, trainer, fp16)}
    assert len(keys) == 3  # cached features kept apart
    assert (trainer.pixel_dtype == torch.float16) == (kind == "rn")
    assert with_official(ours, "trainer").identity == trainer.identity and with_official(ours, None) is ours
    assert with_official(ours, "fp16").identity == fp16.identity
    with pytest.raises(Exception, match="official"):
        with_official(ours, "fp8")
    assert fp16_backbone(trainer).identity == fp16.identity  # the fp16 text encoder of a trainer run
    with pytest.raises(ValueError, match="fp32 form"):  # the converted model is not the trainer's
        trainer_backbone(fp16)


def test_the_trainer_leaves_backbones_the_official_code_cannot_run():
    demo = load_backbone("taskres-demo")  # an open_clip model, not an OpenAI-format one
    assert trainer_backbone(demo) is demo


def test_official_taskres_encodes_records_and_reloads_as_the_trainer(pair, tmp_path):
    """`train --protocol official` (TaskRes) encodes the training and test images with the trainer's encoder
    (fp16-rounded pixels for a ResNet), records that mode, and eval and predict reload the backbone in it."""
    from conftest import make_split_dataset

    from taskres.cache import FeatureCache
    from taskres.config import Setup, TrainConfig
    from taskres.data.sources import open_dataset
    from taskres.features import encode_split
    from taskres.reuse import evaluate_run, load_run_backbone
    from taskres.workflow import encode_training, train

    ours, _, kind = pair
    image_dir, split_file = make_split_dataset(tmp_path / "tiny", n_train=2, n_val=1, n_test=3)
    data = open_dataset(image_dir, split_file, ["a photo of a {}."])
    setup = Setup(cache_dir=str(tmp_path / "cache"), quiet=True)
    config = TrainConfig.resolve("taskres", 1, 1, optim={"epochs": 1}, protocol="official")
    encode_training(ours, data, config, setup)  # the encoding alone, as a sweep encodes its cells first
    paths = [data.path(e) for e in data.test]
    trainer, _ = FeatureCache(None).features(trainer_backbone(ours), paths)
    plain, _ = FeatureCache(None).features(ours, paths)
    assert torch.allclose(trainer, plain, atol=1e-2)
    if kind == "rn":  # its pixels rounded to fp16 (a ViT runs sequence first, which may round alike)
        assert not torch.equal(trainer, plain)
    cached = setup.cache()
    assert torch.equal(encode_split(with_official(ours, "trainer"), data, data.test, setup, cached)[0], trainer)
    assert cached.encoded == 0  # what was encoded, read back from the cache under the trainer's key
    _, metrics = train(ours, data, config, setup, out=tmp_path / "run")
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["backbone"]["official"] == "trainer"
    reloaded = load_run_backbone(record, setup)
    assert reloaded.identity.official == "trainer" and reloaded.pixel_dtype == trainer_backbone(ours).pixel_dtype
    assert load_run_backbone(record, setup, official=False).identity.official is None  # what export writes
    assert evaluate_run(tmp_path / "run", setup)["n_correct"] == metrics["n_correct"]
