"""`taskres sweep`: a grid of runs in one process that resumes, isolates failures and splits across machines.

An experiment folder holds the grid (``EXP/sweep.json``), one run folder per cell under ``EXP/runs/`` (the files
``taskres train`` writes), and ``EXP/failures.jsonl``. A cell whose run folder has ``metrics.json`` is done and
skipped, so a rerun of the same command finishes the rest; killing the process loses at most the cell in progress.
Each backbone is loaded once, each dataset opened once, and one FeatureCache serves every cell, so features stay in
memory between the cells that share them.

    taskres sweep EXP --dataset dtd,eurosat --root DATA --backbone RN50 --methods taskres,linear-probe \\
        --shots 1,2,4,8,16 --seeds 1,2,3
    taskres sweep EXP --preset paper-fewshot --root DATA --backbone RN50 [--shard 2/4]
"""

from __future__ import annotations

import json
import logging
import re
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

from taskres.atomic import write_json
from taskres.data.benchmarks import IMAGENET_VARIANTS, PAPER_DATASETS
from taskres.errors import TaskResError, TaskResValueError, suggest

logger = logging.getLogger(__name__)

GRID_FILE, FAILURES = "sweep.json", "failures.jsonl"
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


@dataclass(frozen=True)
class Grid:
    """What a sweep runs: every (dataset, backbone, method, shots, seed), plus zero-shot once per (dataset,
    backbone). ``options`` maps option flags to values; each applies to the methods that take it."""

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
        from taskres.methods.registry import option_flags

        known = list(discover()) + list(VARIANTS)
        for m in self.methods:
            if m not in known:
                raise TaskResValueError(
                    f"unknown method {m!r} in `methods`; {suggest(m, known)}known: {', '.join(known)}.", param="methods"
                )
        for name, values in (("shots", self.shots), ("seeds", self.seeds)):
            if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
                raise TaskResValueError(f"{name} must be a list of integers; got {list(values)!r}.", param=name)
        if any(k < 1 for k in self.shots):
            raise TaskResValueError(f"shots must all be >= 1; got {list(self.shots)!r}.", param="shots")
        if not self.datasets or not self.backbones:
            raise TaskResValueError("a sweep needs at least one dataset and one backbone.", param="dataset")
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
        if self.protocol == "official":
            from taskres.methods import get_method

            without = [m for m in self.methods if get_method(self.base_method(m)).official is None]
            if without:
                raise TaskResValueError(
                    f"`protocol` official: {', '.join(without)} have no official variant; run "
                    "them in a grid of the default protocol.",
                    param="protocol",
                )
            if self.views is not None:
                raise TaskResValueError("`protocol` official sets each method's views; drop `views`.", param="views")
        for name, values in self.grid.items():
            flag = grid_flag(name)
            if not values:
                raise TaskResValueError(f"grid option {name} has no values.", param="grid")
            if flag in self.options:
                raise TaskResValueError(f"{flag} is both a fixed option and a grid option; keep one.", param="grid")
            if not bases & set(flags[flag][1]):
                raise TaskResValueError(
                    f"grid option {name} applies to {' or '.join(flags[flag][1])}, none of "
                    f"which is in `methods` ({', '.join(self.methods)}).",
                    param="grid",
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
        import itertools

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


def parse_grid(specs: Sequence[str]) -> dict[str, tuple]:
    """``["alpha=0.1,0.5", "learn_alpha=false,true"]`` -> ``{"alpha": (0.1, 0.5), "learn_alpha": (False, True)}``,
    each value read as its option's type."""
    import typing

    from taskres.methods import discover
    from taskres.methods.registry import option_flags

    out: dict[str, tuple] = {}
    for spec in specs:
        name, eq, text = str(spec).partition("=")
        name = name.strip()
        if not eq or not name or not text.strip():
            raise TaskResValueError(
                f"grid must be NAME=V1,V2,... (e.g. alpha=0.1,0.5,1.0); got {spec!r}.", param="grid"
            )
        if name in out:
            raise TaskResValueError(
                f"grid option {name} is given twice; give its values once: {name}=V1,V2,...", param="grid"
            )
        field_name, methods = option_flags()[grid_flag(name)]
        annotation = typing.get_type_hints(discover()[methods[0]].config_cls)[field_name]
        out[name] = tuple(_parse_value(v.strip(), annotation, name) for v in text.split(",") if v.strip())
    return out


def _parse_value(text: str, annotation: Any, name: str) -> Any:
    import typing

    kind = annotation
    if typing.get_origin(annotation) is not typing.Literal and typing.get_args(annotation):
        kind = [a for a in typing.get_args(annotation) if a is not type(None)][0]  # Optional[X]: X
    try:
        if kind is bool:
            if text.lower() not in ("true", "false"):
                raise ValueError
            return text.lower() == "true"
        if typing.get_origin(kind) is typing.Literal:
            if text not in typing.get_args(kind):
                raise ValueError
            return text
        return kind(text)
    except ValueError:
        kind_name = getattr(kind, "__name__", None) or ", ".join(map(str, typing.get_args(kind)))
        raise TaskResValueError(
            f"grid option {name}: {text!r} is not a valid value (expected {kind_name}).", param="grid"
        ) from None


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


def open_experiment(exp: Path, grid: Grid, extend: bool = False) -> None:
    """Record the grid in EXP/sweep.json; an experiment of another grid is refused unless ``extend``."""
    exp.mkdir(parents=True, exist_ok=True)
    path = exp / GRID_FILE
    record = grid.to_json()
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise TaskResValueError(
                f"{str(path)!r} is not valid JSON; it is not a taskres experiment, or it was damaged.", param="exp"
            ) from None
        previous = {k: v for k, v in old.items() if k != "extended_from"}
        if previous == record:
            return  # the same grid, resumed (after an --extend too)
        if old != record:
            if not extend:
                diff = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
                raise TaskResValueError(
                    f"experiment {str(exp)!r} was written by another grid (it differs in "
                    f"{', '.join(diff)}); use another folder, or pass --extend to add this "
                    "grid's cells to it.",
                    param="exp",
                )
            record = {**record, "extended_from": old}
    write_json(path, record)


def run_sweep(
    exp: str | Path,
    grid: Grid,
    setup,
    shard: tuple[int, int] = (1, 1),
    extend: bool = False,
    progress: bool = True,
    replace_stale: bool = False,
) -> dict:
    """Run the grid's cells of this shard that are not finished. Returns counts: done (skipped), ran, failed.

    A finished cell whose run was made with other settings (an option, the views, the optimiser or the protocol
    changed since) is never reused: it fails, naming the difference, or with ``replace_stale`` it is run again.
    """
    from tqdm.auto import tqdm

    from taskres import distributed

    cluster = distributed.current()
    exp = Path(exp)
    if cluster.is_main:
        open_experiment(exp, grid, extend)
    cluster.barrier("opening the experiment folder")
    cells = shard_cells(grid.cells(), shard)
    counts = {"cells": len(cells), "skipped": 0, "ran": 0, "failed": 0}
    todo: list[Cell] = []
    stale: list[Cell] = []
    for c in cells:
        if not _finished(exp, c, grid):
            todo.append(c)
        elif (difference := _settings_difference(exp, c, grid)) is not None:
            (todo if replace_stale else stale).append(c)
            if not replace_stale:
                _record_failure(
                    exp,
                    c,
                    TaskResValueError(
                        f"run folder {str(exp / 'runs' / c.folder)!r} holds a run made with other settings "
                        f"({difference}); use another experiment folder, or --grid to compare settings."
                    ),
                )
    counts["failed"] = len(stale)
    counts["skipped"] = len(cells) - len(todo) - len(stale)
    cache = setup.cache()
    if cluster.active:  # torchrun: the ranks encode every cell's features together, then split the cells
        cluster.agree(
            "the cells to run",
            [c.folder for c in todo],
            "every rank must see the same experiment "
            "folder (one on a filesystem that every node mounts) and run the same sweep command.",
        )
        _encode_cells(todo, grid, setup, cache)
        cache.cluster = None  # each rank now runs its own cells, alone, on the features in the cache
        todo = cluster.share(todo)
        counts["skipped"] += len(cells) - len(todo) - len(stale) - counts["skipped"]
    bar = tqdm(
        total=len(cells),
        initial=counts["skipped"],
        desc="sweep",
        unit="cell",
        disable=not progress or not cluster.is_main,
    )
    try:
        for (backbone_name, dataset_name), group in _groups(todo):
            try:
                backbone, dataset = _load(backbone_name, dataset_name, grid, setup)
            except TaskResError as err:
                for cell in group:
                    _record_failure(exp, cell, err)
                    counts["failed"] += 1
                    bar.update(1)
                continue
            for cell in group:
                t0 = time.perf_counter()
                try:
                    _run_cell(exp, cell, grid, backbone, dataset, setup, cache)
                    counts["ran"] += 1
                except KeyboardInterrupt:
                    raise
                except Exception as err:  # a failing cell is recorded and the sweep goes on
                    _record_failure(exp, cell, err)
                    counts["failed"] += 1
                logger.info("cell %s: %.1f s", cell.folder, time.perf_counter() - t0)
                bar.update(1)
    finally:
        bar.close()
    if cluster.active:  # rank 0 reports the whole job once every rank has finished its cells
        shares = cluster.gather({k: counts[k] for k in ("ran", "failed")}, "running the cells")
        counts.update(
            ran=sum(c["ran"] for c in shares),
            failed=sum(c["failed"] for c in shares),
            skipped=counts["cells"] - sum(c["ran"] + c["failed"] for c in shares) + len(stale),
        )
    return counts


def _encode_cells(cells: Sequence[Cell], grid: Grid, setup, cache) -> None:
    """Every feature the cells read, encoded collectively (the ranks of a torchrun job share each split's images).
    A cell whose settings or data are invalid is left to fail, and be recorded, when it runs; those checks come
    before any encoding, so every rank skips the same cells."""
    from taskres.features import encode_features, encode_split
    from taskres.workflow import prepare_training

    for (backbone_name, dataset_name), group in _groups(cells):
        try:
            backbone, dataset = _load(backbone_name, dataset_name, grid, setup)
        except TaskResError:
            continue
        for cell in group:
            try:
                targets = [dataset] if cell.method == ZERO_SHOT else [_eval_target(name, grid) for name in grid.eval_on]
                if cell.method != ZERO_SHOT:
                    config = _resolve(cell, grid, dataset.name)
                    fewshot, _ = prepare_training(backbone, dataset, config)
            except TaskResError:
                continue
            if cell.method != ZERO_SHOT:
                encode_features(
                    backbone,
                    dataset,
                    fewshot,
                    config.views,
                    setup,
                    seed=config.seed,
                    scale=config.view_scale,
                    cache=cache,
                    full_val=config.selects_publicly,
                )
            for target in targets:
                encode_split(backbone, target, target.test, setup, cache, desc=f"test {target.name}")


def _eval_target(name: str, grid: Grid):
    return DatasetRef(name, root=next((d.root for d in grid.datasets if d.root), None)).open()


def _finished(exp: Path, cell: Cell, grid: Grid) -> bool:
    run = exp / "runs" / cell.folder
    if not (run / "metrics.json").is_file():
        return False
    if cell.method == ZERO_SHOT:
        return True
    return all((run / f"eval-{name}" / "metrics.json").is_file() for name in grid.eval_on)


def _settings_difference(exp: Path, cell: Cell, grid: Grid) -> str | None:
    """What differs between a finished cell's config.json and the settings the grid gives it, or None."""
    recorded = json.loads((exp / "runs" / cell.folder / "config.json").read_text())
    if cell.method == ZERO_SHOT:
        want = {"protocol": _zeroshot_protocol(grid)}
    else:
        try:
            want = _resolve(cell, grid, cell.dataset).record()
        except TaskResError as err:
            return f"the grid's settings are invalid: {err}"
        want = {k: want[k] for k in ("method", "shots", "seed", "views", "method_config", "optim", "protocol")}
        want = json.loads(json.dumps(want))
    for key, value in want.items():
        if recorded.get(key, "default" if key == "protocol" else None) != value:
            return f"{key}: {recorded.get(key)!r} in the run, {value!r} in the grid"
    return None


def _zeroshot_protocol(grid: Grid) -> Literal["default", "official"]:
    """Zero-shot selects nothing: under no-val it is the default zero-shot; under official, CoOp's."""
    return "official" if grid.protocol == "official" else "default"


def _resolve(cell: Cell, grid: Grid, dataset_name: str):
    from taskres.config import TrainConfig

    return TrainConfig.resolve(
        grid.base_method(cell.method),
        cell.shots,
        cell.seed,
        dataset_name,
        options=grid.method_options(cell.method, cell.grid_values),
        optim=grid.optim if _trained(cell.method, grid) else {},
        # the grid's values as given; TrainConfig checks them
        views=cast("int | Literal['online'] | None", grid.views) if _views_apply(cell.method, grid) else None,
        protocol=cast("Literal['default', 'official', 'no-val']", grid.protocol),
    )


def _groups(cells: Sequence[Cell]) -> Iterator[tuple[tuple[str, str], list[Cell]]]:
    groups: dict[tuple[str, str], list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.backbone, c.dataset), []).append(c)
    yield from groups.items()


