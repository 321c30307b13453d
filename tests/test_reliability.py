"""Bad inputs and faults (issue 12): each is an exit 2 with a message, never a traceback, and a run folder is either
as it was or a finished run. docs/reliability.md lists every case with the test that covers it."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RN, tiny_clip
from conftest import run_cli as run
from PIL import Image
from safetensors import safe_open

from taskres.cache import FORMAT

TRAIN = ["--shots", "2", "--seed", "1", "--epochs", "2", "--views", "0"]


def train_args(base, out, *extra):
    return ["train", *base, *TRAIN, *extra, "--out", str(out)]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(out: Path) -> list[str]:
    """What a writer of ``out`` left beside it (temporary folders, set-aside runs, lock files)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def exit_2(code, err, pattern):
    import re

    assert code == 2, err
    assert "Traceback" not in err and "taskres: error: " in err, err
    assert re.search(pattern, err), err


def edit_split(base, change):
    split_file = Path(base[base.index("--split-file") + 1])
    splits = json.loads(split_file.read_text())
    change(splits)
    split_file.write_text(json.dumps(splits))


# ---- run folders as transactions ------------------------------------------------------------------------------

LOCK_HOLDER = (
    "import sys; from pathlib import Path; from taskres.run_writer import RunLock; "
    "RunLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); sys.stdin.read()"
)


def hold_lock(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_kept_out_naming_the_holder(env, capsys):
    tmp, base, _ = env
    proc = hold_lock(tmp / "r")
    try:
        code, _, err = run(train_args(base, tmp / "r"), capsys)
        exit_2(code, err, rf"being written by another taskres process \(pid {proc.pid} on host ")
        assert not (tmp / "r").exists()
    finally:
        proc.stdin.close()
        proc.wait()
    assert run(train_args(base, tmp / "r"), capsys)[0] == 0  # the holder released it on exit
    assert leftovers(tmp / "r") == []


def test_stale_lock_of_a_killed_process_is_taken_over_with_a_warning(env, capsys, caplog):
    tmp, base, _ = env
    proc = hold_lock(tmp / "r")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lock = tmp / ".r.taskres-lock"
    assert json.loads(lock.read_text())["pid"] == proc.pid  # kill -9 left it behind
    code, _, err = run(train_args(base, tmp / "r"), capsys)
    assert code == 0, err
    assert f"taking over the stale lock {lock} of pid {proc.pid}" in caplog.text
    assert (tmp / "r" / "metrics.json").is_file() and leftovers(tmp / "r") == []


def test_lock_of_another_host_is_refused(env, capsys):
    tmp, base, _ = env
    (tmp / ".r.taskres-lock").write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    code, _, err = run(train_args(base, tmp / "r"), capsys)
    exit_2(code, err, "locked by pid 1 on host 'elsewhere'.*delete the lock file")


def test_folder_with_foreign_files_is_refused_untouched(env, capsys):
    tmp, base, image_dir = env
    out = tmp / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"my": "own"}')
    (out / "log.jsonl").write_text("my notes\n")
    (image_dir / "test" / "red_1.png").write_bytes(b"broken")  # the run would fail too
    before = snapshot(out)
    for extra in ([], ["--overwrite"]):
        code, _, err = run(train_args(base, out, *extra), capsys)
        exit_2(code, err, "holds files that taskres did not write.*left untouched")
        assert snapshot(out) == before and leftovers(out) == []


def test_failed_overwrite_keeps_the_finished_run(env, capsys):
    tmp, base, image_dir = env
    out = tmp / "r"
    assert run(train_args(base, out), capsys)[0] == 0
    before = snapshot(out)
    (image_dir / "test" / "red_1.png").write_bytes(b"broken")
    code, _, err = run(train_args(base, out, "--overwrite", "--lr", "1e-2"), capsys)
    exit_2(code, err, "cannot be decoded")
    assert snapshot(out) == before and leftovers(out) == []


