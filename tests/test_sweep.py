"""`taskres sweep` and `taskres report`: a grid that resumes, isolates failures and shards, and tables that match
the run folders."""

import csv
import json

import numpy as np
import pytest
import torch
from conftest import run_cli as run
from safetensors import safe_open

from taskres.app import sweep as sweep_module
from taskres.app.grid import Cell, DatasetRef, Grid, parse_shard, shard_cells


def grid_args(env, *extra):
    tmp, base, _ = env
    return [
        "sweep",
        str(tmp / "exp"),
        *base,
        "--methods",
        "taskres,linear-probe",
        "--shots",
        "1,2",
        "--seeds",
        "1,2",
        "--epochs",
        "3",
        "--views",
        "2",
        *extra,
    ]


def finished(exp):
    return sorted(
        p.parent.relative_to(exp / "runs").as_posix()
        for p in (exp / "runs").rglob("metrics.json")
        if (p.parent / "config.json").is_file()
    )


def test_sweep_runs_the_grid_and_its_cell_equals_taskres_train(env, capsys):
    tmp, base, _ = env
    code, out, err = run(grid_args(env), capsys)
    assert code == 0, err
    cells = finished(tmp / "exp")
    assert len(cells) == 1 + 2 * 2 * 2 and any(c.endswith("zero-shot") for c in cells)
    code, _, err = run(
        ["train", *base, "--shots", "2", "--seed", "1", "--epochs", "3", "--views", "2", "--out", str(tmp / "t")],
        capsys,
    )
    assert code == 0, err
    cell = next((tmp / "exp" / "runs").rglob("taskres/2shot-seed1"))
    for name in ("classifier.safetensors",):
        with safe_open(str(cell / name), "pt") as a, safe_open(str(tmp / "t" / name), "pt") as b:
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    assert (
        json.loads((cell / "metrics.json").read_text())["accuracy"]
        == json.loads((tmp / "t" / "metrics.json").read_text())["accuracy"]
    )


def test_an_interrupted_sweep_resumes_without_recomputing_finished_cells(env, capsys, monkeypatch):
    tmp, _, _ = env
    real, calls = sweep_module._run_cell, []

    def interrupt_on_fourth(exp, cell, *a, **kw):
        calls.append(cell.folder)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(exp, cell, *a, **kw)

    monkeypatch.setattr(sweep_module, "_run_cell", interrupt_on_fourth)
    code, _, err = run(grid_args(env), capsys)
    assert code == 130 and len(finished(tmp / "exp")) == 3
    done = {c: (tmp / "exp" / "runs" / c / "metrics.json").stat().st_mtime_ns for c in finished(tmp / "exp")}
    calls.clear()
    monkeypatch.setattr(
        sweep_module, "_run_cell", lambda exp, cell, *a, **kw: (calls.append(cell.folder), real(exp, cell, *a, **kw))
    )
    code, out, err = run(grid_args(env), capsys)
    assert code == 0, err
    assert "3 already done, 6 run" in out and len(calls) == 6 and not set(calls) & set(done)
    assert all((tmp / "exp" / "runs" / c / "metrics.json").stat().st_mtime_ns == t for c, t in done.items())
    assert len(finished(tmp / "exp")) == 9


def test_a_failing_cell_is_recorded_while_the_others_finish(env, capsys):
    tmp, _, _ = env
    # CoOp's 16 context vectors do not fit the tiny model's 16-token context: every coop cell fails at fit time.
    code, out, err = run(grid_args(env)[:4] + grid_args(env)[4:] + ["--methods", "taskres,coop"], capsys)
    assert code == 1 and "4 failed" in out
    failures = [json.loads(line) for line in (tmp / "exp" / "failures.jsonl").read_text().splitlines()]
    assert len(failures) == 4 and all(f["method"] == "coop" and "context" in f["error"] for f in failures)
    assert len([c for c in finished(tmp / "exp") if "/taskres/" in c]) == 4


