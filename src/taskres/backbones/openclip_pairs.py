"""open_clip models: ``MODEL:PRETRAINED`` pairs, where PRETRAINED is one of open_clip's tags for MODEL (its weights
found on disk or in the Hugging Face cache, downloaded only when the network answers) or a weights file; and the
models shipped with this package (``taskres-demo``: an open_clip config and its weights in ``taskres/assets``)."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from taskres.backbones.backbone import ClipModel
from taskres.backbones.weights import LOAD_ERRORS, file_sha256, first_line, network_reachable
from taskres.errors import TaskResFileNotFoundError, TaskResValueError, suggest

ASSETS = Path(__file__).parent.parent / "assets"
SHIPPED_MODELS = ("taskres-demo",)


def load_open_clip_pair(spec: str, weights_dir: Path) -> tuple[ClipModel, Any, dict]:
    """(model, tokenizer, identity fields) of ``MODEL:TAG`` or ``MODEL:FILE``; the model config decides the
    activation, except that a tag trained with QuickGELU gets it."""
    import open_clip

    model_name, pretrained = spec.split(":", 1)
    if model_name not in open_clip.list_models():
        raise TaskResValueError(
            f"unknown open_clip model {model_name!r} in backbone {spec!r}; "
            f"{suggest(model_name, open_clip.list_models())}see open_clip.list_models()."
        )
    source, quick_gelu, identity = _pair_weights(spec, model_name, pretrained, weights_dir)
    try:
        model = open_clip.create_model(model_name, pretrained=source, load_weights=True, force_quick_gelu=quick_gelu)
    except LOAD_ERRORS as err:
        # by the file's damage: torch's weights-only unpickler (which raises IndexError or TypeError on some random
        # bytes), safetensors and open_clip's own asserts
        raise TaskResValueError(
            f"could not load weights {source!r} into open_clip model {model_name!r} "
            f"({type(err).__name__}: {first_line(err)}); pass a weights file of that model (an open_clip "
            ".safetensors or .bin state dict).",
            param="backbone",
        ) from None
    identity["sha256"] = file_sha256(Path(source))
    return model, open_clip.get_tokenizer(model_name), identity


def _pair_weights(spec: str, model_name: str, pretrained: str, weights_dir: Path) -> tuple[str, bool, dict]:
    """(weights file, whether to force QuickGELU, identity fields) of a pair whose PRETRAINED is a file or a tag."""
    import open_clip

    file = Path(pretrained).expanduser()
    if file.is_file():
        return str(file), False, {"kind": "open_clip_file", "arch": model_name}
    if open_clip.pretrained.is_pretrained_cfg(model_name, pretrained):
        cfg = open_clip.pretrained.get_pretrained_cfg(model_name, pretrained)
        source = _find_open_clip_weights(spec, cfg, weights_dir)
        # Loaded from a file path, open_clip would not apply the tag's activation (e.g. QuickGELU for 'openai').
        quick_gelu = bool(cfg.get("quick_gelu", False))
        return source, quick_gelu, {"kind": "open_clip", "arch": model_name, "tag": pretrained}
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    raise TaskResValueError(
        f"{pretrained!r} in backbone {spec!r} is neither a file nor a known tag of "
        f"{model_name}; "
        f"{suggest(pretrained, tags)}known tags: {', '.join(tags) or 'none'}."
    )


def _find_open_clip_weights(spec: str, cfg: dict, weights_dir: Path) -> str:
    import open_clip

    if cfg.get("file") and Path(cfg["file"]).is_file():  # a tag registered with a local file
        return str(cfg["file"])
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        for name in [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]:
            hit = try_to_load_from_cache(repo, name)
            if isinstance(hit, str):
                return hit
    url = cfg.get("url", "")
    if url and (weights_dir / os.path.basename(url)).is_file():
        return str(weights_dir / os.path.basename(url))
    probe = "https://huggingface.co" if hub else url
    if probe and network_reachable(probe):
        return open_clip.pretrained.download_pretrained(cfg, cache_dir=None)
    raise TaskResValueError(
        f"the weights of backbone {spec!r} are not on disk and the network is unreachable. On a connected machine, "
        f"run: python -c \"import open_clip; open_clip.create_model('{spec.split(':')[0]}', "
        f"pretrained='{spec.split(':', 1)[1]}')\" and copy the Hugging Face cache (~/.cache/huggingface) here, or "
        f"save the weights file and pass --backbone {spec.split(':')[0]}:/path/to/weights.safetensors."
    )


@functools.cache
def _register_shipped_config(config: Path) -> None:
    """Add a shipped model's config to open_clip's registry, once per process."""
    import open_clip

    open_clip.add_model_config(config)


def load_shipped(name: str) -> tuple[ClipModel, Any, dict]:
    """(model, tokenizer, identity fields) of a model shipped in ``taskres/assets``, in fp32."""
    import open_clip

    config, weights = ASSETS / f"{name}.json", ASSETS / f"{name}.safetensors"
    if not weights.is_file():
        raise TaskResFileNotFoundError(
            f"the shipped backbone {name!r} is missing its weights file {str(weights)!r}; "
            "reinstall taskres, or rebuild it with scripts/pretrain_demo.py."
        )
    _register_shipped_config(config)
    model = open_clip.create_model(name, pretrained=str(weights)).float()
    identity = {"kind": "shipped", "arch": name, "sha256": file_sha256(weights)}
    return model, open_clip.get_tokenizer(name), identity
