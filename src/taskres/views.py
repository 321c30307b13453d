"""Where a training epoch's image features come from: a bank of cached augmented views, or fresh augmentations
encoded online (the official protocol, docs/protocol.md#images-and-transforms).

Both give ``epoch(e)``: the (N, D) features of the N training images for epoch ``e``, and ``bank(count)``: a
(V, N, D) stack of augmented views for methods that average views (Tip-Adapter's cache).

- ``ViewBank``: V cached views per image. In each cycle of V epochs every image visits each of its views once, in
  an order drawn per image from the run's seed: runs with different seeds share the cache but not the sequence.
- ``OnlineViews``: every epoch draws a new RandomResizedCrop + flip of every image, seeded by (run seed, epoch,
  image name), and runs it through the frozen image encoder, as the official trainer does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch

from taskres.data.images import DEFAULT_MAX_PIXELS, TRAIN_SCALE, ImageViews, online_seed
from taskres.errors import TaskResValueError


class TrainViews(Protocol):
    num_samples: int

    def epoch(self, epoch: int) -> torch.Tensor: ...

    def bank(self, count: int) -> torch.Tensor: ...


def _cycle_generator(seed: int, cycle: int) -> torch.Generator:
    digest = hashlib.sha256(f"views|{seed}|{cycle}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class ViewBank:
    """V cached views of N images, (V, N, D); with V = 1 every epoch reads the one view."""

    def __init__(self, views: torch.Tensor, seed: int):
        if views.dim() == 2:
            views = views.unsqueeze(0)
        self.views, self.seed = views, seed
        self.num_views, self.num_samples = views.shape[0], views.shape[1]
        self._cycle: tuple[int, torch.Tensor] | None = None

    def order(self, cycle: int) -> torch.Tensor:
        """(N, V): for each image, the order in which it visits its views during cycle ``cycle``."""
        g = _cycle_generator(self.seed, cycle)
        return torch.rand(self.num_samples, self.num_views, generator=g).argsort(dim=1)

    def view_index(self, epoch: int) -> torch.Tensor:
        """(N,) the view each image reads in epoch ``epoch``."""
        cycle = epoch // self.num_views
        if self._cycle is None or self._cycle[0] != cycle:
            self._cycle = (cycle, self.order(cycle))
        return self._cycle[1][:, epoch % self.num_views]

    def epoch(self, epoch: int) -> torch.Tensor:
        if self.num_views == 1:
            return self.views[0]
        # (N, D): row n of view view_index[n]; index_select on the flattened bank (a view of it when it is
        # contiguous) gathers the same rows as views[view_index, arange(N)], about twice as fast on a CPU
        rows = torch.arange(self.num_samples)
        if not self.views.is_contiguous():
            return self.views[self.view_index(epoch), rows]
        return self.views.flatten(0, 1).index_select(0, self.view_index(epoch) * self.num_samples + rows)

    def bank(self, count: int | None = None) -> torch.Tensor:
        return self.views


class OnlineViews:
    """Fresh augmentations of the training images, encoded when an epoch asks for them (nothing is cached).

    One decoding pool serves the whole run: its worker processes (``workers``; auto: none on a CPU, and on a GPU
    ``taskres.encoding.loader_workers``' count once an epoch holds two encoder batches) start with the first epoch and
    stay until ``close`` (``fit`` closes it at its end; a later call starts a new one). An epoch that reads only
    some images (``rows``: the samples of the batches that training keeps) decodes and encodes only those. Each
    draw's seed is computed once, from (run seed, epoch, image name).
    """

    def __init__(
        self,
        backbone,
        paths: Sequence[str],
        names: Sequence[str],
        seed: int,
        batch_size: int = 32,
        workers: int | None = None,
        scale: tuple[float, float] = TRAIN_SCALE,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        if len(paths) != len(names):
            raise TaskResValueError(f"one name per image: {len(names)} names for {len(paths)} paths.")
        self.backbone, self.paths, self.names, self.seed = backbone, list(paths), list(names), seed
        self.batch_size, self.workers, self.scale, self.max_pixels = batch_size, workers, scale, max_pixels
        self.num_samples = len(self.paths)
        self.encoded = 0  # images run through the encoder (encoder passes)
        self._plan = _Plan()  # the batches the pool reads when it is next iterated
        self._pool: Any = None

    def epoch(self, epoch: int, rows: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """(N, D): a fresh augmentation of every image, or of ``rows`` only (the other rows are zeros)."""
        return self._encode(epoch, rows)

    def bank(self, count: int) -> torch.Tensor:
        """``count`` augmented draws of every image, (count, N, D), from a stream apart from the epochs'."""
        return torch.stack([self._encode(-1 - v) for v in range(count)])

    def pixel_batches(
        self, epoch: int, batches: Sequence[Sequence[int]]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The augmented pixels of epoch ``epoch``'s draw, batch by batch in the order given: ((B,) rows, (B, 3, S,
        S) normalised pixels), for methods that train through the image encoder (CLIP-LoRA). The same draws, from
        the same pool, as ``epoch`` encodes."""
        self._plan.batches = [[(i, online_seed(self.seed, epoch, self.names[i])) for i in b] for b in batches]
        for idx, pixels, errors in self._decoder():
            first_error = next((e for e in errors if e), "")
            if first_error:
                raise TaskResValueError(first_error)
            self.encoded += len(idx)
            yield idx, pixels

    def close(self) -> None:
        """Stop the decoding pool's worker processes (a later epoch starts a new pool)."""
        pool, self._pool = self._pool, None
        iterator = getattr(pool, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()

    def _encode(self, stream: int, rows: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """The features of draw ``stream`` (an epoch, or -1 - v for bank view v) of ``rows`` (default: all)."""
        from taskres.encoding import encode_loader

        picked = range(self.num_samples) if rows is None else sorted(set(torch.as_tensor(rows).tolist()))
        items = [(i, online_seed(self.seed, stream, self.names[i])) for i in picked]
        self._plan.batches = [items[s : s + self.batch_size] for s in range(0, len(items), self.batch_size)]
        out = None
        for idx, feats, errors in encode_loader(self.backbone, self._decoder(), len(items)):
            first_error = next((e for e in errors if e), "")
            if first_error:
                raise TaskResValueError(first_error)
            if out is None:
                out = torch.zeros(self.num_samples, feats.shape[1])
            out[idx] = feats
            self.encoded += len(idx)
        return out if out is not None else torch.zeros(0, 0)

    def _decoder(self):
        """The run's decoding pool (started on first use): a DataLoader that reads ``self._plan``."""
        if self._pool is None:
            from taskres.encoding import decoding_pool, loader_workers

            data = ImageViews(
                self.paths,
                self.backbone.image_size,
                self.backbone.mean,
                self.backbone.std,
                scale=self.scale,
                max_pixels=self.max_pixels,
                augment=True,
            )
            workers = self.workers
            if workers is None and self.backbone.device.type == "cpu":
                workers = 0  # a decoding process beside the encoder's threads slows a CPU pass (docs/performance.md)
            # on a GPU: started once for every epoch, workers pay off as soon as an epoch holds two encoder batches
            # (they decode the next ones while the encoder runs), loader_workers' rule for two epochs' images
            workers = loader_workers(workers, 2 * self.num_samples, self.batch_size, self.backbone.device)
            self._pool = decoding_pool(data, self._plan, workers, self.backbone.device)
        return self._pool


class _Plan:
    """The batches a decoding pool reads when it is iterated: lists of (index, seed) items, set before each pass."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def as_views(views: torch.Tensor | TrainViews, seed: int) -> TrainViews:
    """A tensor of cached views, (V, N, D) or (N, D), as a ViewBank; view sources pass through."""
    return ViewBank(views, seed) if isinstance(views, torch.Tensor) else views


def as_bank(views: torch.Tensor | TrainViews, count: int) -> torch.Tensor:
    """(V, N, D) views to average: a tensor as it is, a bank's views, or ``count`` online draws."""
    if isinstance(views, torch.Tensor):
        return views if views.dim() == 3 else views.unsqueeze(0)
    return views.bank(count)
