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
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from taskres.app.experiment import FAILURES, GRID_FILE, check_failures_file, read_grid, set_aside_damaged
from taskres.app.grid import ZERO_SHOT, Cell, DatasetRef, Grid, shard_cells
from taskres.atomic import write_json
from taskres.errors import TaskResError, TaskResValueError

logger = logging.getLogger(__name__)


def open_experiment(exp: Path, grid: Grid, extend: bool = False) -> None:
    """Record the grid in EXP/sweep.json; an experiment of another grid is refused unless ``extend``, and one whose
    sweep.json or failures.jsonl is damaged is refused naming the file."""
    exp.mkdir(parents=True, exist_ok=True)
    record = grid.to_json()
    old = read_grid(exp)
    check_failures_file(exp)
    if old is not None:
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
    write_json(exp / GRID_FILE, record)


def run_sweep(
    exp: str | Path,
    grid: Grid,
    setup,
    shard: tuple[int, int] = (1, 1),
    extend: bool = False,
    progress: bool = True,
    replace_stale: bool = False,
) -> dict:
    """Run the grid's cells of this shard that are not finished. Returns counts: done (skipped), ran, failed, and
    damaged (finished cells whose files could not be read back: set aside under EXP/damaged and run again).

    A finished cell whose run was made with other settings (an option, the views, the optimiser or the protocol
    changed since) is never reused: it fails, naming the difference, or with ``replace_stale`` it is run again.
    """
    from tqdm.auto import tqdm

    from taskres import distributed

    cluster = distributed.current()
    exp = Path(exp)
    cells = shard_cells(grid.cells(), shard)
    damaged = _open(exp, grid, extend, cells) if cluster.is_main else []
    cluster.barrier("opening the experiment folder")
    todo, stale = _triage(exp, cells, grid, replace_stale)
    counts = {"cells": len(cells), "skipped": len(cells) - len(todo) - len(stale), "ran": 0, "failed": len(stale)}
    counts["damaged"] = len(damaged)
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
        _run_cells(exp, todo, grid, setup, cache, counts, bar.update)
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


def _open(exp: Path, grid: Grid, extend: bool, cells: Sequence[Cell]) -> list[Path]:
    """Open the experiment (rank 0 alone) and set its damaged cells aside; returns where they went."""
    open_experiment(exp, grid, extend)
    return set_aside_damaged(exp, [c.folder for c in cells], grid.eval_on)


def _triage(exp: Path, cells: Sequence[Cell], grid: Grid, replace_stale: bool) -> tuple[list[Cell], list[Cell]]:
    """(the cells to run, the finished cells made with other settings, each recorded as a failure unless
    ``replace_stale``, which runs them again)."""
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
    return todo, stale


def _run_cells(exp: Path, cells: Sequence[Cell], grid: Grid, setup, cache, counts: dict, done) -> None:
    """Run the cells group by group (one backbone and dataset each), counting each as ran or failed."""
    for (backbone_name, dataset_name), group in _groups(cells):
        try:
            backbone, dataset = _load(backbone_name, dataset_name, grid, setup)
        except TaskResError as err:
            for cell in group:
                _record_failure(exp, cell, err)
                counts["failed"] += 1
                done(1)
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
            done(1)


