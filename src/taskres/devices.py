"""The device a backbone and a head run on, checked against what this machine has."""

from __future__ import annotations

import torch

from taskres.errors import TaskResValueError


def available_devices() -> list[str]:
    """The devices taskres can run on here: cpu, then cuda:0..N-1 and mps when this torch build and machine have
    them."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def parse_device(device: str | torch.device) -> torch.device:
    """A torch device that exists here, or a TaskResError that names it and the ones that do."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise _refused(f"device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise _refused(f"device {device} asks for a GPU, but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise _refused(f"device {device}: only {torch.cuda.device_count()} GPU(s) here")
    elif device.type == "mps":
        if not torch.backends.mps.is_available() or (device.index or 0) > 0:
            reason = "this machine has no Apple GPU" if torch.backends.mps.is_built() else "this torch has no MPS"
            raise _refused(f"device {device} is not available ({reason})")
    elif device.type != "cpu":
        raise _refused(f"device {device} is not supported; use cpu or cuda[:N]")
    return device


def _refused(message: str) -> TaskResValueError:
    return TaskResValueError(f"{message}; available here: {', '.join(available_devices())}.", param="device")
