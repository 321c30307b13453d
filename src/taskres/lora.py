"""Low-rank adapters (LoRA, Hu et al. 2022) on the attention projections of an open_clip model, placed as CLIP-LoRA
(Zanella and Ben Ayed 2024) places them: one rank-r update per adapted projection,

    W x + b  ->  W x + b + s * B A dropout(x)       A (r, D_in), B (D_out, r), s = alpha / sqrt(r)

with A drawn as nn.Linear's weights (Kaiming uniform, a = sqrt(5)) and B zero, so that the adapted model starts as
the model itself. The projections are the query, key and value ("q", "k", "v") and optionally the output ("o") of

- every ``nn.MultiheadAttention`` of the text transformer, and of a ViT image tower;
- the attention pool of a ModifiedResNet image tower (CLIP's RN50...), its one attention layer.

Training runs the unmerged form (the dropout acts on the update's input only); evaluation, ``eval``, ``predict`` and
export run the merged model, W + s * B A written into the frozen weights (``merge_lora``), through open_clip's own
modules. Why these layers are ours rather than PEFT's is in docs/methods.md (CLIP-LoRA).

    attention_layers(model, encoders)         -> {name: attention module} that LoRA can adapt
    add_lora(model, layers, ...)              -> {name: LoRAAttention | LoRAPool}, installed in ``model``
    lora_tensors(adapters)                    -> {"<layer>.<proj>.A" / ".B": tensor}
    merge_lora(model, tensors, scaling)       -> the model with every update written into its weights
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from taskres.errors import TaskResValueError

PROJECTIONS = "qkvo"
ENCODERS = ("text", "vision")


class LowRank(nn.Module):
    """s * B A dropout(x): (..., D_in) -> (..., D_out); zero while B is zero. Parameters in float32, applied in the
    input's dtype."""

    def __init__(self, d_in: int, d_out: int, rank: int, scaling: float, dropout: float, generator: torch.Generator):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, d_in))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5), generator=generator)
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        self.dropout = nn.Dropout(dropout)
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = F.linear(self.dropout(x), self.A.to(x.dtype))  # (..., r)
        return F.linear(low, self.B.to(x.dtype)) * self.scaling  # (..., D_out)

    def delta(self) -> torch.Tensor:
        """(D_out, D_in) the update of W."""
        return (self.B @ self.A) * self.scaling


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention of batch-first (N, L, D) projections over ``heads`` heads -> (N, Lq, D).
    ``mask``: nn.MultiheadAttention's (additive float, or bool where True hides a key)."""
    n, lq, d = q.shape
    split = lambda t: t.reshape(n, t.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731  (N, H, L, d/H)
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, float("-inf"))
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)  # (N, H, Lq, d/H)
    return out.transpose(1, 2).reshape(n, lq, d)