def test_two_shards_cover_every_cell_exactly_once(env, capsys):
    tmp, _, _ = env
    grid = Grid(
        (DatasetRef("a", root="/r"), DatasetRef("b", root="/r")),
        ("RN50", "RN101"),
        ("taskres", "coop"),
        shots=(1, 2, 4),
        seeds=(1, 2, 3),
    )
    cells = grid.cells()
    one, two = shard_cells(cells, (1, 2)), shard_cells(cells, (2, 2))
    assert sorted(map(str, one + two)) == sorted(map(str, cells)) and not set(one) & set(two)
    for shard in ("1/2", "2/2"):
        code, _, err = run(grid_args(env, "--shard", shard), capsys)
        assert code == 0, err
    assert len(finished(tmp / "exp")) == 9
    code, out, _ = run(grid_args(env), capsys)
    assert code == 0 and "9 already done, 0 run" in out


def test_report_means_and_stds_match_the_run_folders(env, capsys):
    tmp, _, _ = env
    assert run(grid_args(env), capsys)[0] == 0
    code, out, err = run(["report", str(tmp / "exp")], capsys)
    assert code == 0, err
    with open(tmp / "exp" / "report" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    independent = {}
    for metrics in (tmp / "exp" / "runs").rglob("metrics.json"):
        config = json.loads((metrics.parent / "config.json").read_text())
        key = ("zero-shot", "0") if config["kind"] == "zeroshot" else (config["method"], str(config["shots"]))
        independent.setdefault(key, []).append(json.loads(metrics.read_text())["accuracy"])
    assert len(rows) == len(independent) == 5
    for r in rows:
        accs = independent[(r["method"], r["shots"])]
        assert int(r["n_seeds"]) == len(accs)
        assert float(r["mean"]) == pytest.approx(np.mean(accs), abs=1e-4)
        assert float(r["std"]) == pytest.approx(np.std(accs), abs=1e-4)
    md = (tmp / "exp" / "report" / "results.md").read_text()
    assert "| taskres |" in md and "### average" in md
    assert (tmp / "exp" / "report" / "accuracy_vs_shots.svg").is_file()


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--methods", "taskres,tip-adaptr"], "unknown method 'tip-adaptr' in --methods; did you mean 'tip-adapter'"),
        (["--methods", "taskres,zero-shot"], "zero-shot runs once per dataset and backbone in every sweep"),
        (["--shard", "3/2"], "--shard must be I/N with 1 <= I <= N"),
        (["--shard", "x"], "--shard must be I/N"),
        (["--lp-c", "1", "--methods", "taskres"], "--lp-c applies to linear-probe, none of which is in --methods"),
        (["--preset", "paper-fewshot"], "--preset paper-fewshot sets the datasets; drop --data, --split-file"),
    ],
)
def test_bad_sweep_input_exits_2(env, capsys, extra, match):
    code, _, err = run(grid_args(env, *extra), capsys)
    assert code == 2 and match in err and "Traceback" not in err


def test_unknown_preset_exits_2(tmp_path, capsys):
    code, _, err = run(["sweep", str(tmp_path / "exp"), "--preset", "paper-fewshots", "--root", str(tmp_path)], capsys)
    assert code == 2 and "unknown preset 'paper-fewshots'; did you mean 'paper-fewshot'" in err


def test_a_different_grid_in_the_same_folder_is_refused_unless_extended(env, capsys):
    tmp, _, _ = env
    assert run(grid_args(env, "--seeds", "1"), capsys)[0] == 0
    code, _, err = run(grid_args(env, "--seeds", "1", "--shots", "4"), capsys)
    assert code == 2 and "was written by another grid" in err and "shots" in err
    code, out, err = run(grid_args(env, "--seeds", "1", "--shots", "4", "--extend"), capsys)
    assert code == 0, err
    assert "1 already done" in out
    code, out, err = run(grid_args(env, "--seeds", "1", "--shots", "4"), capsys)  # the extended grid resumes
    assert code == 0 and "3 already done, 0 run" in out, err


