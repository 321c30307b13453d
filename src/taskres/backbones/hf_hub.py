"""Hugging Face Hub models in open_clip's format, ``hf-hub:ORG/NAME[@REVISION]``, read from the local Hugging Face
cache and downloaded only when they are not there and the Hub answers.

The revision is resolved in the cache (refs/BRANCH -> commit), and the snapshot folder of that commit is built by
open_clip's ``local-dir:`` loader (the same config and preprocessing fields as its ``hf-hub:`` loader, which takes no
revision and, offline, would build a randomly initialised model when the weights file is missing)."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from taskres.backbones.backbone import HF_HUB_PREFIX, ClipModel
from taskres.backbones.weights import LOAD_ERRORS, file_sha256, first_line, network_reachable
from taskres.errors import TaskResFileNotFoundError, TaskResValueError

logger = logging.getLogger(__name__)

# open_clip's own names on the Hub (open_clip.pretrained: HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME), in
# the order its hf-hub loader prefers them
HF_CONFIG_FILE = "open_clip_config.json"
HF_WEIGHTS_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
# (snapshot folder, commit hash) of a revision in the cache
Snapshot = tuple[Path, str]


def hf_hub_cache_dir() -> Path:
    """The Hugging Face cache as huggingface_hub finds it, read from the environment at each call (huggingface_hub
    reads it once, at import): $HF_HUB_CACHE, $HUGGINGFACE_HUB_CACHE, $HF_HOME/hub, $XDG_CACHE_HOME/huggingface/hub,
    ~/.cache/huggingface/hub."""
    env = os.environ
    hub = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not hub:
        home = env.get("HF_HOME") or os.path.join(
            env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
        )
        hub = os.path.join(home, "hub")
    return Path(os.path.expandvars(hub)).expanduser()


def parse_hf_hub_spec(spec: str) -> tuple[str, str | None]:
    """``hf-hub:ORG/NAME[@REVISION]`` -> (ORG/NAME, REVISION or None)."""
    repo, at, revision = spec[len(HF_HUB_PREFIX) :].partition("@")
    if not HF_REPO_ID.fullmatch(repo) or "--" in repo or ".." in repo:
        raise TaskResValueError(
            f"backbone {spec!r}: hf-hub: needs a Hugging Face repository as ORG/NAME, e.g. "
            "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K, optionally with @REVISION (a branch, a tag or a commit "
            f"hash); got {repo!r}.",
            param="backbone",
        )
    if at and (
        not revision
        or ".." in revision.split("/")
        or revision.startswith("/")
        or any(c.isspace() or c in "\\~^:?*[" for c in revision)
    ):
        raise TaskResValueError(
            f"backbone {spec!r}: {revision!r} after @ is not a revision; give a branch, a tag or a "
            "40-hex commit hash (hf-hub:ORG/NAME@main), or drop @ for the default branch.",
            param="backbone",
        )
    return repo, revision if at else None


def load_hf_hub(spec: str) -> tuple[ClipModel, Any, dict]:
    """(model, tokenizer, identity fields) of a Hub model in open_clip's format (open_clip_config.json and
    open_clip_model.safetensors or open_clip_pytorch_model.bin); the identity pins the snapshot's commit."""
    repo, revision = parse_hf_hub_spec(spec)
    cache = hf_hub_cache_dir()
    (snapshot, commit), weights = _cached_snapshot(spec, repo, revision, cache)
    model, tokenizer = _build_from_snapshot(spec, snapshot, weights)
    identity = {
        "kind": "hf_hub",
        "arch": f"{HF_HUB_PREFIX}{repo}",
        "repo": repo,
        "revision": commit,
        "sha256": file_sha256(weights),
    }
    return model, tokenizer, identity


def _cached_snapshot(spec: str, repo: str, revision: str | None, cache: Path) -> tuple[Snapshot, Path]:
    """The snapshot of ``repo`` at ``revision`` and its weights file, fetched first when the cache lacks either and
    the Hub answers; a TaskResFileNotFoundError that says what the cache holds otherwise."""
    found, (config, weights) = _look_up(repo, revision, cache)
    if (found is None or config is None or weights is None) and network_reachable("https://huggingface.co"):
        _download(spec, repo, revision, cache)
        found, (config, weights) = _look_up(repo, revision, cache)
    hint = _fetch_hint(repo, revision, cache)
    if found is None:
        raise _not_cached(spec, repo, revision, cache, hint)
    snapshot, commit = found
    if config is None or weights is None:
        missing = HF_CONFIG_FILE if config is None else " or ".join(HF_WEIGHTS_FILES)
        raise TaskResFileNotFoundError(
            f"backbone {spec!r}: the cached snapshot {str(snapshot)!r} (revision {commit}) has no {missing}; "
            f"taskres loads open_clip-format Hub models, which carry both. {hint}",
            param="backbone",
        )
    return (snapshot, commit), weights


def _look_up(repo: str, revision: str | None, cache: Path) -> tuple[Snapshot | None, tuple[Path | None, Path | None]]:
    """The snapshot of ``repo`` at ``revision`` in the cache (or None) and its config and weights files (or None)."""
    found = _snapshot(repo, revision, cache)
    return found, (_snapshot_files(found[0]) if found else (None, None))


def _repo_folder(repo: str, cache: Path) -> Path:
    return cache / f"models--{repo.replace('/', '--')}"


