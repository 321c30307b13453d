"""Content-addressed feature cache: every image is encoded once per (backbone, transform, view).

Layout: ``<cache_dir>/v<FORMAT>/<namespace>/chunk-*.safetensors``. The namespace hashes the backbone identity
(weights hash or open_clip name and tag, architecture, precision), the transform and view, and the format version.
Inside a namespace, an image's key is the SHA-256 of the file's bytes, and for an augmented view of its name too (the
path relative to the dataset's image folder, which seeds the crop): a changed file is a miss whatever its times, a
dataset copied anywhere a hit. ``taskres.cache_keys`` keeps the digests by file identity (path, inode, size, times)
so that unchanged files are not read again. Without a cache folder, images are keyed by their place, for one call.

Chunks are written to a temporary file and renamed; each carries its image keys and a SHA-256 of its tensor bytes,
checked on load. Under torchrun, a cache given the job's ``Cluster`` works collectively: each rank hashes and encodes
its share of the images into its own index files and chunks, then reads the others' (``taskres.distributed``).
An interrupted extraction keeps its finished chunks and resumes; a corrupt chunk is reported, deleted, re-encoded.
A cache folder that can be read but not written (outside torchrun) serves what it holds; an image missing from it is
an error naming the folder, before anything is encoded. Older formats are ignored, not read (``v3`` keyed images by
name, size and mtime, which say nothing sure about the pixels): their images are encoded again into ``v4``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from taskres.atomic import write_safetensors, write_text
from taskres.backbones import Backbone
from taskres.cache_keys import PLACE, ImageKeys
from taskres.data.images import DEFAULT_MAX_PIXELS, TRAIN_SCALE, ImageViews, transform_spec, view_seed
from taskres.distributed import Cluster, check_shared_folder
from taskres.encoding import encode_batches
from taskres.errors import TaskResError, TaskResValueError

logger = logging.getLogger(__name__)

FORMAT = 4  # 4: images keyed by the SHA-256 of their bytes (3: by name, size and mtime; ignored, not read)


def check_writable_dir(folder: Path, param: str, shown: Path | None = None) -> None:
    """Create ``folder`` if needed and check that a file can be written in it (a probe file, removed); raise a
    TaskResValueError naming ``param`` otherwise. Checked before any image is encoded."""
    reason = _write_probe(folder)
    if reason is not None:
        raise _not_writable(param, shown if shown is not None else folder, reason)


def _write_probe(folder: Path) -> str | None:
    """Why a file cannot be written in ``folder`` (made if needed), or None when one can (a probe file, removed)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except (OSError, ValueError) as err:
        return getattr(err, "strerror", None) or str(err)
    return None


def _not_writable(param: str, shown: Path, reason: str, why: str = "") -> TaskResValueError:
    return TaskResValueError(
        f"{param} {str(shown)!r} is not a writable folder ({reason}){why}; "
        f"{'make it writable, ' if why else ''}choose another folder, or encode without the cache.",
        param=param,
    )