def test_a_finished_cell_made_with_other_settings_is_never_reused(env, capsys):
    tmp, _, _ = env
    assert run(grid_args(env, "--seeds", "1", "--shots", "1", "--methods", "taskres"), capsys)[0] == 0
    code, out, err = run(
        grid_args(env, "--seeds", "1", "--shots", "1", "--methods", "taskres", "--alpha", "1.0", "--extend"), capsys
    )
    assert code == 1 and "1 failed" in out
    [failure] = [json.loads(line) for line in (tmp / "exp" / "failures.jsonl").read_text().splitlines()]
    assert "holds a run made with other settings (method_config" in failure["error"]
    config = json.loads(next((tmp / "exp" / "runs").rglob("taskres/1shot-seed1/config.json")).read_text())
    assert config["method_config"]["alpha"] == 0.5  # left as it was


def test_official_cells_of_an_older_taskres_are_not_mixed_with_new_ones(env, capsys):
    """Runs made under --protocol official before the official encoders were recorded (no "official" in the
    backbone record) are flagged as made with other settings, not reused beside new cells."""
    tmp, base, _ = env
    args = ["sweep", str(tmp / "exp"), *base, "--methods", "taskres", "--shots", "1", "--seeds", "1"]
    args += ["--epochs", "2", "--protocol", "official"]
    code, _, err = run(args, capsys)
    assert code == 0, err
    for name in ("taskres", "zero-shot"):
        path = next((tmp / "exp" / "runs").rglob(f"{name}/**/config.json"))
        config = json.loads(path.read_text())
        assert config["backbone"]["official"] == {"taskres": "trainer", "zero-shot": "fp16"}[name]
        del config["backbone"]["official"]
        path.write_text(json.dumps(config))
    code, out, _ = run(args, capsys)
    assert code == 1 and "2 failed" in out
    errors = [json.loads(line)["error"] for line in (tmp / "exp" / "failures.jsonl").read_text().splitlines()]
    assert sorted(e.split("(")[1].split(")")[0] for e in errors) == [
        "official encoder: None in the run, 'fp16' now",
        "official encoder: None in the run, 'trainer' now",
    ]


def test_config_file_with_an_unknown_key_is_refused(env, capsys):
    tmp, base, _ = env
    (tmp / "grid.toml").write_text('methods = "taskres"\nshots = [1]\nseeds = [1]\nalfa = 0.3\n')
    code, _, err = run(["sweep", str(tmp / "exp"), *base, "--config", str(tmp / "grid.toml")], capsys)
    assert code == 2 and "unknown key 'alfa'" in err
    (tmp / "grid.toml").write_text('methods = "taskres"\nshots = [1]\nseeds = [1]\nalpha = 0.3\nepochs = 2\n')
    code, _, err = run(["sweep", str(tmp / "exp"), *base, "--config", str(tmp / "grid.toml")], capsys)
    assert code == 0, err
    config = json.loads(next((tmp / "exp" / "runs").rglob("taskres/1shot-seed1/config.json")).read_text())
    assert config["method_config"]["alpha"] == 0.3 and config["optim"]["epochs"] == 2


def test_parse_shard():
    assert parse_shard("2/4") == (2, 4) and parse_shard(None) == (1, 1)
    assert Cell("dtd", "ViT-B/16", "taskres*", 4, 1).folder == "dtd/ViT-B-16/taskres-star/4shot-seed1"


