"""Weights files on disk: where named weights are looked for, how a file is hashed, what a damaged file raises, and
whether the network answers (so that a missing file fails within seconds instead of waiting on a download)."""

from __future__ import annotations

import hashlib
import os
import pickle
import socket
import threading
from pathlib import Path

from safetensors import SafetensorError

WEIGHTS_ENV = "TASKRES_WEIGHTS"
OFFLINE_ENV = "TASKRES_OFFLINE"
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


def default_weights_dir() -> Path:
    return Path(os.environ.get(WEIGHTS_ENV) or Path.home() / ".cache" / "taskres" / "weights").expanduser()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, for an error message of ours that names it."""
    return str(err).splitlines()[0] if str(err) else ""


def network_reachable(url: str, timeout: float = 3.0) -> bool:
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
