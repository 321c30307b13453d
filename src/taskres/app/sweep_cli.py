"""The `sweep` and `report` commands: their arguments, the ``--grid`` and ``--config`` values (each read by the parser
of the flag it names, as ``taskres train`` reads it), and the grid they describe."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from taskres.app import options as o
from taskres.app.options import OPTIM_OPTIONS, CommaList, boolean, given, method_options, optim_options
from taskres.errors import TaskResError, TaskResValueError


def add_parsers(sub) -> None:
    p = sub.add_parser("sweep", help="run a grid of runs that resumes (datasets x backbones x methods x shots x seeds)")
    p.add_argument("exp", help="experiment folder (EXP/runs/... holds one run folder per cell)")
    o.add(p, "--data", "--split-file")
    o.add(p, "--dataset", many=True)
    o.add(p, "--root", "--template", "--skip-bad-images", "--max-image-pixels", *o.ENCODING)
    o.add(p, "--backbone", many=True, help="backbone(s), comma-separated (default with a preset: RN50)")
    o.add(p, "--precision")
    p.add_argument("--preset", default=None, help="paper-fewshot (the paper's Fig. 3 grid) or paper-dg (its Table 1)")
    p.add_argument(
        "--with-clip-lora",
        action="store_true",
        help="--preset paper-fewshot: add clip-lora, which trains through the encoders (far slower than the others)",
    )
    p.add_argument(
        "--config", metavar="FILE.toml", help="the grid from a TOML file (same keys as the flags, with underscores)"
    )
    o.add(
        p,
        "--method",
        many=True,
        help="methods, comma-separated (see `taskres methods`; taskres* is TaskRes with the enhanced base); "
        "zero-shot always runs",
    )
    o.add(p, "--shots", many=True, help="shot counts, comma-separated (default 1,2,4,8,16)")
    o.add(p, "--seed", many=True, help="seeds, comma-separated (default 1,2,3)")
    o.add(p, "--views")
    o.add(p, "--protocol", default=None)
    p.add_argument(
        "--eval-on",
        type=o.CommaList(str),
        help="also evaluate every trained run on these datasets (with --root), "
        "e.g. imagenetv2,imagenet_sketch,imagenet_a,imagenet_r",
    )
    p.add_argument(
        "--grid",
        action="append",
        metavar="NAME=V1,V2,...",
        help="cross a method option's values with shots and seeds (repeatable), e.g. --grid "
        "alpha=0.1,0.5,1.0 --grid learn_alpha=false,true; NAME is the option's flag without dashes",
    )
    p.add_argument(
        "--shard",
        metavar="I/N",
        help="run only the I-th of N deterministic parts of the grid (for N machines sharing EXP and the cache)",
    )
    p.add_argument("--extend", action="store_true", help="add this grid's cells to an experiment of another grid")
    o.add_optim_options(p)
    o.add_method_options(p)
    p.set_defaults(handler=functools.partial(sweep_command, parser=p))

    p = sub.add_parser("report", help="tables and figures of an experiment folder (reads run folders only)")
    p.add_argument("exp", help="experiment folder written by `taskres sweep`")
    p.add_argument("--out", default=None, help="report folder (default EXP/report)")
    p.add_argument(
        "--compare-published",
        action="store_true",
        help="show published numbers of the same protocol beside ours, with their sources",
    )
    p.set_defaults(handler=report_command)


def grid_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The Grid of a `taskres sweep` command: a preset, a TOML file, or the flags (flags given override both)."""
    from taskres.app.grid import Grid

    values = sweep_values(args, parser)
    settings: dict[str, Any] = {
        "options": {opt.flag: values[opt.dest] for opt in o.method_options().values() if opt.dest in values},
        "optim": {opt.field: values[opt.dest] for opt in o.optim_options().values() if opt.dest in values},
        "views": values.get("views"),
        "protocol": values.get("protocol") or "default",
    }
    if values.get("with_clip_lora") and values.get("preset") != "paper-fewshot":
        raise TaskResError(
            "--with-clip-lora adds clip-lora to --preset paper-fewshot; for another grid, add clip-lora to --method."
        )
    if values.get("preset") is not None:
        return _preset_grid(values, settings, args.exp)
    datasets = _datasets(values)
    if not values.get("backbone"):
        raise TaskResError("--backbone is required (one or more, comma-separated).")
    return Grid(
        datasets,
        values["backbone"],
        values.get("methods") or ("taskres",),
        shots=values.get("shots") or (1, 2, 4, 8, 16),
        seeds=values.get("seeds") or (1, 2, 3),
        eval_on=values.get("eval_on", ()),
        grid=values.get("grid", {}),
        **settings,
    )


