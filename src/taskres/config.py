"""What a run is told: ``Setup`` (how features are computed: device, precision, cache) and ``TrainConfig`` (the
method, its config and optimiser, shots, seed, views, protocol), each checked when made. The rules that involve a
method's own config are the method's (``taskres.methods.Method``): this module names no method's fields."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

from taskres import distributed
from taskres.backbones.engines import ENGINES
from taskres.cache import FeatureCache
from taskres.data.images import DEFAULT_MAX_PIXELS, TRAIN_SCALE
from taskres.devices import parse_device
from taskres.engine import OptimConfig
from taskres.errors import TaskResValueError, check_choice, invalid
from taskres.features import ONLINE
from taskres.methods.registry import Method, OfficialVariant, discover, get_method

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's largest seed
PROTOCOLS: Final = ("default", "official", "no-val")


@dataclass(frozen=True)
class Setup:
    """How features are computed: device, precision, image encoder engine, cache, encoder batch size, progress
    bars, bad images."""

    device: str = "cpu"
    precision: str = "fp32"
    # what runs the image encoder (taskres.backbones.engines); None: eager, or a reloaded run's recorded engine
    engine: str | None = None
    cache_dir: str | None = None
    batch_size: int = 32
    workers: int | None = None  # image-decoding processes; None: auto (taskres.encoding.loader_workers)
    quiet: bool = False
    skip_bad_images: bool = False
    weights_dir: str | None = None
    max_image_pixels: int | None = DEFAULT_MAX_PIXELS  # larger images are refused (None: no limit)

    def __post_init__(self) -> None:
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            raise invalid("max_image_pixels", "be >= 1 (pixels of the largest image to decode)", self.max_image_pixels)
        if self.batch_size < 1:
            raise invalid("batch_size", "be >= 1 (images per encoder batch)", self.batch_size)
        if self.workers is not None and self.workers < 0:
            raise invalid("workers", "be >= 0 (0 = load images in the main process)", self.workers)
        parse_device(self.device)
        if self.engine is not None:
            check_choice("engine", self.engine, ENGINES)

    def cache(self) -> FeatureCache:
        """The feature cache; under torchrun, the job's ranks encode through it together (taskres.distributed)."""
        return FeatureCache(
            self.cache_dir,
            batch_size=self.batch_size,
            workers=self.workers,
            quiet=self.quiet,
            max_pixels=self.max_image_pixels,
            cluster=distributed.current(),
        )

    def record(self) -> dict:
        return {"device": self.device, "precision": self.precision, "skip_bad_images": self.skip_bad_images}


