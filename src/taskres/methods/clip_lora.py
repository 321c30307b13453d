"""CLIP-LoRA (Zanella and Ben Ayed, "Low-Rank Few-Shot Adaptation of Vision-Language Models", CVPR Workshops 2024),
as MaxZanella/CLIP-LoRA (``main.py``, ``lora.py``, ``loralib/``):

    W_p x  ->  W_p x + s * B_p A_p dropout(x)       p in {q, k, v} of every attention layer of both encoders
    logits = tau * cos(image_encoder'(x), text_encoder'("a photo of a {class}."))

rank r = 2, s = alpha / sqrt(r) with alpha = 1, dropout 0.25 on the update's input, A Kaiming-uniform and B zero
(so training starts at zero-shot CLIP with that prompt, "_" in class names replaced by spaces); AdamW (lr 2e-4,
betas 0.9/0.999, weight decay 1e-2), batch 32, 500 x K iterations, cosine to 1e-6 stepped per iteration;
RandomResizedCrop(scale 0.08-1) + flip, drawn fresh every step (online views). The layers: ``taskres.lora``; the
loop: ``taskres.lora_training``.

Where we differ (docs/methods.md): a ResNet image tower gets LoRA on its attention pool, its one attention layer
(the public code adapts ViTs only); the logit scale is the backbone's (100 for OpenAI's CLIPs, as the public code's
constant); on a GPU, bf16 autocast (``amp``) instead of fp16 with a gradient scaler; no validation is run.

The run folder keeps the adapters (``lora.safetensors``, with the SHA-256 of the backbone they apply to) and the
head: the class texts of the adapted text encoder. The test split is encoded through the merged image encoder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open

from taskres.atomic import write_safetensors
from taskres.backbones import Backbone
from taskres.backbones.official import plain_copy
from taskres.engine import OptimConfig
from taskres.errors import TaskResValueError, invalid
from taskres.lora import PROJECTIONS, add_lora, check_layers, lora_tensors, merge_lora
from taskres.lora_training import EncoderTraining, train_through_encoder
from taskres.methods.base import Artifact, FitContext, Fitted, Head, cosine_logits, option
from taskres.methods.registry import Method, register_method
from taskres.views import OnlineViews

PROMPT = "a photo of a {}."  # the public code's template for every dataset (its dataset files)
ITERATIONS_PER_SHOT = 500
MIN_LR = 1e-6  # CosineAnnealingLR's eta_min in the public code
LORA_FILE = "lora.safetensors"
LORA_FORMAT = "taskres-lora-1"


@dataclass(frozen=True)
class ClipLoRAConfig:
    rank: int = field(default=2, metadata=option("--lora-rank", "rank of every low-rank update (default 2)"))
    alpha: float = field(default=1.0, metadata=option("--lora-alpha", "scaling alpha: s = alpha / sqrt(rank) (1)"))
    dropout: float = field(default=0.25, metadata=option("--lora-dropout", "dropout on the updates' input (0.25)"))
    encoders: Literal["both", "text", "vision"] = field(
        default="both", metadata=option("--lora-encoders", "the encoders adapted (default both)")
    )
    projections: str = field(
        default="qkv", metadata=option("--lora-projections", "the attention projections adapted, of q, k, v, o (qkv)")
    )
    iterations: int | None = field(
        default=None, metadata=option("--lora-iterations", "training iterations (default 500 x shots)")
    )
    checkpointing: bool = field(
        default=False, metadata=option("--lora-checkpointing", "gradient checkpointing of the towers (saves memory)")
    )
    amp: Literal["bf16", "off"] = field(
        default="bf16", metadata=option("--lora-amp", "autocast on a GPU: bf16 (default) or off (no effect on a CPU)")
    )

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise invalid("rank", "be an integer >= 1", self.rank)
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise invalid("alpha", "be a finite number > 0", self.alpha)
        if not 0 <= self.dropout < 1:
            raise invalid("dropout", "be in [0, 1)", self.dropout)
        if (
            not self.projections
            or set(self.projections) - set(PROJECTIONS)
            or len(set(self.projections)) != len(self.projections)
        ):
            raise invalid("projections", "be distinct letters of q, k, v, o (e.g. qkv)", self.projections)
        if self.amp not in ("bf16", "off"):
            raise invalid("amp", "be bf16 or off", self.amp)
        if self.iterations is not None and (isinstance(self.iterations, bool) or self.iterations < 1):
            raise invalid("iterations", "be an integer >= 1 (training steps)", self.iterations)

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.rank)  # the public code's LoRALayer: alpha / sqrt(r)

    @property
    def encoder_names(self) -> tuple[str, ...]:
        return ("text", "vision") if self.encoders == "both" else (self.encoders,)


def optim_preset(shots: int, dataset: str) -> OptimConfig:
    """``taskres train --method clip-lora``: the public code's AdamW; ``epochs`` is unused (iterations count)."""
    return OptimConfig(
        lr=2e-4, epochs=1, batch_size=32, weight_decay=1e-2, warmup_epochs=0, optimizer="adamw", schedule="iteration"
    )


class ClipLoRAHead(Head):
    """The adapted text encoder's class texts (C, D) over the adapted image encoder's features: (N, D) -> (N, C)."""

    class_rows = ("text_features",)
    config_cls = ClipLoRAConfig
    scalars = ("logit_scale",)
    text_features: torch.Tensor  # buffers (registered in __init__), declared for the type checker
    logit_scale: torch.Tensor

    def __init__(self, text_features: torch.Tensor, logit_scale: float, config: ClipLoRAConfig):
        super().__init__()
        self.config = config
        self.register_buffer("text_features", text_features.detach().float().clone())  # (C, D)
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return cosine_logits(image_features.float(), self.text_features, self.logit_scale)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"text_features": self.text_features}


