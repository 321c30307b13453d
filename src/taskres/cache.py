"""Content-addressed feature cache: every image is encoded once per (backbone, transform, view).

Layout: ``<cache_dir>/v<FORMAT>/<namespace>/chunk-*.safetensors``. The namespace hashes the backbone identity
(weights hash or open_clip name and tag, architecture, precision), the transform and view, and the format version.
Inside a namespace, each image's key hashes its name (the path relative to the dataset's image folder; the absolute
path for a loose image), size and mtime, so a changed file is a miss and a copied dataset (``cp -p``) is a hit.

Chunks are written to a temporary file and renamed; each carries its image keys and a SHA-256 of its tensor bytes,
checked on load. Under torchrun, a cache given the job's ``Cluster`` encodes collectively: each rank encodes its
share of the missing images into its own chunks, then reads the others' (``taskres.distributed``).
An interrupted extraction keeps its finished chunks and resumes from there; a corrupt or truncated chunk is
reported, deleted and re-encoded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from taskres.atomic import write_safetensors, write_text
from taskres.backbones import Backbone
from taskres.data.images import DEFAULT_MAX_PIXELS, TRAIN_SCALE, ImageViews, transform_spec, view_seed
from taskres.distributed import Cluster, check_shared_folder
from taskres.errors import TaskResFileNotFoundError, TaskResValueError

logger = logging.getLogger(__name__)

FORMAT = 3  # 3: images keyed by their path relative to the dataset folder


def image_key(path: str | Path, name: str | None = None) -> str:
    """Identity of an image file's content: its name (default: the absolute path), size and modification time."""
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise TaskResFileNotFoundError(
            f"image {path!r} does not exist; check the data folder (--data/--root) "
            "and the split "
            "file's paths, which are relative to it."
        ) from None
    return hashlib.sha256(f"{name or path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]


def check_writable_dir(folder: Path, param: str, shown: Path | None = None) -> None:
    """Create ``folder`` if needed and check that a file can be written in it (a probe file, removed); raise a
    TaskResValueError naming ``param`` otherwise. Checked before any image is encoded."""
    shown = shown if shown is not None else folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except (OSError, ValueError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise TaskResValueError(
            f"{param} {str(shown)!r} is not a writable folder ({reason}); choose another "
            "folder, or encode without the cache.",
            param=param,
        ) from None


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
        if self.root is not None:
            assert cache_dir is not None  # root is set from it
            check_writable_dir(self.root, "cache_dir", Path(cache_dir))
        if self.cluster is not None:
            if self.root is None:
                raise TaskResValueError(
                    "the ranks of a torchrun job exchange features through the cache folder; "
                    "give one that every rank sees (--cache-dir), not --no-cache.",
                    param="cache_dir",
                )
            check_shared_folder(self.cluster, self.root, "cache_dir")
        self.encoded = 0  # images run through the image encoder by this object (for tests and benchmarks)
        self._stores: dict[Path, dict[str, torch.Tensor]] = {}
        self._chunks: dict[Path, set[str]] = {}  # namespace folder -> names of the chunk files read or written
        self._keys: dict[tuple[str, int, int], str] = {}  # (name, size, mtime) -> image key

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
        keys = [self._key(p, n) for p, n in zip(files, names)]
        ns = self.namespace(backbone, view, scale)
        folder = self._folder(ns)
        store = self._store(folder)
        todo = sorted({k: i for i, k in enumerate(keys) if k not in store}.values())  # one image per missing key
        mine = self._my_share(todo, keys, ns, desc)
        bad: set[str] = set()
        if mine:
            data = self._image_views(backbone, [files[i] for i in mine], [names[i] for i in mine], view, scale)
            bad = self._encode(backbone, data, [keys[i] for i in mine], skip_bad, store, folder, desc)
        if self.cluster is not None and todo:
            bad = self._read_other_shares(folder, store, [(files[i], keys[i]) for i in todo], bad, desc)
        return _rows(files, keys, store, bad, backbone.embed_dim)

    def _key(self, path: str, name: str) -> str:
        """``image_key``: the file is checked (stat) on every call, so a changed file is a miss at once; the hash
        of an unchanged identity is remembered, as one cache serves the many views and runs of a sweep."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return image_key(path, name)  # raises, naming the file
        identity = (name, st.st_size, st.st_mtime_ns)
        if identity not in self._keys:
            self._keys[identity] = image_key(path, name)
        return self._keys[identity]

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
        if folder in self._stores:  # made and described when first used by this object
            return folder
        try:
            folder.mkdir(parents=True, exist_ok=True)
            info = folder / "namespace.json"
            if not info.exists():
                write_text(info, json.dumps(ns, indent=1, sort_keys=True))
        except OSError as err:
            raise TaskResValueError(
                f"cache_dir {str(self.root.parent)!r}: {str(folder)!r} cannot be written "
                f"({err.strerror or err}); fix or remove it, or choose another cache folder.",
                param="cache_dir",
            ) from None
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
                logger.warning(
                    "feature cache file %s is corrupt (%s); deleting it, its images will be re-encoded", chunk, err
                )
                chunk.unlink(missing_ok=True)
                continue
            store.update(zip(keys, feats))

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
        write_safetensors(folder / name, {"features": tensor}, meta)
        self._chunks.setdefault(folder, set()).add(name)


def loader_workers(workers: int | None, images: int, batch_size: int, device: torch.device) -> int:
    """Image-decoding processes for ``images`` images: ``workers`` when given; else (auto) none for a job of at
    most two batches (a worker's start costs more than it saves), one on the CPU (it decodes the next batch while
    the encoder's threads run; decoding costs about a tenth of a CPU encoder pass), and up to 8 on a GPU, which
    encodes faster than one process decodes."""
    if workers is not None:
        return workers
    if images <= 2 * batch_size:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cpus < 2:
        return 0
    return min(8, cpus - 1) if device.type == "cuda" else 1


def encode_batches(
    backbone: Backbone,
    data: ImageViews,
    batch_size: int = 32,
    workers: int | None = None,
    desc: str = "encoding",
    quiet: bool = True,
) -> Iterator[tuple[list[int], torch.Tensor, list[str]]]:
    """Run ``data`` through the image encoder in batches: (indices, (B, D) features on the CPU, error per item).
    Worker processes (``loader_workers``) decode and transform the next batches while the encoder runs; on CUDA
    the batches come in pinned memory and are copied without blocking."""
    workers = loader_workers(workers, len(data), batch_size, backbone.device)
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=batch_size,
        num_workers=workers,
        shuffle=False,
        pin_memory=backbone.device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    yield from encode_loader(backbone, loader, len(data), desc, quiet)


def encode_loader(
    backbone: Backbone, loader: Iterable, total: int, desc: str = "encoding", quiet: bool = True
) -> Iterator[tuple[list[int], torch.Tensor, list[str]]]:
    """``encode_batches`` over the batches of a DataLoader of ``ImageViews`` (``total`` images in all)."""
    with tqdm(total=total, desc=desc, unit="img", disable=quiet, leave=False) as bar:
        for idx, pixels, errors in loader:
            yield idx.tolist(), backbone.encode_images(pixels).cpu(), list(errors)
            bar.update(len(idx))


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


def decoding_pool(data: ImageViews, batches: Iterable[list], workers: int, device: torch.device):
    """A DataLoader of ``data`` that reads, each time it is iterated, the batches that ``batches`` yields then (a
    batch is a list of items, e.g. ``(index, seed)``). Its ``workers`` processes start once and serve every
    iteration (persistent workers); pinned memory on CUDA. Its own generator: iterating it leaves the global RNG
    alone."""
    return torch.utils.data.DataLoader(
        data,
        batch_sampler=batches,  # any iterable of index lists, read again at each iteration
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
        persistent_workers=workers > 0,
        generator=torch.Generator(),
    )


def _digest(t: torch.Tensor, keys: str) -> str:
    """SHA-256 of a chunk: its image keys (as stored) and its feature bytes."""
    h = hashlib.sha256(keys.encode())
    h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()
