"""The paper's grids as sweep presets: ``taskres sweep EXP --preset NAME --root DATA --backbone RN50``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from taskres.app.grid import DatasetRef, Grid
from taskres.data.benchmarks import IMAGENET_VARIANTS, PAPER_DATASETS
from taskres.errors import TaskResValueError, suggest

ABLATION_GRID = {"alpha": (0.1, 0.5, 1.0), "learn_alpha": (False, True), "adapter_form": ("residual", "direct")}
PRESETS = ("paper-fewshot", "paper-dg", "paper-ablations", "demo-ablations")


def preset(
    name: str,
    root: str | None,
    backbones: Sequence[str],
    exp: str | Path | None = None,
    with_clip_lora: bool = False,
) -> Grid:
    """The paper's grids: ``paper-fewshot`` (its Fig. 3: the 11 datasets, 1-16 shots, seeds 1-3, zero-shot, linear
    probe, CoOp, CLIP-Adapter, Tip-Adapter-F, TaskRes, TaskRes*, and the newer LP++, ZS-LP and CLAP),
    ``paper-dg`` (its Table 1: 16-shot ImageNet,
    evaluated on V2, Sketch, A and R), ``paper-ablations`` (its Tables 2 and 5 on ImageNet: TaskRes with alpha 0.1,
    0.5, 1.0, fixed or learned; the classifier adapters, residual and direct) and ``demo-ablations`` (the same grid on
    the shipped demo model and its six generated tasks, written under EXP/tasks, at 1, 4, 16 shots: minutes on a
    CPU). ``with_clip_lora`` adds CLIP-LoRA to ``paper-fewshot`` (``--with-clip-lora``): it trains through both
    encoders on every step's images, far slower than the methods on cached features."""
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
            ("linear-probe", "coop", "clip-adapter", "tip-adapter-f", "taskres", "taskres*", "lp++", "zs-lp", "clap")
            + (("clip-lora",) if with_clip_lora else ()),
        )
    if name == "paper-ablations":
        return Grid(
            (DatasetRef("imagenet", root=root),), backbones, ("taskres", "classifier-adapter"), grid=dict(ABLATION_GRID)
        )
    return Grid((DatasetRef("imagenet", root=root),), backbones, ("taskres",), shots=(16,), eval_on=IMAGENET_VARIANTS)
