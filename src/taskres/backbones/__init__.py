"""CLIP backbones through open_clip: OpenAI weights by name or file, open_clip ``model:pretrained`` pairs, local files.

``load_backbone(spec)`` accepts
- an OpenAI model name (``RN50``, ``RN101``, ``ViT-B/32``, ``ViT-B/16``, ``RN50x16`` ...): OpenAI's weights, QuickGELU;
- an open_clip pair ``MODEL:PRETRAINED`` where PRETRAINED is a tag (``ViT-B-32:laion2b_s34b_b79k``) or a weights file
  (``ViT-B-32-quickgelu:/path/model.safetensors``); the model config decides the activation;
- a path to an OpenAI-format checkpoint (TorchScript archive or plain state dict): the architecture is inferred from
  the tensors and QuickGELU is used, as OpenAI trained these models;
- a model shipped with this package (``taskres-demo``);
- a Hugging Face Hub repository in open_clip's format, ``hf-hub:ORG/NAME`` or ``hf-hub:ORG/NAME@REVISION``
  (REVISION: a branch, a tag or a 40-hex commit hash; default ``main``), read from the local Hugging Face cache
  (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``). The identity records the repository
  and the snapshot's commit hash, so two revisions never share cached features.

Nothing is downloaded when the weights are on disk; when they are not and the network is unreachable, loading fails
within seconds with a message that says where to put the file.

Modules: ``backbone`` (Backbone, BackboneIdentity), ``load`` (load_backbone: which loader a spec goes to),
``openai_files`` (OpenAI names and files), ``openclip_pairs`` (MODEL:PRETRAINED pairs and the shipped models),
``hf_hub`` (the Hugging Face cache), ``engines`` (``--engine``: what runs the image encoder), ``weights`` (the
weights folder, hashing, the network probe).
"""

from taskres.backbones.backbone import OPENAI_MEAN, OPENAI_STD, Backbone, BackboneIdentity, ClipModel
from taskres.backbones.engines import ENGINES
from taskres.backbones.hf_hub import hf_hub_cache_dir, parse_hf_hub_spec
from taskres.backbones.load import PRECISIONS, known_backbones, load_backbone
from taskres.backbones.openai_files import OPENAI_MODELS
from taskres.backbones.openclip_pairs import SHIPPED_MODELS
from taskres.backbones.weights import default_weights_dir, file_sha256

__all__ = [
    "ENGINES",
    "OPENAI_MEAN",
    "OPENAI_MODELS",
    "OPENAI_STD",
    "PRECISIONS",
    "SHIPPED_MODELS",
    "Backbone",
    "BackboneIdentity",
    "ClipModel",
    "default_weights_dir",
    "file_sha256",
    "hf_hub_cache_dir",
    "known_backbones",
    "load_backbone",
    "parse_hf_hub_spec",
]
