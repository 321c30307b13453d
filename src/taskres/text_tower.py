"""The frozen text encoder opened at two points, for methods that tune what it reads (CoOp's context vectors) or its
last layer (TaskRes*'s text projection).

``encode_text`` of an open_clip ``CLIP`` is: token embedding -> + positional embedding -> transformer -> ln_final ->
pool at the end-of-text token -> ``@ text_projection``. ``pooled_text`` runs it from given token embeddings up to the
pooling, so ``pooled_text(model, tokens) @ projection(model)`` is ``model.encode_text(tokens)``.
"""

from __future__ import annotations

import torch

from taskres.backbones import Backbone, ClipModel
from taskres.errors import TaskResValueError


def check_text_tower(backbone: Backbone, method: str) -> ClipModel:
    """The backbone's model, if its text tower is open_clip's CLIP transformer with a linear projection."""
    model = backbone.model
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    if not all(hasattr(model, name) for name in needed):
        raise TaskResValueError(
            f"{method} needs a CLIP text transformer (token embedding, transformer, ln_final, text "
            f"projection); backbone {backbone.identity.spec!r} has another text tower. Use an "
            "OpenAI CLIP (RN50, ViT-B/16, ...) or an open_clip model with the CLIP text tower."
        )
    proj = model.text_projection
    if isinstance(proj, torch.nn.Linear) and proj.bias is not None:
        raise TaskResValueError(
            f"{method} replaces the text projection, but backbone "
            f"{backbone.identity.spec!r} "
            "has a projection with a bias; use a backbone whose text projection is a matrix."
        )
    return model


def projection(model: ClipModel) -> torch.Tensor:
    """CLIP's text projection as a (W, D) matrix: features = pooled (N, W) @ projection."""
    proj = model.text_projection
    return proj.weight.t() if isinstance(proj, torch.nn.Linear) else proj


def pooled_text(model: ClipModel, tokens: torch.Tensor, embeddings: torch.Tensor | None = None) -> torch.Tensor:
    """(N, L) token ids [and (N, L, W) token embeddings that replace the looked-up ones] -> (N, W) pre-projection
    features at the pooling position chosen by the ids (the end-of-text token for CLIP)."""
    from open_clip.model import text_global_pool  # here: commands that never encode text skip open_clip

    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens) if embeddings is None else embeddings
    x = x.to(cast) + model.positional_embedding.to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)  # (N, L, W)
    return text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