def test_ctrl_c_leaves_the_target_as_it_was(env, capsys, monkeypatch):
    import taskres.workflow as workflow

    tmp, base, _ = env
    out = tmp / "r"
    assert run(train_args(base, out), capsys)[0] == 0
    before = snapshot(out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(workflow, "fit_method", interrupted)
    code, _, err = run(train_args(base, out, "--overwrite"), capsys)
    assert code == 130 and "left as it was" in err
    assert snapshot(out) == before and leftovers(out) == []
    code, _, err = run(train_args(base, tmp / "new"), capsys)
    assert code == 130 and not (tmp / "new").exists() and leftovers(tmp / "new") == []


def test_what_a_killed_writer_left_is_cleared_or_restored(tmp_path):
    from taskres.run_writer import RunWriter

    out = tmp_path / "r"
    aside = tmp_path / ".r.taskres-old-abc"  # killed between the two renames of a commit
    aside.mkdir()
    (aside / "metrics.json").write_text("{}")
    (aside / "config.json").write_text('{"taskres_version": "x"}')
    (tmp_path / ".r.taskres-tmp-def").mkdir()  # killed while running
    with pytest.raises(ValueError, match="already holds a finished run"):
        RunWriter.create(out)
    assert (out / "metrics.json").read_text() == "{}"  # the set-aside run is back in place
    assert leftovers(out) == []


def test_overwrite_replaces_a_finished_run_whole(env, capsys):
    tmp, base, _ = env
    out = tmp / "r"
    assert run(train_args(base, out, "--method", "taskres"), capsys)[0] == 0
    assert run(train_args(base, out, "--overwrite", "--epochs", "3"), capsys)[0] == 0
    assert len((out / "log.jsonl").read_text().splitlines()) == 3
    assert json.loads((out / "config.json").read_text())["optim"]["epochs"] == 3
    assert leftovers(out) == []


# ---- integrity ------------------------------------------------------------------------------------------------


def test_tampered_classifier_is_refused_by_eval_and_predict(env, capsys):
    tmp, base, image_dir = env
    out = tmp / "r"
    assert run(train_args(base, out, "--lr", "1e-2"), capsys)[0] == 0
    path = out / "classifier.safetensors"
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(64)  # zeros over the last tensor bytes
    path.write_bytes(bytes(data))
    img = str(image_dir / "test" / "red_0.png")
    for argv in (["predict", "--run", str(out), "--quiet", img], ["eval", "--run", str(out), "--quiet"]):
        code, _, err = run(argv, capsys)
        exit_2(code, err, "classifier file .*classifier.safetensors' does not match its checksum")


def test_edited_classifier_metadata_and_config_are_exit_2(env, capsys):
    from safetensors.torch import load_file, save_file

    tmp, base, image_dir = env
    out = tmp / "r"
    assert run(train_args(base, out), capsys)[0] == 0
    img = str(image_dir / "test" / "red_0.png")
    path = out / "classifier.safetensors"
    original = path.read_bytes()
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(load_file(str(path)), str(path), metadata={**meta, "classnames": '["red"]'})
    exit_2(*run(["predict", "--run", str(out), img], capsys)[::2], "does not match its checksum")
    path.write_bytes(original)
    (out / "config.json").write_text("{not json")
    exit_2(*run(["predict", "--run", str(out), img], capsys)[::2], "config.json cannot be read")
    (out / "config.json").write_text('{"backbone": {}, "dataset": {}}')
    exit_2(*run(["predict", "--run", str(out), img], capsys)[::2], "damaged backbone record")


def test_identical_runs_give_identical_classifier_bytes_with_mode_0644(env, capsys):
    tmp, base, _ = env
    for name in ("a", "b"):
        assert run(train_args(base, tmp / name, "--lr", "1e-2"), capsys)[0] == 0
    a, b = (tmp / n / "classifier.safetensors" for n in "ab")
    assert a.read_bytes() == b.read_bytes()
    for p in [*(tmp / "a").iterdir(), *(tmp / "cache").rglob("chunk-*.safetensors")]:
        assert p.stat().st_mode & 0o777 == 0o644, p


def test_classifier_digest_covers_tensors_and_metadata():
    from taskres.runs import classifier_digest

    t = {"w": torch.arange(6.0).reshape(2, 3)}
    d = classifier_digest(t, {"method": "taskres"})
    assert d == classifier_digest({"w": t["w"].clone()}, {"method": "taskres", "sha256": "ignored"})
    assert d != classifier_digest({"w": t["w"] + 1e-7}, {"method": "taskres"})
    assert d != classifier_digest(t, {"method": "linear-probe"})


# ---- divergence and non-finite numbers ------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [["--lr", "1e30"], ["--lr", "1e30", "--weight-decay", "1e30"]])
def test_diverged_training_is_an_error_and_writes_no_run(env, capsys, extra):
    tmp, base, _ = env
    code, _, err = run(train_args(base, tmp / "r", *extra, "--epochs", "5"), capsys)
    exit_2(code, err, r"training diverged in epoch [23] of 5: .*non-finite.*--lr.*--alpha.*--weight-decay")
    assert not (tmp / "r").exists() and leftovers(tmp / "r") == []


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--alpha", "inf"),
        ("--lr", "inf"),
        ("--lr", "nan"),
        ("--weight-decay", "nan"),
        ("--weight-decay", "inf"),
        ("--tip-alpha", "nan"),
    ],
)
def test_non_finite_numbers_are_refused_at_parsing(env, capsys, flag, value):
    tmp, base, _ = env
    argv = train_args(base, tmp / "r", flag, value)
    if flag == "--tip-alpha":
        argv = train_args(base, tmp / "r", "--method", "tip-adapter", "--search", "none", "--tip-alpha", value)
    with pytest.raises(SystemExit) as exc:
        run(argv, capsys)
    assert exc.value.code == 2 and "expected a finite number" in capsys.readouterr().err


