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
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pickle
import re
import socket
import threading
import zipfile
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from taskres.errors import TaskResFileNotFoundError, TaskResValueError, check_choice, suggest

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WEIGHTS_ENV = "TASKRES_WEIGHTS"
OFFLINE_ENV = "TASKRES_OFFLINE"
# An open_clip CLIP-style model (an nn.Module with encode_image, encode_text, logit_scale, visual, ...): open_clip
# ships no type information, so its attributes are untyped.
ClipModel = Any

# OpenAI's names (as the official CLIP package spells them) -> open_clip's model names.
OPENAI_MODELS = {
    "RN50": "RN50",
    "RN101": "RN101",
    "RN50x4": "RN50x4",
    "RN50x16": "RN50x16",
    "RN50x64": "RN50x64",
    "ViT-B/32": "ViT-B-32",
    "ViT-B/16": "ViT-B-16",
    "ViT-L/14": "ViT-L-14",
    "ViT-L/14@336px": "ViT-L-14-336",
}
SHIPPED_MODELS = ("taskres-demo",)
# What building a model from a damaged or foreign weights file raises (torch, open_clip, safetensors, pickle).
LOAD_ERRORS: tuple[type[Exception], ...] = (
    RuntimeError,
    ValueError,
    OSError,
    EOFError,
    KeyError,
    IndexError,
    TypeError,
    AssertionError,
    pickle.UnpicklingError,
    SafetensorError,
)
HF_HUB_PREFIX = "hf-hub:"
# open_clip's own names on the Hub (open_clip.pretrained: HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME), in
# the order its hf-hub loader prefers them
HF_CONFIG_FILE = "open_clip_config.json"
HF_WEIGHTS_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


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

    @cached_property
    def embed_dim(self) -> int:
        """D, read off the text encoder's output (works for every open_clip text tower)."""
        return int(self.encode_text(["a"]).shape[-1])

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised pixels -> (N, D) float32 image features (pinned pixels are copied to a GPU
        without blocking)."""
        return self.model.encode_image(images.to(self.device, self.dtype, non_blocking=True)).float()

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """List of N strings -> (N, D) float32 text features."""
        tokens = self.tokenizer(texts).to(self.device)
        return self.model.encode_text(tokens).float()


def default_weights_dir() -> Path:
    return Path(os.environ.get(WEIGHTS_ENV) or Path.home() / ".cache" / "taskres" / "weights").expanduser()


def known_backbones() -> list[str]:
    import open_clip

    return list(OPENAI_MODELS) + list(SHIPPED_MODELS) + [f"{m}:{t}" for m, t in open_clip.list_pretrained()]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def load_backbone(
    spec: str, device: str | torch.device = "cpu", precision: str = "fp32", weights_dir: str | Path | None = None
) -> Backbone:
    """Load a frozen backbone in eval mode (see the module docstring for what ``spec`` may be)."""
    check_choice("precision", precision, sorted(PRECISIONS))
    device = parse_device(device)
    weights_dir = Path(weights_dir).expanduser() if weights_dir else default_weights_dir()
    if "\0" in spec:
        raise TaskResValueError(
            f"backbone {spec!r} holds a NUL byte; pass a model name or a file path.", param="backbone"
        )
    try:
        return _load_backbone(spec, device, precision, weights_dir)
    except PermissionError as err:
        raise TaskResValueError(
            f"backbone {spec!r}: {err.filename!r} cannot be read ({err.strerror}); fix its permissions.",
            param="backbone",
        ) from None


def _load_backbone(spec: str, device: torch.device, precision: str, weights_dir: Path) -> Backbone:
    import open_clip

    path = Path(spec).expanduser()
    if spec in SHIPPED_MODELS:
        model, tokenizer, identity = _load_shipped(spec)
    elif spec.startswith(HF_HUB_PREFIX):
        model, tokenizer, identity = _load_hf_hub(spec)
    elif spec in OPENAI_MODELS:
        file = _find_openai_weights(spec, weights_dir)
        model, identity = _load_openai_file(file)
        identity.update(kind="openai", name=spec)
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
    elif path.is_file():
        model, identity = _load_openai_file(path)
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
    elif ":" in spec:
        model, tokenizer, identity = _load_open_clip_pair(spec, weights_dir)
    elif path.suffix or os.sep in spec:
        raise TaskResFileNotFoundError(
            f"backbone file {spec!r} does not exist; pass --backbone an existing "
            "checkpoint file, "
            f"an OpenAI model name ({', '.join(OPENAI_MODELS)}) or an open_clip "
            "MODEL:PRETRAINED pair."
        )
    else:
        raise TaskResValueError(
            f"unknown backbone {spec!r}; {suggest(spec, known_backbones())}known OpenAI names: "
            f"{', '.join(OPENAI_MODELS)}; shipped: {', '.join(SHIPPED_MODELS)}; or an open_clip MODEL:PRETRAINED pair "
            '(list them with `python -c "import open_clip; print(open_clip.list_pretrained())"`), a Hugging Face '
            "Hub model hf-hub:ORG/NAME, or a checkpoint path."
        )
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


def parse_device(device: str | torch.device) -> torch.device:
    """A torch device that exists here, or a TaskResError that says which ones do."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise TaskResValueError(
            f"device {device!r} is not a torch device; use cpu, cuda or cuda:N.", param="device"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TaskResValueError(
                f"device {device} asks for a GPU, but CUDA is not available here; use cpu.", param="device"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TaskResValueError(f"device {device}: only {torch.cuda.device_count()} GPU(s) here.", param="device")
    elif device.type not in ("cpu", "mps"):
        raise TaskResValueError(f"device {device} is not supported; use cpu or cuda[:N].", param="device")
    return device


def _has_quick_gelu(model: torch.nn.Module) -> bool:
    from open_clip.model import QuickGELU

    return any(isinstance(m, QuickGELU) for m in model.modules())


# ---- OpenAI-format files -------------------------------------------------------------------------------------------


def _read_openai_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of an OpenAI checkpoint: a TorchScript archive (as OpenAI distributes) or a plain state dict."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for a bad header
            raise TaskResValueError(
                f"backbone file {str(path)!r} is not a readable safetensors file ({err})."
            ) from None
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            is_script = any(n.split("/", 1)[-1].startswith("code/") for n in zf.namelist())
        if is_script:
            try:
                return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
            except RuntimeError as err:
                raise TaskResValueError(
                    f"backbone file {str(path)!r} is a damaged TorchScript archive ({str(err).splitlines()[0]}).",
                    param="backbone",
                ) from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        raise TaskResValueError(
            f"backbone file {str(path)!r} is not a checkpoint that can be read safely ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Expected an OpenAI CLIP .pt file (TorchScript or "
            "state dict), or MODEL:FILE for open_clip weights."
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TaskResValueError(f"backbone file {str(path)!r} does not hold a state dict of tensors.")
    if obj and next(iter(obj)).startswith("module."):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _openai_config(sd: dict[str, torch.Tensor], where: str) -> dict:
    """Infer the CLIP architecture from OpenAI-layout tensors (the rules of OpenAI's build_model)."""
    need = ("text_projection", "positional_embedding", "token_embedding.weight", "ln_final.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise TaskResValueError(
            f"backbone file {where!r} is not an OpenAI-format CLIP checkpoint (no {missing}); "
            "for open_clip weights pass MODEL:FILE, e.g. ViT-B-32:/path/weights.safetensors."
        )
    layers: int | tuple[int, ...]
    if "visual.proj" in sd:
        width = sd["visual.conv1.weight"].shape[0]
        patch = sd["visual.conv1.weight"].shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        layers = len([k for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")])
        vision = dict(layers=layers, width=width, patch_size=patch, image_size=patch * grid)
        arch = f"ViT-w{width}-l{layers}-p{patch}-{patch * grid}"
    else:
        layers = tuple(len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4))
        width = sd["visual.layer1.0.conv1.weight"].shape[0]
        out = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = dict(layers=layers, width=width, image_size=out * 32)
        arch = f"RN-w{width}-l{'-'.join(map(str, layers))}-{out * 32}"
    twidth = sd["ln_final.weight"].shape[0]
    text = dict(
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        width=twidth,
        heads=twidth // 64,
        layers=len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}),
    )
    return dict(embed_dim=int(sd["text_projection"].shape[1]), vision_cfg=vision, text_cfg=text, arch=arch)


def _load_openai_file(path: Path) -> tuple[ClipModel, dict]:
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    path = Path(path)
    sd = _read_openai_state_dict(path)
    cfg = _openai_config(sd, str(path))
    # Scalars OpenAI's archives carry, and the causal mask (derived, not a weight) that traced archives may hold.
    for k in ("input_resolution", "context_length", "vocab_size", "attn_mask"):
        sd.pop(k, None)
    # Built in fp32 (open_clip's own builder casts to fp16 first, which would round fp32 checkpoints).
    model = CLIP(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]), CLIPTextCfg(**cfg["text_cfg"]), quick_gelu=True)
    try:
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except RuntimeError as err:
        raise TaskResValueError(
            f"backbone file {str(path)!r} does not match the CLIP architecture inferred from it "
            f"({cfg['arch']}): {str(err).splitlines()[0]}"
        ) from None
    identity = {"kind": "file", "format": "openai", "arch": cfg["arch"], "sha256": file_sha256(path)}
    return model, identity