def _preset_grid(values: dict[str, Any], settings: dict[str, Any], exp: str):
    """A preset's grid, with the shots, seeds, methods, grid options and evaluations given on top."""
    from dataclasses import fields

    from taskres.app.grid import Grid
    from taskres.app.presets import preset

    ignored = [f"--{k.replace('_', '-')}" for k in ("dataset", "data", "split_file", "template") if k in values]
    if ignored:
        raise TaskResError(
            f"--preset {values['preset']} sets the datasets; drop {', '.join(ignored)} (or "
            "drop --preset and give the grid with flags)."
        )
    grid = preset(
        values["preset"],
        values.get("root"),
        values.get("backbone") or (),
        exp=exp,
        with_clip_lora=bool(values.get("with_clip_lora")),
    )
    overrides: dict[str, Any] = {k: values[k] for k in ("shots", "seeds", "methods", "eval_on") if k in values}
    if values.get("grid"):
        overrides["grid"] = values["grid"]
    return Grid(**{**{f.name: getattr(grid, f.name) for f in fields(grid)}, **overrides, **settings})


def _datasets(values: dict[str, Any]) -> tuple:
    from taskres.app.grid import DatasetRef

    if "data" in values and "dataset" in values:
        raise TaskResError("pass either --dataset NAME[,NAME...] --root ROOT or --data DIR [--split-file FILE].")
    templates = tuple(values.get("template") or ()) or None
    if "data" in values:
        from taskres.data.sources import open_dataset

        name = open_dataset(values["data"], values.get("split_file"), templates).name
        split_file = values.get("split_file")
        return (
            DatasetRef(
                name,
                data=str(Path(values["data"]).resolve()),
                split_file=str(Path(split_file).resolve()) if split_file else None,
                templates=templates,
            ),
        )
    names = values.get("dataset")
    if not names:
        raise TaskResError(
            "no dataset: pass --dataset NAME[,NAME...] with --root, --data DIR, a --preset or a --config file."
        )
    if values.get("root") is None:
        raise TaskResError("--dataset needs --root, the folder that holds CoOp's dataset folders.")
    return tuple(DatasetRef(n, root=str(Path(values["root"]).resolve()), templates=templates) for n in names)


def sweep_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from taskres.app.grid import parse_shard
    from taskres.app.sweep import run_sweep
    from taskres.backbones.engines import check_engine
    from taskres.devices import parse_device

    setup = o.setup_from_args(args)
    shard = parse_shard(args.shard)
    grid = grid_from_args(args, parser)
    # an engine that cannot run here would fail every cell: refused once, before anything is written
    check_engine(setup.engine or "eager", parse_device(setup.device), setup.precision)
    counts = run_sweep(args.exp, grid, setup, shard=shard, extend=args.extend, progress=not args.quiet)
    damaged = f", {counts['damaged']} damaged (set aside under {Path(args.exp) / 'damaged'})"
    print(
        f"sweep {args.exp}: {counts['cells']} cells in this shard: {counts['skipped']} already done, "
        f"{counts['ran']} run, {counts['failed']} failed"
        + (damaged if counts.get("damaged") else "")
        + (f" (see {Path(args.exp) / 'failures.jsonl'})" if counts["failed"] else "")
    )
    return 1 if counts["failed"] else 0


def report_command(args: argparse.Namespace) -> int:
    from taskres.app.report import write_report

    out = write_report(args.exp, args.out, compare_published=args.compare_published)
    for line in out["summary"]:
        print(line)
    print(f"wrote {', '.join(str(p) for p in out['files'])}")
    return 0


# ---- --grid and --config ---------------------------------------------------------------------------------------


def to_text(value: Any) -> str:
    """A TOML value as the command line would give it (true/false for a bool)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float, str)):
        return str(value)
    raise argparse.ArgumentTypeError(f"expected a single value; got {value!r}")


def grid_values(name: str, texts: Iterable[str]) -> tuple:
    """The values of a grid option, each read by its option's parser."""
    from taskres.app.grid import grid_flag

    option = method_options()[grid_flag(name)]
    try:
        return tuple(option.parse(t.strip()) for t in texts if t.strip())
    except argparse.ArgumentTypeError as err:
        raise TaskResValueError(f"grid option {name}: {err}.") from None