def test_library_configs_refuse_non_finite_numbers():
    from taskres.engine import OptimConfig
    from taskres.methods.taskres import TaskResConfig

    with pytest.raises(ValueError, match="alpha must be a finite number"):
        TaskResConfig(alpha=float("inf"))
    with pytest.raises(ValueError, match="weight_decay must be a finite number"):
        OptimConfig(weight_decay=float("nan"))


def test_seed_out_of_the_generators_range_is_refused_before_encoding(env, capsys):
    tmp, base, _ = env
    code, _, err = run(
        ["train", *base, "--shots", "2", "--seed", str(2**64), "--views", "0", "--out", str(tmp / "r")], capsys
    )
    exit_2(code, err, r"--seed must be an integer in \[0, 18446744073709551615\]")
    assert not (tmp / "cache").exists()  # nothing was encoded


# ---- images ---------------------------------------------------------------------------------------------------


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    from taskres.data.images import read_image

    Image.fromarray(np.full((8, 8), 30000, np.uint16)).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").convert("RGB").getpixel((0, 0)) == (255, 255, 255)  # PIL: white
    assert read_image(tmp_path / "g16.png").getpixel((0, 0)) == (117, 117, 117)  # 30000 / 65535 * 255
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "f.tif")
    assert read_image(tmp_path / "f.tif").getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "1", "RGB"])
def test_8_bit_modes_keep_their_pixels(tmp_path, mode):
    from taskres.data.images import read_image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    img.save(path)
    ours = read_image(path)
    assert ours.mode == "RGB" and np.array_equal(np.asarray(ours), np.asarray(Image.open(path).convert("RGB")))


def test_images_above_the_pixel_limit_are_refused_with_the_flag_named(env, capsys):
    tmp, base, _ = env
    code, _, err = run(["zeroshot", *base, "--max-image-pixels", "1000", "--out", str(tmp / "zs")], capsys)
    exit_2(code, err, r"is 40 x 40 = 1600 pixels, more than the limit of 1000.*--max-image-pixels")
    assert run(["zeroshot", *base, "--max-image-pixels", "1600", "--out", str(tmp / "zs")], capsys)[0] == 0


