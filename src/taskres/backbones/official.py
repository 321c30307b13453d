"""Backbones run as the official code runs OpenAI's CLIP, for ``--protocol official`` (docs/protocol.md#precision).

The official TaskRes trainer and CoOp's ``ZeroshotCLIP`` build CLIP with OpenAI's ``clip.model.build_model``, which
converts it with ``convert_weights``: the weights and biases of convolutions and linear layers, the attention
projections, and the text and image projections become fp16; LayerNorm (computed in fp32, its output cast back),
BatchNorm, the embeddings and the logit scale stay as they are. OpenAI's transformers take their input sequence
first, (L, N, D); open_clip's take it batch first, which rounds differently in fp16 and lets torch's fused attention
(its "fast path", batch first only) run in place of the plain one.

- ``fp16_backbone`` (mode "fp16"): that converted model, sequence first. CoOp's ``ZeroshotCLIP`` encodes text and
  images with it; the official TaskRes trainer builds its base classifier with its text encoder.
- ``trainer_backbone`` (mode "trainer"): the TaskRes trainer then casts the whole model to fp32 but still casts each
  image batch to fp16 before the image encoder. OpenAI's ResNet casts it back to its own dtype, so it encodes
  fp16-rounded pixels in fp32; OpenAI's ViT raises on the fp16 input, and the trainer's bare ``except`` encodes the
  fp32 image instead (here: the fp32 ViT, sequence first). Only OpenAI-format backbones change: the official code
  runs no other.

The mode is recorded in the backbone's identity (``official``), so runs and cached features keep them apart. An
image engine (``--engine``, ``taskres.backbones.engines``) runs a ResNet's "trainer" mode, the same model given
fp16-rounded pixels; the other modes run their own copy of the model, in PyTorch eager (their identity records no
engine).
"""

from __future__ import annotations

import copy
import dataclasses
import weakref

import torch
from torch import nn

from taskres.backbones.backbone import Backbone, ClipModel
from taskres.errors import check_choice

OFFICIAL_MODES = ("trainer", "fp16")


def sequence_first(model: ClipModel) -> ClipModel:
    """Make every open_clip transformer of ``model`` (in place) run its blocks on (L, N, D) input, as OpenAI's code
    lays it out: the same arithmetic as OpenAI's CLIP, and never torch's batch-first fused attention."""
    from open_clip.transformer import Transformer

    for module in model.modules():
        if isinstance(module, Transformer):
            module.batch_first = False  # forward() transposes the (N, L, D) input and back
            for block in module.resblocks:
                attn = getattr(block, "attn", None)
                if isinstance(attn, nn.MultiheadAttention):
                    attn.batch_first = False
    return model


def convert_weights(model: ClipModel) -> ClipModel:
    """A copy of an open_clip CLIP from its fp32 weights, converted as OpenAI's ``clip.model.convert_weights``
    converts OpenAI's CLIP, its LayerNorms computing in fp32 and casting back (OpenAI's ``LayerNorm``), sequence
    first. The model given is left as it is."""
    from open_clip.model import CLIP
    from open_clip.transformer import LayerNorm, LayerNormFp32, TextTransformer, VisionTransformer

    model = sequence_first(plain_copy(model).float())
    for module in model.modules():
        if type(module) in (nn.LayerNorm, LayerNorm):
            module.__class__ = LayerNormFp32  # the same parameters; forward: F.layer_norm(x.float()).to(x.dtype)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            _halve(module, "weight")
            _halve(module, "bias")
        if isinstance(module, nn.MultiheadAttention):
            for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"):
                _halve(module, name)
            _halve(module, "bias_k")
            _halve(module, "bias_v")
        if isinstance(module, (CLIP, TextTransformer)):
            _halve(module, "text_projection")
        if isinstance(module, VisionTransformer):
            _halve(module, "proj")
    return model


def _halve(module: nn.Module, name: str) -> None:
    tensor = getattr(module, name, None)
    if isinstance(tensor, torch.Tensor):
        tensor.data = tensor.data.half()


def fp16_backbone(backbone: Backbone) -> Backbone:
    """A copy of the backbone with its model converted as OpenAI's ``build_model`` leaves it (``convert_weights``):
    text and images encoded in fp16, as CoOp's ``ZeroshotCLIP`` encodes them."""
    if backbone.identity.official == "fp16":
        return backbone
    return dataclasses.replace(
        backbone,
        model=convert_weights(backbone.model),
        identity=dataclasses.replace(backbone.identity, official="fp16", engine=None),
        dtype=torch.float16,
        pixel_dtype=None,
        image_engine=None,
    )


def trainer_backbone(backbone: Backbone) -> Backbone:
    """The backbone as the official TaskRes trainer encodes images (see the module's docstring): for OpenAI's
    ResNets, fp16-rounded pixels; for OpenAI's ViTs, a copy whose transformer runs sequence first; any other
    backbone unchanged."""
    from open_clip.modified_resnet import ModifiedResNet

    if backbone.identity.official == "fp16":  # its model is converted: the trainer's starts from the fp32 weights
        raise ValueError("trainer_backbone needs a backbone in its fp32 form, not the fp16 one (fp16_backbone)")
    if backbone.identity.format != "openai" or backbone.identity.official == "trainer":
        return backbone
    identity = dataclasses.replace(backbone.identity, official="trainer")
    if isinstance(backbone.model.visual, ModifiedResNet):  # the same model: its engine (if any) runs it
        return dataclasses.replace(backbone, identity=identity, pixel_dtype=torch.float16)
    model = _SEQUENCE_FIRST.get(backbone.model)
    if model is None:  # one copy per model, however many runs of a sweep ask for it
        model = _SEQUENCE_FIRST[backbone.model] = sequence_first(plain_copy(backbone.model))
    identity = dataclasses.replace(identity, engine=None)  # a copy of the model, run by PyTorch eager
    return dataclasses.replace(backbone, model=model, identity=identity, image_engine=None)


def plain_copy(model: ClipModel) -> ClipModel:
    """A copy of the model in PyTorch's default memory format (the channels-last engine converts the model it
    runs in place)."""
    return copy.deepcopy(model).to(memory_format=torch.contiguous_format)


# A frozen model's sequence-first copy, kept while the model lives.
_SEQUENCE_FIRST: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def official_image_backbone(backbone: Backbone, official_base: str | None) -> Backbone:
    """The backbone that encodes a run's images under a method's official variant (``OfficialVariant.base``): as
    the TaskRes trainer encodes them ("fp16_text"), in fp16 as CoOp's ``ZeroshotCLIP`` ("zeroshot_clip"), else
    unchanged."""
    if official_base == "fp16_text":
        return trainer_backbone(backbone)
    return fp16_backbone(backbone) if official_base == "zeroshot_clip" else backbone


def with_official(backbone: Backbone, mode: str | None) -> Backbone:
    """The backbone with a recorded ``official`` mode (a run's config.json) applied again; None: unchanged."""
    if mode is None:
        return backbone
    check_choice("official", mode, OFFICIAL_MODES)
    return trainer_backbone(backbone) if mode == "trainer" else fp16_backbone(backbone)