def _find_openai_weights(name: str, weights_dir: Path) -> Path:
    """Local file for an OpenAI model name; downloaded only when the network answers."""
    import open_clip

    url = open_clip.pretrained.get_pretrained_url(OPENAI_MODELS[name], "openai")
    filename = os.path.basename(url)
    candidates = [weights_dir / filename, Path.home() / ".cache" / "clip" / filename]
    for c in candidates:
        if c.is_file():
            return c
    if _network_reachable(url):
        logger.warning("downloading %s weights to %s", name, weights_dir)
        return Path(open_clip.pretrained.download_pretrained_from_url(url, cache_dir=str(weights_dir)))
    raise TaskResValueError(
        f"the weights of backbone {name!r} are not on disk and the network is unreachable. Put OpenAI's file "
        f"{filename!r} in {str(weights_dir)!r} (set ${WEIGHTS_ENV} to use another folder, or pass --backbone "
        f'/path/to/{filename}). On a connected machine fetch it with: python -c "import open_clip; '
        f"open_clip.pretrained.download_pretrained_from_url('{url}', cache_dir='weights')\" and copy "
        f"weights/{filename}."
    )


def _network_reachable(url: str, timeout: float = 3.0) -> bool:
    """True if a TCP connection to the URL's host opens within ``timeout`` seconds (DNS included)."""
    if os.environ.get(OFFLINE_ENV) == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    host = url.split("://", 1)[-1].split("/", 1)[0]
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)  # getaddrinfo ignores the socket timeout, so bound the whole probe
    return bool(result and result[0])