@dataclass(frozen=True)
class TrainConfig:
    """A training run of one method. ``TrainConfig.preset(method, shots, seed, dataset)`` gives the method's
    published settings; the plain defaults are TaskRes's.

    ``method_config`` None means the method's default config; ``optim`` is None for training-free methods (it is
    set so).
    """

    shots: int
    seed: int
    method: str = "taskres"
    method_config: Any = None  # the method's config dataclass
    optim: OptimConfig | None = field(default_factory=OptimConfig)
    views: int | Literal["online"] = 10  # cached augmented views per image (0: test transform), or "online"
    fewshot_file: str | None = None  # the few-shot images from a file (Dassl's split_fewshot pickle, a run's split)
    # "official": the method as its public code runs it; "no-val": nothing is selected or tuned on a validation
    # split (CLAP's protocol): no val shots are drawn, and methods that search use their fixed values
    protocol: Literal["default", "official", "no-val"] = "default"

    @classmethod
    def preset(cls, method: str, shots: int, seed: int, dataset: str = "", **overrides) -> TrainConfig:
        """The method's published settings for ``dataset`` (a benchmark name, or "" for others); with
        ``protocol="official"`` among the overrides, the views of its public code."""
        spec = get_method(method)
        optim = spec.optim_preset(shots, dataset) if spec.optim_preset is not None else None
        views = spec.official.views if overrides.get("protocol") == "official" and spec.official else spec.views
        values = dict(method_config=spec.default_config(dataset), optim=optim, views=views)
        return cls(shots=shots, seed=seed, method=method, **{**values, **overrides})

    @classmethod
    def resolve(
        cls,
        method: str,
        shots: int,
        seed: int,
        dataset: str = "",
        options: dict[str, Any] | None = None,
        optim: dict[str, Any] | None = None,
        views: int | Literal["online"] | None = None,
        protocol: Literal["default", "official", "no-val"] = "default",
        fewshot_file: str | None = None,
    ) -> TrainConfig:
        """The method's preset for ``dataset`` with the given settings on top: ``options`` (config fields of the
        method, e.g. ``{"alpha": 1.0}``), ``optim`` (OptimConfig fields, e.g. ``{"lr": 1e-3}``), ``views`` (default:
        the method's, or its public code's under the official protocol). What ``taskres train`` and ``taskres
        sweep`` run. Under ``protocol="no-val"`` the method's ``no_val_options`` (its fixed values) are the
        defaults."""
        spec = get_method(method)
        optim = dict(optim or {})
        options = dict(options or {})
        if protocol == "no-val" and spec.no_val_options is not None:
            options = {**spec.no_val_options(spec.default_config(dataset), options), **options}
        if optim and not spec.trained:
            raise TaskResValueError(
                f"{', '.join(f'`{k}`' for k in optim)}: method {method!r} is training-free; drop the setting(s).",
                param=next(iter(optim)),
            )
        unused = [k for k in optim if k in spec.unused_optim]
        if unused:
            raise TaskResValueError(
                f"{', '.join(f'`{k}`' for k in unused)}: method {method!r} does not use it "
                f"({spec.unused_optim_reason}); drop the setting.",
                param=unused[0],
            )
        config = cls.preset(method, shots, seed, dataset)
        method_config = spec.configure(config.method_config, **options)
        optim_config = dataclasses.replace(config.optim, **optim) if config.optim is not None else None
        if views is None:
            views = spec.official.views if protocol == "official" and spec.official is not None else config.views
        return dataclasses.replace(
            config,
            method_config=method_config,
            optim=optim_config,
            views=views,
            fewshot_file=fewshot_file,
            protocol=protocol,
        )

    def __post_init__(self) -> None:
        if isinstance(self.shots, bool) or not isinstance(self.shots, int) or self.shots < 1:
            raise invalid("shots", "be an integer >= 1 (images per class)", self.shots)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise invalid("seed", f"be an integer in [0, {MAX_SEED}] (the range of torch's generators)", self.seed)
        if self.views != ONLINE and (isinstance(self.views, bool) or not isinstance(self.views, int) or self.views < 0):
            raise invalid("views", "be an integer >= 0 (0 = no augmentation) or 'online'", self.views)
        spec = self.spec
        self._settle_method(spec)
        if self.views == ONLINE and (not spec.trained or spec.test_view_only):
            raise TaskResValueError(
                f"`views` online draws a fresh augmentation of every training image in every "
                f"epoch, but method {self.method!r} "
                f"{'is training-free' if not spec.trained else 'trains on the test transform'}; "
                f"use `views` {spec.views} (its default).",
                param="views",
            )
        self._check_protocol(spec)
        if spec.adapt_backbone is not None and self.views != ONLINE:
            raise TaskResValueError(
                f"method {self.method!r} trains through the image encoder on a fresh augmentation of the images "
                f"at every step; set `views` online (its default); got {self.views}.",
                param="views",
            )
        if spec.test_view_only and self.views != 0:
            raise TaskResValueError(
                f"method {self.method!r} trains on the test-transform features of the few-shot "
                f"images (no augmentation); set `views` to 0 (its default); got {self.views}.",
                param="views",
            )

    def _settle_method(self, spec: Method) -> None:
        """The method's config (its default when None) and optimiser (None when training-free), checked."""
        if self.method_config is None:
            object.__setattr__(self, "method_config", spec.default_config())
        if not isinstance(self.method_config, spec.config_cls):
            raise TaskResValueError(
                f"method {self.method!r} takes a {spec.config_cls.__name__}, got {type(self.method_config).__name__}.",
                param="method_config",
            )
        if not spec.trained:
            object.__setattr__(self, "optim", None)  # training-free: nothing is optimised
        elif not isinstance(self.optim, OptimConfig):
            raise TaskResValueError(
                f"method {self.method!r} is trained and needs an OptimConfig; got {self.optim!r}.", param="optim"
            )

    def _check_protocol(self, spec: Method) -> None:
        """no-val: the config selects nothing on val (``Method.val_option``); official: the method has an official
        variant, and the views are its public code's."""
        check_choice("protocol", self.protocol, PROTOCOLS)
        option = spec.val_option(self.method_config) if spec.val_option is not None else None
        if self.protocol == "no-val" and option is not None:
            raise TaskResValueError(
                f"`protocol` no-val selects nothing on a validation split, but method "
                f"{self.method!r} is set to search on it; set `{option}` none (with its fixed "
                "values).",
                param=option,
            )
        if self.protocol != "official":
            return
        if spec.official is None:
            official = [name for name, m in discover().items() if m.official is not None]
            raise TaskResValueError(
                f"`protocol` official runs a method as its public code does; method "
                f"{self.method!r} has no official variant (methods with one: "
                f"{', '.join(official)}).",
                param="protocol",
            )
        if self.views != spec.official.views:
            raise TaskResValueError(
                f"`protocol` official trains {self.method} on `views` "
                f"{spec.official.views}, as its public code; got `views` {self.views}. "
                "Drop the views setting.",
                param="views",
            )

    @property
    def spec(self) -> Method:
        return get_method(self.method)

    @property
    def official(self) -> OfficialVariant | None:
        return self.spec.official if self.protocol == "official" else None

    @property
    def selects_publicly(self) -> bool:
        """Whether the method's public code, which the official protocol follows, selects on the whole val split or
        on test (such a method also encodes those splits)."""
        return self.official is not None and self.official.selection == "public"

    @property
    def view_scale(self) -> tuple[float, float]:
        return self.official.view_scale if self.official is not None else TRAIN_SCALE

    def record(self) -> dict:
        """The run's training settings for config.json."""
        spec = self.spec
        return {
            "method": self.method,
            "shots": self.shots,
            "seed": self.seed,
            "views": self.views,
            "fewshot_file": self.fewshot_file,
            "protocol": self.protocol,
            "view_scale": list(self.view_scale),
            "method_config": asdict(self.method_config),
            "optim": asdict(self.optim) if self.optim is not None else None,
            "base": spec.base_record(self.method_config) if spec.base_record is not None else None,
        }

    def check_files(self) -> None:
        """The method's checks of the files its config names (``Method.check_files``), before any encoding."""
        if self.spec.check_files is not None:
            self.spec.check_files(self.method_config)
