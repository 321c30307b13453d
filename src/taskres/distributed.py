"""Scale-out under ``torchrun``: the ranks of a job share the encoding, rank 0 alone trains and writes.

``torchrun --nproc-per-node N -m taskres <command> ...`` (``--nnodes`` and a rendezvous endpoint for several
machines) starts N copies of the command. Each copy calls ``init_from_env``, which joins the process group (NCCL
on GPUs, gloo on CPUs) and checks that every rank runs the same command line and sees the same cache folder. A
``FeatureCache`` that holds the job's ``Cluster`` then encodes collectively: the ranks agree on the images still
missing, each encodes every N-th of them into its own cache chunks, they meet at a barrier and read each other's
chunks. Nothing else changes: results do not depend on the number of ranks. Without torchrun (no ``WORLD_SIZE``
in the environment, or 1) the cluster is a single process and every collective is a no-op.

A rank that fails or is stopped makes the others stop with a message at their next meeting point; the chunks
written so far stay in the cache, so running the same command again resumes.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from taskres.errors import TaskResError, TaskResValueError

ENV_TIMEOUT = "TASKRES_DIST_TIMEOUT"  # seconds a rank waits for the others at a meeting point (default 1800)


class RankFailure(TaskResError):
    """Another rank of the job failed or was stopped; this one stops too, keeping what it encoded."""


@dataclass(frozen=True)
class Cluster:
    """This process's place in a torchrun job: rank ``rank`` of ``world_size``, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        """This rank's share of ``items``: every ``world_size``-th, from its rank on."""
        return items[self.rank :: self.world_size]

    def barrier(self, what: str) -> None:
        if self.active:
            self._collective(what, torch.distributed.barrier)

    def gather(self, value: Any, what: str) -> list:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        if not self.active:
            return [value]
        out: list[Any] = [None] * self.world_size
        self._collective(what, torch.distributed.all_gather_object, out, value)
        return out

    def agree(self, what: str, value: Any, hint: str) -> None:
        """Stop, on every rank, when the ranks hold different ``value``s (JSON-able) for ``what``."""
        if not self.active:
            return
        digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
        digests = self.gather(digest, what)
        if len(set(digests)) > 1:
            groups: dict[str, list[int]] = {}
            for rank, d in enumerate(digests):
                groups.setdefault(d, []).append(rank)
            split = "; ".join(f"ranks {ranks}" for ranks in groups.values())
            raise TaskResValueError(f"the ranks of this torchrun job disagree on {what} ({split} differ): {hint}")

    def _collective(self, what: str, op, *args) -> None:
        try:
            op(*args)
        except (RuntimeError, ValueError) as err:  # gloo/NCCL report a dead peer as RuntimeError (DistBackendError)
            raise RankFailure(
                f"rank {self.rank} of {self.world_size}: another rank stopped while the job was {what} ({err}). "
                "Its own error is above in torchrun's output. The cache chunks written so far are kept: run the "
                "same command again to resume."
            ) from None


_current = Cluster()


def current() -> Cluster:
    """The cluster this process belongs to (a single process unless ``init_from_env`` joined a torchrun job)."""
    return _current


def from_env() -> Cluster:
    """The rank, world size and local rank that torchrun put in the environment (a single process without it)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise TaskResValueError(
            "WORLD_SIZE, RANK and LOCAL_RANK must be whole numbers; start the job with torchrun, which sets them."
        ) from None
    if not 0 <= rank < max(world, 1):
        raise TaskResValueError(f"RANK {rank} is not in [0, WORLD_SIZE {world}); start the job with torchrun.")
    return Cluster(rank, max(world, 1), local)


def rank_device(device: str, cluster: Cluster) -> str:
    """The device of this rank: with several ranks on a machine, ``cuda`` means the GPU of its local rank."""
    if cluster.active and device == "cuda":
        return f"cuda:{cluster.local_rank}"
    return device


def init_from_env(device: str, command: list[str]) -> Cluster:
    """Join the torchrun job described by the environment, if any: NCCL for CUDA devices, gloo otherwise. Every
    rank must run the same ``command`` (the command line), checked here. SIGTERM (torchrun stopping the job after a
    rank failed) becomes a RankFailure, so that a rank writes what it encoded before it exits."""
    global _current
    cluster = from_env()
    if not cluster.active or torch.distributed.is_initialized():
        _current = cluster
        return cluster
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(cluster.local_rank)
    timeout = datetime.timedelta(seconds=float(os.environ.get(ENV_TIMEOUT, "1800")))
    torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    _current = cluster
    signal.signal(signal.SIGTERM, _stopped)
    cluster.agree("the command line", command, "start every rank with the same taskres command and options.")
    return cluster


def _stopped(signum, frame) -> None:
    raise RankFailure(
        f"rank {_current.rank} of {_current.world_size} was stopped (signal {signum}), most likely "
        "because another rank failed (see torchrun's output above). The cache chunks written so far "
        "are kept: run the same command again to resume."
    )


def shutdown() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        # gloo's worker threads drop the tensors of the last collective (all_gather_object's) after it has returned,
        # and need the GIL for it: at interpreter exit they cannot get it, and the process aborts ("terminate called
        # without an active exception", SIGABRT, after the work was done). Let them have it before exiting.
        time.sleep(0.1)


def check_shared_folder(cluster: Cluster, folder: Path, param: str) -> None:
    """Stop when some ranks cannot see a file that rank 0 writes in ``folder``: the ranks of a job exchange
    features through it, so it must be one folder on a filesystem that every node mounts."""
    if not cluster.active:
        return
    probe = folder / f".shared-probe-{uuid.uuid4().hex}" if cluster.is_main else None
    if probe is not None:
        probe.write_text("taskres")
    name = cluster.gather(probe.name if probe is not None else None, "checking the cache folder")[0]
    seen = cluster.gather((folder / name).is_file(), "checking the cache folder")
    cluster.barrier("checking the cache folder")
    if probe is not None:
        probe.unlink(missing_ok=True)
    blind = [rank for rank, ok in enumerate(seen) if not ok]
    if blind:
        raise TaskResValueError(
            f"{param} {str(folder)!r} is not shared between the nodes of this torchrun job: rank(s) {blind} cannot "
            "see a file that rank 0 wrote there. The ranks exchange features through this folder; pass a folder "
            "on a filesystem that every node mounts at the same path.",
            param=param,
        )
