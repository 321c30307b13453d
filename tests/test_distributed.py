"""torchrun scale-out: two CPU ranks (gloo) share the encoding of a cold cache, rank 0 writes what one process writes.

Every rank runs with one intra-op thread (torchrun's default with several ranks), and so does the single process
they are compared with: feature values depend on the thread count at float rounding level, not on how the images
are split between ranks.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_split_dataset
from safetensors import safe_open
from safetensors.torch import load_file

TIMINGS = ("seconds_features", "seconds_train")


def _env() -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    # PYTHONFAULTHANDLER: a rank that dies of a signal prints the Python stack it died in (how the SIGABRT at exit
    # that taskres.distributed.shutdown now avoids was found)
    env.update(OMP_NUM_THREADS="1", TASKRES_DIST_TIMEOUT="120", PYTHONFAULTHANDLER="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def torchrun(args: list[str], cwd: Path, script: Path | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m taskres ARGS`` (or the script), on the CPU."""
    target = [str(script)] if script is not None else ["-m", "taskres"]
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *target, *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def single(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "taskres", *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300
    )


def chunks(cache: Path) -> dict[str, list[tuple[str | None, list[str]]]]:
    """namespace -> [(writer rank, image keys)] of every chunk in the cache."""
    out: dict[str, list] = {}
    for chunk in sorted(cache.glob("v*/*/chunk-*.safetensors")):
        with safe_open(str(chunk), "pt") as f:
            meta = f.metadata()
        out.setdefault(chunk.parent.name, []).append((meta.get("rank"), json.loads(meta["keys"])))
    return out


