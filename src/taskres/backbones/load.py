"""``load_backbone``: which loader a spec goes to, and the frozen, cast, eval-mode ``Backbone`` it comes back as."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from taskres.backbones.backbone import HF_HUB_PREFIX, OPENAI_MEAN, OPENAI_STD, Backbone, BackboneIdentity, ClipModel
from taskres.backbones.engines import check_engine, with_engine
from taskres.backbones.hf_hub import load_hf_hub
from taskres.backbones.openai_files import OPENAI_MODELS, load_openai_file, load_openai_name
from taskres.backbones.openclip_pairs import SHIPPED_MODELS, load_open_clip_pair, load_shipped
from taskres.backbones.weights import default_weights_dir
from taskres.devices import parse_device
from taskres.errors import TaskResFileNotFoundError, TaskResValueError, check_choice, suggest

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def known_backbones() -> list[str]:
    import open_clip

    return list(OPENAI_MODELS) + list(SHIPPED_MODELS) + [f"{m}:{t}" for m, t in open_clip.list_pretrained()]


def load_backbone(
    spec: str,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    weights_dir: str | Path | None = None,
    engine: str = "eager",
) -> Backbone:
    """Load a frozen backbone in eval mode (see the package docstring for what ``spec`` may be), its images encoded
    by ``engine`` (``taskres.backbones.engines``: eager, channels-last or onnxruntime)."""
    check_choice("precision", precision, sorted(PRECISIONS))
    device = parse_device(device)
    check_engine(engine, device, precision)
    weights_dir = Path(weights_dir).expanduser() if weights_dir else default_weights_dir()
    if "\0" in spec:
        raise TaskResValueError(
            f"backbone {spec!r} holds a NUL byte; pass a model name or a file path.", param="backbone"
        )
    try:
        return with_engine(_frozen(spec, *_load_model(spec, weights_dir), device, precision), engine, weights_dir)
    except PermissionError as err:
        raise TaskResValueError(
            f"backbone {spec!r}: {err.filename!r} cannot be read ({err.strerror}); fix its permissions.",
            param="backbone",
        ) from None


def _load_model(spec: str, weights_dir: Path) -> tuple[ClipModel, Any, dict]:
    """(model, tokenizer, identity fields) from the loader the spec asks for, in this order: a shipped model, a Hub
    model, an OpenAI name, an existing file, a MODEL:PRETRAINED pair."""
    path = Path(spec).expanduser()
    if spec in SHIPPED_MODELS:
        return load_shipped(spec)
    if spec.startswith(HF_HUB_PREFIX):
        return load_hf_hub(spec)
    if spec in OPENAI_MODELS:
        return load_openai_name(spec, weights_dir)
    if path.is_file():
        return load_openai_file(path)
    if ":" in spec:
        return load_open_clip_pair(spec, weights_dir)
    if path.suffix or os.sep in spec:
        raise TaskResFileNotFoundError(
            f"backbone file {spec!r} does not exist; pass --backbone an existing "
            "checkpoint file, "
            f"an OpenAI model name ({', '.join(OPENAI_MODELS)}) or an open_clip "
            "MODEL:PRETRAINED pair."
        )
    raise TaskResValueError(
        f"unknown backbone {spec!r}; {suggest(spec, known_backbones())}known OpenAI names: "
        f"{', '.join(OPENAI_MODELS)}; shipped: {', '.join(SHIPPED_MODELS)}; or an open_clip MODEL:PRETRAINED pair "
        '(list them with `python -c "import open_clip; print(open_clip.list_pretrained())"`), a Hugging Face '
        "Hub model hf-hub:ORG/NAME, or a checkpoint path."
    )


def _frozen(
    spec: str, model: ClipModel, tokenizer: Any, identity: dict, device: torch.device, precision: str
) -> Backbone:
    """The model frozen in eval mode on ``device`` in ``precision``, with its identity and geometry."""
    if not hasattr(model, "encode_text") or not hasattr(model, "logit_scale"):
        raise TaskResValueError(f"backbone {spec!r} is not a CLIP-style model with a text encoder and a logit scale.")
    tau = float(model.logit_scale.detach().float().exp().reshape(-1)[0])
    model = model.to(device=device, dtype=PRECISIONS[precision]).eval().requires_grad_(False)
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean = tuple(getattr(model.visual, "image_mean", None) or OPENAI_MEAN)
    std = tuple(getattr(model.visual, "image_std", None) or OPENAI_STD)
    ident = BackboneIdentity(
        spec=spec,
        precision=precision,
        quick_gelu=_has_quick_gelu(model),
        image_size=size,
        mean=mean,
        std=std,
        **identity,
    )
    logger.info("loaded backbone %s (%s, image size %d, logit scale %.2f)", spec, ident.arch, size, tau)
    return Backbone(model, tokenizer, size, ident, tau, device, PRECISIONS[precision], mean, std)


def _has_quick_gelu(model: torch.nn.Module) -> bool:
    from open_clip.model import QuickGELU

    return any(isinstance(m, QuickGELU) for m in model.modules())