def test_a_folder_passed_as_an_image_is_called_a_folder(env, capsys):
    tmp, base, image_dir = env
    assert run(["zeroshot", *base, "--out", str(tmp / "zs")], capsys)[0] == 0
    code, out, err = run(["predict", "--run", str(tmp / "zs"), "--quiet", str(image_dir)], capsys)
    # predict gives each image its entry (issue 27): the folder's says why, and the exit status is 1
    assert code == 1 and "Traceback" not in err and "1 of 1 images could not be read" in err, err
    assert f"error: image {str(image_dir)!r} is a folder, not an image file" in out, out


# ---- split files ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case,match",
    [
        ("huge_label", r"labels must run 0..C-1 with no gaps, but 4 classes have label\(s\) up to 1000000"),
        ("fractional_label", "has a label that is not an integer"),
        ("duplicate", r"'train/red_0.png' is listed twice in 'train'"),
        ("escape", r"entry \['../../../etc/passwd'.*leads outside the image folder"),
        ("absolute", r"entry \['/etc/passwd'.*is absolute"),
        ("nul", "holds a NUL byte"),
        ("huge_integer", "is not valid JSON"),
    ],
)
def test_bad_split_entries_are_exit_2_naming_the_entry(env, capsys, case, match):
    tmp, base, _ = env

    def change(splits):
        if case == "huge_label":
            splits["test"].append(["test/huge.png", 1e300, "huge"])
        elif case == "fractional_label":
            splits["test"][0][1] = 0.5
        elif case == "duplicate":
            splits["train"].append(list(splits["train"][0]))
        elif case == "escape":
            splits["test"].append(["../../../etc/passwd", 0, "red"])
        elif case == "absolute":
            splits["test"].append(["/etc/passwd", 0, "red"])
        elif case == "nul":
            splits["test"].append(["test/red\u0000.png", 0, "red"])

    edit_split(base, change)
    if case == "huge_integer":
        split_file = Path(base[base.index("--split-file") + 1])
        split_file.write_text(split_file.read_text().replace(', 0, "red"]', ", " + "9" * 5000 + ', "red"]', 1))
    code, _, err = run(train_args(base, tmp / "r"), capsys)
    exit_2(code, err, match)
    assert not (tmp / "cache").exists()  # refused before any encoding


def test_label_gap_check_is_linear():
    from taskres.data.splits import Entry, classnames_from_entries

    entries = [Entry("a.png", 0, "a"), Entry("b.png", 10**300, "b")]
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="no entry has label"):
        classnames_from_entries(entries, "split")
    assert time.perf_counter() - t0 < 5  # range(10**300) would never end


def test_train_test_overlap_is_a_warning(env, capsys, caplog):
    tmp, base, _ = env
    edit_split(base, lambda s: s["test"].append(list(s["train"][0])))
    code, _, err = run(train_args(base, tmp / "r"), capsys)
    assert code == 0, err
    assert "1 image(s) are in both train and test (e.g. 'train/red_0.png')" in caplog.text


def test_template_that_does_not_fit_the_context_names_the_class(env, capsys):
    tmp, base, _ = env
    long = "a photo of a {} which is a kind of thing seen very very often"  # 15 + 2 tokens with the class
    for command in (
        train_args(base, tmp / "r", "--template", long),
        ["zeroshot", *base, "--template", long, "--out", str(tmp / "zs")],
    ):
        code, _, err = run(command, capsys)
        exit_2(code, err, r"template .*, class 'red'\) is 17 tokens, but the text encoder reads 16.*--template")
    assert not (tmp / "cache").exists()


def test_skip_bad_images_counts_training_images(env, capsys):
    tmp, base, image_dir = env
    (image_dir / "train" / "green_0.png").write_bytes(b"broken")
    code, _, err = run(
        [
            "train",
            *base,
            "--shots",
            "6",
            "--seed",
            "1",
            "--epochs",
            "2",
            "--views",
            "0",
            "--skip-bad-images",
            "--out",
            str(tmp / "r"),
        ],
        capsys,
    )
    assert code == 0, err
    metrics = json.loads((tmp / "r" / "metrics.json").read_text())
    assert metrics["skipped_train_images"] == 1 and metrics["skipped_images"] == 1 and metrics["n_train"] == 17