def assert_same_run(a: Path, b: Path, exact: bool = True) -> None:
    """The same run folder, bit for bit but for timings; ``exact`` False: a classifier equal to float rounding
    (trained in another process of the job), with the same predictions."""
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    ta, tb = load_file(a / "classifier.safetensors"), load_file(b / "classifier.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]) if exact else torch.allclose(ta[k], tb[k], rtol=0, atol=1e-6), k
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    loose = TIMINGS if exact else (*TIMINGS, "residual_mean_abs")
    assert {k: v for k, v in ma.items() if k not in loose} == {k: v for k, v in mb.items() if k not in loose}
    for name in (
        ("config.json", "fewshot_split.json") if not exact else ("config.json", "fewshot_split.json", "log.jsonl")
    ):
        if (a / name).exists():
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture()
def job(tmp_path, openai_rn_file):
    image_dir, split_file = make_split_dataset(tmp_path / "tiny", n_train=6, n_val=3, n_test=10)
    common = [
        "--data",
        str(image_dir),
        "--split-file",
        str(split_file),
        "--backbone",
        str(openai_rn_file),
        "--quiet",
        "--device",
        "cpu",
    ]
    return tmp_path, common


TRAIN = ["--shots", "2", "--seed", "1", "--epochs", "5", "--views", "2"]


def test_two_ranks_share_a_cold_cache_and_rank_0_writes_the_run_one_process_writes(job):
    tmp, common = job
    done = torchrun(["train", *common, *TRAIN, "--cache-dir", str(tmp / "c2"), "--out", str(tmp / "r2")], tmp)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("accuracy") == 2  # zero_shot_accuracy and accuracy, printed once: by rank 0
    alone = single(["train", *common, *TRAIN, "--cache-dir", str(tmp / "c1"), "--out", str(tmp / "r1")], tmp)
    assert alone.returncode == 0, alone.stderr
    shared, own = chunks(tmp / "c2"), chunks(tmp / "c1")
    assert sorted(shared) == sorted(own)  # test transform and the 2 views: the same namespaces
    for ns, parts in shared.items():
        keys = [k for _, ks in parts for k in ks]
        assert len(keys) == len(set(keys))  # each image once
        assert set(keys) == {k for _, ks in own[ns] for k in ks}
        if len(keys) > 1:  # every rank encoded a share of every split
            assert {rank for rank, _ in parts} == {"0/2", "1/2"}
    assert {rank for rank, _ in own[next(iter(own))]} == {None}  # a single process marks no rank
    assert_same_run(tmp / "r1", tmp / "r2")


@pytest.mark.slow
def test_zeroshot_eval_and_sweep_under_torchrun_match_one_process(job):
    tmp, common = job
    for tag, run in (("2", torchrun), ("1", single)):
        cache = ["--cache-dir", str(tmp / f"c{tag}")]
        assert (r := run(["zeroshot", *common, *cache, "--out", str(tmp / f"zs{tag}")], tmp)).returncode == 0, r.stderr
        assert (
            r := run(
                [
                    "sweep",
                    str(tmp / f"exp{tag}"),
                    *common,
                    *cache,
                    "--methods",
                    "taskres",
                    "--shots",
                    "1,2",
                    "--seeds",
                    "1",
                    "--epochs",
                    "3",
                    "--views",
                    "1",
                ],
                tmp,
            )
        ).returncode == 0, r.stderr
        cell = tmp / f"exp{tag}" / "runs"
        assert (
            r := run(
                [
                    "eval",
                    "--run-dir",
                    str(next(cell.glob("**/2shot-seed1"))),
                    *cache,
                    "--quiet",
                    "--device",
                    "cpu",
                    "--out",
                    str(tmp / f"ev{tag}"),
                ],
                tmp,
            )
        ).returncode == 0, r.stderr
    assert_same_run(tmp / "zs1", tmp / "zs2")
    runs1 = sorted(p.relative_to(tmp / "exp1") for p in (tmp / "exp1").glob("runs/**/metrics.json"))
    runs2 = sorted(p.relative_to(tmp / "exp2") for p in (tmp / "exp2").glob("runs/**/metrics.json"))
    assert runs1 == runs2 and len(runs1) == 3  # zero-shot, 1 and 2 shots
    for rel in runs1:  # grid order is zero-shot, 1 shot, 2 shots: rank 1 trained the 1-shot cell
        assert_same_run(tmp / "exp1" / rel.parent, tmp / "exp2" / rel.parent, exact="1shot" not in str(rel))
    ev1, ev2 = (json.loads((tmp / f"ev{t}" / "metrics.json").read_text()) for t in "12")
    assert ev1["accuracy"] == ev2["accuracy"] and ev1["per_class_accuracy"] == ev2["per_class_accuracy"]
    for parts in chunks(tmp / "c2").values():
        keys = [k for _, ks in parts for k in ks]
        assert len(keys) == len(set(keys))


def _wrapper(tmp: Path, body: str) -> Path:
    """A script for torchrun that adjusts one rank, then runs the CLI with the given arguments."""
    script = tmp / "rank_script.py"
    script.write_text(
        "import os, sys\nrank = int(os.environ['RANK'])\n"
        + textwrap.dedent(body)
        + "\nfrom taskres.app.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    return script


@pytest.mark.slow
def test_ranks_with_different_commands_stop_with_a_clear_error(job):
    tmp, common = job
    script = _wrapper(tmp, "if rank == 1:\n    sys.argv[sys.argv.index('--seed') + 1] = '2'\n")
    done = torchrun(["train", *common, *TRAIN, "--cache-dir", str(tmp / "c"), "--out", str(tmp / "r")], tmp, script)
    assert done.returncode != 0
    assert "taskres: error: the ranks of this torchrun job disagree on the command line" in done.stderr
    assert not re.search(r'File ".*taskres', done.stderr)  # torchrun's own report, and no traceback of ours
    assert not (tmp / "r").exists()


@pytest.mark.slow
def test_a_cache_folder_that_the_ranks_do_not_share_is_named(job):
    tmp, common = job
    for rank in (0, 1):
        (tmp / f"node{rank}").mkdir()
    script = _wrapper(tmp, "os.chdir(f'node{rank}')\n")  # the same relative --cache-dir, two folders
    done = torchrun(["train", *common, *TRAIN, "--cache-dir", "cache", "--out", str(tmp / "r")], tmp, script)
    assert done.returncode != 0
    assert "is not shared between the nodes" in done.stderr and "rank(s) [1]" in done.stderr
    assert not (tmp / "r").exists()


@pytest.mark.slow
def test_a_rank_killed_mid_way_stops_the_job_and_a_rerun_resumes_from_its_chunks(job):
    tmp, common = job
    script = _wrapper(
        tmp,
        """
        if rank == 1 and os.environ.get("KILL_RANK_1"):
            import signal
            from taskres.cache import FeatureCache
            write = FeatureCache._write_chunk
            def write_then_die(self, *args):
                write(self, *args)
                os.kill(os.getpid(), signal.SIGKILL)  # dies after its first chunk, as a crashed node would
            FeatureCache._write_chunk = write_then_die
        """,
    )
    args = ["train", *common, *TRAIN, "--cache-dir", str(tmp / "c"), "--out", str(tmp / "r")]
    os.environ["KILL_RANK_1"] = "1"
    try:
        failed = torchrun(args, tmp, script)
    finally:
        del os.environ["KILL_RANK_1"]
    assert failed.returncode != 0 and not (tmp / "r").exists()
    assert "another rank" in failed.stderr and "run the same command again to resume" in failed.stderr
    before = {ns: [ks for _, ks in parts] for ns, parts in chunks(tmp / "c").items()}
    assert before  # what the ranks finished is kept
    done = torchrun(args, tmp, script)
    assert done.returncode == 0, done.stderr
    after = {ns: [ks for _, ks in parts] for ns, parts in chunks(tmp / "c").items()}
    for ns, kept in before.items():
        assert all(ks in after[ns] for ks in kept)  # the chunks written before the failure were not redone
    for parts in after.values():
        keys = [k for ks in parts for k in ks]
        assert len(keys) == len(set(keys))
    alone = single(args[:-4] + ["--cache-dir", str(tmp / "c1"), "--out", str(tmp / "r1")], tmp)
    assert alone.returncode == 0, alone.stderr
    assert_same_run(tmp / "r1", tmp / "r")


@pytest.mark.slow
def test_an_official_sweep_under_torchrun_shares_the_splits_its_cells_encode(job):
    """Under --protocol official the zero-shot cell encodes its test split with the fp16 model and TaskRes with the
    trainer's encoding: the ranks encode exactly those splits together, and nothing else."""
    tmp, common = job
    args = ["--methods", "taskres", "--shots", "1", "--seeds", "1", "--epochs", "2", "--protocol", "official"]
    for tag, run in (("2", torchrun), ("1", single)):
        done = run(["sweep", str(tmp / f"exp{tag}"), *common, *args, "--cache-dir", str(tmp / f"c{tag}")], tmp)
        assert done.returncode == 0, done.stderr
    shared, own = chunks(tmp / "c2"), chunks(tmp / "c1")
    assert sorted(shared) == sorted(own)  # no split encoded in a mode that no cell reads
    for parts in shared.values():
        keys = [k for _, ks in parts for k in ks]
        assert len(keys) == len(set(keys))
        if len(keys) > 1:  # encoded by both ranks, before the cells ran
            assert {rank for rank, _ in parts} == {"0/2", "1/2"}
