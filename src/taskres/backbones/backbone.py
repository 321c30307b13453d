"""What a loaded backbone is: the frozen model with its tokenizer and geometry (``Backbone``), and the record of what
makes its features what they are (``BackboneIdentity``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from typing import Any

import torch

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HF_HUB_PREFIX = "hf-hub:"
# An open_clip CLIP-style model (an nn.Module with encode_image, encode_text, logit_scale, visual, ...): open_clip
# ships no type information, so its attributes are untyped.
ClipModel = Any


@dataclass(frozen=True)
class BackboneIdentity:
    """What makes a backbone's features what they are, recorded in every run's config.json.

    ``kind``: "openai" (an OpenAI name), "file" (an OpenAI-format file), "open_clip" (a MODEL:TAG pair),
    "open_clip_file" (MODEL:FILE), "shipped" or "hf_hub" (``hf-hub:ORG/NAME[@REVISION]``). ``sha256`` hashes the
    weights file; ``tag`` is the open_clip tag; ``repo`` and ``revision`` (the snapshot's commit hash, whatever
    branch or tag was asked for) name a Hugging Face Hub model.
    """

    spec: str  # as the user wrote it: RN50, a path, MODEL:TAG
    kind: str
    arch: str
    sha256: str
    precision: str = "fp32"
    quick_gelu: bool = False  # as built, not as configured: the activation changes every feature
    image_size: int = 224
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD
    name: str | None = None  # the OpenAI name, for kind "openai"
    format: str | None = None  # "openai" for OpenAI-format files
    tag: str | None = None  # the open_clip tag, for kind "open_clip"
    repo: str | None = None  # ORG/NAME, for kind "hf_hub"
    revision: str | None = None  # the snapshot's commit hash, for kind "hf_hub"
    # run as the official code runs OpenAI's CLIP (taskres.backbones.official): "trainer" (the TaskRes trainer's image
    # encoder: fp16-rounded pixels for a ResNet) or "fp16" (the model as OpenAI's build_model converts it)
    official: str | None = None
    # the SHA-256 of low-rank adapters merged into the weights (a CLIP-LoRA run's encoder), None for the plain weights
    adapter: str | None = None
    # the engine that runs the image encoder (taskres.backbones.engines) when not PyTorch eager, e.g. "onnxruntime"
    engine: str | None = None

    def to_json(self) -> dict:
        """The record in config.json (fields that do not apply are left out)."""
        out = {k: v for k, v in asdict(self).items() if v is not None}
        out.update(mean=list(self.mean), std=list(self.std))
        return out

    @classmethod
    def from_json(cls, record: dict) -> BackboneIdentity:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in record.items() if k in known}
        for k in ("mean", "std"):
            if k in values:
                values[k] = tuple(values[k])
        return cls(**values)

    def weights_key(self) -> dict:
        """Everything that changes the features, and nothing about how the weights were named (cache keys): the
        same weights give the same features as RN50, as a path or as a MODEL:FILE pair."""
        return {k: v for k, v in self.to_json().items() if k not in ("spec", "kind", "name")}

    def reload_spec(self) -> str:
        """The spec that loads these weights again: a Hub model pinned to its recorded commit (its branch may have
        moved since), any other as written."""
        if self.kind == "hf_hub" and self.repo and self.revision:
            return f"{HF_HUB_PREFIX}{self.repo}@{self.revision}"
        return self.spec

    def difference(self, other: BackboneIdentity) -> str | None:
        """The first of sha256, tag, arch, repo, revision that differs from ``other``, as "field: here vs there", or
        None."""
        for key in ("sha256", "tag", "arch", "repo", "revision"):
            if getattr(self, key) != getattr(other, key):
                return f"{key}: {getattr(self, key)!r} here, {getattr(other, key)!r} in the run"
        return None


@dataclass
class Backbone:
    """A frozen CLIP model with its tokenizer and image geometry. Features come out un-normalised: (N, D)."""

    model: ClipModel
    tokenizer: Any
    image_size: int
    identity: BackboneIdentity
    logit_scale: float = 100.0  # tau = exp(logit_scale), read in fp32 before any cast to a lower precision
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD
    pixel_dtype: torch.dtype | None = None  # pixels are rounded to it before the encoder (None: to ``dtype`` only)
    # runs the image encoder in place of ``model.encode_image`` (taskres.backbones.engines; None: eager)
    image_engine: Callable[[torch.Tensor], torch.Tensor] | None = None

    @cached_property
    def embed_dim(self) -> int:
        """D, read off the text encoder's output (works for every open_clip text tower)."""
        return int(self.encode_text(["a"]).shape[-1])

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised pixels -> (N, D) float32 image features (pinned pixels are copied to a GPU
        without blocking)."""
        images = images.to(self.device, self.pixel_dtype or self.dtype, non_blocking=True)
        encode = self.image_engine or self.model.encode_image
        return encode(images.to(self.dtype)).float()

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """List of N strings -> (N, D) float32 text features."""
        tokens = self.tokenizer(texts).to(self.device)
        return self.model.encode_text(tokens).float()
