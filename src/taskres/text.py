"""The base classifier: class names through prompt templates and the frozen text encoder.

See docs/protocol.md#base-classifier.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from taskres.backbones import Backbone
from taskres.backbones.official import fp16_backbone
from taskres.errors import TaskResValueError, check_choice


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    if not templates:
        raise TaskResValueError(
            "no prompt template given; pass --template with a string holding '{}', e.g. --template 'a photo of a {}.'"
        )
    for t in templates:
        # '{{' is a literal brace: "{{}}" is not a place for the class name, nor a second one beside "{}"
        if t.replace("{{", "").count("{}") != 1:
            raise TaskResValueError(
                f"template {t!r} must contain exactly one '{{}}' where the class name goes, e.g. 'a photo of a {{}}.'"
            )
        try:
            t.format("x")
        except (KeyError, IndexError, ValueError, AttributeError, TypeError):  # '{0.x}', '{0[a]}' too
            raise TaskResValueError(
                f"template {t!r} has braces other than the one '{{}}'; write a literal brace as '{{{{' or '}}}}'."
            ) from None
    return tuple(templates)


def check_prompts_fit(
    backbone: Backbone, classnames: Sequence[str], templates: Sequence[str], replace_underscores: bool = False
) -> None:
    """Raise, naming the class and template, if a prompt has more tokens than the text encoder's context (the
    tokenizer would cut it, and the class name with it). Tokenizers without ``encode`` (Hugging Face ones) are not
    checked."""
    tokenizer = backbone.tokenizer
    encode, context = getattr(tokenizer, "encode", None), getattr(tokenizer, "context_length", None)
    if encode is None or not context or getattr(tokenizer, "reduction_fn", None) is not None:
        return
    for template in check_templates(templates):
        for name in classnames:
            text = template.format(name.replace("_", " ") if replace_underscores else name)
            n = len(encode(text)) + 2  # start and end tokens
            if n > context:
                raise TaskResValueError(
                    f"the prompt {text!r} (template {template!r}, class {name!r}) is {n} tokens, but the text "
                    f"encoder reads {context}; it would be cut and lose the class name. Shorten the `templates` "
                    "or the class name.",
                    param="templates",
                )


@torch.no_grad()
def build_base_classifier(
    backbone: Backbone,
    classnames: Sequence[str],
    templates: Sequence[str],
    text_precision: Literal["fp32", "fp16"] = "fp32",
) -> torch.Tensor:
    """(C, D) float32: per class, the mean over templates of the un-normalised text embeddings.

    Class names are used exactly as given (underscores kept), as the official code does. ``text_precision`` "fp16"
    runs the text encoder (and takes the mean) in half precision, as the official trainer, whose CLIP is fp16 when
    the base is built: the model converted as OpenAI's ``build_model`` converts it (docs/protocol.md#precision).
    """
    templates = check_templates(templates)
    check_prompts_fit(backbone, classnames, templates)
    check_choice("text_precision", text_precision, ("fp32", "fp16"))
    if text_precision == "fp16":  # as the official trainer: the classes' (T, D) embeddings stacked, mean in fp16
        encode = _half_text_encoder(backbone)
        return torch.stack([encode([t.format(name) for t in templates]) for name in classnames]).mean(1).float().cpu()
    rows = []
    for name in classnames:
        emb = backbone.encode_text([t.format(name) for t in templates])  # (T, D)
        rows.append(emb.mean(dim=0))
    return torch.stack(rows).float().cpu()  # (C, D)


def _half_text_encoder(backbone: Backbone):
    """``texts -> (T, D)`` fp16 features from a copy of the backbone's model converted as OpenAI's ``build_model``
    converts CLIP (taskres.backbones.official; the backbone stays as it is)."""
    model = fp16_backbone(backbone).model

    def encode(texts: list[str]) -> torch.Tensor:
        return model.encode_text(backbone.tokenizer(texts).to(backbone.device))

    return encode


@torch.no_grad()
def normalized_text_classifier(backbone: Backbone, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(C, D) float32, unit rows: CoOp's ``ZeroshotCLIP`` and Tip-Adapter's text classifier (docs/protocol.md#coop-
    zero-shot-clip). Class names with "_" replaced by a space; each prompt's feature normalised, averaged over the
    templates, normalised again (with one template: that prompt's normalised feature)."""
    templates = check_templates(templates)
    check_prompts_fit(backbone, classnames, templates, replace_underscores=True)
    rows = []
    for name in classnames:
        emb = backbone.encode_text([t.format(name.replace("_", " ")) for t in templates])  # (T, D)
        rows.append(F.normalize(F.normalize(emb, dim=-1).mean(dim=0), dim=-1))
    return torch.stack(rows).cpu()  # (C, D)


@torch.no_grad()
def zeroshot_clip_classifier(backbone: Backbone, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(C, D) float32 holding fp16 values: CoOp's ``ZeroshotCLIP`` text classifier as CoOp computes it, with the
    model converted as OpenAI's ``build_model`` leaves it (``taskres.backbones.official.fp16_backbone``; encode the
    test images with that backbone too). Class names with "_" replaced by a space; one template: each prompt's
    feature normalised in fp16; several (``ZeroshotCLIP2``'s form): the per-template normalised features summed in
    fp16, divided by their number and normalised again (docs/protocol.md#coop-zero-shot-clip)."""
    templates = check_templates(templates)
    check_prompts_fit(backbone, classnames, templates, replace_underscores=True)
    fp16 = fp16_backbone(backbone)
    per_template = []
    for template in templates:  # all the classes' prompts in one batch per template, as CoOp tokenizes them
        tokens = fp16.tokenizer([template.format(name.replace("_", " ")) for name in classnames]).to(fp16.device)
        feats = fp16.model.encode_text(tokens)  # (C, D) fp16
        per_template.append(feats / feats.norm(dim=-1, keepdim=True))
    if len(per_template) == 1:
        return per_template[0].float().cpu()
    total = per_template[0]
    for feats in per_template[1:]:
        total = total + feats
    mean = total / len(per_template)
    return (mean / mean.norm(dim=-1, keepdim=True)).float().cpu()
