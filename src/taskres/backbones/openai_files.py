"""OpenAI-format CLIP checkpoints: by OpenAI's model name (the file found on disk, downloaded only when the network
answers) or by path (a TorchScript archive, as OpenAI distributes them, or a plain state dict). The architecture is
inferred from the tensors and QuickGELU is used, as OpenAI trained these models."""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from taskres.backbones.backbone import ClipModel
from taskres.backbones.weights import WEIGHTS_ENV, file_sha256, first_line, network_reachable
from taskres.errors import TaskResValueError

logger = logging.getLogger(__name__)

# OpenAI's names (as the official CLIP package spells them) -> open_clip's model names.
OPENAI_MODELS = {
    "RN50": "RN50",
    "RN101": "RN101",
    "RN50x4": "RN50x4",
    "RN50x16": "RN50x16",
    "RN50x64": "RN50x64",
    "ViT-B/32": "ViT-B-32",
    "ViT-B/16": "ViT-B-16",
    "ViT-L/14": "ViT-L-14",
    "ViT-L/14@336px": "ViT-L-14-336",
}


def load_openai_name(name: str, weights_dir: Path) -> tuple[ClipModel, Any, dict]:
    """(model, tokenizer, identity fields) of an OpenAI model name, from its file in ``weights_dir`` (or the
    ``clip`` package's cache)."""
    model, tokenizer, identity = load_openai_file(find_openai_weights(name, weights_dir))
    identity.update(kind="openai", name=name)
    return model, tokenizer, identity


def load_openai_file(path: Path) -> tuple[ClipModel, Any, dict]:
    """(model, tokenizer, identity fields) of an OpenAI-format checkpoint, built in fp32 with QuickGELU."""
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    path = Path(path)
    sd = _read_openai_state_dict(path)
    cfg = _openai_config(sd, str(path))
    # Scalars OpenAI's archives carry, and the causal mask (derived, not a weight) that traced archives may hold.
    for k in ("input_resolution", "context_length", "vocab_size", "attn_mask"):
        sd.pop(k, None)
    # Built in fp32 (open_clip's own builder casts to fp16 first, which would round fp32 checkpoints).
    model = CLIP(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]), CLIPTextCfg(**cfg["text_cfg"]), quick_gelu=True)
    try:
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except RuntimeError as err:
        raise TaskResValueError(
            f"backbone file {str(path)!r} does not match the CLIP architecture inferred from it "
            f"({cfg['arch']}): {str(err).splitlines()[0]}"
        ) from None
    identity = {"kind": "file", "format": "openai", "arch": cfg["arch"], "sha256": file_sha256(path)}
    return model, open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length), identity


def _read_openai_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of an OpenAI checkpoint: a TorchScript archive (as OpenAI distributes) or a plain state dict."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for a bad header
            raise TaskResValueError(
                f"backbone file {str(path)!r} is not a readable safetensors file ({err})."
            ) from None
    if zipfile.is_zipfile(path) and _is_torchscript(path):
        try:
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        except RuntimeError as err:
            raise TaskResValueError(
                f"backbone file {str(path)!r} is a damaged TorchScript archive ({str(err).splitlines()[0]}).",
                param="backbone",
            ) from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        raise TaskResValueError(
            f"backbone file {str(path)!r} is not a checkpoint that can be read safely ({type(err).__name__}: "
            f"{first_line(err)}). Expected an OpenAI CLIP .pt file (TorchScript or "
            "state dict), or MODEL:FILE for open_clip weights."
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TaskResValueError(f"backbone file {str(path)!r} does not hold a state dict of tensors.")
    if obj and next(iter(obj)).startswith("module."):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _is_torchscript(path: Path) -> bool:
    """A zip archive holding TorchScript code (torch.save's zip archives hold data only)."""
    with zipfile.ZipFile(path) as zf:
        return any(n.split("/", 1)[-1].startswith("code/") for n in zf.namelist())


def _openai_config(sd: dict[str, torch.Tensor], where: str) -> dict:
    """Infer the CLIP architecture from OpenAI-layout tensors (the rules of OpenAI's build_model)."""
    need = ("text_projection", "positional_embedding", "token_embedding.weight", "ln_final.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise TaskResValueError(
            f"backbone file {where!r} is not an OpenAI-format CLIP checkpoint (no {missing}); "
            "for open_clip weights pass MODEL:FILE, e.g. ViT-B-32:/path/weights.safetensors."
        )
    layers: int | tuple[int, ...]
    if "visual.proj" in sd:
        width = sd["visual.conv1.weight"].shape[0]
        patch = sd["visual.conv1.weight"].shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        layers = len([k for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")])
        vision = dict(layers=layers, width=width, patch_size=patch, image_size=patch * grid)
        arch = f"ViT-w{width}-l{layers}-p{patch}-{patch * grid}"
    else:
        layers = tuple(len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4))
        width = sd["visual.layer1.0.conv1.weight"].shape[0]
        out = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = dict(layers=layers, width=width, image_size=out * 32)
        arch = f"RN-w{width}-l{'-'.join(map(str, layers))}-{out * 32}"
    twidth = sd["ln_final.weight"].shape[0]
    text = dict(
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        width=twidth,
        heads=twidth // 64,
        layers=len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}),
    )
    return dict(embed_dim=int(sd["text_projection"].shape[1]), vision_cfg=vision, text_cfg=text, arch=arch)


def find_openai_weights(name: str, weights_dir: Path) -> Path:
    """Local file for an OpenAI model name; downloaded only when the network answers."""
    import open_clip

    url = open_clip.pretrained.get_pretrained_url(OPENAI_MODELS[name], "openai")
    filename = os.path.basename(url)
    candidates = [weights_dir / filename, Path.home() / ".cache" / "clip" / filename]
    for c in candidates:
        if c.is_file():
            return c
    if network_reachable(url):
        logger.warning("downloading %s weights to %s", name, weights_dir)
        return Path(open_clip.pretrained.download_pretrained_from_url(url, cache_dir=str(weights_dir)))
    raise TaskResValueError(
        f"the weights of backbone {name!r} are not on disk and the network is unreachable. Put OpenAI's file "
        f"{filename!r} in {str(weights_dir)!r} (set ${WEIGHTS_ENV} to use another folder, or pass --backbone "
        f'/path/to/{filename}). On a connected machine fetch it with: python -c "import open_clip; '
        f"open_clip.pretrained.download_pretrained_from_url('{url}', cache_dir='weights')\" and copy "
        f"weights/{filename}."
    )