def _encode_cells(cells: Sequence[Cell], grid: Grid, setup, cache) -> None:
    """Every feature the cells read, encoded collectively (the ranks of a torchrun job share each split's images).
    A cell whose settings or data are invalid is left to fail, and be recorded, when it runs; those checks come
    before any encoding, so every rank skips the same cells."""
    from taskres.backbones.official import official_image_backbone
    from taskres.features import encode_split, training_features
    from taskres.workflow import prepare_training

    for (backbone_name, dataset_name), group in _groups(cells):
        try:
            backbone, dataset = _load(backbone_name, dataset_name, grid, setup)
        except TaskResError:
            continue
        for cell in group:
            try:
                targets = [dataset] if cell.method == ZERO_SHOT else [_eval_target(name, grid) for name in grid.eval_on]
                config = None if cell.method == ZERO_SHOT else grid.config(cell, dataset.name)
                if config is not None:
                    fewshot, _ = prepare_training(backbone, dataset, config)
            except TaskResError:
                continue
            if config is not None:
                training_features(backbone, dataset, config, fewshot, setup, cache)
            # the test splits as the cell's run encodes them (zeroshot, and eval of the run, apply its official mode)
            official = _cell_official(cell, grid, config)
            encoder = official_image_backbone(backbone, official.base if official is not None else None)
            for target in targets:
                encode_split(encoder, target, target.test, setup, cache, desc=f"test {target.name}")


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
    config = None
    if cell.method == ZERO_SHOT:
        want = {"protocol": _zeroshot_protocol(grid)}
    else:
        try:
            config = grid.config(cell, cell.dataset)
        except TaskResError as err:
            return f"the grid's settings are invalid: {err}"
        record = config.record()
        want = {k: record[k] for k in ("method", "shots", "seed", "views", "method_config", "optim", "protocol")}
        want = json.loads(json.dumps(want))
    official = _cell_official(cell, grid, config)
    for key, value in want.items():
        if recorded.get(key, "default" if key == "protocol" else None) != value:
            return f"{key}: {recorded.get(key)!r} in the run, {value!r} in the grid"
    backbone = recorded.get("backbone") if isinstance(recorded.get("backbone"), dict) else {}
    mode = _official_mode(official.base if official is not None else None, backbone.get("format"))
    if backbone.get("official") != mode:  # a run of an older taskres, before the official encoders
        return f"official encoder: {backbone.get('official')!r} in the run, {mode!r} now"
    return None


def _cell_official(cell: Cell, grid: Grid, config):
    """The official variant a cell runs under (None: none): the zero-shot method's under ``--protocol official``,
    else its TrainConfig's."""
    if cell.method != ZERO_SHOT:
        return config.official
    from taskres.methods import get_method

    return get_method(ZERO_SHOT).official if _zeroshot_protocol(grid) == "official" else None


def _official_mode(base: str | None, backbone_format: str | None) -> str | None:
    """The ``official`` mode that a run records in its backbone (taskres.backbones.official.official_image_backbone):
    "trainer" for the TaskRes trainer's variant on an OpenAI-format backbone, "fp16" for CoOp's ZeroshotCLIP."""
    if base == "fp16_text":
        return "trainer" if backbone_format == "openai" else None
    return "fp16" if base == "zeroshot_clip" else None


def _zeroshot_protocol(grid: Grid) -> Literal["default", "official"]:
    """Zero-shot selects nothing: under no-val it is the default zero-shot; under official, CoOp's."""
    return "official" if grid.protocol == "official" else "default"


def _groups(cells: Sequence[Cell]) -> Iterator[tuple[tuple[str, str], list[Cell]]]:
    groups: dict[tuple[str, str], list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.backbone, c.dataset), []).append(c)
    yield from groups.items()


_loaded: dict[str, Any] = {}


def _load(backbone_name: str, dataset_name: str, grid: Grid, setup):
    """The backbone (kept loaded for the sweep) and the dataset of a group of cells."""
    from taskres.backbones import load_backbone

    engine = setup.engine or "eager"
    key = f"{backbone_name}|{setup.device}|{setup.precision}|{engine}|{setup.weights_dir}"
    if key not in _loaded:
        _loaded.clear()  # one backbone in memory at a time: groups come backbone by backbone
        _loaded[key] = load_backbone(
            backbone_name, device=setup.device, precision=setup.precision, weights_dir=setup.weights_dir, engine=engine
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
        train(backbone, dataset, grid.config(cell, dataset.name), setup, out=run, overwrite=True, cache=cache)
    for name in grid.eval_on:
        out = run / f"eval-{name}"
        if not (out / "metrics.json").is_file():
            target = _eval_target(name, grid)
            evaluate_run(run, setup, dataset=target, out=out, backbone=backbone, cache=cache)


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
