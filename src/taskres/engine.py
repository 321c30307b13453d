"""Training loop over cached features, method-agnostic: the official optimiser, schedule and batching.

See docs/protocol.md#optimisation.

The defaults are TaskRes's: Adam (betas 0.9/0.999, L2 weight decay), one constant warm-up epoch at 1e-5, then cosine
from ``lr`` over E epochs, stepped once per epoch. Each epoch shuffles the training set with a seeded generator and
drops the last partial batch only when the set holds at least one full batch (Dassl's rule). Epoch ``e`` reads the
features that the view source gives for it (``taskres.views``: a bank of cached views, or online augmentation).

Other methods' public settings are options: SGD with momentum (Dassl's ``sgd``: CoOp, CLIP-Adapter), AdamW with its
own eps (Tip-Adapter-F), cosine stepped per iteration without warm-up (Tip-Adapter-F's ``CosineAnnealingLR`` over
``epochs * len(loader)``), and never dropping the partial batch (Tip-Adapter's loaders use ``drop_last=False``).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from taskres.errors import TaskResValueError, check_choice, invalid
from taskres.views import OnlineViews, TrainViews, ViewBank, as_views

logger = logging.getLogger(__name__)


Optimizer = Literal["adam", "sgd", "adamw"]
Schedule = Literal["epoch", "iteration"]
DropLast = Literal["auto", "never"]
OPTIMIZERS, SCHEDULES, DROP_LAST = get_args(Optimizer), get_args(Schedule), get_args(DropLast)


@dataclass(frozen=True)
class OptimConfig:
    """How a head is trained. The defaults are TaskRes's published settings (docs/protocol.md#optimisation).

    optimizer: "adam" (L2 weight decay), "sgd" (momentum, L2 weight decay, as Dassl) or "adamw" (decoupled decay).
    schedule: "epoch" = ``warmup_epochs`` constant epochs at ``warmup_lr``, then cosine stepped once per epoch;
              "iteration" = cosine from ``lr`` to 0 stepped after every batch, over all epochs (no warm-up).
    drop_last: "auto" = drop the partial last batch only when a full batch exists (Dassl); "never".
    """

    lr: float = 2e-3
    epochs: int = 200
    batch_size: int = 256
    weight_decay: float = 5e-4
    warmup_lr: float = 1e-5
    warmup_epochs: int = 1
    optimizer: Optimizer = "adam"
    momentum: float = 0.9  # sgd only
    eps: float = 1e-8  # adam and adamw only
    schedule: Schedule = "epoch"
    drop_last: DropLast = "auto"

    def __post_init__(self) -> None:
        for name in ("lr", "epochs", "batch_size"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise invalid(name, "be a finite number > 0", value)
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise invalid("weight_decay", "be a finite number >= 0", self.weight_decay)
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise invalid("warmup_epochs", "be in [0, epochs]", self.warmup_epochs)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("drop_last", self.drop_last, DROP_LAST)
        if self.schedule == "iteration" and self.warmup_epochs:
            raise invalid(
                "warmup_epochs", "be 0 with the per-iteration cosine schedule (it has no warm-up)", self.warmup_epochs
            )
        if not 0 <= self.momentum < 1:
            raise invalid("momentum", "be in [0, 1)", self.momentum)
        if not self.eps > 0:
            raise invalid("eps", "be > 0", self.eps)


def epoch_lr(config: OptimConfig, epoch: int) -> float:
    """The learning rate that epoch ``epoch`` (0-based) trains at (``schedule="epoch"``)."""
    if epoch < config.warmup_epochs:
        return config.warmup_lr
    return config.lr * (1 + math.cos(math.pi * (epoch - config.warmup_epochs) / config.epochs)) / 2


def iteration_lr(config: OptimConfig, step: int, total_steps: int) -> float:
    """``schedule="iteration"``: the learning rate of global step ``step`` (0-based) of ``total_steps``, as torch's
    ``CosineAnnealingLR(T_max=total_steps)`` stepped after every batch."""
    return config.lr * (1 + math.cos(math.pi * step / total_steps)) / 2


def make_optimizer(params, config: OptimConfig) -> torch.optim.Optimizer:
    """The configured optimiser over ``params``. Its update runs as one fused kernel per step where torch has one
    (float parameters on the CPU or CUDA): the same algorithm as the per-tensor loop, in one pass over the
    parameters instead of about eight, rounding the last bit differently (docs/performance.md)."""
    params = list(params)
    fused: dict[str, Any] = {"fused": True} if _fusable(params) else {}
    if config.optimizer == "sgd":  # Dassl's build_optimizer: dampening 0, no Nesterov
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, **fused
        )
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, eps=config.eps, weight_decay=config.weight_decay, **fused)
    return torch.optim.Adam(
        params, lr=config.lr, betas=(0.9, 0.999), eps=config.eps, weight_decay=config.weight_decay, **fused
    )


def _fusable(params: list[torch.Tensor]) -> bool:
    return (
        bool(params)
        and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        and len({p.device for p in params}) == 1
    )


def check_finite(
    record: dict,
    params: Sequence[torch.Tensor],
    config: OptimConfig,
    epoch: int,
    when: str | None = None,
    trained: str = "the trained parameters (residual)",
) -> None:
    """Stop a diverged training: a non-finite learning rate, loss or trained tensor is an error, not a result.
    ``when`` says where training stopped (default: ``in epoch E of N``); ``trained`` names the parameters."""
    what = [k for k in ("lr", "loss") if not math.isfinite(record[k])]
    if not all(bool(torch.isfinite(p.detach()).all()) for p in params):
        what.append(trained)
    if what:
        when = when or f"in epoch {epoch + 1} of {config.epochs}"
        raise TaskResValueError(
            f"training diverged {when}: {', '.join(what)} became non-finite "
            f"(nan or inf). Likely causes: `lr` {config.lr:g} too large, a residual scale (`alpha`) too large, or "
            f"`weight_decay` {config.weight_decay:g} too large; lower it and run again. No run was written.",
            param="lr",
        )


# Up to this size, a bank of cached views is mapped through the head's ``train_inputs`` once per run, beside the
# bank itself; a larger one is mapped batch by batch, every step (the same numbers: the map works row by row).
PREPARED_BANK_MAX_BYTES = 2 * 2**30


def prepare_views(
    source: TrainViews, train_inputs: Callable[[torch.Tensor], torch.Tensor] | None, device: str | torch.device
) -> TrainViews | None:
    """The views mapped through ``train_inputs`` (on ``device``, where the head is) once, if ``source`` is a bank
    of cached views that is small enough (``PREPARED_BANK_MAX_BYTES``); None if the map is to be applied per batch.
    The mapped bank stays where the bank is."""
    if train_inputs is None or not isinstance(source, ViewBank):
        return None
    bank = source.views  # (V, N, D)
    if bank.numel() * bank.element_size() > PREPARED_BANK_MAX_BYTES:
        return None
    mapped = None
    for v in range(len(bank)):  # one view at a time: no temporary the size of the bank
        view = train_inputs(bank[v].to(device)).to(bank.device)
        if mapped is None:
            mapped = torch.empty((len(bank), *view.shape), dtype=view.dtype, device=bank.device)
        mapped[v] = view
    return ViewBank(mapped, source.seed) if mapped is not None else None


def autograd_step(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    inputs: torch.Tensor,
    targets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A training step through autograd: ``loss_fn``'s (loss, logits), the loss differentiated into the parameters'
    ``.grad``, both returned detached."""
    loss, logits = loss_fn(inputs, targets)
    loss.backward()
    return loss.detach(), logits.detach()


