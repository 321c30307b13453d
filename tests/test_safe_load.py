"""The safe checkpoint and pickle readers (safe_load.py): what loads, with which tensors and state, and the whole
message of each refusal, on files written here (docs/mutation.md)."""

from __future__ import annotations

import os
import pickle
import sys
import types
import zipfile

import pytest
import torch

from taskres.errors import TaskResError, TaskResFileNotFoundError
from taskres.safe_load import Inert, load_checkpoint, load_plain_pickle

WEIGHTS = {"state_dict": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}}


def assert_weights(loaded):
    assert loaded.keys() == WEIGHTS.keys() and loaded["state_dict"].keys() == WEIGHTS["state_dict"].keys()
    for key, tensor in WEIGHTS["state_dict"].items():
        got = loaded["state_dict"][key]
        assert got.device.type == "cpu" and got.dtype == tensor.dtype and torch.equal(got, tensor)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


class EvalCall:
    def __reduce__(self):
        return (eval, ("1 + 1",))


class Record:
    def __init__(self, *args):
        self.args = args


# ---- checkpoints ---------------------------------------------------------------------------------------------------


def test_checkpoint_reader_keeps_tensors_and_refuses_code(tmp_path):
    weights = {"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 50}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)
    good = tmp_path / "model.pth.tar"
    torch.save({**weights, "optimizer": opt, "scheduler": None}, good)
    ckpt = load_checkpoint(good)
    assert torch.equal(ckpt["state_dict"]["w"], weights["state_dict"]["w"]) and ckpt["epoch"] == 50
    assert isinstance(ckpt["optimizer"], Inert)
    plain = tmp_path / "plain.pt"
    torch.save(weights, plain)
    assert torch.equal(load_checkpoint(plain)["state_dict"]["w"], weights["state_dict"]["w"])
    evil = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, evil)
    with pytest.raises(TaskResError, match=r"refused: its pickle calls .*system"):
        load_checkpoint(evil, what="strong_base")
    with pytest.raises(TaskResError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(good.read_bytes()[:200])
    with pytest.raises(TaskResError, match="cannot be read safely"):
        load_checkpoint(damaged)


def test_missing_files_are_named_with_what_they_are(tmp_path):
    missing = tmp_path / "none.pt"
    cases = [
        (lambda: load_checkpoint(missing), "checkpoint"),
        (lambda: load_checkpoint(str(missing), "strong_base"), "strong_base"),
        (lambda: load_plain_pickle(missing, {}), "file"),
        (lambda: load_plain_pickle(missing, {}, what="few-shot file"), "few-shot file"),
    ]
    for call, what in cases:
        with pytest.raises(TaskResFileNotFoundError) as err:
            call()
        assert str(err.value) == f"{what} {str(missing)!r} does not exist."


def test_every_unsafe_global_is_named_in_the_refusal(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": Evil(), "y": EvalCall(), **WEIGHTS}, path)
    with pytest.raises(TaskResError) as err:
        load_checkpoint(path)
    system = f"{os.system.__module__}.system"  # posix.system here
    tail = (
        ", which could run code. Only tensors, containers and optimiser/scheduler state are read; re-save the "
        "weights with safetensors or as a plain dict of tensors."
    )
    # the scanner reports the globals as a set: either order
    assert str(err.value) in {
        f"checkpoint {str(path)!r} is refused: its pickle calls {a!r}, {b!r}{tail}"
        for a, b in ((system, "builtins.eval"), ("builtins.eval", system))
    }


def _torch_archive(tmp_path, name, change):
    """A torch.save archive of WEIGHTS rewritten with ``change(record name, bytes) -> bytes or None (dropped)``."""
    good = tmp_path / "good.pt"
    torch.save(WEIGHTS, good)
    with zipfile.ZipFile(good) as z:
        records = {n: z.read(n) for n in z.namelist()}
    path = tmp_path / name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for record, data in records.items():
            data = change(record, data)
            if data is not None:
                z.writestr(record, data)
    assert zipfile.is_zipfile(path)
    return path


def test_a_damaged_archive_is_named_with_the_scanners_error(tmp_path):
    same = _torch_archive(tmp_path, "same.pt", lambda n, b: b)  # the rewriting itself keeps a readable archive
    assert_weights(load_checkpoint(same))
    truncated = _torch_archive(tmp_path, "trunc.pt", lambda n, b: b[:10] if n.endswith("/data.pkl") else b)
    with pytest.raises(EOFError) as raw:  # torch's scanner: a bare EOFError, no text
        torch.serialization.get_unsafe_globals_in_checkpoint(str(truncated))
    assert str(raw.value) == ""
    with pytest.raises(TaskResError) as err:
        load_checkpoint(truncated, "strong_base")
    assert str(err.value) == f"strong_base {str(truncated)!r} cannot be read safely (EOFError: )."
    no_pickle = _torch_archive(tmp_path, "nopkl.pt", lambda n, b: None if n.endswith("/data.pkl") else b)
    with pytest.raises(TaskResError) as err:
        load_checkpoint(no_pickle)
    message = str(err.value)
    assert message.startswith(
        f"checkpoint {str(no_pickle)!r} cannot be read safely (RuntimeError: PytorchStreamReader failed locating "
        "file data.pkl"
    )
    assert message.endswith(").") and "\n" not in message


def test_an_unreadable_file_gets_the_first_line_of_torchs_error(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(TaskResError) as err:
        load_checkpoint(empty)
    assert str(err.value) == f"checkpoint {str(empty)!r} cannot be read safely (EOFError: )."
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(pickle.UnpicklingError) as raw:
        torch.load(str(junk), weights_only=True)
    assert len(str(raw.value).splitlines()) > 1  # torch's message runs over several lines; only the first is kept
    with pytest.raises(TaskResError) as err:
        load_checkpoint(junk)
    first = str(raw.value).splitlines()[0]
    assert first.startswith("Weights only load failed.")
    assert str(err.value) == f"checkpoint {str(junk)!r} cannot be read safely (UnpicklingError: {first})."


def test_the_legacy_format_loads(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save(WEIGHTS, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    assert_weights(load_checkpoint(path))


def test_a_checkpoint_saved_on_a_gpu_loads_on_the_cpu(tmp_path, monkeypatch):
    """The official checkpoints were saved from GPUs: their tensors are tagged cuda:0, and come back on the CPU (torch
    alone refuses them on a machine without CUDA)."""
    paths = [tmp_path / "gpu.pt", tmp_path / "gpu-legacy.pt"]
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(WEIGHTS, paths[0])
        torch.save(WEIGHTS, paths[1], _use_new_zipfile_serialization=False)
    for path in paths:
        assert_weights(load_checkpoint(path))


CALLS: list = []


def record_call(*args):
    CALLS.append(args)
    return "ran"


class CallsRecord:
    def __reduce__(self):
        return (record_call, ("from the file",))


def test_nothing_runs_even_when_torch_is_told_to_unpickle_freely(tmp_path, monkeypatch):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD turns torch.load's default to full unpickling; the reader asks for weights
    only itself, so a file that calls a function is still refused and the function never runs (a legacy-format
    file: no archive for the scanner, torch's weights-only unpickler refuses it)."""
    path = tmp_path / "calls.pt"
    torch.save({"x": CallsRecord(), **WEIGHTS}, path, _use_new_zipfile_serialization=False)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    CALLS.clear()
    with pytest.raises(TaskResError) as err:
        load_checkpoint(path)
    assert CALLS == []
    assert str(err.value).startswith(f"checkpoint {str(path)!r} cannot be read safely (UnpicklingError: ")
    plain = tmp_path / "plain.pt"  # plain weights still load
    torch.save(WEIGHTS, plain, _use_new_zipfile_serialization=False)
    assert_weights(load_checkpoint(plain))


class WarmupScheduler:
    """Stands for a Dassl class that a checkpoint builds by calling it with arguments."""

    made: list = []

    def __init__(self, *args):
        WarmupScheduler.made.append(args)
        self.args = args

    def __reduce__(self):
        return (WarmupScheduler, self.args)


def test_optimiser_and_scheduler_objects_keep_their_state_and_run_nothing(tmp_path, monkeypatch):
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    fake = types.ModuleType("dassl")  # a "dassl" package only while saving: loading must not import it
    fake.WarmupScheduler = WarmupScheduler
    path = tmp_path / "model.pth.tar"
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "dassl", fake)
        m.setattr(WarmupScheduler, "__module__", "dassl")
        torch.save({**WEIGHTS, "optimizer": opt, "scheduler": WarmupScheduler("linear", 5, 1e-5)}, path)
    WarmupScheduler.made.clear()
    ckpt = load_checkpoint(path)
    assert_weights({"state_dict": ckpt["state_dict"]})
    optimizer, scheduler = ckpt["optimizer"], ckpt["scheduler"]
    assert isinstance(optimizer, Inert) and isinstance(scheduler, Inert)
    assert not isinstance(optimizer, torch.optim.Optimizer) and WarmupScheduler.made == []  # nothing was built
    assert scheduler.args == ("linear", 5, 1e-5) and scheduler.kwargs == {}
    state = optimizer.state  # torch.optim.Optimizer.__getstate__: defaults, state, param_groups
    assert state["defaults"]["lr"] == 0.1 and state["defaults"]["momentum"] == 0.9
    (group,) = state["param_groups"]
    assert group["lr"] == 0.1 and torch.equal(group["params"][0], param.detach())


# ---- plain pickles -------------------------------------------------------------------------------------------------


def test_plain_pickle_reader_builds_only_allowed_records(tmp_path):
    data = tmp_path / "ok.pkl"
    data.write_bytes(pickle.dumps({"a": [1, 2.5, "x"], "b": (None, True)}))
    assert load_plain_pickle(data, {}) == {"a": [1, 2.5, "x"], "b": (None, True)}
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(TaskResError, match=r"refused: its pickle asks for '(posix|os)\.system'"):
        load_plain_pickle(evil, {}, what="split")
    truncated = tmp_path / "t.pkl"
    truncated.write_bytes(pickle.dumps(list(range(100)))[:20])
    with pytest.raises(TaskResError, match=r"cannot be read \(pickle data was truncated\)"):
        load_plain_pickle(truncated, {})
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    with pytest.raises(TaskResError, match="cannot be read as a pickle .EOFError"):
        load_plain_pickle(empty, {})
    with pytest.raises(TaskResError, match="does not exist"):
        load_plain_pickle(tmp_path / "none.pkl", {})
    rec = tmp_path / "rec.pkl"
    rec.write_bytes(pickle.dumps(Record(1, 2)))
    name = f"{Record.__module__}.Record"
    out = load_plain_pickle(rec, {name: Record})
    assert isinstance(out, Record) and out.__dict__ == {"args": (1, 2)}


def test_plain_pickle_messages_name_the_file_and_the_global(tmp_path):
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(TaskResError) as err:
        load_plain_pickle(evil, {})
    system = f"{os.system.__module__}.system"
    assert str(err.value) == (
        f"file {str(evil)!r} is refused: its pickle asks for {system!r}, which could run code; only plain data and "
        "the records listed in the docs are read."
    )
    truncated = tmp_path / "t.pkl"
    truncated.write_bytes(pickle.dumps(list(range(100)))[:20])
    with pytest.raises(TaskResError) as err:
        load_plain_pickle(truncated, {}, what="few-shot file")
    assert str(err.value) == f"few-shot file {str(truncated)!r} cannot be read (pickle data was truncated)."
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    with pytest.raises(TaskResError) as err:
        load_plain_pickle(empty, {})
    assert str(err.value) == f"file {str(empty)!r} cannot be read as a pickle (EOFError: Ran out of input)."
