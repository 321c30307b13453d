"""What a sweep runs: the grid of (dataset, backbone, method, shots, seed) cells, their run folders, their training
settings (``Grid.config``, the library's ``TrainConfig``) and the shards that split them across machines."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, cast

from taskres.errors import TaskResError, TaskResValueError, suggest

ZERO_SHOT = "zero-shot"
# Grid entries that are a method with some options set: the paper's TaskRes* (the enhanced base).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"taskres*": ("taskres", {"enhance_base": True})}


@dataclass(frozen=True)
class DatasetRef:
    """A dataset of the grid: a benchmark ``name`` under ``root``, or a split file / ImageFolder at ``data``."""

    name: str
    root: str | None = None
    data: str | None = None
    split_file: str | None = None
    templates: tuple[str, ...] | None = None

    def open(self):
        from taskres.data.sources import open_dataset

        if self.data is not None:  # named as the grid names it (its cells' folders and records)
            return replace(open_dataset(self.data, self.split_file, self.templates), name=self.name)
        return open_dataset(dataset=self.name, root=self.root, templates=self.templates)


class CellSettingsError(TaskResValueError):
    """The library refused a cell's settings; ``method`` is the cell's (its options name the parameters)."""

    def __init__(self, err: TaskResError, method: str):
        super().__init__(str(err), param=err.param)
        self.method = method


@dataclass(frozen=True)
class Grid:
    """What a sweep runs: every (dataset, backbone, method, shots, seed), plus zero-shot once per (dataset,
    backbone). ``options`` maps option flags to values; each applies to the methods that take it. Every cell's
    settings are checked by the library (``TrainConfig``) when the grid is made, so a grid the library would refuse
    is refused before anything runs."""

    datasets: tuple[DatasetRef, ...]
    backbones: tuple[str, ...]
    methods: tuple[str, ...]
    shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    seeds: tuple[int, ...] = (1, 2, 3)
    options: dict[str, Any] = field(default_factory=dict)
    optim: dict[str, Any] = field(default_factory=dict)
    views: int | str | None = None
    protocol: str = "default"
    eval_on: tuple[str, ...] = ()
    # option name (its flag without dashes, e.g. "alpha", "learn_alpha") -> the values to cross with shots and seeds
    grid: dict[str, tuple] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from taskres.methods import discover

        self._drop_repeats()
        known = [m for m in discover() if m != ZERO_SHOT] + list(VARIANTS)
        for m in self.methods:
            if m == ZERO_SHOT:
                raise TaskResValueError(
                    "zero-shot runs once per dataset and backbone in every sweep; drop it from `methods`.",
                    param="methods",
                )
            if m not in known:
                raise TaskResValueError(
                    f"unknown method {m!r} in `methods`; {suggest(m, known)}known: {', '.join(known)}.", param="methods"
                )
        for name, values in (("shots", self.shots), ("seeds", self.seeds)):
            if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
                raise TaskResValueError(f"{name} must be a list of integers; got {list(values)!r}.", param=name)
        if not self.datasets or not self.backbones:
            raise TaskResValueError("a sweep needs at least one dataset and one backbone.", param="dataset")
        if not self.methods:
            raise TaskResValueError("methods must name at least one method (zero-shot runs with every grid).")
        self._check_options()
        for cell in self.cells():
            if cell.method != ZERO_SHOT:
                try:
                    self.config(cell, cell.dataset)
                except TaskResError as err:
                    raise CellSettingsError(err, self.base_method(cell.method)) from None

    def _drop_repeats(self) -> None:
        """A value given twice (``alpha=0.5,0.50``, ``--seeds 1,1``) is one cell, run and counted once."""
        for name in ("datasets", "backbones", "methods", "shots", "seeds", "eval_on"):
            object.__setattr__(self, name, _unique(getattr(self, name)))
        object.__setattr__(self, "grid", {k: _unique(v) for k, v in self.grid.items()})

    def _check_options(self) -> None:
        from taskres.methods.registry import option_flags

        flags = option_flags()
        bases = {self.base_method(m) for m in self.methods}
        for flag in self.options:
            if flag not in flags:
                raise TaskResValueError(
                    f"unknown method option {flag!r}; {suggest(flag, flags)}known: {', '.join(flags)}.", param="options"
                )
            if not bases & set(flags[flag][1]):
                raise TaskResValueError(
                    f"{flag} applies to {' or '.join(flags[flag][1])}, none of which is in "
                    f"`methods` ({', '.join(self.methods)}).",
                    param="options",
                )
        for name, values in self.grid.items():  # messages that name the grid option itself: no param
            flag = grid_flag(name)
            if not values:
                raise TaskResValueError(f"grid option {name} has no values.")
            if flag in self.options:
                raise TaskResValueError(f"{flag} is both a fixed option and a grid option; keep one.", param="grid")
            if not bases & set(flags[flag][1]):
                raise TaskResValueError(
                    f"grid option {name} applies to {' or '.join(flags[flag][1])}, none of "
                    f"which is in `methods` ({', '.join(self.methods)}).",
                )

    @staticmethod
    def base_method(method: str) -> str:
        return VARIANTS[method][0] if method in VARIANTS else method

    def method_options(self, method: str, grid_values: tuple[tuple[str, Any], ...] = ()) -> dict[str, Any]:
        """The config fields that the grid's options (and a cell's grid values) set for ``method``."""
        from taskres.methods.registry import option_flags

        base = self.base_method(method)
        flags = option_flags()
        given = {**self.options, **{grid_flag(name): v for name, v in grid_values}}
        values = {flags[flag][0]: v for flag, v in given.items() if base in flags[flag][1]}
        return {**values, **(VARIANTS[method][1] if method in VARIANTS else {})}

    def grid_values(self, method: str) -> list[tuple[tuple[str, Any], ...]]:
        """The combinations of grid values that apply to ``method`` (one empty combination if none applies)."""
        from taskres.methods.registry import option_flags

        base, flags = self.base_method(method), option_flags()
        names = [n for n in self.grid if base in flags[grid_flag(n)][1]]
        return [tuple(zip(names, combo)) for combo in itertools.product(*(self.grid[n] for n in names))]

    def cells(self) -> list[Cell]:
        """Every cell, in a fixed order (shards take every N-th)."""
        out = []
        for d in self.datasets:
            for b in self.backbones:
                out.append(Cell(d.name, b, ZERO_SHOT, 0, 0))
                for m in self.methods:
                    for values in self.grid_values(m):
                        for k in self.shots:
                            for s in self.seeds:
                                out.append(Cell(d.name, b, m, k, s, values))
        return out

    def config(self, cell: Cell, dataset_name: str):
        """A trained cell's TrainConfig: the method's preset for the dataset with the grid's settings; the
        optimiser options apply to the methods that train, the views to those that train on augmented views."""
        from taskres.config import TrainConfig
        from taskres.methods import get_method

        spec = get_method(self.base_method(cell.method))
        views_apply = self.views is not None and not spec.test_view_only and (spec.trained or self.views != "online")
        views_apply = views_apply and spec.adapt_backbone is None  # it trains on online views only
        return TrainConfig.resolve(
            spec.name,
            cell.shots,
            cell.seed,
            dataset_name,
            options=self.method_options(cell.method, cell.grid_values),
            optim={k: v for k, v in self.optim.items() if k not in spec.unused_optim} if spec.trained else {},
            # the grid's values as given; TrainConfig checks them
            views=cast("int | Literal['online'] | None", self.views) if views_apply else None,
            protocol=cast("Literal['default', 'official', 'no-val']", self.protocol),
        )

    def to_json(self) -> dict:
        record = asdict(self)
        record["datasets"] = [{k: v for k, v in asdict(d).items() if v is not None} for d in self.datasets]
        return json.loads(json.dumps(record))  # tuples as lists, as read back


@dataclass(frozen=True)
class Cell:
    dataset: str
    backbone: str
    method: str
    shots: int
    seed: int
    grid_values: tuple[tuple[str, Any], ...] = ()  # (option name, value) of the grid options that apply

    @property
    def folder(self) -> str:
        backbone = re.sub(r"[^A-Za-z0-9_.+-]+", "-", self.backbone).strip("-")
        method = self.method.replace("*", "-star")
        if self.grid_values:
            method += "/" + ",".join(f"{n}={_value_text(v)}" for n, v in self.grid_values)
        tail = ZERO_SHOT if self.method == ZERO_SHOT else f"{method}/{self.shots}shot-seed{self.seed}"
        return f"{self.dataset}/{backbone}/{tail}"


def _unique(values: Sequence) -> tuple:
    """``values`` in order, each once (0.5 and 0.50 are one value; True and 1 are not)."""
    out: list = []
    for v in values:
        if not any(v == u and type(v) is type(u) for u in out):
            out.append(v)
    return tuple(out)


def _value_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def grid_flag(name: str) -> str:
    """A grid option's flag: its name with dashes (``learn_alpha`` -> ``--learn-alpha``)."""
    from taskres.methods.registry import option_flags

    flag = "--" + name.replace("_", "-")
    if flag not in option_flags():
        raise TaskResValueError(
            f"unknown grid option {name!r}; {suggest(flag, option_flags())}known: "
            f"{', '.join(f.lstrip('-').replace('-', '_') for f in option_flags())}.",
            param="grid",
        )
    return flag


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 1 <= I <= N; None -> (1, 1)."""
    if text is None:
        return 1, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise TaskResValueError(f"shard must be I/N with 1 <= I <= N (e.g. 2/4); got {text!r}.", param="shard")
    return int(m.group(1)), int(m.group(2))


def shard_cells(cells: Sequence[Cell], shard: tuple[int, int]) -> list[Cell]:
    i, n = shard
    return [c for j, c in enumerate(cells) if j % n == i - 1]
