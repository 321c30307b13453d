"""Engines that run a backbone's image encoder (``--engine``; measured in docs/performance.md, "The encoder on the
CPU"). Text encoding is PyTorch's in every engine.

- "eager": the open_clip model as PyTorch runs it (the default).
- "channels-last": the image tower and each pixel batch in ``torch.channels_last`` memory format, which PyTorch's
  CPU convolutions run faster. It helps a ResNet tower; a ViT has one convolution (its patch embedding) and gains
  nothing.
- "onnxruntime": the image tower exported once to ONNX (as ``taskres export`` exports it) and run by an ONNX Runtime
  ``InferenceSession`` on the CPU with torch's thread count; fp32 only. The export is kept in
  ``<weights_dir>/onnx/``, named by a hash of everything that changes it (the weights' identity, torch's and
  open_clip's versions), and checked against eager on a small batch whenever it is loaded.

A non-eager engine is recorded in the backbone's identity (``engine``; None for eager, so eager's cache keys and run
records are as they were), which keeps its features apart in the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from taskres.backbones.backbone import Backbone, ClipModel
from taskres.errors import TaskResValueError, check_choice

logger = logging.getLogger(__name__)

ENGINES = ("eager", "channels-last", "onnxruntime")
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")  # onnxscript: torch.onnx.export's exporter
EXTRA_INSTALL = "pip install 'taskres[export]'"
EXPORT_VERSION = 1  # bump when the exported graph changes for the same weights
PARITY_RTOL = 1e-4  # an export is used only if its features are this close to eager's (relative, per image)


def missing_onnx_packages() -> list[str]:
    """The packages of the export extra (ONNX export and ONNX Runtime) that do not import."""
    missing = []
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def check_engine(engine: str, device: torch.device, precision: str) -> None:
    """Refuse an unknown engine, or onnxruntime off the CPU, in another precision than fp32, or without its
    packages: before any weights are read."""
    check_choice("engine", engine, ENGINES)
    if engine != "onnxruntime":
        return
    if device.type != "cpu":
        raise TaskResValueError(
            f"`engine` onnxruntime runs the image encoder on the CPU; the device is {device}. Use `engine` eager or "
            "channels-last on this device.",
            param="engine",
        )
    if precision != "fp32":
        raise TaskResValueError(
            f"`engine` onnxruntime runs the image encoder in fp32; got `precision` {precision}. Use `precision` "
            "fp32, or `engine` eager for this precision.",
            param="engine",
        )
    missing = missing_onnx_packages()
    if missing:
        raise TaskResValueError(
            f"`engine` onnxruntime needs the optional package(s) {', '.join(missing)}, which are not installed; "
            f"install them with: {EXTRA_INSTALL} (or use `engine` eager).",
            param="engine",
        )


def with_engine(backbone: Backbone, engine: str, weights_dir: Path) -> Backbone:
    """The backbone with its images encoded by ``engine`` (its identity records it); eager: unchanged. The
    channels-last engine converts the backbone's own model in place (``load_backbone`` made it for this)."""
    check_choice("engine", engine, ENGINES)
    if engine == "eager":
        return backbone
    if engine == "channels-last":
        backbone.model.visual.to(memory_format=torch.channels_last)
        encoder: Any = ChannelsLast(backbone.model)
    else:
        encoder = _onnx_encoder(backbone, weights_dir)
    identity = dataclasses.replace(backbone.identity, engine=engine)
    return dataclasses.replace(backbone, identity=identity, image_engine=encoder)


@dataclasses.dataclass(frozen=True)
class ChannelsLast:
    """(N, 3, H, W) pixels -> (N, D) features through a channels-last image tower."""

    model: ClipModel

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images.contiguous(memory_format=torch.channels_last))


class OnnxEncoder:
    """(N, 3, H, W) float32 pixels -> (N, D) features through an ONNX Runtime session of the image tower."""

    def __init__(self, session: Any):
        self.session = session

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        (features,) = self.session.run(["features"], {"image": images.float().cpu().contiguous().numpy()})
        return torch.from_numpy(features)


def onnx_path(backbone: Backbone, weights_dir: Path) -> Path:
    """Where the image tower's export is kept: named by the weights' identity (sha256, architecture, image size,
    precision, ...) and the versions of the code that exported it."""
    import open_clip

    key = {
        "weights": backbone.identity.weights_key(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "version": EXPORT_VERSION,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return weights_dir / "onnx" / f"image-encoder-{digest}.onnx"


def _onnx_encoder(backbone: Backbone, weights_dir: Path) -> OnnxEncoder:
    """The session of the kept export when it loads and matches eager; else a new export, kept when the folder
    can be written."""
    path = onnx_path(backbone, weights_dir)
    if path.is_file():
        try:
            encoder = OnnxEncoder(_session(path.read_bytes()))
            _check_parity(backbone, encoder)
            return encoder
        except MemoryError:
            raise
        except Exception as err:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) share no base but Exception
            logger.warning("the kept ONNX export %s is not usable (%s); exporting again", path, err)
    data = _export(backbone)
    encoder = OnnxEncoder(_session(data))
    _check_parity(backbone, encoder)
    _keep(path, data)
    return encoder


def _export(backbone: Backbone) -> bytes:
    from taskres.export_formats import onnx_bytes, quiet_exporters

    logger.info("exporting the image encoder of %s to ONNX (once for these weights)", backbone.identity.spec)
    example = torch.randn(2, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(0))
    try:
        with quiet_exporters():
            return onnx_bytes(backbone.model.visual, example, {"taskres_engine": "image encoder"}, ("features",))
    except MemoryError:
        raise
    except Exception as err:  # torch's exporter raises many types; the 2 GiB limit is a TaskResValueError
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise TaskResValueError(
            f"`engine` onnxruntime: the image encoder of backbone {backbone.identity.spec!r} cannot be exported to "
            f"ONNX ({type(err).__name__}: {first}); use `engine` eager or channels-last.",
            param="engine",
        ) from None


def _session(data: bytes) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3  # errors only
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _check_parity(backbone: Backbone, encoder: OnnxEncoder) -> None:
    """Refuse an export whose features differ from eager's by more than PARITY_RTOL on a fixed noise batch."""
    size = backbone.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))  # another batch than traced
    with torch.no_grad():
        eager = backbone.model.encode_image(pixels).float()  # (3, D)
    error = float(((encoder(pixels) - eager).norm(dim=1) / eager.norm(dim=1).clamp_min(1e-12)).max())
    if not error <= PARITY_RTOL:
        raise TaskResValueError(
            f"`engine` onnxruntime: the exported image encoder of backbone {backbone.identity.spec!r} differs from "
            f"PyTorch's by {error:.2g} (relative; the bar is {PARITY_RTOL:g}); use `engine` eager.",
            param="engine",
        )


def _keep(path: Path, data: bytes) -> None:
    """Keep the export for the next process; a folder that cannot be written only costs the next one an export."""
    from taskres.atomic import write_bytes

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(path, data)
    except OSError as err:  # DiskFullError is an OSError too
        logger.warning("the ONNX export is not kept in %s (%s); the next process exports again", path.parent, err)
