"""Faults in an experiment folder, a report folder, predict's images and start-up (issue 27): a damaged file is
named and set aside or skipped, never a traceback, never silently counted."""

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import make_split_dataset
from conftest import run_cli as run

from taskres.app import cli

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def made(tmp_path_factory, openai_rn_file):
    """A finished experiment (zero-shot and TaskRes 1 shot, seeds 1 and 2) and the sweep command that made it."""
    tmp = tmp_path_factory.mktemp("made")
    image_dir, split_file = make_split_dataset(tmp / "tiny")
    base = ["--data", str(image_dir), "--split-file", str(split_file), "--backbone", str(openai_rn_file)]
    base += ["--cache-dir", str(tmp / "cache"), "--quiet", "--device", "cpu"]
    grid = ["--methods", "taskres", "--shots", "1", "--seeds", "1,2", "--epochs", "2", "--views", "1"]
    code = cli.main(["sweep", str(tmp / "exp"), *base, *grid])
    assert code == 0
    return tmp, [*base, *grid]


@pytest.fixture()
def exp(made, tmp_path):
    """(a copy of the finished experiment, the sweep arguments after EXP)."""
    shutil.copytree(made[0] / "exp", tmp_path / "exp")
    return tmp_path / "exp", made[1]


def cell(exp: Path, seed: int = 1) -> Path:
    return next((exp / "runs").rglob(f"taskres/1shot-seed{seed}"))


def csv_rows(path: Path) -> dict:
    with open(path) as f:
        return {(r["method"], r["shots"]): r for r in csv.DictReader(f)}