def test_skip_bad_images_leaving_a_class_empty_is_an_error(env, capsys):
    tmp, base, image_dir = env
    for i in range(6):
        (image_dir / "train" / f"blue_{i}.png").write_bytes(b"broken")
    code, _, err = run(train_args(base, tmp / "r", "--skip-bad-images"), capsys)
    exit_2(code, err, r"--skip-bad-images left class\(es\) \['blue'\] with no training image")


# ---- tracebacks that are now exit 2 ---------------------------------------------------------------------------


def test_unreadable_split_file_and_folders(env, capsys, monkeypatch, image_folder):
    tmp, base, _ = env
    split_file = Path(base[base.index("--split-file") + 1])
    real_read, real_iterdir = Path.read_text, Path.iterdir

    def read_text(self, *args, **kwargs):
        if self == split_file:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self, *args, **kwargs)

    def iterdir(self):
        if self.name == "red":
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "read_text", read_text)
    exit_2(*run(train_args(base, tmp / "r"), capsys)[::2], "split file .* cannot be read \\(Permission denied\\)")
    monkeypatch.setattr(Path, "iterdir", iterdir)
    folder_args = ["--data", str(image_folder), *base[base.index("--backbone") :]]
    exit_2(
        *run(["zeroshot", *folder_args, "--out", str(tmp / "zs")], capsys)[::2],
        r"data folder .*red' cannot be read \(Permission denied\)",
    )


@pytest.mark.parametrize("case", ["file", "unwritable", "partial"])
def test_unusable_cache_dir_is_exit_2_before_encoding(env, capsys, case):
    tmp, base, _ = env
    cache = tmp / "cache"
    if case == "file":
        cache.write_text("not a folder")
    elif case == "unwritable":
        cache = Path("/proc/taskres-cache")  # not writable, even by root
    else:
        cache.mkdir()
        (cache / f"v{FORMAT}").write_text("a file where the format folder belongs")
    argv = ["zeroshot", *base, "--out", str(tmp / "zs")]
    argv[argv.index("--cache-dir") + 1] = str(cache)
    exit_2(*run(argv, capsys)[::2], r"--cache-dir .* is not a writable folder")
    assert not (tmp / "zs").exists()


def test_eval_out_that_is_a_file_is_refused_before_evaluating(env, capsys, monkeypatch):
    import taskres.reuse as reuse

    tmp, base, _ = env
    assert run(["zeroshot", *base, "--out", str(tmp / "zs")], capsys)[0] == 0
    (tmp / "file").write_text("x")
    monkeypatch.setattr(reuse, "encode_split", lambda *a, **k: pytest.fail("evaluated before checking --out"))
    exit_2(
        *run(["eval", "--run", str(tmp / "zs"), "--quiet", "--out", str(tmp / "file")], capsys)[::2],
        "--out .*file' exists and is not a folder",
    )


@pytest.mark.parametrize("damage", ["random", "truncated", "mismatched"])
def test_model_file_backbones_that_do_not_load_are_exit_2(env, capsys, damage, tmp_path):
    import open_clip
    from safetensors.torch import save_file

    tmp, base, _ = env
    (tmp_path / "tiny-rel.json").write_text(json.dumps(TINY_RN))
    open_clip.add_model_config(tmp_path / "tiny-rel.json")
    model = tiny_clip(TINY_RN)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    if damage == "random":
        weights = tmp_path / "w.bin"
        weights.write_bytes(np.random.default_rng(7).bytes(4096))
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        save_file({"visual.proj": torch.zeros(2, 2)}, str(weights))
    argv = ["zeroshot", *base, "--out", str(tmp / "zs")]
    argv[argv.index("--backbone") + 1] = f"tiny-rel:{weights}"
    exit_2(*run(argv, capsys)[::2], "could not load weights .* into open_clip model 'tiny-rel'")