_loaded: dict[str, Any] = {}


def _load(backbone_name: str, dataset_name: str, grid: Grid, setup):
    """The backbone (kept loaded for the sweep) and the dataset of a group of cells."""
    from taskres.backbones import load_backbone

    key = f"{backbone_name}|{setup.device}|{setup.precision}|{setup.weights_dir}"
    if key not in _loaded:
        _loaded.clear()  # one backbone in memory at a time: groups come backbone by backbone
        _loaded[key] = load_backbone(
            backbone_name, device=setup.device, precision=setup.precision, weights_dir=setup.weights_dir
        )
    ref = next(d for d in grid.datasets if d.name == dataset_name)
    return _loaded[key], ref.open()


def _run_cell(exp: Path, cell: Cell, grid: Grid, backbone, dataset, setup, cache) -> None:
    from taskres.reuse import evaluate_run
    from taskres.workflow import train, zeroshot

    run = exp / "runs" / cell.folder
    if cell.method == ZERO_SHOT:
        zeroshot(backbone, dataset, setup, out=run, overwrite=True, protocol=_zeroshot_protocol(grid), cache=cache)
        return
    if not (run / "metrics.json").is_file() or _settings_difference(exp, cell, grid) is not None:
        train(backbone, dataset, _resolve(cell, grid, dataset.name), setup, out=run, overwrite=True, cache=cache)
    for name in grid.eval_on:
        out = run / f"eval-{name}"
        if not (out / "metrics.json").is_file():
            target = _eval_target(name, grid)
            evaluate_run(run, setup, dataset=target, out=out, backbone=backbone, cache=cache)