def _snapshot(repo: str, revision: str | None, cache: Path) -> Snapshot | None:
    """(snapshot folder, commit hash) of ``repo`` at ``revision`` (default: main) in the cache, or None."""
    folder = _repo_folder(repo, cache)
    wanted = revision or "main"
    commit: str | None = wanted if COMMIT_HASH.fullmatch(wanted) else None
    if commit is None:
        ref = folder / "refs" / wanted
        try:
            commit = ref.read_text().strip() if ref.is_file() else None
        except (OSError, UnicodeDecodeError):
            commit = None
    if commit is None or not COMMIT_HASH.fullmatch(commit) or not (folder / "snapshots" / commit).is_dir():
        return None
    return folder / "snapshots" / commit, commit


def _snapshot_files(snapshot: Path) -> tuple[Path | None, Path | None]:
    """(open_clip_config.json, the weights file open_clip's Hub loader would take) in a snapshot, or None each."""
    config = snapshot / HF_CONFIG_FILE
    weights = next((snapshot / n for n in HF_WEIGHTS_FILES if (snapshot / n).is_file()), None)
    return (config if config.is_file() else None), weights


def _not_cached(spec: str, repo: str, revision: str | None, cache: Path, hint: str) -> TaskResFileNotFoundError:
    """The error for a repository, or a revision of it, that is not in the cache: what the cache holds of it."""
    folder = _repo_folder(repo, cache)
    if not folder.is_dir():
        return TaskResFileNotFoundError(
            f"backbone {spec!r}: the Hugging Face repository {repo!r} is not in the local "
            f"cache {str(cache)!r}, and the Hub is unreachable or offline mode is set. "
            f"{hint}",
            param="backbone",
        )
    refs = folder / "refs"
    cached = sorted(p.relative_to(refs).as_posix() for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else []
    snapshots = sorted(p.name for p in (folder / "snapshots").iterdir()) if (folder / "snapshots").is_dir() else []
    return TaskResFileNotFoundError(
        f"backbone {spec!r}: revision {revision or 'main'!r} of {repo!r} is not in the local cache "
        f"{str(cache)!r} (cached branches/tags: {', '.join(cached) or 'none'}; snapshots: "
        f"{', '.join(snapshots) or 'none'}). Pass one of those as @REVISION, or fetch it. {hint}",
        param="backbone",
    )


def _fetch_hint(repo: str, revision: str | None, cache: Path) -> str:
    rev = f" --revision {revision}" if revision else ""
    files = f"{HF_CONFIG_FILE} {HF_WEIGHTS_FILES[0]}"
    return (
        f"On a connected machine run `hf download {repo} {files}{rev} --cache-dir {cache}` (older "
        f"huggingface_hub: `huggingface-cli download` with the same arguments), or copy its cache folder "
        f"models--{repo.replace('/', '--')} into {str(cache)!r}; set $HF_HUB_CACHE (or $HF_HOME) to use another "
        "cache."
    )


def _download(spec: str, repo: str, revision: str | None, cache: Path) -> None:
    """Fetch the config and the weights into the cache (only called when the Hub answers)."""
    from huggingface_hub import hf_hub_download

    logger.warning("downloading %s from the Hugging Face Hub into %s", spec, cache)
    try:
        hf_hub_download(repo, HF_CONFIG_FILE, revision=revision, cache_dir=str(cache))
        for i, name in enumerate(HF_WEIGHTS_FILES):
            try:
                hf_hub_download(repo, name, revision=revision, cache_dir=str(cache))
                break
            except Exception:  # the Hub's "entry not found": try the next name, and report the last
                if i == len(HF_WEIGHTS_FILES) - 1:
                    raise
    except Exception as err:  # the Hub's errors: no such repository, revision or file, a gated repository, HTTP
        raise TaskResValueError(
            f"backbone {spec!r} could not be fetched from the Hugging Face Hub "
            f"({type(err).__name__}: {first_line(err)}); check the repository and the revision. "
            f"{_fetch_hint(repo, revision, cache)}",
            param="backbone",
        ) from None


class _DropRandomInitWarning(logging.Filter):
    """open_clip warns "initialized randomly" when it is asked to build a model without its weights; the weights are
    loaded right after, so the warning would only mislead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def _build_from_snapshot(spec: str, snapshot: Path, weights: Path) -> tuple[ClipModel, Any]:
    """(model, tokenizer) built by open_clip's ``local-dir:`` loader from a snapshot, its weights loaded strictly."""
    import open_clip

    root = logging.getLogger()
    drop = _DropRandomInitWarning()
    root.addFilter(drop)
    try:
        model = open_clip.create_model(f"local-dir:{snapshot}", load_weights=False, pretrained_text=False)
        open_clip.load_checkpoint(model, str(weights), strict=True)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{snapshot}")
    except LOAD_ERRORS + (ImportError, json.JSONDecodeError) as err:
        raise TaskResValueError(
            f"backbone {spec!r}: open_clip could not build the model of {str(snapshot)!r} "
            f"({type(err).__name__}: {first_line(err)}); the snapshot's {HF_CONFIG_FILE} and "
            f"{weights.name} must be an open_clip model and its weights.",
            param="backbone",
        ) from None
    finally:
        root.removeFilter(drop)
    return model, tokenizer
