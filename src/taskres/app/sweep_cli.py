"""The `sweep` and `report` commands: their arguments, and the grid they describe."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from taskres.errors import TaskResError

# Keys a --config TOML may hold besides the method and optimiser options (which it names by flag, without "--").
CONFIG_KEYS = (
    "preset",
    "dataset",
    "root",
    "data",
    "split_file",
    "template",
    "backbone",
    "methods",
    "shots",
    "seeds",
    "views",
    "protocol",
    "eval_on",
    "grid",
)
OPTIM_FLAGS = {"lr": float, "epochs": int, "batch_size": int, "weight_decay": float}


def add_parsers(sub, common, method_options, views_arg) -> None:
    p = sub.add_parser("sweep", help="run a grid of runs that resumes (datasets x backbones x methods x shots x seeds)")
    p.add_argument("exp", help="experiment folder (EXP/runs/... holds one run folder per cell)")
    common(p, backbone=False)
    p.add_argument("--backbone", default=None, help="backbone(s), comma-separated (default with a preset: RN50)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"], help="backbone precision")
    p.add_argument("--preset", default=None, help="paper-fewshot (the paper's Fig. 3 grid) or paper-dg (its Table 1)")
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE.toml",
        help="the grid from a TOML file (same keys as the flags, with underscores)",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="methods, comma-separated (see `taskres methods`; taskres* is "
        "TaskRes with the enhanced base); zero-shot always runs",
    )
    p.add_argument("--shots", default=None, help="shot counts, comma-separated (default 1,2,4,8,16)")
    p.add_argument("--seeds", default=None, help="seeds, comma-separated (default 1,2,3)")
    p.add_argument(
        "--views",
        type=views_arg,
        default=None,
        metavar="V|online",
        help="training views for the methods that train on augmented views (default: each method's)",
    )
    p.add_argument(
        "--protocol",
        default=None,
        choices=["default", "official", "no-val"],
        help="the methods' protocol (no-val: no validation split, fixed values; see `taskres train`)",
    )
    p.add_argument(
        "--eval-on",
        default=None,
        help="also evaluate every trained run on these datasets (with --root), "
        "e.g. imagenetv2,imagenet_sketch,imagenet_a,imagenet_r",
    )
    p.add_argument(
        "--grid",
        action="append",
        default=None,
        metavar="NAME=V1,V2,...",
        help="cross a method option's values with shots and seeds (repeatable), e.g. --grid "
        "alpha=0.1,0.5,1.0 --grid learn_alpha=false,true; NAME is the option's flag without dashes",
    )
    p.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="run only the I-th of N deterministic parts of the grid (for N machines sharing EXP and the cache)",
    )
    p.add_argument("--extend", action="store_true", help="add this grid's cells to an experiment of another grid")
    for flag, kind in OPTIM_FLAGS.items():
        p.add_argument(
            f"--{flag.replace('_', '-')}",
            dest=flag,
            type=kind,
            default=None,
            help=f"{flag} for every trained method (default: each method's preset)",
        )
    method_options(p)

    p = sub.add_parser("report", help="tables and figures of an experiment folder (reads run folders only)")
    p.add_argument("exp", help="experiment folder written by `taskres sweep`")
    p.add_argument("--out", default=None, help="report folder (default EXP/report)")
    p.add_argument(
        "--compare-published",
        action="store_true",
        help="show published numbers of the same protocol beside ours, with their sources",
    )


def _list(value: Any, kind=str) -> tuple:
    if value is None:
        return ()
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    out = []
    for item in items:
        item = str(item).strip() if not isinstance(item, (int, float)) else item
        if item == "":
            continue
        try:
            out.append(kind(item))
        except ValueError:
            raise TaskResError(f"expected a comma-separated list of {kind.__name__}s; got {value!r}.") from None
    return tuple(out)


def grid_from_args(args: argparse.Namespace, option_dests: dict[str, str]):
    """The Grid of a `taskres sweep` command: a preset, a TOML file, or the flags (flags given override both)."""
    from taskres.app.sweep import DatasetRef, Grid, grid_from_toml, parse_grid, preset

    values: dict[str, Any] = {}
    options: dict[str, Any] = {}
    optim: dict[str, Any] = {}
    if args.config is not None:
        raw = grid_from_toml(args.config)
        for key, value in raw.items():
            flag = "--" + key.replace("_", "-")
            if key in CONFIG_KEYS:
                values[key] = value
            elif key in OPTIM_FLAGS:
                optim[key] = value
            elif flag in option_dests:
                options[flag] = value
            else:
                raise TaskResError(
                    f"config file {args.config!r}: unknown key {key!r}; known: "
                    f"{', '.join(CONFIG_KEYS + tuple(OPTIM_FLAGS))} and the method options "
                    f"({', '.join(f.lstrip('-').replace('-', '_') for f in option_dests)})."
                )
    for key in CONFIG_KEYS:
        given = getattr(args, key, None)
        if given is not None:
            values[key] = given
    options.update(
        {
            flag: getattr(args, dest)
            for flag, dest in option_dests.items()
            if getattr(args, dest) is not None and getattr(args, dest) is not False
        }
    )
    optim.update({k: getattr(args, k) for k in OPTIM_FLAGS if getattr(args, k) is not None})
    backbones = _list(values.get("backbone"))
    grid_specs = values.get("grid") or []
    grid_specs = [grid_specs] if isinstance(grid_specs, str) else grid_specs
    if isinstance(grid_specs, dict):  # TOML: [grid] alpha = [0.1, 0.5]
        grid_specs = [f"{k}={','.join(map(str, v))}" for k, v in grid_specs.items()]
    grid_values = parse_grid(grid_specs)
    if values.get("preset") is not None:
        ignored = [f"--{k.replace('_', '-')}" for k in ("dataset", "data", "split_file", "template") if k in values]
        if ignored:
            raise TaskResError(
                f"--preset {values['preset']} sets the datasets; drop {', '.join(ignored)} (or "
                "drop --preset and give the grid with flags)."
            )
        grid = preset(values["preset"], values.get("root"), backbones, exp=args.exp)
        overrides: dict[str, Any] = {k: _list(values[k], int) for k in ("shots", "seeds") if k in values}
        if "methods" in values:
            overrides["methods"] = _list(values["methods"])
        if grid_values:
            overrides["grid"] = grid_values
        if "eval_on" in values:
            overrides["eval_on"] = _list(values["eval_on"])
        grid = Grid(
            **{
                **_fields(grid),
                **overrides,
                "options": options,
                "optim": optim,
                "views": values.get("views"),
                "protocol": values.get("protocol") or "default",
            }
        )
        return grid
    if "data" in values and "dataset" in values:
        raise TaskResError("pass either --dataset NAME[,NAME...] --root ROOT or --data DIR [--split-file FILE].")
    templates = _list(values.get("template")) or None
    datasets: tuple[DatasetRef, ...]
    if "data" in values:
        from taskres.data.sources import open_dataset

        name = open_dataset(values["data"], values.get("split_file"), templates).name
        datasets = (
            DatasetRef(
                name,
                data=str(Path(values["data"]).resolve()),
                split_file=str(Path(values["split_file"]).resolve()) if values.get("split_file") else None,
                templates=templates,
            ),
        )
    else:
        names = _list(values.get("dataset"))
        if not names:
            raise TaskResError(
                "no dataset: pass --dataset NAME[,NAME...] with --root, --data DIR, a --preset or a --config file."
            )
        if values.get("root") is None:
            raise TaskResError("--dataset needs --root, the folder that holds CoOp's dataset folders.")
        datasets = tuple(DatasetRef(n, root=str(Path(values["root"]).resolve()), templates=templates) for n in names)
    if not backbones:
        raise TaskResError("--backbone is required (one or more, comma-separated).")
    methods = _list(values.get("methods")) or ("taskres",)
    return Grid(
        datasets,
        backbones,
        methods,
        shots=_list(values.get("shots"), int) or (1, 2, 4, 8, 16),
        seeds=_list(values.get("seeds"), int) or (1, 2, 3),
        options=options,
        optim=optim,
        views=values.get("views"),
        protocol=values.get("protocol") or "default",
        eval_on=_list(values.get("eval_on")),
        grid=grid_values,
    )


def _fields(grid) -> dict:
    from dataclasses import fields

    return {f.name: getattr(grid, f.name) for f in fields(grid)}


def run_command(args: argparse.Namespace, setup, option_dests: dict[str, str]) -> int:
    if args.command == "report":
        from taskres.app.report import write_report

        out = write_report(args.exp, args.out, compare_published=args.compare_published)
        for line in out["summary"]:
            print(line)
        print(f"wrote {', '.join(str(p) for p in out['files'])}")
        return 0
    from taskres.app.sweep import parse_shard, run_sweep

    shard = parse_shard(args.shard)
    grid = grid_from_args(args, option_dests)
    counts = run_sweep(args.exp, grid, setup, shard=shard, extend=args.extend, progress=not args.quiet)
    print(
        f"sweep {args.exp}: {counts['cells']} cells in this shard: {counts['skipped']} already done, "
        f"{counts['ran']} run, {counts['failed']} failed"
        + (f" (see {Path(args.exp) / 'failures.jsonl'})" if counts["failed"] else "")
    )
    return 1 if counts["failed"] else 0
