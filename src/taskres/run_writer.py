"""Writing a run folder (its files: ``taskres.runs``). ``RunWriter`` owns a folder's files while a run writes it.

A run folder is a transaction: its files are written into ``.RUN.taskres-tmp-<id>`` beside it and renamed into place
when the run finishes, so RUN is either as it was before or the finished run. ``.RUN.taskres-lock`` beside it holds
the writer's PID and host while it runs (an advisory ``flock``, released by the kernel when the process dies).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from taskres.atomic import (
    DiskFullError,
    atomic_path,
    disk_full_advice,
    disk_full_error,
    human_size,
    is_disk_full,
    write_json,
)
from taskres.errors import TaskResValueError
from taskres.runs import CLASSIFIER, CONFIG, LOG, METRICS, RUN_FILES, SPLIT, ExportableHead, save_classifier

logger = logging.getLogger(__name__)

TMP_TAG, OLD_TAG, LOCK_TAG = ".taskres-tmp-", ".taskres-old-", ".taskres-lock"


class EpochLog:
    """Appends one JSON line per epoch to RUN/log.jsonl, flushed as it goes."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "a")

    def __call__(self, record: dict) -> None:
        try:
            self.file.write(json.dumps(record, allow_nan=False) + "\n")
            self.file.flush()
        except OSError as err:
            with contextlib.suppress(OSError):  # its flush fails again; what it holds is lost with the run anyway
                self.file.close()
            if is_disk_full(err):
                raise disk_full_error(self.path, err) from None
            raise

    def close(self) -> None:
        self.file.close()


def run_disk_full(out: Path, err: OSError) -> DiskFullError:
    """A full disk met while the run folder ``out`` was written (the lock file beside it, or a file in the temporary
    folder beside it): named by the run folder, which is as it was."""
    where = f" (file {Path(err.filename).name!r})" if isinstance(err.filename, str) else ""
    size = getattr(err, "size", None)
    need = f"; that file needs {human_size(size)}" if size is not None else ""
    return DiskFullError(
        f"cannot write the run folder {str(out)!r}{where}: {err.strerror or os.strerror(err.errno or 0)}{need}. "
        f"{str(out)!r} is as it was and nothing was left beside it; {disk_full_advice(err)}.",
        err,
        size,
    )


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
            self._write_holder(fd, me)
            self.fd = fd
            return self
        raise TaskResValueError(
            f"could not lock {str(self.path)!r}: it keeps changing; is another process writing the same --out?",
            param="out",
        )

    def _write_holder(self, fd: int, me: dict) -> None:
        """Name this process in the lock file; on a full disk the lock is dropped and its file removed (an empty lock
        file would name no holder), and the error names the run folder."""
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        except OSError as err:
            self.path.unlink(missing_ok=True)  # while still held, as release does
            os.close(fd)
            if is_disk_full(err):
                err.filename = str(self.path)
                raise run_disk_full(self.target, err) from None
            raise

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

    def __exit__(self, kind, err, tb) -> None:
        if not self.finished:
            self.abort()
            if isinstance(err, DiskFullError) and self.folder in Path(err.filename or "/").parents:
                raise run_disk_full(self.target, err) from None

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
