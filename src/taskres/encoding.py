"""Running images through a backbone's image encoder in batches, with worker processes that decode the next batches
meanwhile: ``encode_batches`` (one pass over ``ImageViews``), ``encode_loader`` (over any DataLoader of them) and
``decoding_pool`` (one set of workers that serves every epoch of the online views). The feature cache and the online
views both encode through here."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import torch
from tqdm.auto import tqdm

from taskres.backbones import Backbone
from taskres.data.images import ImageViews


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
