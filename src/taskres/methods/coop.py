"""CoOp (Zhou et al., IJCV 2022), as KaiyangZhou/CoOp ``trainers/coop.py`` with its default unified context:

    prompt_c = [SOS] [V]_1 ... [V]_M [CLASS_c] . [EOS]      M = 16 learned vectors shared by all classes
    t_c = text_encoder(prompt_c)                            the frozen encoder runs in the training loop
    logits = tau * cos(f, t)

The context vectors start random (normal, std 0.02); class names have "_" replaced by spaces (CoOp does, unlike the
TaskRes base). Image features come from the cache (the image encoder is frozen). Optimiser: CoOp's rn50*.yaml
(Dassl ``sgd``: lr 2e-3, momentum 0.9, weight decay 5e-4, batch 32, warm-up and cosine), 50 epochs for 1 shot,
100 for 2/4, 200 for 8/16, 50 for every K on ImageNet. On a GPU the text encoder runs under bf16 autocast (CoOp ran
the whole model in fp16). The trained head keeps the resulting (C, D) text features, so ``predict`` and ``eval``
need no text encoder.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from taskres.backbones import ClipModel
from taskres.engine import OptimConfig
from taskres.errors import TaskResValueError
from taskres.methods.base import FitContext, Fitted, Head, cosine_logits, option
from taskres.methods.clip_adapter import coop_schedule_epochs
from taskres.methods.registry import Method, register_method
from taskres.text_tower import check_text_tower, pooled_text, projection


@dataclass(frozen=True)
class CoOpConfig:
    n_ctx: int = field(default=16, metadata=option("--coop-n-ctx", "number of context vectors (default 16)"))
    init_std: float = 0.02
    amp: bool = True  # bf16 autocast of the text encoder on CUDA (no effect on the CPU)

    def __post_init__(self) -> None:
        if self.n_ctx < 1 or not self.init_std > 0:
            raise TaskResValueError(
                f"CoOp needs `n_ctx` >= 1 and init_std > 0; got {self.n_ctx!r}, {self.init_std!r}.", param="n_ctx"
            )


def optim_preset(shots: int, dataset: str) -> OptimConfig:
    """``taskres train --method coop``: CoOp's optimiser; epochs by shots (rn50_ep50 on ImageNet)."""
    epochs = 50 if dataset == "imagenet" else coop_schedule_epochs(shots)
    return OptimConfig(lr=2e-3, epochs=epochs, batch_size=32, weight_decay=5e-4, optimizer="sgd", momentum=0.9)


class CoOpHead(Head):
    """The trained prompt's class text features: (N, D) features -> (N, C) logits, no text encoder needed."""

    class_rows = ("text_features",)
    config_cls = CoOpConfig
    scalars = ("logit_scale",)
    text_features: torch.Tensor  # buffers (registered in __init__), declared for the type checker
    ctx: torch.Tensor
    logit_scale: torch.Tensor

    def __init__(self, text_features: torch.Tensor, ctx: torch.Tensor, logit_scale: float, config: CoOpConfig):
        super().__init__()
        self.config = config
        self.register_buffer("text_features", text_features.detach().float().clone())  # (C, D)
        self.register_buffer("ctx", ctx.detach().float().clone())  # (M, W), kept for the record
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return cosine_logits(image_features.float(), self.text_features, self.logit_scale)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"text_features": self.text_features, "ctx": self.ctx}


class PromptLearner(nn.Module):
    """The context vectors in front of the frozen text encoder; the encoder is held outside the module's state, so
    only ``ctx`` is a parameter and moving the learner never moves the shared backbone."""

    tokens: torch.Tensor  # buffers (registered in __init__), declared for the type checker
    prefix: torch.Tensor
    suffix: torch.Tensor

    def __init__(self, model: ClipModel, tokens: torch.Tensor, ctx: torch.Tensor, logit_scale: float, amp: bool):
        super().__init__()
        self.encoder = (model,)
        n_ctx = ctx.shape[0]
        with torch.no_grad():
            embedding = model.token_embedding(tokens)  # (C, L, W)
        self.register_buffer("tokens", tokens)  # (C, L)
        self.register_buffer("prefix", embedding[:, :1].clone())  # SOS
        self.register_buffer("suffix", embedding[:, 1 + n_ctx :].clone())  # class tokens, ".", EOS, padding
        self.ctx = nn.Parameter(ctx)  # (M, W)
        self.logit_scale, self.amp = float(logit_scale), amp

    def text_features(self) -> torch.Tensor:
        """(C, D) float32 text features of the current prompts."""
        model = self.encoder[0]
        ctx = self.ctx.to(self.prefix.dtype).unsqueeze(0).expand(self.tokens.shape[0], -1, -1)  # (C, M, W)
        prompts = torch.cat([self.prefix, ctx, self.suffix], dim=1)  # (C, L, W)
        amp = self.amp and self.prefix.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            return (pooled_text(model, self.tokens, prompts) @ projection(model)).float()

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return cosine_logits(image_features.float(), self.text_features(), self.logit_scale)


def prompt_tokens(backbone, classnames, n_ctx: int) -> torch.Tensor:
    """(C, L) token ids of "X X ... X {name}." (CoOp's placeholder prompt), checking nothing is truncated."""
    tokenizer = backbone.tokenizer
    if not hasattr(tokenizer, "encode"):
        raise TaskResValueError("CoOp builds prompts with CLIP's BPE tokenizer; this backbone's tokenizer is another.")
    length = backbone.model.positional_embedding.shape[0]
    prompts = [" ".join(["X"] * n_ctx) + " " + name.replace("_", " ") + "." for name in classnames]
    for name, prompt in zip(classnames, prompts):
        need = len(tokenizer.encode(prompt)) + 2
        if need > length:
            raise TaskResValueError(
                f"CoOp's prompt for class {name!r} needs {need} tokens with {n_ctx} context "
                f"vectors, but the text encoder reads {length}; use a smaller `n_ctx` (at most "
                f"{n_ctx - (need - length)}).",
                param="n_ctx",
            )
    return tokenizer(prompts)


def fit_coop(ctx: FitContext, config: CoOpConfig) -> Fitted:
    if ctx.backbone is None:
        raise TaskResValueError(
            "CoOp runs the text encoder in the training loop and needs the backbone in its context.", param="backbone"
        )
    model = check_text_tower(ctx.backbone, "CoOp")
    tokens = prompt_tokens(ctx.backbone, ctx.classnames, config.n_ctx).to(ctx.backbone.device)
    width = model.token_embedding.weight.shape[1]
    init = torch.randn(config.n_ctx, width, generator=torch.Generator().manual_seed(ctx.seed)) * config.init_std
    learner = PromptLearner(model, tokens, init.to(ctx.backbone.device), ctx.logit_scale, config.amp)
    ctx.train(learner)
    with torch.no_grad():
        text = learner.text_features()
    return Fitted(CoOpHead(text.cpu(), learner.ctx.detach().cpu(), ctx.logit_scale, config))


register_method(
    Method(
        "coop",
        "CoOp: 16 learned context vectors through the frozen text encoder (Zhou et al. 2022)",
        CoOpConfig,
        CoOpHead,
        fit_coop,
        optim_preset=optim_preset,
    )
)
