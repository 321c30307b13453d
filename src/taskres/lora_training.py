"""The training loop of a method that trains through the encoders (CLIP-LoRA): decoded images every step, from the
online views' decoding pool and seeding (``OnlineViews.pixel_batches``), through an image encoder with gradients.

As CLIP-LoRA's public code (``lora.py``, ``run_lora``): a fixed number of iterations, each a batch of freshly
augmented training images; the loader reshuffles after every pass over the few-shot set (dropping the last partial
batch when the set holds a full one, as Dassl's train loader); AdamW; cosine from ``lr`` to ``min_lr`` stepped
after every iteration (``CosineAnnealingLR(T_max=iterations, eta_min)``). The loss is the cross-entropy of
tau * cos(image, text) with the class texts encoded every step (when the text encoder is adapted) or once.

Each pass over the set logs one record (``on_epoch``) and is checked for divergence; Ctrl-C propagates (the run
folder's transaction leaves nothing); running out of memory is an error naming the options that reduce memory.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from taskres.engine import OptimConfig, check_finite, make_optimizer
from taskres.errors import TaskResValueError
from taskres.views import OnlineViews

MEMORY_OPTIONS = (
    "`batch_size` (default 32), `checkpointing` true (recompute activations in the backward), `amp` bf16 on a "
    "GPU (autocast), `encoders` text or vision (adapt one encoder), or a smaller backbone"
)


@dataclass
class EncoderTraining:
    """What the loop trains: ``model`` (an open_clip CLIP with adapters installed) maps pixels and tokens to
    features; ``params`` are the adapters' parameters; ``text`` gives the (C, D) class texts (through the model,
    or fixed)."""

    model: Any  # an open_clip CLIP (untyped)
    params: list[nn.Parameter]
    text: Callable[[], torch.Tensor]
    logit_scale: float
    device: torch.device
    dtype: torch.dtype  # the backbone's weights
    pixel_dtype: torch.dtype | None = None  # pixels rounded to it first, as the backbone's encoder
    amp: bool = False  # bf16 autocast on CUDA

    def loss(self, pixels: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross-entropy, (B, C) logits) of a batch of normalised pixels (B, 3, S, S)."""
        pixels = pixels.to(self.device, self.pixel_dtype or self.dtype, non_blocking=True).to(self.dtype)
        amp = self.amp and self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            image = self.model.encode_image(pixels)  # (B, D)
            text = self.text()  # (C, D)
        logits = self.logit_scale * F.normalize(image.float(), dim=-1) @ F.normalize(text.float(), dim=-1).t()
        return F.cross_entropy(logits, targets), logits


def cosine_lr(optim: OptimConfig, step: int, total: int, min_lr: float) -> float:
    """The learning rate of iteration ``step`` (0-based) of ``total``: torch's ``CosineAnnealingLR(T_max=total,
    eta_min=min_lr)`` stepped after every iteration."""
    return min_lr + (optim.lr - min_lr) * (1 + math.cos(math.pi * step / total)) / 2


def train_through_encoder(
    training: EncoderTraining,
    views: OnlineViews,
    labels: torch.Tensor,
    optim: OptimConfig,
    iterations: int,
    seed: int,
    min_lr: float = 1e-6,
    on_epoch: Callable[[dict], None] | None = None,
    quiet: bool = False,
) -> list[dict]:
    """Train ``training.params`` in place for ``iterations`` steps; one log record per pass over the set."""
    try:
        return _loop(training, views, labels, optim, iterations, seed, min_lr, on_epoch, quiet)
    except torch.OutOfMemoryError:
        raise TaskResValueError(
            f"out of memory training through the encoders on {training.device}. Reduce memory with {MEMORY_OPTIONS}.",
            param="batch_size",
        ) from None
    finally:
        views.close()


def _loop(training, views, labels, optim, iterations, seed, min_lr, on_epoch, quiet) -> list[dict]:
    n, size = views.num_samples, optim.batch_size
    stop = n - n % size if optim.drop_last == "auto" and n >= size else n
    if stop == 0:
        raise TaskResValueError("the training set is empty; check --shots and the split file's train entries.")
    optimizer = make_optimizer(training.params, optim)
    generator = torch.Generator().manual_seed(seed)
    history: list[dict] = []
    step, epoch = 0, 0
    with tqdm(total=iterations, desc="training", unit="step", disable=quiet, leave=False) as bar:
        while step < iterations:
            order = torch.randperm(n, generator=generator)
            batches = [order[s : s + size].tolist() for s in range(0, stop, size)][: iterations - step]
            losses, correct, seen = 0.0, 0, 0
            for idx, pixels in views.pixel_batches(epoch, batches):
                lr = cosine_lr(optim, step, iterations, min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                targets = labels[idx].to(training.device)
                optimizer.zero_grad(set_to_none=True)
                loss, logits = training.loss(pixels, targets)
                loss.backward()
                optimizer.step()
                losses += float(loss.detach()) * len(idx)
                correct += int((logits.argmax(dim=1) == targets).sum())
                seen, step = seen + len(idx), step + 1
                bar.update(1)
            record = {"epoch": epoch, "iterations": step, "lr": lr, "loss": losses / seen}
            record["train_accuracy"] = 100.0 * correct / seen
            where = f"by iteration {step} of {iterations}"
            check_finite(record, training.params, optim, epoch, where, trained="the adapters' parameters")
            history.append(record)
            if on_epoch is not None:
                on_epoch(record)
            epoch += 1
    return history
