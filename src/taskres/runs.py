"""Run folders: what was done, what was learned, what it scored. ``RunWriter`` owns a folder's files.

RUN/config.json            everything resolved (backbone identity, dataset source, split hash, method, optimiser)
RUN/fewshot_split.json     {"train": [...], "val": [...]} entries actually used
RUN/classifier.safetensors the head's tensors; method, config, class names, alpha, logit scale and a SHA-256 of the
                           tensors and metadata in the metadata (checked when read)
RUN/log.jsonl              one JSON line per epoch
RUN/metrics.json           the scores
(and the files a method adds, such as TaskRes*'s text_projection.safetensors)

A run folder is a transaction: its files are written into ``.RUN.taskres-tmp-<id>`` beside it and renamed into place
when the run finishes, so RUN is either as it was before or the finished run. ``.RUN.taskres-lock`` beside it holds
the writer's PID and host while it runs (an advisory ``flock``, released by the kernel when the process dies).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open

from taskres.atomic import atomic_path, write_json, write_safetensors
from taskres.errors import TaskResFileNotFoundError, TaskResValueError

logger = logging.getLogger(__name__)

CONFIG, SPLIT, CLASSIFIER, LOG, METRICS = (
    "config.json",
    "fewshot_split.json",
    "classifier.safetensors",
    "log.jsonl",
    "metrics.json",
)
RUN_FILES = (CONFIG, SPLIT, CLASSIFIER, LOG, METRICS)
CLASSIFIER_FORMAT = "taskres-classifier-1"
DIGEST_KEY = "sha256"  # classifier metadata: SHA-256 of the tensors and the rest of the metadata
TMP_TAG, OLD_TAG, LOCK_TAG = ".taskres-tmp-", ".taskres-old-", ".taskres-lock"


def classifier_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 over the metadata (without its digest) and every tensor's name, dtype, shape and bytes, by name."""
    h = hashlib.sha256(json.dumps({k: v for k, v in metadata.items() if k != DIGEST_KEY}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ExportableHead(Protocol):
    """What a run needs of a method's head (``taskres.methods.base.Head``, which this module does not import)."""

    def export(self) -> tuple[dict[str, torch.Tensor], dict]: ...


def save_classifier(
    path: Path, method: str, head: ExportableHead, classnames: Sequence[str], class_ids: Sequence[str] | None = None
) -> None:
    """The head's export as safetensors: its tensors, and in the metadata the method, the head's config (JSON),
    the class names and ids, the config's scalar values (readable without JSON) and the digest. The bytes depend
    only on the head: identical runs give identical files."""
    tensors, meta = head.export()
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {
        "method": method,
        "config": json.dumps(meta),
        "classnames": json.dumps(list(classnames)),
        "class_ids": json.dumps(list(class_ids or [])),
        "format": CLASSIFIER_FORMAT,
    }
    metadata.update({k: str(v) for k, v in meta.items() if isinstance(v, (int, float, str, bool))})
    metadata[DIGEST_KEY] = classifier_digest(tensors, metadata)
    write_safetensors(path, tensors, metadata)


def read_classifier(path: Path) -> tuple[str, dict[str, torch.Tensor], dict, list[str], list[str]]:
    """(method name, tensors, head metadata, class names, class ids or []) of a classifier.safetensors file, whose
    digest must match (a file without one, from an older taskres, is read with a warning)."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise TaskResValueError(
            f"classifier file {str(path)!r} cannot be read ({err}); re-run training.", param="run"
        ) from None
    if "method" not in meta:
        raise TaskResValueError(
            f"classifier file {str(path)!r} has no taskres metadata; it was not written by taskres.", param="run"
        )
    if DIGEST_KEY not in meta:
        logger.warning("classifier file %s carries no checksum (written by an older taskres); it is not verified", path)
    elif classifier_digest(tensors, meta) != meta[DIGEST_KEY]:
        raise TaskResValueError(
            f"classifier file {str(path)!r} does not match its checksum: its tensors or "
            "metadata changed after taskres wrote it (a damaged or edited file). Re-run "
            "training, or restore the file from a copy.",
            param="run",
        )
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise TaskResValueError(
            f"classifier file {str(path)!r} holds non-finite values in {bad}; re-run training.", param="run"
        )
    try:
        parsed = (json.loads(meta["config"]), json.loads(meta["classnames"]), json.loads(meta.get("class_ids", "[]")))
    except (KeyError, json.JSONDecodeError) as err:
        raise TaskResValueError(
            f"classifier file {str(path)!r} has damaged metadata ({type(err).__name__}: {err}); re-run training.",
            param="run",
        ) from None
    head_meta, classnames, class_ids = parsed
    if not (isinstance(head_meta, dict) and isinstance(classnames, list) and isinstance(class_ids, list)):
        raise TaskResValueError(f"classifier file {str(path)!r} has damaged metadata; re-run training.", param="run")
    return meta["method"], tensors, head_meta, classnames, class_ids


def read_run(run: str | Path) -> tuple[Path, dict]:
    """(folder, config) of a finished run."""
    run = Path(run)
    if not (run / CONFIG).is_file():
        raise TaskResFileNotFoundError(
            f"{str(run)!r} is not a run folder (no config.json); pass --run a folder "
            "written by `taskres train` or `taskres zeroshot`.",
            param="run",
        )
    if not (run / METRICS).is_file():
        raise TaskResValueError(
            f"run {str(run)!r} is incomplete (no metrics.json): it was interrupted or failed. "
            "Re-run the same train command to finish it.",
            param="run",
        )
    try:
        config = json.loads((run / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TaskResValueError(
            f"run {str(run)!r}: config.json cannot be read ({type(err).__name__}: {err}); "
            "it was edited or damaged. Re-run training.",
            param="run",
        ) from None
    if (
        not isinstance(config, dict)
        or not isinstance(config.get("backbone"), dict)
        or not isinstance(config.get("dataset"), dict)
    ):
        raise TaskResValueError(
            f"run {str(run)!r}: config.json lacks the backbone and dataset records that taskres "
            "writes; it was edited or damaged. Re-run training.",
            param="run",
        )
    return run, config


class EpochLog:
    """Appends one JSON line per epoch to RUN/log.jsonl, flushed as it goes."""

    def __init__(self, path: Path):
        self.file = open(path, "a")

    def __call__(self, record: dict) -> None:
        self.file.write(json.dumps(record, allow_nan=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class RunLock:
    """``.RUN.taskres-lock`` beside a run folder: an exclusive ``flock`` on a file that names its holder (PID, host).

    A second writer is refused with the holder named. The kernel drops the flock when its process dies, so a lock
    file whose flock is free was left by a dead process: on this host it is taken over with a warning; from another
    host (a shared file system, where the PID cannot be checked) it is refused, naming the file to delete.
    """

    def __init__(self, target: Path):
        self.target = target
        self.path = target.with_name(f".{target.name}{LOCK_TAG}")
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(10):  # retried only when the file is replaced between open and flock
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise TaskResValueError(
                    f"out {str(self.path.parent)!r} is not writable ({err.strerror}); choose another --out.",
                    param="out",
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                holder = self._holder()
                raise TaskResValueError(
                    f"out {str(self.target)!r} is being written by another taskres process "
                    f"(pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since "
                    f"{holder.get('since', '?')}; lock file {str(self.path)!r}); wait for it to finish or choose "
                    "another --out.",
                    param="out",
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder released and removed the file after we opened it
                os.close(fd)
                continue
            previous = self._holder(fd)
            if previous.get("host") not in (None, me["host"]):
                os.close(fd)
                raise TaskResValueError(
                    f"out {str(self.target)!r} is locked by pid {previous.get('pid')} on host "
                    f"{previous.get('host')!r} (lock file {str(self.path)!r}); its process cannot be checked from "
                    "here. If it is no longer running, delete the lock file.",
                    param="out",
                )
            if previous.get("pid") is not None:
                state = "alive, but not holding the lock" if _pid_alive(int(previous["pid"])) else "dead"
                logger.warning(
                    "taking over the stale lock %s of pid %s on this host (%s)", self.path, previous["pid"], state
                )
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            self.fd = fd
            return self
        raise TaskResValueError(
            f"could not lock {str(self.path)!r}: it keeps changing; is another process writing the same --out?",
            param="out",
        )

    def _holder(self, fd: int | None = None) -> dict:
        try:
            if fd is not None:
                text = os.pread(fd, 4096, 0).decode()
            else:
                text = self.path.read_text()
            record = json.loads(text)
            return record if isinstance(record, dict) else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still held, so no one locks the old inode
        os.close(self.fd)
        self.fd = None


def _is_finished_run(folder: Path, names: set[str], known: set[str]) -> bool:
    if not {CONFIG, METRICS} <= names or not names <= known:
        return False
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and "taskres_version" in config


def check_out(out: str | Path, overwrite: bool = False, extra_files: Iterable[str] = ()) -> Path:
    """Raise unless ``out`` can take a run: it does not exist, is an empty folder, or (with ``overwrite``) holds a
    finished run whose files are all taskres's. Nothing is changed."""
    out = Path(out)
    try:
        if out.exists() and not out.is_dir():
            raise TaskResValueError(f"out {str(out)!r} exists and is not a folder; choose another path.", param="out")
        names = {p.name for p in out.iterdir()} if out.is_dir() else set()
    except (OSError, ValueError) as err:
        raise TaskResValueError(f"out {str(out)!r} cannot be used ({err}); choose another path.", param="out") from None
    if not names:
        return out
    known = {*RUN_FILES, *extra_files}
    if _is_finished_run(out, names, known):
        if not overwrite:
            raise TaskResValueError(
                f"run folder {str(out)!r} already holds a finished run (metrics.json); choose "
                "another --out, or pass --overwrite to replace it.",
                param="out",
            )
        return out
    foreign = sorted(names - known) or sorted(names)
    raise TaskResValueError(
        f"out {str(out)!r} holds files that taskres did not write as a finished run "
        f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); it is left untouched. "
        "Choose a new or empty folder.",
        param="out",
    )


class RunWriter:
    """The files of one run folder, written into a temporary folder beside it and renamed into place by
    ``finish`` (the files: split, log, the method's files, then config, classifier and metrics).

    ``RunWriter.create(out, overwrite, extra_files)`` locks ``out``, refuses a folder that holds a finished run
    (unless ``overwrite``) or anything else that taskres did not write, and clears what a killed writer left
    beside it (``extra_files``: the names of files methods may add). Use it as a context manager: leaving the
    block without ``finish`` (an error, Ctrl-C) removes the temporary folder and leaves ``out`` as it was.
    """

    def __init__(self, folder: Path, target: Path | None = None, lock: RunLock | None = None):
        self.folder = folder  # where the files are written until finish
        self.target = target if target is not None else folder
        self.lock = lock
        self.finished = False

    @classmethod
    def create(cls, out: str | Path, overwrite: bool = False, extra_files: Iterable[str] = ()) -> RunWriter:
        out = Path(out)
        extra_files = tuple(extra_files)
        check_out(out, overwrite, extra_files)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TaskResValueError(
                f"out {str(out)!r}: its parent folder cannot be created ({err}).", param="out"
            ) from None
        lock = RunLock(out).acquire()
        try:
            _recover(out)
            check_out(out, overwrite, extra_files)  # again, under the lock
            tmp = out.with_name(f".{out.name}{TMP_TAG}{uuid.uuid4().hex[:12]}")
            tmp.mkdir()
        except BaseException:
            lock.release()
            raise
        return cls(tmp, out, lock)

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc) -> None:
        if not self.finished:
            self.abort()

    def write_split(self, fewshot: Mapping[str, Sequence]) -> None:
        write_json(self.folder / SPLIT, {k: [e.to_json() for e in v] for k, v in fewshot.items()})

    def epoch_log(self) -> EpochLog:
        return EpochLog(self.folder / LOG)

    def write_file(self, name: str, write: Callable[[Path], None]) -> Path:
        """A method's own file, written atomically by ``write(path)``; returns its path in the finished run."""
        with atomic_path(self.folder / name) as tmp:
            write(tmp)
        os.chmod(self.folder / name, 0o644)
        return self.target / name

    def finish(
        self,
        config: dict[str, Any],
        head: ExportableHead,
        method: str,
        classnames: Sequence[str],
        class_ids: Sequence[str],
        metrics: dict[str, Any],
    ) -> None:
        """Write config, classifier and metrics, then put the run in place (replacing what ``out`` held)."""
        write_json(self.folder / CONFIG, config)
        save_classifier(self.folder / CLASSIFIER, method, head, classnames, class_ids)
        write_json(self.folder / METRICS, metrics)
        if self.folder != self.target:
            self._commit()
        self.finished = True
        if self.lock is not None:
            self.lock.release()

    def _commit(self) -> None:
        old = None
        if self.target.exists():  # an empty folder or the finished run --overwrite replaces: aside, not gone
            old = self.target.with_name(f".{self.target.name}{OLD_TAG}{uuid.uuid4().hex[:12]}")
            os.rename(self.target, old)
        try:
            os.rename(self.folder, self.target)
        except BaseException:
            if old is not None:
                os.rename(old, self.target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Remove the temporary folder and release the lock; ``out`` stays as it was."""
        if self.folder != self.target:
            shutil.rmtree(self.folder, ignore_errors=True)
        if self.lock is not None:
            self.lock.release()


def _recover(out: Path) -> None:
    """Under the lock: what a killed writer of ``out`` left beside it. A run set aside by an interrupted commit is
    put back when ``out`` is missing; temporary folders are removed."""
    beside = sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))
    for p in [p for p in beside if p.name.startswith(f".{out.name}{OLD_TAG}")]:
        if not out.exists():
            logger.warning("restoring %s, which an interrupted run had set aside as %s", out, p)
            os.rename(p, out)
        else:
            shutil.rmtree(p, ignore_errors=True)
    for p in [p for p in beside if p.name.startswith(f".{out.name}{TMP_TAG}")]:
        shutil.rmtree(p, ignore_errors=True)


def open_run(
    out: str | Path | None, overwrite: bool = False, extra_files: Iterable[str] = ()
) -> RunWriter | contextlib.nullcontext[None]:
    """``with open_run(out, ...) as writer``: a RunWriter for ``out``, or None when ``out`` is None."""
    return RunWriter.create(out, overwrite, extra_files) if out is not None else contextlib.nullcontext()
