"""Training loop over cached features, method-agnostic: the official optimiser, schedule and batching (SPEC).

Adam (betas 0.9/0.999, L2 weight decay), one constant warm-up epoch at 1e-5, then cosine from ``lr`` over E epochs,
stepped once per epoch. Each epoch shuffles the training set with a seeded generator and drops the last partial
batch only when the set holds at least one full batch. Epoch ``e`` reads view ``e % V`` of the cached features.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from taskres.errors import TaskResError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-3
    epochs: int = 200
    batch_size: int = 256
    weight_decay: float = 5e-4
    warmup_lr: float = 1e-5
    warmup_epochs: int = 1

    def __post_init__(self) -> None:
        for name in ("lr", "epochs", "batch_size"):
            if not getattr(self, name) > 0:
                raise TaskResError(f"--{name.replace('_', '-')} must be > 0; got {getattr(self, name)!r}.")
        if self.weight_decay < 0:
            raise TaskResError(f"--weight-decay must be >= 0; got {self.weight_decay!r}.")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise TaskResError(f"warm-up epochs must be in [0, epochs]; got {self.warmup_epochs!r}.")


def epoch_lr(config: OptimConfig, epoch: int) -> float:
    """The learning rate that epoch ``epoch`` (0-based) trains at."""
    if epoch < config.warmup_epochs:
        return config.warmup_lr
    return config.lr * (1 + math.cos(math.pi * (epoch - config.warmup_epochs) / config.epochs)) / 2


def fit(
    head: torch.nn.Module,
    views: torch.Tensor,
    labels: torch.Tensor,
    config: OptimConfig,
    seed: int,
    device: str | torch.device = "cpu",
    on_epoch: Callable[[dict], None] | None = None,
    quiet: bool = False,
) -> list[dict]:
    """Train the head's parameters in place; return one log record per epoch.

    views: (V, N, D) cached features, V >= 1 (view ``e % V`` in epoch e); labels: (N,) int64.
    """
    if views.dim() == 2:
        views = views.unsqueeze(0)
    num_views, n, _ = views.shape
    if n == 0:
        raise TaskResError("the training set is empty; check --shots and the split file's train entries.")
    params = [p for p in head.parameters() if p.requires_grad]
    if not params:
        raise TaskResError("the method has no trainable parameters.")
    head.to(device).train()
    views, labels = views.to(device), labels.to(device)
    optimizer = torch.optim.Adam(params, lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    drop_last = n >= config.batch_size
    history = []
    for epoch in tqdm(range(config.epochs), desc="training", unit="epoch", disable=quiet, leave=False):
        lr = epoch_lr(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        feats = views[epoch % num_views]
        order = torch.randperm(n, generator=generator).to(device)
        stop = n - n % config.batch_size if drop_last else n
        total_loss, correct, seen = 0.0, 0, 0
        for start in range(0, stop, config.batch_size):
            idx = order[start:start + config.batch_size]
            logits = head(feats[idx])  # (B, C)
            loss = F.cross_entropy(logits, labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(idx)
            correct += int((logits.argmax(dim=1) == labels[idx]).sum())
            seen += len(idx)
        record = {"epoch": epoch, "lr": lr, "loss": total_loss / seen, "train_accuracy": 100.0 * correct / seen}
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
    head.eval()
    return history
