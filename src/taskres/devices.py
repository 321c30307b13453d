"""The device a backbone and a head run on, checked against what this machine has."""

from __future__ import annotations

import torch

from taskres.errors import TaskResValueError


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
