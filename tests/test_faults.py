"""Faults that used to end in a traceback, an abort or a misleading message (issue 27): a full disk under the feature
cache and the exporters, PIL's own pixel guard below --max-image-pixels, devices this torch lacks, a run whose
backbone file is gone, and class names that collide or hold a line break."""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_folder, make_split_dataset, run_cli
from PIL import Image

from taskres import cache_keys
from taskres.atomic import write_bytes
from taskres.cache import FORMAT
from taskres.data.images import read_image
from taskres.errors import TaskResError

DISK_FULL = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded"}


def exit_2(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("taskres: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)


def hidden_leftovers(folder: Path) -> list[str]:
    """Temporary files (``.NAME.<id>.tmp``) anywhere under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if p.is_file())


# ---- a full disk -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", list(DISK_FULL))
def test_a_full_disk_is_a_taskres_error_naming_the_folder_and_the_size(tmp_path, full_disk, code):
    folder = full_disk(tmp_path / "full", code)
    with pytest.raises(TaskResError) as raised:
        write_bytes(folder / "x.bin", b"\0" * 3000)
    message = str(raised.value)
    assert f"folder {str(folder)!r}" in message and DISK_FULL[code] in message and "2.9 KiB" in message, message
    assert isinstance(raised.value, OSError) and raised.value.errno == code  # `except OSError` still catches it
    assert list(folder.iterdir()) == []  # no temporary file, no partial file


@pytest.mark.parametrize("names", ["chunk-", "digests-"])
def test_a_full_disk_under_the_feature_cache_is_exit_2(env, capsys, caplog, full_disk, names, monkeypatch):
    """The disk fills up when the features are written ("chunk-"), or already when the index of file digests is
    written, before them ("digests-": then the index is a warning and the chunks are still written)."""
    tmp, base, _ = env
    monkeypatch.setattr(cache_keys, "SETTLE_NS", 0)  # the images were just made: record them in the index anyway
    cache = full_disk(tmp / "cache", names=names)
    code, _, err = run_cli(["zeroshot", *base, "--out", str(tmp / "zs")], capsys)
    if names == "digests-":
        assert code == 0 and "Traceback" not in err, err
        assert "cannot write the feature cache index" in caplog.text and "No space left on device" in caplog.text
        assert list(cache.rglob("chunk-*")) and not list(cache.rglob("digests-*")), err
        assert hidden_leftovers(cache) == []
        return
    exit_2(code, err, "No space left on device", f"folder {str(cache / f'v{FORMAT}')!r}"[:-1], "chunk-", "needs")
    assert hidden_leftovers(cache) == [] and not list(cache.rglob("chunk-*"))
    assert not (tmp / "zs").exists()


@pytest.fixture(scope="module")
def tip_run(tmp_path_factory, openai_rn_file):
    """A finished training-free tip-adapter run on a generated dataset with the tiny ResNet CLIP."""
    from taskres.backbones import load_backbone
    from taskres.config import Setup, TrainConfig
    from taskres.data.sources import open_dataset
    from taskres.workflow import train

    root = tmp_path_factory.mktemp("faults")
    image_dir, split_file = make_split_dataset(root / "data")
    dataset = open_dataset(str(image_dir), str(split_file))
    config = TrainConfig.resolve("tip-adapter", 2, 1, options=None, views=1)
    train(load_backbone(str(openai_rn_file)), dataset, config, Setup(cache_dir=None, quiet=True), out=root / "run")
    return root / "run"


@pytest.mark.parametrize("format, name", [("onnx", "m.onnx"), ("torchscript", "m.pt")])
def test_export_to_a_full_disk_is_exit_2_and_leaves_nothing(tip_run, tmp_path, capsys, full_disk, format, name):
    folder = full_disk(tmp_path / "full")
    out = folder / name
    code, _, err = run_cli(["export", "--run", str(tip_run), "--format", format, "--out", str(out)], capsys)
    exit_2(code, err, "No space left on device", f"folder {str(folder)!r}", repr(name))
    assert "does not trace" not in err and "--format torchscript" not in err, err  # not an exporter's failure
    assert list(folder.iterdir()) == []


def limit_file_size(limit: int) -> None:
    """In the child: files may not grow past ``limit`` bytes; a write beyond it fails with EFBIG (the signal the
    kernel sends first is ignored, as a shell's ``ulimit -f`` with a trap would)."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.parametrize("format", ["torchscript", "onnx"])
def test_export_past_a_real_write_limit_is_exit_2_not_an_abort(tip_run, tmp_path, format):
    """A real write failure from the kernel (no monkeypatching): torch's C++ writer used to abort the process
    (SIGABRT) and leave its hidden temporary file; the ONNX file's failure was called a tracing failure."""
    import subprocess
    import sys

    code = "import sys; from taskres.app.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = ["export", "--run", str(tip_run), "--format", format, "--out", str(tmp_path / "m.pt")]
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv],
        preexec_fn=lambda: limit_file_size(200_000),
        capture_output=True,
        text=True,
        timeout=300,
    )
    exit_2(proc.returncode, proc.stderr, "File too large", f"folder {str(tmp_path)!r}", "'m.pt'", "ulimit -f")
    assert list(tmp_path.iterdir()) == []


def test_an_exporters_own_full_disk_is_not_called_a_tracing_failure(tip_run, tmp_path, monkeypatch):
    import taskres.export as export

    def exporter(*args):
        raise OSError(errno.ENOSPC, "No space left on device", "/tmp/torch-cache/x")

    monkeypatch.setattr(export, "torchscript_bytes", exporter)
    with pytest.raises(TaskResError) as raised:
        export.export_run(tip_run, tmp_path / "m.pt", "torchscript", n_check=2)
    assert "No space left on device while the exporter wrote /tmp/torch-cache/x" in str(raised.value)
    assert "does not trace" not in str(raised.value) and list(tmp_path.iterdir()) == []


def test_a_model_too_large_for_one_onnx_file_names_torchscript(tip_run, tmp_path, monkeypatch):
    import taskres.export_formats as formats
    from taskres.export import export_run

    monkeypatch.setattr(formats, "ONNX_MAX_BYTES", 1000)
    with pytest.raises(
        TaskResError, match=r"more than the 2 GiB that one ONNX file holds; choose `format` torchscript"
    ):
        export_run(tip_run, tmp_path / "m.onnx", "onnx", n_check=2)
    assert list(tmp_path.iterdir()) == []


def test_export_still_writes_the_file_when_there_is_space(tip_run, tmp_path):
    from taskres.export import export_run, read_metadata

    out = tmp_path / "m.pt"
    export_run(tip_run, out, "torchscript", n_check=2)
    assert read_metadata(out)["method"] == "tip-adapter" and os.stat(out).st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


# ---- PIL's own pixel guard ---------------------------------------------------------------------------------------


def save_png(path: Path, width: int, height: int) -> Path:
    Image.fromarray(np.full((height, width, 3), 128, dtype=np.uint8)).save(path)
    return path


def test_the_pixel_limit_wins_over_pils_guard(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses above 2000 pixels, warns above 1000
    wide = save_png(tmp_path / "wide.png", 60, 60)  # 3600 pixels
    assert read_image(wide, max_pixels=5000).size == (60, 60)
    assert read_image(wide, max_pixels=None).size == (60, 60)
    middle = save_png(tmp_path / "middle.png", 40, 40)  # 1600: PIL would warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_image(middle, max_pixels=5000).size == (40, 40)
    huge = save_png(tmp_path / "huge.png", 100, 100)
    with pytest.raises(TaskResError, match=r"100 x 100 = 10000 pixels, more than the limit of 5000") as raised:
        read_image(huge, max_pixels=5000)
    assert raised.value.param == "max_image_pixels"
    assert Image.MAX_IMAGE_PIXELS == 1000  # PIL's setting is back as it was


def test_the_pixel_limit_holds_across_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    paths = [save_png(tmp_path / f"{i}.png", 50 + i, 50) for i in range(4)]
    barrier = threading.Barrier(4)

    def read(i: int) -> tuple[int, int]:
        barrier.wait()
        return [read_image(paths[(i + k) % 4], max_pixels=10_000).size for k in range(20)][-1]

    with ThreadPoolExecutor(4) as pool:
        assert len(set(pool.map(read, range(4)))) == 4
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_max_image_pixels_above_pils_guard_reads_the_images(env, capsys, monkeypatch):
    tmp, base, _ = env
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # the 40 x 40 images are above PIL's 2 x 500
    code, _, err = run_cli(["zeroshot", *base, "--max-image-pixels", "1600", "--out", str(tmp / "zs")], capsys)
    assert code == 0, err


# ---- devices -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["mps", "mps:0", "xpu", "npu", "foo", "cuda:7"])
def test_a_device_this_torch_lacks_is_exit_2_naming_the_available_ones(env, capsys, device):
    if device.startswith("mps") and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    tmp, base, _ = env
    base = base[: base.index("--device")] + base[base.index("--device") + 2 :]
    code, _, err = run_cli(["zeroshot", *base, "--device", device, "--out", str(tmp / "zs")], capsys)
    exit_2(code, err, "--device", device, "available here: cpu")
    assert not (tmp / "zs").exists() and not (tmp / "cache").exists()


def test_parse_device_names_the_parameter():
    from taskres.devices import available_devices, parse_device

    assert available_devices()[0] == "cpu"
    assert parse_device("cpu") == torch.device("cpu")
    with pytest.raises(TaskResError, match="available here: cpu") as raised:
        parse_device("xpu:3")
    assert raised.value.param == "device"


# ---- export of a run whose backbone file is gone -----------------------------------------------------------------


def test_export_of_a_run_whose_backbone_file_is_gone_says_to_restore_it(env, capsys, openai_rn_file):
    tmp, base, _ = env
    weights = tmp / "weights" / "mine.pt"
    weights.parent.mkdir()
    shutil.copy(openai_rn_file, weights)
    base[base.index("--backbone") + 1] = str(weights)
    code, _, err = run_cli(["zeroshot", *base, "--out", str(tmp / "zs")], capsys)
    assert code == 0, err
    weights.unlink()
    out = tmp / "m.pt"
    code, _, err = run_cli(["export", "--run", str(tmp / "zs"), "--format", "torchscript", "--out", str(out)], capsys)
    exit_2(code, err, f"backbone file {str(weights)!r}", "put it back at that path")
    assert "pass --backbone" not in err and not out.exists()


# ---- class names -------------------------------------------------------------------------------------------------


def rename_class(split_file: Path, old: str, new: str) -> None:
    splits = json.loads(split_file.read_text())
    for entries in splits.values():
        for entry in entries:
            if entry[2] == old:
                entry[2] = new
    split_file.write_text(json.dumps(splits))


def test_class_names_differing_only_by_case_or_whitespace_are_a_warning(tmp_path, caplog):
    from taskres.data.splits import load_image_folder, load_split_file

    image_dir, split_file = make_split_dataset(tmp_path / "d")
    rename_class(split_file, "green", "Red ")
    dataset = load_split_file(split_file, image_dir)
    assert dataset.classnames == ("red", "Red ", "blue")  # kept as written
    assert "'red' and 'Red '" in caplog.text and "differ only in case or whitespace" in caplog.text
    assert str(split_file) in caplog.text
    caplog.clear()
    root = make_image_folder(tmp_path / "f")
    for split in ("train", "test"):
        (root / split / "green").rename(root / split / "RED")
    load_image_folder(root)
    assert "'RED' and 'red'" in caplog.text and "differ only in case or whitespace" in caplog.text


@pytest.mark.parametrize("name", ["red\n", "re\nd", "red\r"])
def test_a_line_break_in_a_class_name_is_exit_2_before_encoding(env, capsys, name):
    tmp, base, _ = env
    split_file = Path(base[base.index("--split-file") + 1])
    rename_class(split_file, "red", name)
    code, _, err = run_cli(["zeroshot", *base, "--out", str(tmp / "zs")], capsys)
    exit_2(code, err, f"class name {name!r}", f"split file {str(split_file)!r}", "line break")
    assert not (tmp / "cache").exists()


def test_a_line_break_in_a_class_folder_name_is_an_error(tmp_path):
    from taskres.data.splits import load_image_folder

    root = make_image_folder(tmp_path / "f")
    for split in ("train", "test"):
        (root / split / "green").rename(root / split / "gre\nen")
    with pytest.raises(TaskResError, match=r"class name 'gre\\nen' .* line break"):
        load_image_folder(root)


# ---- a full disk under a run folder -------------------------------------------------------------------------------

TRAIN = ["--shots", "1", "--seed", "1", "--epochs", "2", "--views", "1"]


@pytest.mark.parametrize("names", [".taskres-lock", "fewshot_split", ""])
def test_overwrite_on_a_full_disk_is_exit_2_and_leaves_the_run_and_no_lock(env, capsys, full_disk, names):
    """``train --overwrite`` with no space left: the lock file beside the run folder used to be left behind empty
    (its holder could not be written) after an OSError traceback."""
    tmp, base, _ = env
    out = tmp / "runs" / "r"
    assert run_cli(["train", *base, *TRAIN, "--out", str(out)], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    full_disk(tmp / "runs", names=names)
    code, _, err = run_cli(["train", *base, *TRAIN, "--lr", "1e-2", "--overwrite", "--out", str(out)], capsys)
    exit_2(code, err, f"cannot write the run folder {str(out)!r}", "No space left on device", "is as it was")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["r"]  # no lock, no temporary folder


def test_overwrite_past_a_real_write_limit_is_exit_2_and_leaves_no_lock(env, capsys):
    """The kernel's own refusal (``ulimit -f 0``: no file may grow), in a subprocess: the lock file's holder cannot
    be written; it used to be left beside the run folder, empty, after an OSError traceback."""
    import subprocess
    import sys

    tmp, base, _ = env
    out = tmp / "runs" / "r"
    assert run_cli(["train", *base, *TRAIN, "--out", str(out)], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code = "import sys; from taskres.app.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = ["train", *base, *TRAIN, "--no-cache", "--overwrite", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv],
        preexec_fn=lambda: limit_file_size(0),
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    last = proc.stderr.strip().splitlines()[-1]  # joblib warns first that it cannot make its semaphores
    exit_2(proc.returncode, last, f"cannot write the run folder {str(out)!r}", "'.r.taskres-lock'", "File too large")
    assert "Traceback" not in proc.stderr and "ulimit -f" in last
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["r"]


def test_the_epoch_log_on_a_full_disk_is_a_disk_full_error():
    """log.jsonl is appended to through a buffered file, which no atomic helper sees; /dev/full is the kernel's
    own full disk (every write: ENOSPC)."""
    from taskres.run_writer import EpochLog

    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    log = EpochLog(Path("/dev/full"))
    with pytest.raises(TaskResError, match=r"cannot write 'full' in folder '/dev': No space left on device"):
        log({"epoch": 0, "loss": 1.0})
    log.close()  # nothing left to flush: no second error