def test_grid_options_are_cells_and_report_columns(env, capsys):
    tmp, base, _ = env
    code, out, err = run(
        [
            "sweep",
            str(tmp / "exp"),
            *base,
            "--methods",
            "taskres",
            "--shots",
            "1",
            "--seeds",
            "1,2",
            "--epochs",
            "2",
            "--grid",
            "alpha=0.1,0.5",
            "--grid",
            "learn_alpha=false,true",
        ],
        capsys,
    )
    assert code == 0, err
    cells = finished(tmp / "exp")
    assert len(cells) == 1 + 2 * 2 * 2
    assert any(c.endswith("taskres/alpha=0.1,learn_alpha=true/1shot-seed2") for c in cells)
    assert run(["report", str(tmp / "exp")], capsys)[0] == 0
    with open(tmp / "exp" / "report" / "results.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["method"] == "taskres"]
    assert {"alpha", "learn_alpha"} <= set(rows[0])
    independent = {}
    for metrics in (tmp / "exp" / "runs").rglob("taskres/*/1shot-seed*/metrics.json"):
        mc = json.loads((metrics.parent / "config.json").read_text())["method_config"]
        key = (str(mc["alpha"]), str(mc["learn_alpha"]).lower())
        independent.setdefault(key, []).append(json.loads(metrics.read_text())["accuracy"])
    assert len(rows) == len(independent) == 4
    for r in rows:
        accs = independent[(r["alpha"], r["learn_alpha"])]
        assert int(r["n_seeds"]) == 2 and float(r["mean"]) == pytest.approx(np.mean(accs), abs=1e-4)
    assert "taskres (alpha=0.1, learn_alpha=true)" in (tmp / "exp" / "report" / "results.md").read_text()


def test_fig4_correlations_against_an_independent_computation():
    from scipy.stats import rankdata

    from taskres.app.report import correlations

    rng = np.random.default_rng(0)
    records = []
    for i in range(6):
        zs, c = float(rng.uniform(20, 90)), int(rng.integers(5, 50))
        for seed in (1, 2):
            records.append(
                {
                    "method": "taskres",
                    "backbone": "RN50",
                    "dataset": f"d{i}",
                    "shots": 16,
                    "seed": seed,
                    "eval_dataset": "",
                    "residual_mean_abs": float(rng.uniform(0, 1)),
                    "zero_shot_accuracy": zs,
                    "num_classes": c,
                }
            )
    [c] = correlations(records)
    xs, ys = [], []
    for i in range(6):
        mine = [r for r in records if r["dataset"] == f"d{i}"]
        xs.append((1 / mine[0]["num_classes"]) / (mine[0]["zero_shot_accuracy"] / 100))
        ys.append(np.mean([r["residual_mean_abs"] for r in mine]))
    assert c["n"] == 6
    assert c["pearson"] == pytest.approx(np.corrcoef(xs, ys)[0, 1])
    assert c["spearman"] == pytest.approx(np.corrcoef(rankdata(xs), rankdata(ys))[0, 1])


def test_a_no_val_grid_runs_every_cell(env, capsys):
    tmp, _, _ = env
    code, out, err = run(grid_args(env, "--protocol", "no-val", "--lp-c", "1", "--seeds", "1"), capsys)
    assert code == 0 and "0 failed" in out, err
    configs = [json.loads(p.read_text()) for p in (tmp / "exp" / "runs").rglob("config.json")]
    assert len(configs) == 5 and all(
        c["protocol"] == ("default" if c["kind"] == "zeroshot" else "no-val") for c in configs
    )


def test_a_grid_the_library_refuses_is_refused_when_made():
    """Every cell's settings are checked by TrainConfig when the grid is made, before anything runs."""
    from taskres.errors import TaskResError

    refs = (DatasetRef("a", root="/r"),)
    with pytest.raises(TaskResError, match="method 'coop' has no official variant") as err:
        Grid(refs, ("RN50",), ("taskres", "coop"), protocol="official")
    assert err.value.method == "coop" and err.value.param == "protocol"
    with pytest.raises(TaskResError, match=r"^seed must be an integer in \[0, "):
        Grid(refs, ("RN50",), ("taskres",), seeds=(1, 2**70))
    with pytest.raises(TaskResError, match=r"^lr must be a finite number > 0; got -1.0"):
        Grid(refs, ("RN50",), ("taskres", "tip-adapter"), optim={"lr": -1.0})
    # the grid's optimiser settings apply to the methods that train
    assert len(Grid(refs, ("RN50",), ("tip-adapter",), optim={"lr": -1.0}).cells()) == 1 + 5 * 3