class FeatureCache:
    """Encode images through a backbone, reusing every feature already on disk. ``cache_dir=None`` keeps nothing."""

    def __init__(
        self,
        cache_dir: str | Path | None,
        batch_size: int = 32,
        workers: int | None = None,
        quiet: bool = False,
        chunk_size: int = 1024,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        cluster: Cluster | None = None,
    ):
        self.root = Path(cache_dir).expanduser() / f"v{FORMAT}" if cache_dir is not None else None
        self.batch_size, self.workers, self.quiet, self.chunk_size = batch_size, workers, quiet, chunk_size
        self.max_pixels = max_pixels
        # the torchrun job that encodes collectively through this cache (None or one process: alone)
        self.cluster = cluster if cluster is not None and cluster.active else None
        self.read_only: str | None = None  # why the cache folder cannot be written, when it can only be read
        if self.root is not None:
            assert cache_dir is not None  # root is set from it
            self._shown = Path(cache_dir)
            self.read_only = self._check_root()
        if self.cluster is not None:
            if self.root is None:
                raise TaskResValueError(
                    "the ranks of a torchrun job exchange features through the cache folder; "
                    "give one that every rank sees (--cache-dir), not --no-cache.",
                    param="cache_dir",
                )
            check_shared_folder(self.cluster, self.root, "cache_dir")
        self.encoded = 0  # images run through the image encoder by this object (for tests and benchmarks)
        self._keys = ImageKeys(self.root and self.root / "index", self.read_only is None)
        self._stores: dict[Path, dict[str, torch.Tensor]] = {}
        self._chunks: dict[Path, set[str]] = {}  # namespace folder -> names of the chunk files read or written

    @property
    def hashed(self) -> int:
        """Image files read and hashed by this object (the others' digests came from the index)."""
        return self._keys.hashed

    def namespace(self, backbone: Backbone, view: int | None, scale: tuple[float, float] = TRAIN_SCALE) -> dict:
        return {
            "format": FORMAT,
            "backbone": backbone.identity.weights_key(),
            "transform": transform_spec(backbone.image_size, backbone.mean, backbone.std, view, scale),
        }

    def features(
        self,
        backbone: Backbone,
        paths: Sequence[str | Path],
        view: int | None = None,
        skip_bad: bool = False,
        desc: str = "encoding",
        names: Sequence[str] | None = None,
        scale: tuple[float, float] = TRAIN_SCALE,
    ) -> tuple[torch.Tensor, list[str]]:
        """Features (N, D) float32 for ``paths`` in order, and the paths skipped as undecodable (rows of zeros).

        ``view`` None is the test transform; ``v >= 0`` the v-th augmented view (RandomResizedCrop at ``scale``)
        of each image, seeded by (v, name). ``names`` (default: the absolute paths) identify the images: pass their
        paths relative to the dataset's image folder, so that the views and the keys do not depend on where the
        dataset lies.
        """
        files = [str(p) for p in paths]
        names = [os.path.abspath(p) for p in files] if names is None else [str(n) for n in names]
        keys = self._keys(files, names, view is not None, desc, self.cluster)
        ns = self.namespace(backbone, view, scale)
        folder = self._folder(ns)
        store = self._store(folder)
        todo = sorted({k: i for i, k in enumerate(keys) if k not in store}.values())  # one image per missing key
        self._check_writable(folder, [keys[i] for i in todo], desc)
        mine = self._my_share(todo, keys, ns, desc)
        bad: set[str] = set()
        if mine:
            data = self._image_views(backbone, [files[i] for i in mine], [names[i] for i in mine], view, scale)
            bad = self._encode(backbone, data, [keys[i] for i in mine], skip_bad, store, folder, desc)
        if self.cluster is not None and todo:
            bad = self._read_other_shares(folder, store, [(files[i], keys[i]) for i in todo], bad, desc)
        return _rows(files, keys, store, bad, backbone.embed_dim)

    def _check_root(self) -> str | None:
        """None when the cache folder can be written. Alone (not in a torchrun job, whose ranks exchange features
        through it), a folder that can only be read is used so: the reason is returned; else an error."""
        assert self.root is not None
        reason = _write_probe(self.root)
        if reason is None:
            return None
        if self.cluster is not None or not (self.root.is_dir() and os.access(self.root, os.R_OK | os.X_OK)):
            raise _not_writable("cache_dir", self._shown, reason)
        logger.info("cache folder %s cannot be written (%s): its features are read, none added", self.root, reason)
        return reason

    def _check_writable(self, folder: Path | None, missing: list[str], desc: str) -> None:
        """Before encoding the images of ``missing`` (keys): stop when their features cannot be written."""
        missing = [k for k in missing if not k.startswith(PLACE)]  # never written
        if folder is None or not missing:
            return
        if self.read_only is not None:
            why = f" and {len(missing)} image(s) ({desc}) are not in it"
            raise _not_writable("cache_dir", self._shown, self.read_only, why)
        reason = _write_probe(folder)
        if reason is not None:
            raise self._cannot_write(folder, reason)

    def _cannot_write(self, folder: Path, reason: str) -> TaskResValueError:
        assert self.root is not None
        return TaskResValueError(
            f"cache_dir {str(self.root.parent)!r}: {str(folder)!r} cannot be written ({reason}); fix or remove it, "
            "or choose another cache folder.",
            param="cache_dir",
        )

    # ---- internals --------------------------------------------------------------------------------------------

    def _store(self, folder: Path | None) -> dict[str, torch.Tensor]:
        """The features known in a namespace folder, read once per object (train, val and test often share a
        namespace); without a cache folder, a store of the call's own."""
        if folder is None:
            return {}
        if folder not in self._stores:
            store = self._stores[folder] = {}
            self._read_chunks(folder, store)
        return self._stores[folder]

    def _my_share(self, todo: list[int], keys: list[str], ns: dict, desc: str) -> list[int]:
        """The images of ``todo`` that this process encodes: all of them alone; in a torchrun job, once every rank
        agrees on what is missing, this rank's share."""
        if self.cluster is None:
            return todo
        self.cluster.agree(
            f"the images still to encode ({desc})",
            [ns, [keys[i] for i in todo]],
            "every rank must run the same command on the same dataset files and see the same "
            "cache folder (--cache-dir).",
        )
        return self.cluster.share(todo)

    def _image_views(
        self, backbone: Backbone, files: list[str], names: list[str], view: int | None, scale: tuple[float, float]
    ) -> ImageViews:
        """The images to encode: the test transform (``view`` None) or view ``view``'s crops, seeded by name."""
        seeds = None if view is None else [view_seed(view, n) for n in names]
        return ImageViews(files, backbone.image_size, backbone.mean, backbone.std, seeds, scale, self.max_pixels)

    def _read_other_shares(
        self,
        folder: Path | None,
        store: dict[str, torch.Tensor],
        todo: list[tuple[str, str]],
        bad: set[str],
        desc: str,
    ) -> set[str]:
        """In a torchrun job, once every rank has written its chunks: read the other ranks' shares of ``todo``
        (file, key) into ``store`` and return the keys every rank found undecodable. A feature no rank's chunk
        holds means the ranks do not share the cache folder."""
        assert self.cluster is not None and folder is not None  # a torchrun job needs the cache folder (__init__)
        bad = set().union(*self.cluster.gather(sorted(bad), f"encoding {desc}"))  # every rank's chunks written
        self._read_chunks(folder, store)
        missing = [file for file, key in todo if key not in store and key not in bad]
        if missing:
            raise TaskResValueError(
                f"rank {self.cluster.rank} cannot see the features the other ranks wrote to {str(folder)!r} "
                f"(e.g. for {missing[0]!r}); the cache folder must be one folder that every node of the job "
                "mounts (--cache-dir). Finished chunks are kept; fix the folder and run again.",
                param="cache_dir",
            )
        return bad

    def _folder(self, ns: dict) -> Path | None:
        if self.root is None:
            return None
        digest = hashlib.sha256(json.dumps(ns, sort_keys=True).encode()).hexdigest()[:24]
        folder = self.root / digest
        if folder in self._stores or self.read_only is not None:  # made when first used; or only read
            return folder
        try:
            folder.mkdir(parents=True, exist_ok=True)
            info = folder / "namespace.json"
            if not info.exists():
                write_text(info, json.dumps(ns, indent=1, sort_keys=True))
        except OSError as err:
            raise self._cannot_write(folder, err.strerror or str(err)) from None
        return folder

    def _read_chunks(self, folder: Path, store: dict[str, torch.Tensor]) -> None:
        """Add the features of the folder's chunks not read yet to ``store``; a corrupt chunk is deleted."""
        seen = self._chunks.setdefault(folder, set())
        for chunk in sorted(folder.glob("chunk-*.safetensors")):
            if chunk.name in seen:
                continue
            seen.add(chunk.name)
            try:
                with safe_open(str(chunk), "pt") as f:
                    meta, feats = f.metadata() or {}, f.get_tensor("features")
                keys = json.loads(meta["keys"])
                if _digest(feats, meta["keys"]) != meta["sha256"] or len(keys) != feats.shape[0]:
                    raise ValueError("checksum mismatch")
            except (SafetensorError, OSError, KeyError, ValueError, json.JSONDecodeError) as err:
                self._drop(chunk, err)
                continue
            store.update(zip(keys, feats))

    def _drop(self, chunk: Path, err: Exception) -> None:
        """A corrupt chunk: deleted, so that its images are encoded again; left in a folder that cannot be written."""
        if self.read_only is not None:
            logger.warning("feature cache file %s is corrupt (%s); ignoring it (read-only cache folder)", chunk, err)
            return
        logger.warning("feature cache file %s is corrupt (%s); deleting it, its images will be re-encoded", chunk, err)
        with contextlib.suppress(OSError):  # a folder that cannot be written: named when a chunk is written
            chunk.unlink(missing_ok=True)

    def _encode(
        self,
        backbone: Backbone,
        data: ImageViews,
        keys: list[str],
        skip_bad: bool,
        store: dict[str, torch.Tensor],
        folder: Path | None,
        desc: str,
    ) -> set[str]:
        pending_keys: list[str] = []
        pending: list[torch.Tensor] = []
        bad: set[str] = set()
        try:
            for idx, feats, errors in encode_batches(backbone, data, self.batch_size, self.workers, desc, self.quiet):
                first_error = next((e for e in errors if e), "")
                if first_error and not skip_bad:
                    raise TaskResValueError(first_error)
                self.encoded += len(idx)
                for i, f, error in zip(idx, feats, errors):
                    if not error:
                        store[keys[i]] = f
                        if not keys[i].startswith(PLACE):  # a key of place serves this object only
                            pending_keys.append(keys[i])
                            pending.append(f)
                    else:
                        bad.add(keys[i])
                        logger.warning("skipping undecodable image %s", data.paths[i])
                if folder is not None and len(pending) >= self.chunk_size:
                    self._write_chunk(folder, pending_keys, pending)
                    pending_keys, pending = [], []
        finally:  # also on an error or Ctrl-C: what is encoded is kept, so that a rerun resumes from it
            if folder is not None and pending:
                self._write_chunk(folder, pending_keys, pending)
        return bad

    def _write_chunk(self, folder: Path, keys: list[str], feats: list[torch.Tensor]) -> None:
        tensor = torch.stack(feats).float().contiguous()
        keys_json = json.dumps(keys)
        meta = {"keys": keys_json, "sha256": _digest(tensor, keys_json)}
        if self.cluster is not None:  # which rank of the torchrun job encoded it
            meta["rank"] = f"{self.cluster.rank}/{self.cluster.world_size}"
        name = f"chunk-{uuid.uuid4().hex}.safetensors"
        try:
            write_safetensors(folder / name, {"features": tensor}, meta)
        except OSError as err:
            if isinstance(err, TaskResError):
                raise
            raise self._cannot_write(folder, err.strerror or str(err)) from None
        self._chunks.setdefault(folder, set()).add(name)


def _rows(
    files: list[str], keys: list[str], store: dict[str, torch.Tensor], bad: set[str], dim: int
) -> tuple[torch.Tensor, list[str]]:
    """Features (N, D) for ``keys`` from ``store``, rows of zeros for the undecodable ones, and the files skipped."""
    if not bad and keys:
        return torch.stack([store[k] for k in keys]), []  # (N, D)
    out = torch.zeros(len(files), dim)
    skipped = []
    for i, (p, k) in enumerate(zip(files, keys)):
        if k in store:
            out[i] = store[k]
        elif k in bad:
            skipped.append(p)
    return out, skipped


def _digest(t: torch.Tensor, keys: str) -> str:
    """SHA-256 of a chunk: its image keys (as stored) and its feature bytes."""
    h = hashlib.sha256(keys.encode())
    h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()
