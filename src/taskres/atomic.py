"""Atomic writes: a file appears complete under its name or not at all (temporary file in the same folder, then
``os.replace``). Every artefact the library writes (run files, cache chunks, projections, exports) goes through here.

A full disk (``ENOSPC``), an exhausted quota (``EDQUOT``) or a file larger than the file system or ``ulimit -f``
allows (``EFBIG``) is a ``DiskFullError`` that names the folder and, when known, the size of the file; the temporary
file is removed, so nothing is left behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from taskres.errors import TaskResError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFullError(TaskResError, OSError):
    """No space left (or the quota used up, or a file too large) where a file was being written. Also an ``OSError``
    with the kernel's ``errno``, so that ``except OSError`` catches it as before."""

    def __init__(self, message: str, cause: OSError, size: int | None = None):
        super().__init__(message)
        self.errno, self.strerror, self.filename = cause.errno, cause.strerror, cause.filename
        self.size = size  # the bytes the file needed, when known


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in DISK_FULL


def human_size(n: int) -> str:
    """``3000`` -> ``"2.9 KiB"``."""
    size, unit = float(n), "bytes"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{n} bytes" if unit == "bytes" else f"{size:.1f} {unit}"


def disk_full_error(path: Path, err: OSError, size: int | None = None) -> DiskFullError:
    """The message of a write to ``path`` that met a full disk: the folder, the file and the space it needs."""
    need = f"; it needs {human_size(size)}" if size is not None else ""
    error = DiskFullError(
        f"cannot write {path.name!r} in folder {str(path.parent)!r}: {err.strerror or os.strerror(err.errno or 0)}"
        f"{need}. No partial file was left; {disk_full_advice(err)}.",
        err,
        size,
    )
    error.filename = str(path)
    return error


def disk_full_advice(err: OSError) -> str:
    """What to do about a write that met a full disk, a quota, or a file-size limit (``EFBIG``)."""
    if err.errno == errno.EFBIG:
        return "the file system (or ulimit -f) allows no file this large; write to another disk or raise the limit"
    return "free some space on that disk (or raise your quota) and run again, or write to another disk"


@contextlib.contextmanager
def atomic_path(path: str | Path, size: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on failure removed. A full disk
    met while writing it is a ``DiskFullError`` (``size``: the bytes the file needs, when known)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        if not is_disk_full(err) or isinstance(err, DiskFullError):
            raise
        raise disk_full_error(path, err, size) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_new_file(path: str | Path, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` to a new file ``path`` (mode 0666 less the umask, as ``open``), through ``os.write``, so that
    a full disk is an ``OSError`` whatever wrote the bytes (TorchScript's C++ writer aborts the process instead)."""
    view = memoryview(data).cast("B")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path, len(data)) as tmp:
        write_new_file(tmp, data)


def write_text(path: str | Path, text: str) -> None:
    """UTF-8; a name read from a folder that is not UTF-8 (Python's surrogate escapes) is written as its bytes."""
    write_bytes(path, text.encode("utf-8", "surrogateescape"))


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """JSON with a trailing newline, written atomically."""
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file as bytes that depend only on the tensors and the metadata: the header's keys sorted (the
    safetensors library writes its metadata in a random order), padded with spaces to 8 bytes as the format wants."""
    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + raw[8 + n :]


def write_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Tensors as a safetensors file, written atomically with deterministic bytes (mode 0644 under the usual umask,
    as the other files)."""
    write_bytes(path, safetensors_bytes(tensors, metadata))