class LoRAAttention(nn.Module):
    """An ``nn.MultiheadAttention`` (kept frozen as ``base``) with low-rank updates of some of its projections,
    called as the module it replaces (self-attention as open_clip's blocks call it; no key padding mask)."""

    def __init__(self, base: nn.MultiheadAttention, updates: dict[str, LowRank]):
        super().__init__()
        self.base, self.updates = base, nn.ModuleDict(updates)

    def _project(self, x: torch.Tensor, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = F.linear(x, weight, bias)
        return out + self.updates[name](x) if name in self.updates else out

    def forward(self, query, key, value, need_weights=False, attn_mask=None, key_padding_mask=None, **kwargs):
        if key_padding_mask is not None or need_weights:
            raise NotImplementedError("LoRAAttention runs self-attention without a key padding mask or weights")
        base = self.base
        if not base.batch_first:  # (L, N, D) -> (N, L, D)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        weights = base.in_proj_weight.chunk(3)
        biases = base.in_proj_bias.chunk(3) if base.in_proj_bias is not None else (None, None, None)
        q, k, v = (self._project(x, n, w, b) for x, n, w, b in zip((query, key, value), "qkv", weights, biases))
        out = _attend(q, k, v, base.num_heads, attn_mask)
        out = self._project(out, "o", base.out_proj.weight, base.out_proj.bias)  # (N, L, D)
        return (out if base.batch_first else out.transpose(0, 1)), None


class LoRAPool(nn.Module):
    """A ModifiedResNet's attention pool (kept frozen as ``base``: q_proj, k_proj, v_proj, c_proj as "o") with
    low-rank updates: (N, C, H, W) -> (N, D), the attention of the mean token over all tokens."""

    def __init__(self, base: nn.Module, updates: dict[str, LowRank]):
        super().__init__()
        self.base, self.updates = base, nn.ModuleDict(updates)

    def _project(self, x: torch.Tensor, name: str, linear: nn.Linear) -> torch.Tensor:
        out = linear(x)
        return out + self.updates[name](x) if name in self.updates else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool: Any = self.base  # open_clip's AttentionPool2d (untyped)
        x = x.flatten(2).transpose(1, 2)  # (N, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # (N, HW + 1, C)
        x = x + pool.positional_embedding[None].to(x.dtype)
        q = self._project(x[:, :1], "q", pool.q_proj)  # (N, 1, C): only the mean token's output is kept
        k, v = self._project(x, "k", pool.k_proj), self._project(x, "v", pool.v_proj)
        out = _attend(q, k, v, pool.num_heads, None)
        return self._project(out, "o", pool.c_proj)[:, 0]  # (N, D)


def _is_pool(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "c_proj", "positional_embedding"))


def attention_layers(model: nn.Module, encoders: Iterable[str]) -> dict[str, tuple[nn.Module, str]]:
    """{layer name: (parent module, attribute)} of the attention layers LoRA can adapt in ``encoders``: "text.<i>"
    (the text transformer's blocks), "vision.<i>" (a ViT's blocks), "vision.attnpool" (a ModifiedResNet's pool)."""
    found: dict[str, tuple[nn.Module, str]] = {}
    towers = {"text": model, "vision": getattr(model, "visual", None)}
    for encoder in encoders:
        tower = towers[encoder]
        blocks = getattr(getattr(tower, "transformer", None), "resblocks", None) or []
        for i, block in enumerate(blocks):
            if isinstance(getattr(block, "attn", None), (nn.MultiheadAttention, LoRAAttention)):
                found[f"{encoder}.{i}"] = (block, "attn")
        if encoder == "vision" and tower is not None and _is_pool(getattr(tower, "attnpool", nn.Module())):
            found["vision.attnpool"] = (tower, "attnpool")
    return found


def _attention_like(tower: nn.Module | None) -> list[str]:
    """Names and types of a tower's modules that look like attention (for the error when none can be adapted)."""
    if tower is None:
        return []
    return [
        f"{n} ({type(m).__name__})"
        for n, m in tower.named_modules()
        if n.rsplit(".", 1)[-1].startswith("attn") or "Attention" in type(m).__name__
    ]


def check_layers(model: nn.Module, encoders: Sequence[str], backbone_name: str) -> dict[str, tuple[nn.Module, str]]:
    """``attention_layers``, with an error naming the backbone and what it holds when an encoder asked for has none."""
    layers = attention_layers(model, encoders)
    for encoder in encoders:
        if not any(name.startswith(f"{encoder}.") for name in layers):
            tower = model if encoder == "text" else getattr(model, "visual", None)
            seen = _attention_like(tower)[:8]
            raise TaskResValueError(
                f"LoRA was asked on the {encoder} encoder of backbone {backbone_name!r}, which has no attention layer "
                f"it can adapt (nn.MultiheadAttention blocks or a ResNet attention pool); found: "
                f"{', '.join(seen) or 'no attention modules'} in its {type(tower).__name__}. Set `encoders` to the "
                "other encoder, or use an open_clip CLIP backbone.",
                param="encoders",
            )
    return layers