# ---- open_clip pairs and shipped models ----------------------------------------------------------------------------


def _load_open_clip_pair(spec: str, weights_dir: Path) -> tuple[ClipModel, Any, dict]:
    import open_clip

    model_name, pretrained = spec.split(":", 1)
    if model_name not in open_clip.list_models():
        raise TaskResValueError(
            f"unknown open_clip model {model_name!r} in backbone {spec!r}; "
            f"{suggest(model_name, open_clip.list_models())}see open_clip.list_models()."
        )
    file = Path(pretrained).expanduser()
    quick_gelu = False
    if file.is_file():
        identity = {"kind": "open_clip_file", "arch": model_name}
        source = str(file)
    elif open_clip.pretrained.is_pretrained_cfg(model_name, pretrained):
        cfg = open_clip.pretrained.get_pretrained_cfg(model_name, pretrained)
        source = _find_open_clip_weights(spec, cfg, weights_dir)
        # Loaded from a file path, open_clip would not apply the tag's activation (e.g. QuickGELU for 'openai').
        quick_gelu = bool(cfg.get("quick_gelu", False))
        identity = {"kind": "open_clip", "arch": model_name, "tag": pretrained}
    else:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise TaskResValueError(
            f"{pretrained!r} in backbone {spec!r} is neither a file nor a known tag of "
            f"{model_name}; "
            f"{suggest(pretrained, tags)}known tags: {', '.join(tags) or 'none'}."
        )
    try:
        model = open_clip.create_model(model_name, pretrained=source, load_weights=True, force_quick_gelu=quick_gelu)
    except LOAD_ERRORS as err:
        # by the file's damage: torch's weights-only unpickler (which raises IndexError or TypeError on some random
        # bytes), safetensors and open_clip's own asserts
        first = str(err).splitlines()[0] if str(err) else ""
        raise TaskResValueError(
            f"could not load weights {source!r} into open_clip model {model_name!r} "
            f"({type(err).__name__}: {first}); pass a weights file of that model (an open_clip "
            ".safetensors or .bin state dict).",
            param="backbone",
        ) from None
    identity["sha256"] = file_sha256(Path(source))
    return model, open_clip.get_tokenizer(model_name), identity


