"""``--backbone hf-hub:ORG/NAME[@REVISION]``: open_clip-format models read from a Hugging Face cache that the tests
lay out offline (blobs, snapshots/<commit> symlinks, refs/<branch>), as ``hf download`` leaves it."""

import hashlib
import io
import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_RN, run_cli, tiny_clip

from taskres.backbones import file_sha256, load_backbone
from taskres.cache import FeatureCache
from taskres.errors import TaskResError

REPO = "tiny-org/tiny-clip"
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def _blob(folder: Path, snapshot: Path, name: str, data: bytes) -> None:
    digest = hashlib.sha256(data).hexdigest()
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    (folder / "blobs" / digest).write_bytes(data)
    snapshot.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(folder / "blobs" / digest, snapshot), snapshot / name)


def add_revision(
    cache: Path, repo: str, commit: str, model, refs=("main",), weights=True, weights_name="open_clip_model.safetensors"
) -> Path:
    """One snapshot of ``repo`` in the cache at ``cache``: open_clip_config.json (the model config and the
    preprocessing) and the weights, as blobs linked from snapshots/<commit>; each ref in ``refs`` points at it."""
    from safetensors.torch import save

    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    config = {"model_cfg": {**TINY_RN, "quick_gelu": False}, "preprocess_cfg": {"mean": list(MEAN), "std": list(STD)}}
    _blob(folder, snapshot, "open_clip_config.json", json.dumps(config).encode())
    if weights:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if weights_name.endswith(".bin"):  # a torch.save'd state dict, as open_clip_pytorch_model.bin is
            buffer = io.BytesIO()
            torch.save(state, buffer)
            data = buffer.getvalue()
        else:
            data = save(state)
        _blob(folder, snapshot, weights_name, data)
    for ref in refs:
        (folder / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """A cache with REPO at two commits: A (main, and tag v1) and B (branch dev), two different models."""
    cache = tmp_path / "hf" / "hub"
    models = {
        COMMIT_A: tiny_clip(TINY_RN, seed=11, quick_gelu=False),
        COMMIT_B: tiny_clip(TINY_RN, seed=12, quick_gelu=False),
    }
    add_revision(cache, REPO, COMMIT_A, models[COMMIT_A], refs=("main", "v1"))
    add_revision(cache, REPO, COMMIT_B, models[COMMIT_B], refs=("dev",))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("TASKRES_OFFLINE", "1")  # nothing may be fetched: a missing file is an error at once
    return cache, models


def test_loads_the_cached_model_with_its_preprocessing_and_identity(hub):
    cache, models = hub
    b = load_backbone(f"hf-hub:{REPO}")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(b.encode_images(x), models[COMMIT_A].encode_image(x))
    torch.testing.assert_close(
        b.encode_text(["a red square."]), models[COMMIT_A].encode_text(b.tokenizer(["a red square."]))
    )
    ident = b.identity
    assert (ident.kind, ident.repo, ident.revision) == ("hf_hub", REPO, COMMIT_A)
    assert ident.mean == MEAN and ident.std == STD and b.mean == MEAN and ident.image_size == 32
    weights = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT_A / "open_clip_model.safetensors"
    assert ident.sha256 == file_sha256(weights)
    key = ident.weights_key()
    assert key["repo"] == REPO and key["revision"] == COMMIT_A
    assert ident.reload_spec() == f"hf-hub:{REPO}@{COMMIT_A}"


def test_revision_by_branch_tag_or_commit(hub):
    _, models = hub
    x = torch.randn(2, 3, 32, 32)
    for rev, commit in (("dev", COMMIT_B), ("v1", COMMIT_A), (COMMIT_B, COMMIT_B)):
        b = load_backbone(f"hf-hub:{REPO}@{rev}")
        assert b.identity.revision == commit and b.identity.spec == f"hf-hub:{REPO}@{rev}"
        torch.testing.assert_close(b.encode_images(x), models[commit].encode_image(x))


def test_hf_home_is_respected_and_the_pytorch_bin_name_is_read(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TASKRES_OFFLINE", "1")
    model = tiny_clip(TINY_RN, seed=3, quick_gelu=False)
    add_revision(tmp_path / "home" / "hub", REPO, COMMIT_A, model, weights_name="open_clip_pytorch_model.bin")
    b = load_backbone(f"hf-hub:{REPO}")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(b.encode_images(x), model.encode_image(x))


def test_two_revisions_never_share_cached_features(hub, tmp_path):
    same = tiny_clip(TINY_RN, seed=11, quick_gelu=False)
    add_revision(hub[0], REPO, "c" * 40, same, refs=("same-weights",))  # A's weights under another commit
    a, c = load_backbone(f"hf-hub:{REPO}"), load_backbone(f"hf-hub:{REPO}@same-weights")
    assert a.identity.sha256 == c.identity.sha256  # byte-identical weights...
    cache = FeatureCache(tmp_path / "features")
    # ...and still two namespaces, one per revision
    assert cache._folder(cache.namespace(a, None)) != cache._folder(cache.namespace(c, None))


def with_backbone(base: list[str], spec: str) -> list[str]:
    """The common CLI arguments with --backbone ``spec``."""
    i = base.index("--backbone") + 1
    return [*base[:i], spec, *base[i + 1 :]]


def test_cli_zeroshot_records_repo_and_revision_and_eval_reloads_the_recorded_commit(hub, env, capsys):
    tmp, base, _ = env
    cache, _ = hub
    for spec, run in ((f"hf-hub:{REPO}", "zs-main"), (f"hf-hub:{REPO}@dev", "zs-dev")):
        code, _, err = run_cli(["zeroshot", *with_backbone(base, spec), "--out", str(tmp / run)], capsys)
        assert code == 0, err
    records = [json.loads((tmp / run / "config.json").read_text())["backbone"] for run in ("zs-main", "zs-dev")]
    assert [(r["kind"], r["repo"], r["revision"]) for r in records] == [
        ("hf_hub", REPO, COMMIT_A),
        ("hf_hub", REPO, COMMIT_B),
    ]
    namespaces = [json.loads(p.read_text())["backbone"] for p in (tmp / "cache").glob("v*/*/namespace.json")]
    assert sorted(n["revision"] for n in namespaces) == [COMMIT_A, COMMIT_B]
    # main moves on: the run is re-evaluated on the commit it used, not on today's main
    (cache / f"models--{REPO.replace('/', '--')}" / "refs" / "main").write_text(COMMIT_B)
    metrics = json.loads((tmp / "zs-main" / "metrics.json").read_text())
    code, out, err = run_cli(
        ["eval", "--run", str(tmp / "zs-main"), "--cache-dir", str(tmp / "cache"), "--quiet", "--device", "cpu"], capsys
    )
    assert code == 0, err
    assert f"{metrics['accuracy']:.2f}" in out


@pytest.mark.parametrize(
    "spec, message",
    [
        ("hf-hub:", "needs a Hugging Face repository as ORG/NAME"),
        ("hf-hub:just-a-name", "needs a Hugging Face repository as ORG/NAME.*got 'just-a-name'"),
        ("hf-hub:org/name/extra", "needs a Hugging Face repository as ORG/NAME"),
        (f"hf-hub:{REPO}@", "after @ is not a revision"),
        (
            "hf-hub:other-org/missing",
            r"repository 'other-org/missing' is not in the local cache .*hf download "
            r"other-org/missing open_clip_config.json open_clip_model.safetensors",
        ),
        (
            f"hf-hub:{REPO}@v9",
            r"revision 'v9' of 'tiny-org/tiny-clip' is not in the local cache .*cached branches/tags: "
            r"dev, main, v1; snapshots: a{40}, b{40}.*--revision v9",
        ),
        (f"hf-hub:{REPO}@{'d' * 40}", "revision 'd{40}' of 'tiny-org/tiny-clip' is not in the local cache"),
    ],
)
def test_bad_hub_specs_exit_2_naming_the_culprit(hub, env, capsys, spec, message):
    tmp, base, _ = env
    code, out, err = run_cli(["zeroshot", *with_backbone(base, spec), "--out", str(tmp / "run")], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.startswith("taskres: error: --backbone ")
    assert re.search(message, err, re.S), err
    assert not (tmp / "run").exists()


def test_a_snapshot_without_weights_is_an_error_not_a_random_model(hub):
    cache, models = hub
    add_revision(cache, REPO, "e" * 40, models[COMMIT_A], refs=("no-weights",), weights=False)
    with pytest.raises(
        TaskResError,
        match=r"has no open_clip_model.safetensors or open_clip_pytorch_model.bin.*"
        r"hf download",
    ):
        load_backbone(f"hf-hub:{REPO}@no-weights")


def test_weights_of_another_model_are_a_clear_error(hub):
    cache, _ = hub
    other = tiny_clip({**TINY_RN, "embed_dim": 16}, seed=1, quick_gelu=False)
    add_revision(cache, REPO, "f" * 40, other, refs=("wrong",))
    with pytest.raises(TaskResError, match="open_clip could not build the model of .*must be an open_clip model"):
        load_backbone(f"hf-hub:{REPO}@wrong")