DAMAGE = {
    "config_truncated": ("config.json", lambda b: b[: len(b) // 2]),
    "config_random_bytes": ("config.json", lambda b: bytes(range(256)) * 4),
    "config_deleted": ("config.json", None),
    "metrics_emptied": ("metrics.json", lambda b: b""),
    "metrics_accuracy_abc": ("metrics.json", lambda b: json.dumps({**json.loads(b), "accuracy": "abc"}).encode()),
    "metrics_a_list": ("metrics.json", lambda b: b"[]"),
}


def damage(folder: Path, case: str) -> bytes | None:
    name, change = DAMAGE[case]
    path = folder / name
    if change is None:
        path.unlink()
        return None
    path.write_bytes(change(path.read_bytes()))
    return path.read_bytes()


# ---- 1. one damaged file no longer breaks an experiment ---------------------------------------------------------


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_sweep_sets_a_damaged_cell_aside_and_runs_it_again(exp, case, capsys, caplog):
    exp, args = exp
    other = (cell(exp, 2) / "metrics.json").stat().st_mtime_ns
    damaged = damage(cell(exp), case)
    code, out, err = run(["sweep", str(exp), *args], capsys)
    assert code == 0 and "Traceback" not in err, err
    assert "2 already done, 1 run, 0 failed, 1 damaged (set aside under" in out
    metrics = json.loads((cell(exp) / "metrics.json").read_text())
    assert isinstance(metrics["accuracy"], float) and json.loads((cell(exp) / "config.json").read_text())["seed"] == 1
    assert (cell(exp, 2) / "metrics.json").stat().st_mtime_ns == other  # the sound cells are not touched
    [aside] = [p for p in (exp / "damaged").rglob("1shot-seed1-*") if p.is_dir()]
    name = DAMAGE[case][0]
    assert (aside / name).read_bytes() == damaged if damaged is not None else not (aside / name).exists()
    assert any(name in r.message and str(aside) in r.message for r in caplog.records if r.levelname == "WARNING")
    code, out, err = run(["sweep", str(exp), *args], capsys)  # and then it is done
    assert code == 0 and "3 already done, 0 run, 0 failed\n" in out


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_report_skips_a_damaged_cell_with_a_warning_naming_the_file(exp, case, capsys, caplog):
    exp, _ = exp
    assert run(["report", str(exp)], capsys)[0] == 0
    assert csv_rows(exp / "report" / "results.csv")[("taskres", "1")]["n_seeds"] == "2"
    damage(cell(exp), case)
    code, out, err = run(["report", str(exp)], capsys)
    assert code == 0 and "Traceback" not in err, err
    row = csv_rows(exp / "report" / "results.csv")[("taskres", "1")]
    kept = json.loads((cell(exp, 2) / "metrics.json").read_text())["accuracy"]
    assert row["n_seeds"] == "1" and float(row["mean"]) == pytest.approx(kept, abs=1e-4)
    path = str(cell(exp) / DAMAGE[case][0])
    assert any(path in r.message and "skipped" in r.message for r in caplog.records if r.levelname == "WARNING")


@pytest.mark.parametrize(
    "content", [b"[]", bytes(range(256)), b'{"grid": 5, "seeds": "x"}'], ids=["list", "bytes", "types"]
)
def test_a_damaged_sweep_json_is_exit_2_naming_it(exp, content, capsys):
    exp, args = exp
    (exp / "sweep.json").write_bytes(content)
    before = sorted(p.relative_to(exp) for p in exp.rglob("*"))
    for argv in (["sweep", str(exp), *args], ["report", str(exp)]):
        code, _, err = run(argv, capsys)
        assert code == 2 and "Traceback" not in err, err
        assert f"{str(exp / 'sweep.json')!r}" in err and "damaged" in err
    assert sorted(p.relative_to(exp) for p in exp.rglob("*")) == before


def test_a_failures_file_that_is_a_folder_is_exit_2_before_any_cell_runs(exp, capsys):
    exp, args = exp
    (exp / "failures.jsonl").mkdir()
    shutil.rmtree(cell(exp))
    argv = ["sweep", str(exp), *args, "--methods", "taskres,coop", "--extend"]  # coop fails on this model
    code, _, err = run(argv, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert f"{str(exp / 'failures.jsonl')!r} is not a file" in err
    assert not cell(exp, 2).with_name("1shot-seed1").exists()


# ---- 2. grid values ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra,cells",
    [
        (["--grid", "alpha=0.5,0.50"], 3),
        (["--seeds", "1,1,2"], 3),
        (["--shots", "1,1"], 3),
        (["--methods", "taskres,taskres"], 3),
    ],
)
def test_duplicate_grid_values_are_one_cell(exp, extra, cells, capsys):
    exp, args = exp
    fresh = exp.with_name("fresh")
    code, out, err = run(["sweep", str(fresh), *args, *extra], capsys)
    assert code == 0, err
    assert f"{cells} cells in this shard: 0 already done, {cells} run, 0 failed" in out
    assert len(list((fresh / "runs").rglob("metrics.json"))) == cells


@pytest.mark.parametrize(
    "line,match",
    [
        ("grid = 5", "grid: expected NAME=V1,V2,... (e.g. alpha=0.1,0.5,1.0) or a [grid] table; got '5'"),
        ("grid = [true]", "grid: expected NAME=V1,V2,..."),
        ("methods = []", "methods: expected at least one value"),
        ("shots = []", "shots: expected at least one value"),
        ("seeds = []", "seeds: expected at least one value"),
    ],
)
def test_config_file_grids_are_checked_whole_before_anything_is_written(tmp_path, capsys, line, match):
    path = tmp_path / "g.toml"
    path.write_text(f'dataset = "dtd"\nroot = "{tmp_path}"\nbackbone = "RN50"\n{line}\n')
    code, _, err = run(["sweep", str(tmp_path / "exp"), "--device", "cpu", "--config", str(path)], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert err.startswith(f"taskres: error: config file {str(path)!r}: {match}"), err
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize("flag", ["--methods", "--shots", "--seeds"])
def test_an_empty_list_flag_is_refused_not_the_default(tmp_path, capsys, flag):
    argv = ["sweep", str(tmp_path / "exp"), "--dataset", "dtd", "--root", str(tmp_path), "--backbone", "RN50"]
    with pytest.raises(SystemExit) as exit_:  # argparse's own refusal
        cli.main([*argv, flag, ","])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument {flag}: expected at least one value" in err, err
    assert not (tmp_path / "exp").exists()


# ---- 3. report --out ------------------------------------------------------------------------------------------------


def test_report_out_into_a_run_folder_is_refused(exp, capsys):
    exp, _ = exp
    for out in (cell(exp), cell(exp) / "report"):
        before = sorted(p.name for p in cell(exp).iterdir())
        code, _, err = run(["report", str(exp), "--out", str(out)], capsys)
        assert code == 2 and "Traceback" not in err, err
        assert f"--out {str(out)!r} is inside the run folder {str(cell(exp))!r}" in err
        assert sorted(p.name for p in cell(exp).iterdir()) == before


def test_report_out_that_is_a_file_is_exit_2(exp, capsys):
    exp, _ = exp
    out = exp.parent / "taken"
    out.write_text("mine")
    code, _, err = run(["report", str(exp), "--out", str(out)], capsys)
    assert code == 2 and f"--out {str(out)!r} exists and is not a folder" in err, err
    assert out.read_text() == "mine"


def test_report_on_a_full_disk_keeps_the_old_report(exp, capsys):
    """A file-size limit (RLIMIT_FSIZE) makes the kernel refuse writes past N bytes, as a full disk would: the old
    results.csv and results.md stay whole, and no temporary file is left."""
    exp, _ = exp
    assert run(["report", str(exp)], capsys)[0] == 0
    report = exp / "report"
    old = {p.name: p.read_bytes() for p in report.iterdir()}
    limit = len(old["results.csv"]) + 1  # results.csv fits, results.md (larger) does not
    assert len(old["results.md"]) > limit
    script = f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        from taskres.app.cli import main
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        sys.exit(main(["report", {str(exp)!r}]))
    """
    env = {**os.environ, "PYTHONPATH": SRC, "MPLCONFIGDIR": str(exp.parent / "mpl")}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True)
    last = done.stderr.strip().splitlines()[-1]  # joblib may warn first that it cannot make its semaphores
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert last.startswith("taskres: error: cannot write 'results.md' in folder " + repr(str(report))), last
    assert "File too large" in last and "ulimit -f" in last, last
    assert {p.name: p.read_bytes() for p in report.iterdir()} == old


@pytest.mark.parametrize("names", ["results.csv", "results.md", "accuracy_vs_shots"])
def test_report_on_a_full_disk_is_exit_2_naming_the_folder(exp, capsys, monkeypatch, full_disk, names):
    """ENOSPC met by results.csv, results.md or a figure (matplotlib writes through a Python file object, not
    os.write: its savefig is made to meet the full disk): exit 2 naming the folder; the old report stays whole."""
    import matplotlib.figure

    exp, _ = exp
    assert run(["report", str(exp)], capsys)[0] == 0
    report = exp / "report"
    old = {p.name: p.read_bytes() for p in report.iterdir()}
    full_disk(report, names=names)
    real = matplotlib.figure.Figure.savefig

    def savefig(self, fname, **kw):
        if names in Path(fname).name:
            raise OSError(28, "No space left on device", str(fname))
        return real(self, fname, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    code, _, err = run(["report", str(exp)], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert f"in folder {str(report)!r}: No space left on device" in err and "free some space" in err, err
    assert f"cannot write '{names}" in err, err
    assert {p.name: p.read_bytes() for p in report.iterdir()} == old


# ---- 7. predict: one bad image among many -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(made):
    tmp, args = made
    run_dir = tmp / "run"
    base = args[: args.index("--methods")]
    assert cli.main(["train", *base, "--shots", "1", "--seed", "1", "--epochs", "1", "--out", str(run_dir)]) == 0
    return run_dir, tmp / "tiny" / "images" / "test"


def test_predict_reports_each_bad_image_and_predicts_the_others(trained, tmp_path, capsys):
    run_dir, images = trained
    good = [str(images / "red_0.png"), str(images / "blue_1.png")]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    missing = str(tmp_path / "missing.png")
    argv = ["predict", "--run", str(run_dir), "--quiet", "--top-k", "2"]
    code, out, err = run([*argv, "--json", good[0], str(broken), good[1], missing], capsys)
    assert code == 1 and "Traceback" not in err, err
    rows = json.loads(out)
    assert [r["image"] for r in rows] == [good[0], str(broken), good[1], missing]
    assert "cannot be decoded" in rows[1]["error"] and "does not exist" in rows[3]["error"]
    assert rows[1]["top"] == [] and "error" not in rows[0] and "error" not in rows[2]
    assert "2 of 4 images could not be read" in err and "--skip-bad-images" not in out + err
    code, alone, _ = run([*argv, "--json", *good], capsys)
    assert code == 0
    for row, single in zip([rows[0], rows[2]], json.loads(alone)):
        assert [t["class"] for t in row["top"]] == [t["class"] for t in single["top"]]
        assert [t["prob"] for t in row["top"]] == pytest.approx([t["prob"] for t in single["top"]], abs=1e-6)
    code, out, err = run([*argv, str(broken), good[0]], capsys)  # the table
    assert code == 1 and f"{broken}\n  error: image {str(broken)!r} cannot be decoded" in out


# ---- 9. Ctrl-C during start-up ------------------------------------------------------------------------------------


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("phase", ["building the parser", "parsing the arguments"])
def test_ctrl_c_during_start_up_is_exit_130_without_traceback(monkeypatch, capsys, phase):
    import argparse

    if phase == "building the parser":
        monkeypatch.setattr(cli, "build_parser", interrupt)
    else:
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", interrupt)
    try:
        code = cli.main(["methods"])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main()")
    assert code == 130 and capsys.readouterr().err == "taskres: interrupted.\n"


def test_a_real_sigint_while_starting_is_exit_130_without_traceback():
    """SIGINT 0.2 s into main(): it is still importing torch (seconds) to build the parser."""
    script = """
        import os, signal, sys, threading
        from taskres.app.cli import main
        threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        sys.exit(main(["methods"]))
    """
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env={**os.environ, "PYTHONPATH": SRC},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("taskres: interrupted") and time.monotonic() - t0 < 60
