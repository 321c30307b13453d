"""The two file formats of ``taskres export``: a module as the bytes of an ONNX file or a TorchScript archive, with
the export's metadata inside (ONNX ``metadata_props``; TorchScript's extra file ``taskres.json``), and what those
bytes compute. Files are made in memory and written by the caller through ``taskres.atomic``: TorchScript's own C++
file writer aborts the process on a full disk, where a Python write raises an error that can be reported."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from taskres.errors import TaskResValueError

METADATA_FILE = "taskres.json"  # the TorchScript extra file
ONNX_MAX_BYTES = 2**31 - 2**24  # a protobuf message holds 2 GiB; room for the graph


def encode(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def decode(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def is_zip(path: Path) -> bool:
    import zipfile

    return zipfile.is_zipfile(path)


@contextlib.contextmanager
def quiet_exporters() -> Iterator[None]:
    """torch's exporters warn about their own deprecations and tracing, and onnxscript logs its graph optimisation;
    none of it is the user's to act on."""
    noisy = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in noisy]
    try:
        for lg in noisy:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(noisy, levels):
            lg.setLevel(level)


def onnx_bytes(
    module: nn.Module, example: torch.Tensor, metadata: dict, outputs: tuple[str, ...] = ("logits", "probs")
) -> bytes:
    """``module`` (one input, ``image``, with a dynamic batch) as the bytes of an ONNX file whose outputs are named
    ``outputs``, with ``metadata`` in its ``metadata_props``."""
    batch = torch.export.Dim("batch")
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            (example,),
            input_names=["image"],
            output_names=list(outputs),
            dynamic_shapes=({0: batch},),  # by position: the forward's argument may have any name
            dynamo=True,
            verbose=False,
        )
    assert program is not None  # the dynamo exporter returns the program
    for key, value in metadata.items():
        program.model.metadata_props[key] = encode(value)
    weights = sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)
    if weights >= ONNX_MAX_BYTES:
        raise TaskResValueError(
            f"the image encoder's weights take {weights / 2**30:.1f} GiB, more than the 2 GiB that one ONNX file "
            "holds; choose `format` torchscript.",
            param="format",
        )
    return program.model_proto.SerializeToString()


def run_onnx(data: bytes, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    logits, probs = session.run(["logits", "probs"], {"image": pixels.numpy()})
    return torch.from_numpy(logits), torch.from_numpy(probs)


def torchscript_bytes(module: nn.Module, example: torch.Tensor, metadata: dict) -> bytes:
    """The TorchScript archive in memory: torch's C++ file writer aborts the process on a full disk."""
    with torch.no_grad():
        traced = torch.jit.trace(module, (example,), check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer, _extra_files={METADATA_FILE: json.dumps(metadata)})
    return buffer.getvalue()


def run_torchscript(data: bytes, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model = torch.jit.load(io.BytesIO(data), map_location="cpu")
    with torch.no_grad():
        logits, probs = model(pixels)
    return logits.float(), probs.float()