def _cross_entropy_loss(module: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor):
    logits = module(inputs)
    return F.cross_entropy(logits, targets), logits


def _mean_loss(losses: list[torch.Tensor], batch_size: int, total: int) -> float:
    """The epoch's loss per sample from its batches' mean losses (all full but the last), summed in float64 in
    step order."""
    summed = 0.0
    for step, loss in enumerate(torch.stack(losses).tolist()):
        summed += loss * min(batch_size, total - step * batch_size)
    return summed / total


def fit(
    head: torch.nn.Module,
    views: torch.Tensor | TrainViews,
    labels: torch.Tensor,
    config: OptimConfig,
    seed: int,
    device: str | torch.device = "cpu",
    on_epoch: Callable[[dict], None] | None = None,
    quiet: bool = False,
) -> list[dict]:
    """Train the head's parameters in place; return one log record per epoch.

    views: (V, N, D) or (N, D) cached features (a ``ViewBank`` drawn with ``seed``), or a view source with
    ``epoch(e) -> (N, D)`` such as ``OnlineViews``; labels: (N,) int64.
    """
    source = as_views(views, seed)
    n = source.num_samples
    if n == 0:
        raise TaskResValueError("the training set is empty; check --shots and the split file's train entries.")
    params = [p for p in head.parameters() if p.requires_grad]
    if not params:
        raise TaskResValueError("the method has no trainable parameters.")
    head.to(device).train()
    # a Head's training step (loss and logits, gradients in .grad), and the image-only part of the logits that
    # training does not change (taskres.methods), applied once to a bank of cached views or else to each batch
    train_step = getattr(head, "train_step", None)
    if train_step is None:  # a module that is not a Head: its own train_loss, or the cross-entropy of its forward
        loss_fn = getattr(head, "train_loss", None) or functools.partial(_cross_entropy_loss, head)
        train_step = functools.partial(autograd_step, loss_fn)
    step_inputs = getattr(head, "train_inputs", None)
    prepared = prepare_views(source, step_inputs, device)
    if prepared is not None:
        source, step_inputs = prepared, None
    labels = labels.to(device)  # views move one epoch at a time: V views of a large set may not fit the device
    optimizer = make_optimizer(params, config)
    generator = torch.Generator().manual_seed(seed)
    drop_last = config.drop_last == "auto" and n >= config.batch_size
    stop = n - n % config.batch_size if drop_last else n
    steps_per_epoch = math.ceil(stop / config.batch_size)
    history = []
    for epoch in tqdm(range(config.epochs), desc="training", unit="epoch", disable=quiet, leave=False):
        lr = (
            epoch_lr(config, epoch)
            if config.schedule == "epoch"
            else iteration_lr(config, epoch * steps_per_epoch, config.epochs * steps_per_epoch)
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        order = torch.randperm(n, generator=generator)
        if isinstance(source, OnlineViews):  # only the samples of the kept batches: a dropped batch is not encoded
            feats = source.epoch(epoch, order[:stop]).to(device)
        else:
            feats = source.epoch(epoch).to(device)
        order = order.to(device)
        # kept on the device and read once per epoch: a read per step would wait for the GPU every step
        losses, predictions = [], []
        for step, start in enumerate(range(0, stop, config.batch_size)):
            if config.schedule == "iteration":
                for group in optimizer.param_groups:
                    group["lr"] = iteration_lr(config, epoch * steps_per_epoch + step, config.epochs * steps_per_epoch)
            idx = order[start : start + config.batch_size]
            batch = feats.index_select(0, idx)  # the same rows as feats[idx], gathered about twice as fast on a CPU
            targets = labels.index_select(0, idx)
            for p in params:  # optimizer.zero_grad(set_to_none=True), without its per-step Python overhead
                p.grad = None
            loss, logits = train_step(batch if step_inputs is None else step_inputs(batch), targets)  # logits (B, C)
            optimizer.step()
            losses.append(loss)
            predictions.append(logits.argmax(dim=1))
        record = {
            "epoch": epoch,
            "lr": lr,
            "loss": _mean_loss(losses, config.batch_size, stop),
            "train_accuracy": 100.0 * int((torch.cat(predictions) == labels[order[:stop]]).sum()) / stop,
        }
        check_finite(record, params, config, epoch)
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
    if isinstance(source, OnlineViews):
        source.close()  # the decoding pool's processes
    head.eval()
    return history