def _trained(method: str, grid: Grid) -> bool:
    from taskres.methods import get_method

    return get_method(grid.base_method(method)).trained


def _views_apply(method: str, grid: Grid) -> bool:
    """Grid-wide --views apply to the methods that train on augmented views (not the test-transform-only probe)."""
    from taskres.methods import get_method

    spec = get_method(grid.base_method(method))
    return grid.views is not None and not spec.test_view_only and (spec.trained or grid.views != "online")


def _record_failure(exp: Path, cell: Cell, err: BaseException) -> None:
    record = {
        "cell": cell.folder,
        **json.loads(json.dumps(asdict(cell))),
        "error": f"{type(err).__name__}: {err}",
        "user_error": isinstance(err, TaskResError),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "traceback": "" if isinstance(err, TaskResError) else traceback.format_exc(),
    }
    with open(exp / FAILURES, "a") as f:
        f.write(json.dumps(record) + "\n")
    logger.warning("cell %s failed: %s", cell.folder, record["error"])


# ---- presets ---------------------------------------------------------------------------------------------------

ABLATION_GRID = {"alpha": (0.1, 0.5, 1.0), "learn_alpha": (False, True), "adapter_form": ("residual", "direct")}
PRESETS = ("paper-fewshot", "paper-dg", "paper-ablations", "demo-ablations")


