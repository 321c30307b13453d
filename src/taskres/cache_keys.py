"""Keys of the feature cache: the SHA-256 of each image file's bytes, and the index that spares reading unchanged
files again.

An image's key is the SHA-256 of its bytes (``feature_key``; with its name for an augmented view, whose crop the
name seeds), so that where the data lie does not matter and a changed file is a miss whatever its name, size and times
say. Reading every file on every run would cost a pass over the data, so ``DigestIndex`` remembers each digest under
the file's identity on this machine: its absolute path, device, inode, size, and modification and change times in
nanoseconds. The change time moves whenever the file is written or its times are set, and cannot be set back, so a
file rewritten with the same size and times is hashed again. A digest is used only for the very identity it was
recorded under. A file changed less than ``SETTLE_NS`` before it was hashed is not recorded: a second write within the
same clock tick would leave its identity as it was.

Layout: ``<cache_dir>/v<FORMAT>/index/digests-<time>-<id>.json``. Each file is written atomically by one process (the
ranks of a torchrun job write their own) and holds its entries and their SHA-256. A reader merges every file, later
ones winning; a damaged file is reported, deleted and its images hashed again: a miss, never a wrong hit. Once more
than ``MAX_FILES`` files have gathered, a reader merges them into one and deletes those it merged (a writer that
loses a file to that merge loses nothing: the merged file holds its entries).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path

from taskres.atomic import write_text
from taskres.distributed import Cluster
from taskres.errors import TaskResFileNotFoundError

logger = logging.getLogger(__name__)

SETTLE_NS = 2_000_000_000  # a file changed this recently when hashed is not recorded (hashed again next time)
MAX_FILES = 16  # index files a reader merges into one once there are more
_BLOCK = 1 << 20
PLACE = "place-"  # the prefix of a key of place (``place_key``), never written to the cache folder


def feature_key(digest: str, name: str | None = None) -> str:
    """Key of an image's features, from the SHA-256 (hex) of its bytes: the digest cut to 32 digits for the test
    transform; with ``name`` (an augmented view, whose crop the name seeds), a hash of the digest and the name. A
    name that is not valid UTF-8 (its bytes held as surrogate escapes, as ``os.fsdecode`` gives) hashes its bytes."""
    if name is None:
        return digest[:32]
    return hashlib.sha256(digest.encode() + b"|" + _name_bytes(name)).hexdigest()[:32]


def image_key(path: str | Path, name: str | None = None) -> str:
    """``feature_key`` of the image file at ``path``, whose bytes are read and hashed."""
    path = os.path.abspath(path)
    try:
        return feature_key(file_digest(path), name)
    except (FileNotFoundError, NotADirectoryError):
        raise TaskResFileNotFoundError(_missing(path)) from None


def place_key(file: str, name: str) -> str:
    """Key of an image by its place (absolute path, name, size and mtime), for an image whose features are not
    cached: without a cache folder, or a file that cannot be read to be hashed (the decoder names the problem)."""
    path = os.path.abspath(file)
    try:
        st = os.stat(path)
        stat = b"%d|%d" % (st.st_size, st.st_mtime_ns)
    except (FileNotFoundError, NotADirectoryError):
        raise TaskResFileNotFoundError(_missing(path)) from None
    except OSError:
        stat = b"?"
    return PLACE + hashlib.sha256(b"|".join((_name_bytes(path), _name_bytes(name), stat))).hexdigest()[:32]


def file_digest(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def _missing(path: str) -> str:
    return (
        f"image {path!r} does not exist; check the data folder (--data/--root) and the split file's paths, which "
        "are relative to it."
    )


def _name_bytes(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _checksum(entries: dict) -> str:
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def _valid(entries: object) -> bool:
    """Entries as written: absolute path -> [device, inode, size, mtime_ns, ctime_ns, SHA-256 hex]."""
    return isinstance(entries, dict) and all(
        isinstance(v, list)
        and len(v) == 6
        and all(type(x) is int for x in v[:5])
        and isinstance(v[5], str)
        and len(v[5]) == 64
        for v in entries.values()
    )


class DigestIndex:
    """Digests of files by their identity, read from and added to the index folder ``folder``. ``writable`` False
    (a cache folder that can only be read): nothing is written or deleted, new digests are kept in memory."""

    def __init__(self, folder: Path, writable: bool = True):
        self.folder, self.writable = folder, writable
        self.hashed = 0  # files read and hashed by this object (for tests and benchmarks)
        self._entries: dict[str, list] = {}  # absolute path -> [*identity, digest]
        self._new: dict[str, list] = {}  # recorded since the last save
        self._read: set[str] = set()  # index files read (or written) by this object

    def digest(self, path: str) -> str | None:
        """SHA-256 of the file at ``path`` (absolute): from the index when its identity is the one recorded, else read
        and hashed. None when the file cannot be read or changed while it was read (the decoder then names the
        problem, and its features are not cached). A missing file raises FileNotFoundError."""
        try:
            before = _identity(os.stat(path))
        except OSError as err:
            if isinstance(err, (FileNotFoundError, NotADirectoryError)):
                raise
            return None
        entry = self._entries.get(path)
        if entry is not None and entry[:5] == before:
            return entry[5]
        try:
            digest = file_digest(path)
            after = _identity(os.stat(path))
        except OSError:  # a folder, no permission, an I/O error: reported by the decoder
            return None
        self.hashed += 1
        if after != before:
            return None
        if time.time_ns() - max(before[3], before[4]) >= SETTLE_NS:
            self._entries[path] = self._new[path] = [*before, digest]
        return digest

    def load(self) -> None:
        """Read the index files not read yet; merge them into one when more than ``MAX_FILES`` have gathered."""
        try:
            names = sorted(p.name for p in self.folder.glob("digests-*.json"))
        except OSError:
            return
        for name in names:
            if name not in self._read:
                self._read.add(name)
                self._entries.update(self._read_file(self.folder / name))
        self._entries.update(self._new)  # what this process recorded is the newest it knows
        if self.writable and len(names) > MAX_FILES:
            self._merge(names)

    def save(self) -> None:
        """Write the digests recorded since the last save as one new index file (nothing when it cannot be written:
        the files are hashed again next time, with the same results)."""
        if not self.writable or not self._new:
            return
        if self._write(self._new) is not None:
            self._new = {}

    def _write(self, entries: dict[str, list]) -> str | None:
        name = f"digests-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.json"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_text(self.folder / name, json.dumps({"entries": entries, "sha256": _checksum(entries)}))
        except OSError as err:
            logger.warning(
                "cannot write the feature cache index %s (%s); the images will be hashed again next time",
                self.folder,
                err.strerror or err,
            )
            return None
        self._read.add(name)
        return name

    def _merge(self, names: list[str]) -> None:
        """One file for ``names`` (read already): written, then the merged files deleted."""
        if self._write(self._entries) is None:
            return
        self._new = {}
        for name in names:
            (self.folder / name).unlink(missing_ok=True)

    def _read_file(self, path: Path) -> dict[str, list]:
        try:
            data = json.loads(path.read_text())
            entries = data["entries"]
            if not _valid(entries) or data["sha256"] != _checksum(entries):
                raise ValueError("checksum mismatch")
        except FileNotFoundError:  # merged into another file by another process meanwhile
            return {}
        except (OSError, ValueError, KeyError, TypeError) as err:  # JSONDecodeError and UnicodeDecodeError included
            logger.warning(
                "feature cache index file %s is damaged (%s); ignoring it, its images will be hashed again", path, err
            )
            if self.writable:
                try:
                    path.unlink(missing_ok=True)
                except OSError:  # e.g. a folder under that name: left for the user
                    pass
            return {}
        return entries


class ImageKeys:
    """The keys of images, by their bytes, with the digests remembered in the index folder ``folder`` (None: no
    cache folder, keys of place)."""

    def __init__(self, folder: Path | None, writable: bool = True):
        self.index = DigestIndex(folder, writable) if folder is not None else None

    @property
    def hashed(self) -> int:
        return self.index.hashed if self.index is not None else 0

    def __call__(
        self, files: list[str], names: list[str], view: bool, desc: str, cluster: Cluster | None = None
    ) -> list[str]:
        """Each image's ``feature_key`` (with its name for a ``view``); a key of place without an index folder, and
        for a file that cannot be read. In a torchrun job (``cluster``) the ranks share the hashing."""
        digests = self._digests(files, desc, cluster) if self.index is not None else [None] * len(files)
        return [
            place_key(f, n) if d is None else feature_key(d, n if view else None)
            for f, n, d in zip(files, names, digests)
        ]

    def _digests(self, files: list[str], desc: str, cluster: Cluster | None) -> list[str | None]:
        """SHA-256 of each file (None: unreadable), from the index where the file is unchanged. In a torchrun job
        each rank first hashes every N-th file into its own index file, and the others read it from there."""
        assert self.index is not None
        self.index.load()
        if cluster is not None:
            for file in cluster.share(files):
                self._digest(file)
            self.index.save()
            cluster.barrier(f"hashing the images ({desc})")
            self.index.load()
        known: dict[str, str | None] = {}
        for file in files:
            if file not in known:  # the same file twice in a call is read once
                known[file] = self._digest(file)
        self.index.save()
        return [known[f] for f in files]

    def _digest(self, file: str) -> str | None:
        assert self.index is not None
        path = os.path.abspath(file)
        try:
            return self.index.digest(path)
        except (FileNotFoundError, NotADirectoryError):
            raise TaskResFileNotFoundError(_missing(path)) from None
