import json
import os
import pickle
import time

import pytest
import torch
from conftest import TINY_RN, tiny_clip
from open_clip.model import QuickGELU

from taskres.backbones import load_backbone
from taskres.backbones.weights import network_reachable
from taskres.errors import TaskResError


def has_quick_gelu(model):
    return any(isinstance(m, QuickGELU) for m in model.modules())


def register_tiny(tmp_path, name, model, cfg=TINY_RN):
    """Register an open_clip config ``name`` for a tiny model and save its weights; return the weights file."""
    import open_clip
    from safetensors.torch import save_file

    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    weights = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return weights


def test_openai_state_dict(openai_rn_file):
    b = load_backbone(str(openai_rn_file))
    reference = tiny_clip(TINY_RN)  # the same seed the file was written from, in fp32
    reference.load_state_dict({k: v.half().float() for k, v in reference.state_dict().items()})
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(b.encode_images(x), reference.encode_image(x), rtol=1e-5, atol=1e-5)
    assert has_quick_gelu(b.model)
    assert b.identity.format == "openai" and b.identity.arch.startswith("RN-w8")
    assert b.image_size == 32 and b.embed_dim == 32
    assert b.logit_scale == pytest.approx(float(reference.logit_scale.exp()), rel=1e-3)


def test_openai_torchscript_archive(openai_vit_jit_file):
    b = load_backbone(str(openai_vit_jit_file))
    traced = torch.jit.load(str(openai_vit_jit_file))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(b.encode_images(x), traced.encode_image(x), rtol=1e-5, atol=1e-5)
    tokens = b.tokenizer(["a photo of a red_car."])
    torch.testing.assert_close(b.encode_text(["a photo of a red_car."]), traced.encode_text(tokens.int()))
    assert has_quick_gelu(b.model)


def test_open_clip_config_with_weights_file(tmp_path):
    """MODEL:FILE: an open_clip config registered by name, weights from safetensors; the config picks GELU."""
    model = tiny_clip(TINY_RN, seed=5, quick_gelu=False)
    weights = register_tiny(tmp_path, "tiny-test-gelu", model)
    b = load_backbone(f"tiny-test-gelu:{weights}")
    assert not has_quick_gelu(b.model) and b.identity.quick_gelu is False
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(b.encode_images(x), model.encode_image(x))


def test_unknown_name_suggests_close_matches():
    with pytest.raises(TaskResError, match=r"unknown backbone 'RN-50'; did you mean 'RN50'"):
        load_backbone("RN-50")
    with pytest.raises(TaskResError, match=r"unknown open_clip model 'ViT-B-33'.*did you mean"):
        load_backbone("ViT-B-33:openai")


def test_missing_file_and_not_a_checkpoint(tmp_path):
    with pytest.raises(TaskResError, match="backbone file .*nope.pt' does not exist"):
        load_backbone(str(tmp_path / "nope.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(TaskResError, match="junk.pt' is not a checkpoint that can be read safely"):
        load_backbone(str(junk))
    notclip = tmp_path / "notclip.pt"
    torch.save({"weight": torch.zeros(2)}, notclip)
    with pytest.raises(TaskResError, match="is not an OpenAI-format CLIP checkpoint"):
        load_backbone(str(notclip))


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"text_projection": Payload(str(marker))}, f)
    with pytest.raises(TaskResError, match="not a checkpoint that can be read safely"):
        load_backbone(str(evil))
    assert not marker.exists()


def test_named_weights_missing_offline_fail_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("TASKRES_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("TASKRES_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(
        TaskResError,
        match=r"weights of backbone 'ViT-B/16' are not on "
        "disk.*ViT-B-16.pt.*TASKRES_WEIGHTS",
    ):
        load_backbone("ViT-B/16")
    with pytest.raises(TaskResError, match=r"weights of backbone 'ViT-B-32:laion2b_s34b_b79k' are not on disk"):
        load_backbone("ViT-B-32:laion2b_s34b_b79k")
    assert time.monotonic() - start < 10


def test_network_probe_gives_up_quickly():
    start = time.monotonic()
    assert network_reachable("https://no-such-host.invalid/x", timeout=2.0) is False
    assert time.monotonic() - start < 5


def test_named_weights_found_in_weights_dir(tmp_path, monkeypatch, openai_rn_file):
    """A file placed where the error message says is picked up (the architecture comes from its tensors)."""
    monkeypatch.setenv("TASKRES_WEIGHTS", str(tmp_path))
    (tmp_path / "RN50.pt").write_bytes(openai_rn_file.read_bytes())
    b = load_backbone("RN50")
    assert b.identity.name == "RN50" and b.identity.kind == "openai"


def test_open_clip_tag_keeps_the_tags_activation(tmp_path, monkeypatch):
    """A tag trained with QuickGELU (as every 'openai' tag) gets it even though the config file says GELU."""
    import open_clip

    model = tiny_clip(TINY_RN, seed=7, quick_gelu=True)
    weights = register_tiny(tmp_path, "tiny-test-tagged", model)
    monkeypatch.setitem(
        open_clip.pretrained._PRETRAINED,
        "tiny-test-tagged",
        {"quickish": {"file": str(weights), "quick_gelu": True}, "plain": {"file": str(weights)}},
    )
    b = load_backbone("tiny-test-tagged:quickish")
    assert has_quick_gelu(b.model) and b.identity.quick_gelu is True
    assert b.identity.sha256 and b.identity.tag == "quickish"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(b.encode_images(x), model.encode_image(x))
    assert not has_quick_gelu(load_backbone("tiny-test-tagged:plain").model)


def test_logit_scale_is_read_before_casting(openai_rn_file):
    fp32 = load_backbone(str(openai_rn_file))
    bf16 = load_backbone(str(openai_rn_file), precision="bf16")
    assert bf16.logit_scale == fp32.logit_scale
    assert bf16.identity.precision == "bf16" and next(bf16.model.parameters()).dtype == torch.bfloat16
    assert bf16.encode_images(torch.randn(1, 3, 32, 32)).dtype == torch.float32


@pytest.mark.parametrize("device,match", [("foo", "is not a torch device"), ("cuda:99", "GPU")])
def test_bad_device(openai_rn_file, device, match):
    with pytest.raises(TaskResError, match=match):
        load_backbone(str(openai_rn_file), device=device)


def test_custom_text_tower_models_load(tmp_path):
    """open_clip's CustomTextCLIP (the class of SigLIP/CoCa-style configs) has no top-level text_projection."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP

    torch.manual_seed(0)
    model = CustomTextCLIP(
        TINY_RN["embed_dim"], CLIPVisionCfg(**TINY_RN["vision_cfg"]), CLIPTextCfg(**TINY_RN["text_cfg"])
    ).eval()
    weights = register_tiny(tmp_path, "tiny-test-custom", model, {**TINY_RN, "custom_text": True})
    assert open_clip.get_model_config("tiny-test-custom")["custom_text"]
    b = load_backbone(f"tiny-test-custom:{weights}")
    assert type(b.model).__name__ == "CustomTextCLIP" and b.embed_dim == 32
    torch.testing.assert_close(
        b.encode_text(["a photo of a cat."]), model.encode_text(b.tokenizer(["a photo of a cat."]))
    )