def preset(name: str, root: str | None, backbones: Sequence[str], exp: str | Path | None = None) -> Grid:
    """The paper's grids: ``paper-fewshot`` (its Fig. 3: the 11 datasets, 1-16 shots, seeds 1-3, zero-shot, linear
    probe, CoOp, CLIP-Adapter, Tip-Adapter-F, TaskRes, TaskRes*, and the newer LP++, ZS-LP and CLAP),
    ``paper-dg`` (its Table 1: 16-shot ImageNet,
    evaluated on V2, Sketch, A and R), ``paper-ablations`` (its Tables 2 and 5 on ImageNet: TaskRes with alpha 0.1,
    0.5, 1.0, fixed or learned; the classifier adapters, residual and direct) and ``demo-ablations`` (the same grid on
    the shipped demo model and its six generated tasks, written under EXP/tasks, at 1, 4, 16 shots: minutes on a
    CPU)."""
    if name not in PRESETS:
        raise TaskResValueError(
            f"unknown preset {name!r}; {suggest(name, PRESETS)}known: {', '.join(PRESETS)}.", param="preset"
        )
    if name == "demo-ablations":
        from taskres.demo.synthetic import write_demo_tasks

        if exp is None:
            raise TaskResValueError("preset demo-ablations writes its tasks under the experiment folder.", param="exp")
        tasks = write_demo_tasks(Path(exp) / "tasks", seed=0)
        return Grid(
            tuple(DatasetRef(t["name"], data=str(t["image_dir"]), split_file=str(t["split_file"])) for t in tasks),
            ("taskres-demo",),
            ("taskres", "classifier-adapter"),
            shots=(1, 4, 16),
            grid=dict(ABLATION_GRID),
        )
    if root is None:
        raise TaskResValueError(f"preset {name} reads the benchmarks under `root`; pass it.", param="root")
    backbones = tuple(backbones) or ("RN50",)
    if name == "paper-fewshot":
        return Grid(
            tuple(DatasetRef(d, root=root) for d in PAPER_DATASETS),
            backbones,
            ("linear-probe", "coop", "clip-adapter", "tip-adapter-f", "taskres", "taskres*", "lp++", "zs-lp", "clap"),
        )
    if name == "paper-ablations":
        return Grid(
            (DatasetRef("imagenet", root=root),), backbones, ("taskres", "classifier-adapter"), grid=dict(ABLATION_GRID)
        )
    return Grid((DatasetRef("imagenet", root=root),), backbones, ("taskres",), shots=(16,), eval_on=IMAGENET_VARIANTS)


def grid_from_toml(path: str | Path) -> dict:
    """The keys of a ``--config FILE.toml`` (the sweep's flags with underscores: dataset, root, backbone, methods,
    shots, seeds, eval_on, views, protocol, preset, and method and optimiser options by flag name)."""
    try:
        import tomllib  # type: ignore[import-not-found,unused-ignore]  # Python 3.11+; mypy checks as 3.10
    except ImportError:  # Python 3.10
        raise TaskResValueError(
            "`config` files need Python 3.11 or later (tomllib); pass the grid as flags.", param="config"
        ) from None

    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise TaskResValueError(f"config file {str(path)!r} does not exist.", param="config") from None
    except tomllib.TOMLDecodeError as err:
        raise TaskResValueError(f"config file {str(path)!r} is not valid TOML ({err}).", param="config") from None