def prompts(classnames) -> list[str]:
    return [PROMPT.format(name.replace("_", " ")) for name in classnames]


def adapted_backbone(backbone: Backbone, tensors: dict[str, torch.Tensor], scaling: float, what: str) -> Backbone:
    """A copy of ``backbone`` with the updates merged into its weights, run by PyTorch (an ``--engine`` runs the
    plain weights, not these); its identity names the adapters."""
    model = plain_copy(backbone.model)
    merge_lora(model, tensors, scaling, what)
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode() + tensors[key].numpy().tobytes())
    digest.update(repr(scaling).encode())
    identity = dataclasses.replace(backbone.identity, adapter=digest.hexdigest(), engine=None)
    return dataclasses.replace(backbone, model=model, identity=identity, image_engine=None)


def _training(ctx: FitContext, config: ClipLoRAConfig) -> tuple[EncoderTraining, dict]:
    """The backbone's model copied with adapters installed (the shared backbone stays as it is)."""
    assert ctx.backbone is not None
    backbone = ctx.backbone
    model = plain_copy(backbone.model).eval()
    layers = check_layers(model, config.encoder_names, backbone.identity.spec)
    generator = torch.Generator().manual_seed(ctx.seed)
    adapters = add_lora(layers, config.projections, config.rank, config.scaling, config.dropout, generator)
    model.to(backbone.device)
    for adapter in adapters.values():
        adapter.updates.to(backbone.device).train()  # the dropout trains; the frozen model stays in eval mode
    if config.checkpointing and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    tokens = backbone.tokenizer(prompts(ctx.classnames)).to(backbone.device)
    if "text" in config.encoder_names:
        text = lambda: model.encode_text(tokens)  # noqa: E731  (C, D), through the adapted encoder every step
    else:
        fixed = backbone.encode_text(prompts(ctx.classnames))
        text = lambda: fixed  # noqa: E731
    params = [p for a in adapters.values() for p in a.updates.parameters()]
    training = EncoderTraining(
        model,
        params,
        text,
        ctx.logit_scale,
        backbone.device,
        backbone.dtype,
        backbone.pixel_dtype,
        config.amp == "bf16",
    )
    return training, adapters


def _lora_file(tensors: dict[str, torch.Tensor], backbone: Backbone, config: ClipLoRAConfig) -> Artifact:
    meta = {
        "format": LORA_FORMAT,
        "config": json.dumps(dataclasses.asdict(config)),
        "scaling": repr(config.scaling),
        "backbone_sha256": backbone.identity.sha256,
        "backbone_arch": backbone.identity.arch,
    }
    return Artifact(LORA_FILE, lambda path: write_safetensors(path, tensors, meta), metrics_key="lora_file")


def fit_clip_lora(ctx: FitContext, config: ClipLoRAConfig) -> Fitted:
    if ctx.backbone is None:
        raise TaskResValueError("CLIP-LoRA trains through the encoders and needs the backbone.", param="backbone")
    views = ctx.train_views
    assert isinstance(views, OnlineViews) and ctx.optim is not None  # TrainConfig: online views, no epochs
    iterations = config.iterations or ITERATIONS_PER_SHOT * ctx.shots
    training, adapters = _training(ctx, config)
    train_through_encoder(
        training, views, ctx.train_labels, ctx.optim, iterations, ctx.seed, MIN_LR, ctx.on_epoch, ctx.quiet
    )
    tensors = lora_tensors(adapters)
    encoder = adapted_backbone(ctx.backbone, tensors, config.scaling, "the trained adapters")
    text = encoder.encode_text(prompts(ctx.classnames)).cpu()
    info = {"lora_iterations": iterations, "lora_parameters": sum(t.numel() for t in tensors.values())}
    head = ClipLoRAHead(text, ctx.logit_scale, config)
    return Fitted(head, info, artifacts=[_lora_file(tensors, ctx.backbone, config)], backbone=encoder)


def load_adapted(run: Path, backbone: Backbone) -> Backbone:
    """The encoder a CLIP-LoRA run's head reads: ``backbone`` with the run's adapters merged, after checking that
    they were trained on these weights."""
    path = run / LORA_FILE
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k).float() for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise TaskResValueError(
            f"run {str(run)!r}: its adapters {str(path)!r} cannot be read ({type(err).__name__}: {err}); re-run "
            "training.",
            param="run",
        ) from None
    if meta.get("format") != LORA_FORMAT or "scaling" not in meta:
        raise TaskResValueError(f"{str(path)!r} is not a taskres LoRA file; re-run training.", param="run")
    if meta.get("backbone_sha256") != backbone.identity.sha256:
        raise TaskResValueError(
            f"the adapters in {str(path)!r} were trained on backbone weights with SHA-256 "
            f"{meta.get('backbone_sha256')}, not these ({backbone.identity.sha256}); use the run's backbone.",
            param="backbone",
        )
    return adapted_backbone(backbone, tensors, float(meta["scaling"]), f"the adapters in {str(path)!r}")


register_method(
    Method(
        "clip-lora",
        "CLIP-LoRA: rank-2 updates of q/k/v in every attention layer of both encoders (Zanella and Ben Ayed 2024)",
        ClipLoRAConfig,
        ClipLoRAHead,
        fit_clip_lora,
        optim_preset=optim_preset,
        views="online",
        files=(LORA_FILE,),
        adapt_backbone=load_adapted,
        unused_optim=("epochs", "warmup_epochs"),
        unused_optim_reason="it counts iterations, not epochs: set `iterations` instead",
    )
)