def _dims(module: nn.Module, proj: str) -> tuple[int, int]:
    """(D_in, D_out) of projection ``proj`` of an attention layer."""
    if isinstance(module, nn.MultiheadAttention):
        d = module.embed_dim
        return (d, d) if proj != "o" else (module.out_proj.in_features, module.out_proj.out_features)
    linear = getattr(module, {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "c_proj"}[proj])
    return linear.in_features, linear.out_features


def add_lora(
    layers: dict[str, tuple[nn.Module, str]],
    projections: str,
    rank: int,
    scaling: float,
    dropout: float,
    generator: torch.Generator,
) -> dict[str, LoRAAttention | LoRAPool]:
    """Wrap each layer in place (its parent's attribute now holds the wrapper) with rank-``rank`` updates of
    ``projections``; a rank above a projection's dimensions is an error naming the layer."""
    adapters: dict[str, LoRAAttention | LoRAPool] = {}
    for name, (parent, attr) in layers.items():
        module = getattr(parent, attr)
        updates = {}
        for proj in projections:
            d_in, d_out = _dims(module, proj)
            if rank > min(d_in, d_out):
                raise TaskResValueError(
                    f"`rank` {rank} is larger than the {proj} projection of layer {name} ({d_out} x {d_in}); "
                    f"use a rank of at most {min(d_in, d_out)}.",
                    param="rank",
                )
            updates[proj] = LowRank(d_in, d_out, rank, scaling, dropout, generator)
        wrapper = (
            LoRAAttention(module, updates) if isinstance(module, nn.MultiheadAttention) else LoRAPool(module, updates)
        )
        setattr(parent, attr, wrapper)
        adapters[name] = wrapper
    return adapters


def lora_tensors(adapters: dict[str, LoRAAttention | LoRAPool]) -> dict[str, torch.Tensor]:
    """{"<layer>.<proj>.A": (r, D_in), "<layer>.<proj>.B": (D_out, r)}, float32 on the CPU."""
    out = {}
    for name, adapter in adapters.items():
        for proj, update in adapter.updates.items():
            assert isinstance(update, LowRank)
            out[f"{name}.{proj}.A"] = update.A.detach().float().cpu().contiguous()
            out[f"{name}.{proj}.B"] = update.B.detach().float().cpu().contiguous()
    return out


def _weight(module: nn.Module, proj: str) -> torch.Tensor:
    """The frozen weight (D_out, D_in) that projection ``proj`` of an attention layer applies (a view for q/k/v of
    nn.MultiheadAttention's fused in_proj)."""
    if isinstance(module, nn.MultiheadAttention):
        return module.out_proj.weight if proj == "o" else module.in_proj_weight.chunk(3)[PROJECTIONS.index(proj)]
    return getattr(module, {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "c_proj"}[proj]).weight


@torch.no_grad()
def merge_lora(model: nn.Module, tensors: dict[str, torch.Tensor], scaling: float, what: str = "the adapters") -> None:
    """Write W + s * B A into the weights of ``model`` (plain, not wrapped) for every update in ``tensors``; a layer
    the model lacks or a shape that does not fit is an error naming ``what``."""
    layers = attention_layers(model, ENCODERS)
    for key in sorted(k for k in tensors if k.endswith(".A")):
        layer, proj = key[:-2].rsplit(".", 1)
        if layer not in layers or proj not in PROJECTIONS:
            raise TaskResValueError(
                f"{what} adapt layer {layer!r} ({proj}), which the backbone does not have (its attention layers: "
                f"{', '.join(layers) or 'none'}); they were trained on another backbone.",
                param="run",
            )
        parent, attr = layers[layer]
        weight = _weight(getattr(parent, attr), proj)
        a, b = tensors[key], tensors[f"{layer}.{proj}.B"]
        if (b.shape[0], a.shape[1]) != tuple(weight.shape) or a.shape[0] != b.shape[1]:
            raise TaskResValueError(
                f"{what}: layer {layer} ({proj}) holds a {tuple(b.shape)} x {tuple(a.shape)} update, but the "
                f"backbone's weight is {tuple(weight.shape)}; they were trained on another backbone.",
                param="run",
            )
        weight.add_(((b @ a) * scaling).to(weight.device, weight.dtype))