def _find_open_clip_weights(spec: str, cfg: dict, weights_dir: Path) -> str:
    import open_clip

    if cfg.get("file") and Path(cfg["file"]).is_file():  # a tag registered with a local file
        return str(cfg["file"])
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        for name in [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]:
            hit = try_to_load_from_cache(repo, name)
            if isinstance(hit, str):
                return hit
    url = cfg.get("url", "")
    if url and (weights_dir / os.path.basename(url)).is_file():
        return str(weights_dir / os.path.basename(url))
    probe = "https://huggingface.co" if hub else url
    if probe and _network_reachable(probe):
        return open_clip.pretrained.download_pretrained(cfg, cache_dir=None)
    raise TaskResValueError(
        f"the weights of backbone {spec!r} are not on disk and the network is unreachable. On a connected machine, "
        f"run: python -c \"import open_clip; open_clip.create_model('{spec.split(':')[0]}', "
        f"pretrained='{spec.split(':', 1)[1]}')\" and copy the Hugging Face cache (~/.cache/huggingface) here, or "
        f"save the weights file and pass --backbone {spec.split(':')[0]}:/path/to/weights.safetensors."
    )


@functools.cache
def _register_shipped_config(config: Path) -> None:
    """Add a shipped model's config to open_clip's registry, once per process."""
    import open_clip

    open_clip.add_model_config(config)


def _load_shipped(name: str) -> tuple[ClipModel, Any, dict]:
    import open_clip

    config, weights = ASSETS / f"{name}.json", ASSETS / f"{name}.safetensors"
    if not weights.is_file():
        raise TaskResFileNotFoundError(
            f"the shipped backbone {name!r} is missing its weights file {str(weights)!r}; "
            "reinstall taskres, or rebuild it with scripts/pretrain_demo.py."
        )
    _register_shipped_config(config)
    model = open_clip.create_model(name, pretrained=str(weights)).float()
    identity = {"kind": "shipped", "arch": name, "sha256": file_sha256(weights)}
    return model, open_clip.get_tokenizer(name), identity


# ---- Hugging Face Hub models ---------------------------------------------------------------------------------------

HF_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")


def hf_hub_cache_dir() -> Path:
    """The Hugging Face cache as huggingface_hub finds it, read from the environment at each call (huggingface_hub
    reads it once, at import): $HF_HUB_CACHE, $HUGGINGFACE_HUB_CACHE, $HF_HOME/hub, $XDG_CACHE_HOME/huggingface/hub,
    ~/.cache/huggingface/hub."""
    env = os.environ
    hub = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not hub:
        home = env.get("HF_HOME") or os.path.join(
            env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
        )
        hub = os.path.join(home, "hub")
    return Path(os.path.expandvars(hub)).expanduser()