def parse_grid(specs: Sequence[str]) -> dict[str, tuple]:
    """``["alpha=0.1,0.5", "learn_alpha=false,true"]`` -> ``{"alpha": (0.1, 0.5), "learn_alpha": (False, True)}``."""
    out: dict[str, tuple] = {}
    for spec in specs:
        name, eq, text = str(spec).partition("=")
        name = name.strip()
        if not eq or not name or not text.strip():
            raise TaskResValueError(f"grid must be NAME=V1,V2,... (e.g. alpha=0.1,0.5,1.0); got {spec!r}.")
        if name in out:
            raise TaskResValueError(f"grid option {name} is given twice; give its values once: {name}=V1,V2,...")
        out[name] = grid_values(name, text.split(","))
    return out


# Keys a --config TOML may hold besides the optimiser and method options (which it names by flag, without "--").
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
    "with_clip_lora",
)


def read_toml(path: str) -> dict:
    try:
        import tomllib  # type: ignore[import-not-found,unused-ignore]  # Python 3.11+; mypy checks as 3.10
    except ImportError:  # Python 3.10
        raise TaskResValueError(
            "`config` files need Python 3.11 or later (tomllib); pass the grid as flags.", param="config"
        ) from None
    try:
        with open(path, encoding="utf-8") as f:
            return tomllib.loads(f.read())
    except FileNotFoundError:
        raise TaskResValueError(f"config file {path!r} does not exist.", param="config") from None
    except tomllib.TOMLDecodeError as err:
        raise TaskResValueError(f"config file {path!r} is not valid TOML ({err}).", param="config") from None


def config_values(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """dest -> value of a ``--config`` TOML file's keys (the flags with underscores), each value read by the
    parser of the flag it names, as if given on the command line (a TOML list: the items of a list flag)."""
    options = {o.name: o for o in (*optim_options().values(), *method_options().values())}
    actions = {a.dest: a for a in parser._actions}
    values: dict[str, Any] = {}
    for key, value in read_toml(path).items():
        if key not in CONFIG_KEYS and key not in options:
            raise TaskResValueError(
                f"config file {path!r}: unknown key {key!r}; known: {', '.join(CONFIG_KEYS + OPTIM_OPTIONS)} and the "
                f"method options ({', '.join(o.name for o in method_options().values())})."
            )
        dest = options[key].dest if key in options else key
        try:
            values[dest] = _toml_grid(value) if key == "grid" else _toml_value(actions[dest], value)
        except (argparse.ArgumentTypeError, TaskResError) as err:  # TaskResError: a grid option's own refusal
            raise TaskResValueError(f"config file {path!r}: {key}: {str(err).rstrip('.')}.") from None
    return values


def _toml_value(action: argparse.Action, value: Any) -> Any:
    parse = boolean if isinstance(action, argparse._StoreTrueAction) else action.type or str
    assert callable(parse)
    if isinstance(parse, CommaList) and isinstance(value, list):
        return parse.items(to_text(v) for v in value)
    if isinstance(action, argparse._AppendAction):
        return [parse(to_text(v)) for v in (value if isinstance(value, list) else [value])]
    return parse(to_text(value))


def _toml_grid(value: Any) -> dict[str, tuple]:
    """``[grid] alpha = [0.1, 0.5]``, or the flag's form: ``grid = "alpha=0.1,0.5"`` or a list of those."""
    if isinstance(value, dict):
        return {
            k: grid_values(k, [to_text(v) for v in (vs if isinstance(vs, list) else [vs])]) for k, vs in value.items()
        }
    specs = value if isinstance(value, list) else [value]
    for spec in specs:
        if not isinstance(spec, str) or "=" not in spec:
            raise argparse.ArgumentTypeError(
                f"expected NAME=V1,V2,... (e.g. alpha=0.1,0.5,1.0) or a [grid] table; got {to_text(spec)!r}"
            )
    return parse_grid(specs)


def sweep_values(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """dest -> value of the grid's settings: the ``--config`` file's, then the flags given (which win)."""
    values = config_values(args.config, parser) if args.config is not None else {}
    options = (*optim_options().values(), *method_options().values())
    for dest in (*CONFIG_KEYS, *(option.dest for option in options)):
        if dest != "grid" and given(args, dest):
            values[dest] = getattr(args, dest)
    if args.grid is not None:
        values["grid"] = parse_grid(args.grid)
    return values
