"""What a method is and what it receives and returns.

A method sees features and the base classifier, never images or files (CoOp, which runs the text encoder in its
loop, gets the backbone explicitly). It is one module that defines

- a frozen **config** dataclass whose defaults are the published preset; a field that the user may set from the
  command line carries ``metadata=option("--flag", "help")``;
- a **head** (a :class:`Head`): ``forward``, ``(N, D)`` image features -> ``(N, C)`` logits, and ``tensors()``;
  what else its ``classifier.safetensors`` holds (scalars, its config) it declares in class attributes, from which
  ``Head`` exports it and rebuilds it (``export`` / ``from_export``, ``select_classes``);
- a **fit** function ``fit(ctx: FitContext, config) -> Fitted``;

and registers them with ``register_method(Method(...))`` (``taskres.methods.registry``). How the cosine heads train
fast (the column-scaled cosine, its hand-written gradients) is in ``taskres.methods._fused``.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from taskres.backbones import Backbone
from taskres.engine import OptimConfig, autograd_step, fit
from taskres.methods._fused import column_cosine
from taskres.views import TrainViews

if TYPE_CHECKING:
    from taskres.features import Features


def option(flag: str, help: str, **argparse_kwargs: Any) -> dict:
    """Field metadata that exposes a config field on the command line as ``flag`` (types and choices are read off
    the field's annotation by the CLI; ``argparse_kwargs`` such as ``metavar`` pass through)."""
    return {"flag": flag, "help": help, **argparse_kwargs}


def config_options(config_cls: type) -> list[dataclasses.Field]:
    """The fields of a config dataclass that carry an ``option(...)``."""
    return [f for f in dataclasses.fields(config_cls) if "flag" in f.metadata]


def cosine_logits(
    image_features: torch.Tensor, classifier: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """(N, D) x (C, D) -> (N, C): tau * cosine similarity; neither input needs to be normalised."""
    return logit_scale * F.normalize(image_features, dim=-1) @ F.normalize(classifier, dim=-1).t()


def scaled_unit(image_features: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """tau * f / |f|, row by row: the image side of the cosine logits."""
    return logit_scale * F.normalize(image_features, dim=-1)


def _float(value: torch.Tensor | float) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


class Head(nn.Module, abc.ABC):
    """A tuned classifier over cached image features: ``forward`` maps (N, D) un-normalised features to (N, C).

    Saved as ``classifier.safetensors``: ``export()`` gives ``tensors()`` (float32, CPU) and the ``metadata()``
    that ``from_export`` rebuilds the head from. ``class_rows`` / ``class_columns`` name the exported tensors indexed
    by class on dim 0 / dim 1, which is all ``select_classes`` needs; ``frozen_tensors`` name those that training
    never changes (the contract test checks it).

    The metadata is declared, not written per head: ``scalars`` name float attributes of the head (its logit scale,
    a searched value), and a head with a ``config_cls`` keeps that dataclass as ``self.config``, whose fields
    (``config_fields``, default all) come first, one key each, a scalar of the same name standing for the field (a
    learned alpha); with ``nest_config`` they form one "config" entry after the scalars instead.
    """

    class_rows: ClassVar[tuple[str, ...]] = ()
    class_columns: ClassVar[tuple[str, ...]] = ()
    frozen_tensors: ClassVar[tuple[str, ...]] = ()
    scalars: ClassVar[tuple[str, ...]] = ()
    config_cls: ClassVar[type | None] = None
    config_fields: ClassVar[tuple[str, ...] | None] = None
    nest_config: ClassVar[bool] = False
    config: Any  # an instance of config_cls (or None, where the head's constructor allows it)

    @abc.abstractmethod
    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """(N, D) un-normalised image features -> (N, C) logits."""

    @abc.abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The head's own tensors by their exported names: what ``from_export`` passes to the constructor (a
        parameter of that name) or copies back into them."""

    def train_inputs(self, image_features: torch.Tensor) -> torch.Tensor:
        """What ``train_logits`` takes, row by row: the part of the training logits that depends on the image
        features alone and that training does not change. The engine applies it once per run to a bank of cached
        views (``engine.fit``), so that no step repeats it. Default: the features themselves."""
        return image_features

    def train_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """The logits that training steps differentiate, from a batch of ``train_inputs``: ``forward``'s, in
        whatever form trains fastest."""
        return self(inputs)

    def train_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A training step's (loss, logits) for a batch of ``train_inputs``: the mean cross-entropy of
        ``train_logits`` against ``targets``, and those logits."""
        logits = self.train_logits(inputs)
        return F.cross_entropy(logits, targets), logits

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step's forward and backward: ``train_loss``'s (loss, logits), detached, with the gradients
        of the trainable parameters left in their ``.grad`` (the engine clears them before each step). Default:
        autograd through ``train_loss``; a head may compute its gradients in closed form instead."""
        return autograd_step(self.train_loss, inputs, targets)

    def metadata(self) -> dict:
        """The scalars and the config, laid out as the class attributes say (JSON-able)."""
        scalars = {name: _float(getattr(self, name)) for name in self.scalars}
        if self.config_cls is None:
            return scalars
        config = None if self.config is None else dataclasses.asdict(self.config)
        if config is not None and self.config_fields is not None:
            config = {k: v for k, v in config.items() if k in self.config_fields}
        return {**scalars, "config": config} if self.nest_config else {**(config or {}), **scalars}

    def export(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {k: v.detach().float().contiguous().cpu() for k, v in self.tensors().items()}, self.metadata()

    @classmethod
    def from_export(cls, tensors: dict[str, torch.Tensor], meta: dict) -> Head:
        """The head again: its constructor called with the exported tensors, scalars and config that its parameters
        name (a nested config missing from ``meta`` leaves the parameter's default), then the other exported
        tensors copied into the head's own."""
        values: dict[str, Any] = {**tensors, **{name: meta[name] for name in cls.scalars}}
        if cls.config_cls is not None and (not cls.nest_config or "config" in meta):
            values["config"] = cls._config_from(cls.config_cls, meta)
        parameters = inspect.signature(cls).parameters
        head = cls(**{name: value for name, value in values.items() if name in parameters})
        with torch.no_grad():
            for name, own in head.tensors().items():
                if name not in parameters:
                    if tensors[name].shape != own.shape:
                        raise ValueError(f"{name} is {tuple(tensors[name].shape)}; the head needs {tuple(own.shape)}")
                    own.copy_(tensors[name])
        return head

    @classmethod
    def _config_from(cls, config_cls: type, meta: dict) -> Any:
        if cls.nest_config:
            return None if meta["config"] is None else config_cls(**meta["config"])
        names = cls.config_fields or [f.name for f in dataclasses.fields(config_cls)]
        return config_cls(**{name: meta[name] for name in names})

    def select_classes(self, rows: Sequence[int]) -> Head:
        """A head over a subset of classes (in the given order), e.g. ImageNet-A's 200 of ImageNet's 1000."""
        tensors, meta = self.export()
        rows = list(rows)
        for name in self.class_rows:
            tensors[name] = tensors[name][rows]
        for name in self.class_columns:
            tensors[name] = tensors[name][:, rows]
        return type(self).from_export(tensors, meta)


class CosineHead(Head):
    """The frozen base classifier t (C, D) and CLIP's logit scale tau: logits = tau * cos(image side, class side).
    Subclasses change the class side (``classifier``) or the image side (``image_features``)."""

    class_rows: ClassVar[tuple[str, ...]] = ("base_text_features",)
    frozen_tensors: ClassVar[tuple[str, ...]] = ("base_text_features",)
    scalars: ClassVar[tuple[str, ...]] = ("logit_scale",)
    base_text_features: torch.Tensor  # buffers (registered in __init__), declared for the type checker
    logit_scale: torch.Tensor

    def __init__(self, base_text_features: torch.Tensor, logit_scale: float):
        super().__init__()
        self.register_buffer("base_text_features", base_text_features.detach().float().clone())  # (C, D)
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"base_text_features": self.base_text_features}

    def classifier(self) -> torch.Tensor:
        return self.base_text_features  # (C, D)

    def image_features(self, image_features: torch.Tensor) -> torch.Tensor:
        return image_features.float()  # (N, D)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """(N, D) un-normalised image features -> (N, C) logits."""
        return cosine_logits(self.image_features(image_features), self.classifier(), self.logit_scale)

    def column_form(self) -> bool:
        """Whether training uses the column-scaled form of ``forward`` (a subclass with its own ``forward`` trains
        through that)."""
        return type(self).forward is CosineHead.forward

    def image_side_trains(self) -> bool:
        """Whether training changes the image side tau * f / |f| (a subclass whose ``image_features`` holds
        trainable parameters says so); if not, ``train_inputs`` is that image side."""
        return type(self).image_features is not CosineHead.image_features

    def train_inputs(self, image_features: torch.Tensor) -> torch.Tensor:
        if not self.column_form() or self.image_side_trains():
            return image_features
        return scaled_unit(self.image_features(image_features), self.logit_scale)

    def train_z(self, inputs: torch.Tensor) -> torch.Tensor:
        """The image side tau * f / |f| of a batch of ``train_inputs`` (column form)."""
        if self.image_side_trains():
            return scaled_unit(self.image_features(inputs), self.logit_scale)
        return inputs

    def train_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """The same logits in the column-scaled form (``column_cosine``), cheaper to train through."""
        if not self.column_form():
            return self(inputs)
        return column_cosine(self.train_z(inputs), self.classifier())


@dataclass
class FitContext:
    """What a method's fit receives: the run's features (``taskres.features.Features``) and its settings."""

    base: torch.Tensor  # (C, D) base classifier: mean un-normalised text embedding over templates
    logit_scale: float  # tau = exp(logit_scale) of the backbone
    # the training views (see taskres.views) with their (N,) labels, the few-shot val split, the test split
    features: Features
    optim: OptimConfig | None  # None for training-free methods
    seed: int
    classnames: Sequence[str] = ()
    templates: Sequence[str] = ()
    shots: int = 0
    dataset: str = ""
    backbone: Backbone | None = None  # for methods with the text encoder in the loop
    device: str = "cpu"
    quiet: bool = False
    on_epoch: Callable[[dict], None] | None = None
    # protocol "official": the method runs as its public code (Method.official); with ``public_selection`` (its
    # public code selects on other splits) the fit is shown the test split and the dataset's whole val split
    protocol: str = "default"
    public_selection: bool = False

    @property
    def train_views(self) -> torch.Tensor | TrainViews:
        """The few-shot images' features per epoch: a (V, N, D) tensor or ViewBank of cached views (V = 1: the
        test transform), or OnlineViews (fresh augmentations, encoded each epoch)."""
        return self.features.train_views

    @property
    def train_labels(self) -> torch.Tensor:
        return self.features.train_labels  # (N,)

    @property
    def val_features(self) -> torch.Tensor | None:
        return self.features.val  # (M, D) few-shot validation features (test transform), or None

    @property
    def val_labels(self) -> torch.Tensor | None:
        return self.features.val_labels  # (M,)

    @property
    def test_features(self) -> torch.Tensor | None:
        return self.features.test if self.public_selection else None  # (T, D)

    @property
    def test_labels(self) -> torch.Tensor | None:
        return self.features.test_labels if self.public_selection else None

    @property
    def full_val_features(self) -> torch.Tensor | None:
        return self.features.full_val if self.public_selection else None  # (M, D) the dataset's whole val split

    @property
    def full_val_labels(self) -> torch.Tensor | None:
        return self.features.full_val_labels if self.public_selection else None

    @property
    def has_val(self) -> bool:
        return self.val_features is not None and len(self.val_features) > 0

    def train(
        self, module: nn.Module, optim: OptimConfig | None = None, on_epoch: Callable[[dict], None] | None = None
    ) -> list[dict]:
        """Train ``module``'s parameters on the training views with the run's optimiser, seed and device."""
        config = optim or self.optim
        assert config is not None, "a trained method's fit context has an optimiser"
        return fit(
            module,
            self.train_views,
            self.train_labels,
            config,
            seed=self.seed,
            device=self.device,
            on_epoch=on_epoch or self.on_epoch,
            quiet=self.quiet,
        )


@dataclass(frozen=True)
class Artifact:
    """A file a method adds to the run folder; ``metrics_key`` records its path in metrics.json."""

    filename: str
    write: Callable[[Path], None]
    metrics_key: str | None = None


@dataclass
class Fitted:
    """What a method's fit returns: the trained head, values for metrics.json (``info``), heads to evaluate on the
    test split beside it (``f"{name}_accuracy"`` in metrics.json), files for the run folder, and the adapted encoder
    of a method that changes the encoder."""

    head: Head
    info: dict[str, Any] = field(default_factory=dict)
    extra_heads: dict[str, Head] = field(default_factory=dict)
    artifacts: list[Artifact] = field(default_factory=list)
    # the encoder whose features the head reads, where the method changed it (CLIP-LoRA's adapters, merged): the
    # run's test and val splits are encoded through it; None: the run's backbone
    backbone: Backbone | None = None