def parse_hf_hub_spec(spec: str) -> tuple[str, str | None]:
    """``hf-hub:ORG/NAME[@REVISION]`` -> (ORG/NAME, REVISION or None)."""
    repo, at, revision = spec[len(HF_HUB_PREFIX) :].partition("@")
    if not HF_REPO_ID.fullmatch(repo) or "--" in repo or ".." in repo:
        raise TaskResValueError(
            f"backbone {spec!r}: hf-hub: needs a Hugging Face repository as ORG/NAME, e.g. "
            "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K, optionally with @REVISION (a branch, a tag or a commit "
            f"hash); got {repo!r}.",
            param="backbone",
        )
    if at and (
        not revision
        or ".." in revision.split("/")
        or revision.startswith("/")
        or any(c.isspace() or c in "\\~^:?*[" for c in revision)
    ):
        raise TaskResValueError(
            f"backbone {spec!r}: {revision!r} after @ is not a revision; give a branch, a tag or a "
            "40-hex commit hash (hf-hub:ORG/NAME@main), or drop @ for the default branch.",
            param="backbone",
        )
    return repo, revision if at else None


def _hf_fetch_hint(repo: str, revision: str | None, cache: Path) -> str:
    rev = f" --revision {revision}" if revision else ""
    files = f"{HF_CONFIG_FILE} {HF_WEIGHTS_FILES[0]}"
    return (
        f"On a connected machine run `hf download {repo} {files}{rev} --cache-dir {cache}` (older "
        f"huggingface_hub: `huggingface-cli download` with the same arguments), or copy its cache folder "
        f"models--{repo.replace('/', '--')} into {str(cache)!r}; set $HF_HUB_CACHE (or $HF_HOME) to use another "
        "cache."
    )


