"""The base classifier: class names through prompt templates and the frozen text encoder (docs/protocol.md#base-classifier)."""

from __future__ import annotations

from typing import Sequence

import torch

from taskres.backbones import Backbone
from taskres.errors import TaskResValueError


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    if not templates:
        raise TaskResValueError("no prompt template given; pass --template with a string holding '{}', "
                                "e.g. --template 'a photo of a {}.'")
    for t in templates:
        if t.count("{}") != 1:
            raise TaskResValueError(f"template {t!r} must contain exactly one '{{}}' where the class name goes, "
                                    "e.g. 'a photo of a {}.'")
        try:
            t.format("x")
        except (KeyError, IndexError, ValueError):
            raise TaskResValueError(f"template {t!r} has braces other than the one '{{}}'; write a literal brace as "
                                    "'{{' or '}}'.") from None
    return tuple(templates)


@torch.no_grad()
def build_base_classifier(backbone: Backbone, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(C, D) float32: per class, the mean over templates of the un-normalised text embeddings.

    Class names are used exactly as given (underscores kept), as the official code does.
    """
    templates = check_templates(templates)
    rows = []
    for name in classnames:
        emb = backbone.encode_text([t.format(name) for t in templates])  # (T, D)
        rows.append(emb.mean(dim=0))
    return torch.stack(rows).cpu()  # (C, D)
