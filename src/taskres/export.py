"""A run as one file that runs without taskres: the backbone's image encoder and the run's tuned head, exported to
ONNX (run by ONNX Runtime) or TorchScript (run by ``torch.jit.load``).

    export_run(run, out, "onnx" | "torchscript") -> dict: the file, its metadata and the parity check

The model takes ``image``: float32 (N, 3, S, S), an image after the backbone's test transform (resize the shorter
side to S, bicubic; centre crop S x S; RGB scaled to [0, 1]; normalised by the mean and std in the metadata), and
gives ``logits`` and ``probs`` (softmax of the logits), both (N, C), classes in the order of ``class_names``. It is
float32 whatever precision the run encoded at.

The metadata (ONNX ``metadata_props``, each value a string, lists and records as JSON; TorchScript: the same keys in
the extra file ``taskres.json``): ``class_names``, ``class_ids``, ``image_size``, ``mean``, ``std``,
``logit_scale``, ``method``, ``run`` (the run's identity: folder, kind, dataset, shots, seed, the classifier file's
SHA-256 and the backbone's identity), ``input``, ``outputs``, ``preprocessing``, ``taskres_version``.

The parity check runs the exported file on a few test images and compares it with what ``predict`` computes for
them (the run's head on the backbone's features): the largest difference may be ``PROBS_ATOL`` on the probabilities
and ``LOGITS_RTOL`` times the largest logit on the logits; beyond that the file is not written. The file is written
atomically, once the check has passed: on a full disk
nothing is left behind.

ONNX needs the optional packages of ``pip install 'taskres[export]'`` (onnx, onnxruntime, and onnxscript, which
torch's exporter uses); TorchScript needs nothing beyond torch.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import taskres
from taskres.atomic import is_disk_full, write_bytes
from taskres.backbones import file_sha256
from taskres.backbones.engines import EXTRA_INSTALL, missing_onnx_packages
from taskres.cache import FeatureCache
from taskres.config import Setup
from taskres.data.images import DEFAULT_MAX_PIXELS, ImageViews
from taskres.errors import TaskResError, TaskResFileNotFoundError, TaskResValueError, check_choice, invalid
from taskres.evaluate import predict_logits
from taskres.export_formats import (
    METADATA_FILE,
    decode,
    is_zip,
    onnx_bytes,
    quiet_exporters,
    run_onnx,
    run_torchscript,
    torchscript_bytes,
)
from taskres.reuse import load_run_backbone, load_run_head, run_encoder
from taskres.runs import CLASSIFIER, read_classifier, read_run

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
EXPORT_FORMAT = "taskres-export-1"
PROBS_ATOL = 1e-3  # largest difference of a probability
LOGITS_RTOL = 1e-3  # largest difference of a logit, relative to the largest |logit| (at least 1)
DEFAULT_CHECK_IMAGES = 8
PREPROCESSING = (
    "resize the shorter side to image_size (bicubic), centre crop image_size x image_size, RGB scaled "
    "to [0, 1], then (x - mean) / std per channel"
)


class ExportedClassifier(nn.Module):
    """The image encoder and the tuned head as one module: (N, 3, S, S) normalised pixels -> (logits, probs)."""

    def __init__(self, visual: nn.Module, head: nn.Module):
        super().__init__()
        self.visual, self.head = visual, head

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(self.visual(image).float())  # (N, C)
        return logits, logits.softmax(dim=-1)


def export_run(
    run: str | Path,
    out: str | Path,
    format: str,
    check_images: Sequence[str | Path] | None = None,
    n_check: int = DEFAULT_CHECK_IMAGES,
    weights_dir: str | Path | None = None,
    overwrite: bool = False,
    max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> dict:
    """Write ``run``'s backbone image encoder and tuned head to ``out`` as ``format`` ("onnx" or "torchscript"),
    checked against ``predict`` on ``check_images`` (default: the first ``n_check`` images of the run's test split).
    Returns ``{"out", "format", "method", "metadata", "parity": {"images", "max_abs_logits", "max_abs_probs"}}``."""
    check_choice("format", format, FORMATS)
    if n_check < 1:
        raise invalid("n_check", "be >= 1 (images for the parity check)", n_check)
    if format == "onnx":
        require_onnx()
    out = _check_out(Path(out), overwrite)
    run, config = read_run(run)
    head, classnames, class_ids = load_run_head(run)
    method = read_classifier(run / CLASSIFIER)[0]
    backbone = _run_backbone(run, config, _fp32_cpu_setup(weights_dir, max_image_pixels))
    images = [str(p) for p in check_images] if check_images else _test_images(run, config, n_check)
    head = head.cpu().eval()
    reference = _reference(run, head, backbone, images, len(classnames), max_image_pixels)
    views = ImageViews(images, backbone.image_size, backbone.mean, backbone.std, max_pixels=max_image_pixels)
    pixels = torch.stack([views[i][1] for i in range(len(views))])  # (N, 3, S, S), as predict's encoder saw them

    metadata = _metadata(run, config, method, classnames, class_ids, backbone)
    module = ExportedClassifier(backbone.model.visual, head).eval()
    example = _trace_example(len(images), backbone.image_size)
    what = f"run {str(run)!r}: method {method!r}"
    data, logits, probs = _export_and_run(module, example, metadata, pixels, format, what)
    parity = _compare(logits, probs, reference)
    _check_parity(parity, run, format, method, len(images))
    write_bytes(out, data)  # the file as checked, or nothing (a full disk is a DiskFullError naming the folder)
    n, d_logits, d_probs = len(images), parity["max_abs_logits"], parity["max_abs_probs"]
    logger.info("exported %s to %s (parity on %d images: logits %.2g, probs %.2g)", run, out, n, d_logits, d_probs)
    return {
        "out": str(out),
        "format": format,
        "method": method,
        "metadata": metadata,
        "parity": {"images": n, **parity},
    }


def require_onnx() -> None:
    """Raise a TaskResValueError naming the install command unless the ONNX packages import."""
    missing = missing_onnx_packages()
    if missing:
        raise TaskResValueError(
            f"format onnx needs the optional package(s) {', '.join(missing)}, which are not "
            f"installed; install them with: {EXTRA_INSTALL} (or choose `format` torchscript).",
            param="format",
        )


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of an exported file (ONNX or TorchScript), JSON values decoded."""
    path = Path(path)
    if is_zip(path):  # a TorchScript archive
        files = {METADATA_FILE: ""}
        with quiet_exporters():
            torch.jit.load(str(path), map_location="cpu", _extra_files=files)
        return json.loads(files[METADATA_FILE])
    import onnx

    return {p.key: decode(p.value) for p in onnx.load(str(path), load_external_data=False).metadata_props}


# ---- internals ---------------------------------------------------------------------------------------------------


def _check_out(out: Path, overwrite: bool) -> Path:
    if out.is_dir():
        raise TaskResValueError(
            f"out {str(out)!r} is a folder; pass a file path, e.g. {str(out / 'model.onnx')!r}.", param="out"
        )
    if out.exists() and not overwrite:
        raise TaskResValueError(
            f"out {str(out)!r} already exists; choose another path, or pass `overwrite` to replace it.", param="out"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TaskResValueError(
            f"out {str(out)!r}: its folder cannot be created ({err.strerror or err}).", param="out"
        ) from None
    return out


def _run_backbone(run: Path, config: dict, setup: Setup):
    """The run's backbone (with its method's encoder changes merged: CLIP-LoRA's adapters), float32 on the CPU; a
    backbone file that is gone is named, with what to do (export has no --backbone to point elsewhere)."""
    try:
        return run_encoder(
            run, config, load_run_backbone(config, setup, precision="fp32", official=False, engine="eager")
        )
    except TaskResError:
        missing = missing_backbone_file(config)
        if missing is None:
            raise
    where = " (a path relative to the folder taskres was run from)" if not os.path.isabs(missing) else ""
    raise TaskResFileNotFoundError(
        f"run {str(run)!r} was trained with the backbone file {missing!r}{where}, which is not there any more; put "
        "it back at that path (config.json records its SHA-256, which is checked), then run again.",
        param="run",
    ) from None


def missing_backbone_file(config: dict) -> str | None:
    """The weights file a run's backbone record names (an OpenAI-format file, or open_clip's MODEL:FILE) when it
    does not exist, else None."""
    record = config.get("backbone")
    if not isinstance(record, dict) or not isinstance(record.get("spec"), str):
        return None
    spec, kind = record["spec"], record.get("kind")
    path = spec if kind == "file" else spec.split(":", 1)[1] if kind == "open_clip_file" and ":" in spec else None
    return path if path is not None and not Path(path).expanduser().is_file() else None


def _test_images(run: Path, config: dict, n: int) -> list[str]:
    """The first ``n`` images of the run's test split, as recorded in its config."""
    from taskres.data.sources import reopen_dataset
    from taskres.data.splits import DatasetSource

    recorded = config["dataset"]
    try:
        dataset = reopen_dataset(DatasetSource.from_json(recorded), recorded.get("templates") or ["{}"])
    except TaskResError as err:
        raise TaskResValueError(
            f"run {str(run)!r}: its dataset, whose test images the parity check runs on, cannot "
            f"be opened ({err}); pass images for the check with `check_images`.",
            param="check_images",
        ) from None
    except (KeyError, TypeError) as err:
        raise TaskResValueError(
            f"run {str(run)!r}: config.json has a damaged dataset record ({type(err).__name__}: "
            f"{err}); pass images for the check with `check_images`, or re-run training.",
            param="run",
        ) from None
    if not dataset.test:
        raise TaskResValueError(
            f"run {str(run)!r}: its dataset has no test images for the parity check; pass images with `check_images`.",
            param="check_images",
        )
    return [str(dataset.path(e)) for e in dataset.test[:n]]


def _fp32_cpu_setup(weights_dir: str | Path | None, max_image_pixels: int | None) -> Setup:
    """float32 on the CPU: the exported file is float32, and so is the reference it is checked against."""
    return Setup(
        device="cpu",
        precision="fp32",
        cache_dir=None,
        quiet=True,
        weights_dir=str(weights_dir) if weights_dir is not None else None,
        max_image_pixels=max_image_pixels,
    )


def _reference(
    run: Path, head: nn.Module, backbone, images: list[str], n_classes: int, max_pixels: int | None
) -> torch.Tensor:
    """What ``predict`` computes for ``images``: the run's head on the backbone's features, logits (N, C)."""
    feats, _ = FeatureCache(None, quiet=True, max_pixels=max_pixels).features(backbone, images)
    reference = predict_logits(head, feats)  # (N, C)
    if reference.shape[1] != n_classes:
        raise TaskResValueError(
            f"run {str(run)!r}: the classifier has {reference.shape[1]} classes but its metadata "
            f"names {n_classes}; the file was edited or damaged. Re-run training.",
            param="run",
        )
    return reference


def _trace_example(n_check: int, size: int) -> torch.Tensor:
    """Noise to trace on: a traced graph must not depend on the example, so another batch size than the check's."""
    return torch.randn(n_check % 3 + 2, 3, size, size, generator=torch.Generator().manual_seed(0))


def _export_and_run(
    module: nn.Module, example: torch.Tensor, metadata: dict, pixels: torch.Tensor, format: str, what: str
) -> tuple[bytes, torch.Tensor, torch.Tensor]:
    """``module`` as the bytes of a ``format`` file, and what that file computes for ``pixels``: (bytes, logits,
    probs). An exporter's failure is a TaskResValueError that names ``what`` is exported and the way out."""
    try:
        with quiet_exporters():
            data = (onnx_bytes if format == "onnx" else torchscript_bytes)(module, example, metadata)
            return data, *(run_onnx if format == "onnx" else run_torchscript)(data, pixels)
    except (TaskResError, MemoryError):
        raise
    except Exception as err:  # torch's exporters raise many types (export, dynamo, tracer, ONNX checker)
        if isinstance(err, OSError) and is_disk_full(err):  # an exporter's own temporary file: not a tracing failure
            raise TaskResValueError(
                f"{what} cannot be exported to {format}: {err.strerror} while the exporter wrote "
                f"{err.filename or 'a temporary file'}; free some space and run again."
            ) from None
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()  # torch colours its messages
        first = text.splitlines()[0] if text else ""
        raise TaskResValueError(
            f"{what} cannot be exported to {format} ({type(err).__name__}: "
            f"{first[:300]}); its head or the backbone's image encoder does not trace into a static graph. Use "
            f"`predict` for this run{', or try `format` torchscript' if format == 'onnx' else ''}.",
            param="run",
        ) from None


def _check_parity(parity: dict, run: Path, format: str, method: str, n_images: int) -> None:
    """Refuse (no file is written) an exported model that disagrees with ``predict`` beyond the tolerances."""
    if parity["max_abs_probs"] > PROBS_ATOL or parity["max_abs_logits"] > parity["logits_tolerance"]:
        raise TaskResValueError(
            f"run {str(run)!r}: the exported {format} model disagrees with predict on {n_images} test images "
            f"(largest difference {parity['max_abs_logits']:.3g} in the logits, allowed "
            f"{parity['logits_tolerance']:.3g}; {parity['max_abs_probs']:.3g} in the probabilities, allowed "
            f"{PROBS_ATOL:g}); method {method!r}'s head does not export faithfully, so no file was written. Use "
            "`predict` for this run.",
            param="run",
        )


def _metadata(
    run: Path, config: dict, method: str, classnames: Sequence[str], class_ids: Sequence[str], backbone
) -> dict[str, Any]:
    dataset = config.get("dataset", {})
    identity = {
        "folder": str(run.resolve()),
        "kind": config.get("kind"),
        "method": method,
        "dataset": dataset.get("name"),
        "split_hash": dataset.get("split_hash"),
        "shots": config.get("shots"),
        "seed": config.get("seed"),
        "protocol": config.get("protocol"),
        "taskres_version": config.get("taskres_version"),
        "classifier_sha256": file_sha256(run / CLASSIFIER),
        "backbone": config.get("backbone"),
    }
    size = backbone.image_size
    return {
        "format": EXPORT_FORMAT,
        "method": method,
        "class_names": list(classnames),
        "class_ids": list(class_ids),
        "image_size": size,
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "logit_scale": backbone.logit_scale,
        "run": identity,
        "input": f"image: float32 (N, 3, {size}, {size}), preprocessed as `preprocessing` says",
        "outputs": f"logits, probs: float32 (N, {len(classnames)}); probs = softmax(logits); classes in the order "
        "of class_names",
        "preprocessing": PREPROCESSING,
        "taskres_version": taskres.__version__,
    }


def _compare(logits: torch.Tensor, probs: torch.Tensor, reference: torch.Tensor) -> dict:
    """The largest differences from the reference logits (equal infinities, e.g. a class a linear probe never saw,
    count as equal) and their softmax."""

    def largest(a: torch.Tensor, b: torch.Tensor) -> float:
        if a.shape != b.shape:
            return float("inf")
        d = (a.double() - b.double()).abs()
        d[a == b] = 0.0
        return float(d.nan_to_num(nan=float("inf")).max()) if d.numel() else 0.0

    finite = reference[torch.isfinite(reference)]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    return {
        "max_abs_logits": largest(logits, reference),
        "max_abs_probs": largest(probs, reference.softmax(dim=-1)),
        "logits_tolerance": LOGITS_RTOL * scale,
    }