def _hf_hub_snapshot(repo: str, revision: str | None, cache: Path) -> tuple[Path, str] | None:
    """(snapshot folder, commit hash) of ``repo`` at ``revision`` (default: main) in the cache, or None."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    wanted = revision or "main"
    commit: str | None = wanted if COMMIT_HASH.fullmatch(wanted) else None
    if commit is None:
        ref = folder / "refs" / wanted
        try:
            commit = ref.read_text().strip() if ref.is_file() else None
        except (OSError, UnicodeDecodeError):
            commit = None
    if commit is None or not COMMIT_HASH.fullmatch(commit) or not (folder / "snapshots" / commit).is_dir():
        return None
    return folder / "snapshots" / commit, commit


def _hf_hub_files(snapshot: Path) -> tuple[Path | None, Path | None]:
    """(open_clip_config.json, the weights file open_clip's Hub loader would take) in a snapshot, or None each."""
    config = snapshot / HF_CONFIG_FILE
    weights = next((snapshot / n for n in HF_WEIGHTS_FILES if (snapshot / n).is_file()), None)
    return (config if config.is_file() else None), weights


def _download_hf_hub(spec: str, repo: str, revision: str | None, cache: Path) -> None:
    """Fetch the config and the weights into the cache (only called when the Hub answers)."""
    from huggingface_hub import hf_hub_download

    logger.warning("downloading %s from the Hugging Face Hub into %s", spec, cache)
    try:
        hf_hub_download(repo, HF_CONFIG_FILE, revision=revision, cache_dir=str(cache))
        for i, name in enumerate(HF_WEIGHTS_FILES):
            try:
                hf_hub_download(repo, name, revision=revision, cache_dir=str(cache))
                break
            except Exception:  # the Hub's "entry not found": try the next name, and report the last
                if i == len(HF_WEIGHTS_FILES) - 1:
                    raise
    except Exception as err:  # the Hub's errors: no such repository, revision or file, a gated repository, HTTP
        first = str(err).splitlines()[0] if str(err) else ""
        raise TaskResValueError(
            f"backbone {spec!r} could not be fetched from the Hugging Face Hub "
            f"({type(err).__name__}: {first}); check the repository and the revision. "
            f"{_hf_fetch_hint(repo, revision, cache)}",
            param="backbone",
        ) from None


class _DropRandomInitWarning(logging.Filter):
    """open_clip warns "initialized randomly" when it is asked to build a model without its weights; the weights are
    loaded right after, so the warning would only mislead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def _load_hf_hub(spec: str) -> tuple[ClipModel, Any, dict]:
    """A Hub model in open_clip's format (open_clip_config.json and open_clip_model.safetensors or
    open_clip_pytorch_model.bin) from the local cache, downloaded only when it is not there and the Hub answers.

    The revision is resolved in the cache (refs/BRANCH -> commit), and the snapshot folder of that commit is built by
    open_clip's ``local-dir:`` loader (the same config and preprocessing fields as its ``hf-hub:`` loader, which takes
    no revision and, offline, would build a randomly initialised model when the weights file is missing)."""
    import open_clip

    repo, revision = parse_hf_hub_spec(spec)
    cache = hf_hub_cache_dir()
    found = _hf_hub_snapshot(repo, revision, cache)
    files = _hf_hub_files(found[0]) if found else (None, None)
    if (found is None or None in files) and _network_reachable("https://huggingface.co"):
        _download_hf_hub(spec, repo, revision, cache)
        found = _hf_hub_snapshot(repo, revision, cache)
        files = _hf_hub_files(found[0]) if found else (None, None)
    folder = cache / f"models--{repo.replace('/', '--')}"
    hint = _hf_fetch_hint(repo, revision, cache)
    if not folder.is_dir():
        raise TaskResFileNotFoundError(
            f"backbone {spec!r}: the Hugging Face repository {repo!r} is not in the local "
            f"cache {str(cache)!r}, and the Hub is unreachable or offline mode is set. "
            f"{hint}",
            param="backbone",
        )
    if found is None:
        refs = folder / "refs"
        cached = sorted(p.relative_to(refs).as_posix() for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else []
        snapshots = sorted(p.name for p in (folder / "snapshots").iterdir()) if (folder / "snapshots").is_dir() else []
        raise TaskResFileNotFoundError(
            f"backbone {spec!r}: revision {revision or 'main'!r} of {repo!r} is not in the local cache "
            f"{str(cache)!r} (cached branches/tags: {', '.join(cached) or 'none'}; snapshots: "
            f"{', '.join(snapshots) or 'none'}). Pass one of those as @REVISION, or fetch it. {hint}",
            param="backbone",
        )
    snapshot, commit = found
    config, weights = files
    if config is None or weights is None:
        missing = HF_CONFIG_FILE if config is None else " or ".join(HF_WEIGHTS_FILES)
        raise TaskResFileNotFoundError(
            f"backbone {spec!r}: the cached snapshot {str(snapshot)!r} (revision {commit}) has no {missing}; "
            f"taskres loads open_clip-format Hub models, which carry both. {hint}",
            param="backbone",
        )
    root = logging.getLogger()
    drop = _DropRandomInitWarning()
    root.addFilter(drop)
    try:
        model = open_clip.create_model(f"local-dir:{snapshot}", load_weights=False, pretrained_text=False)
        open_clip.load_checkpoint(model, str(weights), strict=True)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{snapshot}")
    except LOAD_ERRORS + (ImportError, json.JSONDecodeError) as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise TaskResValueError(
            f"backbone {spec!r}: open_clip could not build the model of {str(snapshot)!r} "
            f"({type(err).__name__}: {first}); the snapshot's {HF_CONFIG_FILE} and "
            f"{weights.name} must be an open_clip model and its weights.",
            param="backbone",
        ) from None
    finally:
        root.removeFilter(drop)
    identity = {
        "kind": "hf_hub",
        "arch": f"{HF_HUB_PREFIX}{repo}",
        "repo": repo,
        "revision": commit,
        "sha256": file_sha256(weights),
    }
    return model, tokenizer, identity
