"""Checkpoints: one dict per file, written by rank 0 atomically, read back safely.

A checkpoint holds everything needed to continue bit-for-bit: model,
optimizer and scheduler states, the position (``epoch`` and ``step_in_epoch``
= optimizer steps already done in that epoch; the data order is a function of
seed and epoch, see :mod:`scalelab.train.sampling`), the RNG states of every
rank, the partial epoch statistics, the epoch history and the config.

Files are ``RUN_DIR/checkpoints/ckpt-<global step>.pt``, each with a
``.pt.sha256`` beside it (``sha256sum -c`` format) written after the checkpoint
itself. Sharded runs (fsdp, tensor parallel) write distributed checkpoints
instead (:func:`save_sharded`): a directory ``ckpt-<global step>.dcp`` in
``torch.distributed.checkpoint``'s format, where every rank writes its own
shards, plus ``meta.pt`` (everything but the tensors) and ``SHA256SUMS``; it
appears under its name only once complete (written as a hidden temporary
directory, checksummed, renamed), and DCP reshards it on load when the world
size differs. :func:`load` verifies that checksum before reading a byte of the
checkpoint, so a flipped bit in tensor data, which ``torch.load`` would accept
silently, is caught like a truncated file. :func:`find_latest` returns the
newest checkpoint that verifies and loads, skipping (with a warning) one that
does not, e.g. after a node died mid-write or a disk corrupted it.

:class:`Checkpointer` is the one owner the trainer asks: it saves (one file or a
distributed checkpoint), finds the newest valid one, prunes, and resumes (the stored
config and layout compared with this run's, ``--reshard`` allowing a new layout; then
weights, schedule, position and RNG restored). The functions below are its file format.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from scalelab.backends.parallel_dims import ParallelDims
from scalelab.errors import UsageError
from scalelab.fsio import atomic_write, atomic_write_text, fsync_dir, sha256_file
from scalelab.provenance import flatten
from scalelab.train import dcp_safe

if TYPE_CHECKING:
    from scalelab.train.setup import Job
    from scalelab.train.state import TrainState

FORMAT = 1
REQUIRED = (
    "format",
    "model",
    "optimizer",
    "scheduler",
    "epoch",
    "step_in_epoch",
    "global_step",
    "rng",
    "config",
)
_NAME = re.compile(r"^ckpt-(\d+)\.(pt|dcp)$")
#: Inside a sharded checkpoint directory: the non-tensor state and the checksums.
META, SUMS = "meta.pt", "SHA256SUMS"
#: Config fields a resume may change: where and how this execution runs, not what it
#: computes (any other difference means the checkpoint belongs to another run).
RESUME_MAY_CHANGE = (
    "data.path",
    "data.scratch",
    "data.localize",
    "data.prefetch",
    "train.threads",
    "train.progress",
    "train.val_every_epochs",
    "checkpoint",
    "metrics",
    "dist.timeout_s",
    "dist.socket_ifname",
    "dist.bucket_cap_mb",
    "dist.activation_checkpointing",
    "dist.elastic",
)
#: The layout's fields: they change only under ``--reshard`` (with the world size).
LAYOUT_FIELDS = (
    "dist.backend",
    "dist.tp",
    "dist.pp",
    "dist.microbatches",
    "dist.schedule",
    "dist.virtual_stages",
    "dist.fsdp",
    "dist.horovod",
)


def path_for(directory: Path, global_step: int, sharded: bool = False) -> Path:
    """Path of the checkpoint taken after ``global_step`` optimizer steps."""
    return directory / f"ckpt-{global_step:09d}.{'dcp' if sharded else 'pt'}"


def is_sharded(path: Path) -> bool:
    return path.suffix == ".dcp"


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files, newest (highest step) first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def rng_state() -> dict[str, Any]:
    """This process's RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checksum_path(path: Path) -> Path:
    """The sha256 file of a checkpoint."""
    return path.with_name(path.name + ".sha256")


def write_checksum(path: Path) -> str:
    """Record ``path``'s sha256 beside it (atomically); return the digest."""
    digest = sha256_file(path)
    atomic_write_text(checksum_path(path), f"{digest}  {path.name}\n")
    return digest


def verify(path: Path) -> str:
    """Raise ValueError unless ``path`` matches its recorded sha256; return the digest."""
    try:
        expected = checksum_path(path).read_text().split()[0]
    except (OSError, IndexError):
        raise ValueError(
            f"no checksum file {checksum_path(path).name} (written after the "
            "checkpoint: the writer died in between, or it was removed)"
        ) from None
    actual = sha256_file(path)
    if actual != expected:
        raise ValueError(
            f"sha256 mismatch (recorded {expected[:16]}..., file {actual[:16]}...):"
            " the checkpoint is corrupt or was altered"
        )
    return actual


def save(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temp file + fsync + rename), then its sha256."""
    state = {"format": FORMAT, **state}
    checksum_path(path).unlink(missing_ok=True)  # never a stale checksum beside new bytes
    atomic_write(path, lambda fh: torch.save(state, fh))
    write_checksum(path)


def load(path: Path, verified: bool = False) -> dict[str, Any]:
    """Verify and load a checkpoint (tensors to CPU; no arbitrary code: weights_only).

    Of a sharded checkpoint this returns the non-tensor state; its ``model`` and
    ``optimizer`` entries name the directory that :func:`load_sharded` reads.
    ``verified``: the checksums were checked already (by rank 0, for the whole job)."""
    if is_sharded(path):
        if not verified:
            verify_dir(path)
            dcp_safe.read_metadata(path)  # refuses a .metadata that could run code
        state = torch.load(path / META, map_location="cpu", weights_only=True)
        state = {**state, "model": path, "optimizer": path} if isinstance(state, dict) else state
    else:
        if not verified:
            verify(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError("not a checkpoint dict")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise ValueError(f"missing keys {missing}")
    if state["format"] != FORMAT:
        raise ValueError(f"format {state['format']} is not {FORMAT}")
    return state


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def config_differences(saved: dict[str, Any], now: dict[str, Any], reshard: bool) -> list[str]:
    """``'seed: 1 (checkpoint) != 0 (this run)'`` for each config field that must match
    on a resume and does not; the layout's fields only without ``reshard``. A field the
    checkpoint lacks (written before the field existed) is not compared."""

    was, have = flatten(saved), flatten(now)
    exempt = RESUME_MAY_CHANGE + (LAYOUT_FIELDS if reshard else ())
    return [
        f"{key}: {was[key]!r} (checkpoint) != {have.get(key)!r} (this run)"
        for key in sorted(was)
        if not _under(key, exempt) and was[key] != have.get(key)
    ]


def find_latest(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads cleanly (older ones are tried after a bad one)."""
    for path in list_checkpoints(directory):
        try:
            return path, load(path)
        except dcp_safe.UnsafeCheckpoint:
            raise  # verified bytes that could run code: refused, not skipped
        except Exception as exc:  # any unreadable file: warn and fall back to an older one
            print(
                f"scalelab train: warning: skipping unreadable checkpoint {path}: "
                f"{type(exc).__name__}: {str(exc)[:200]}; falling back to an older one",
                file=sys.stderr,
            )
    return None


def prune(directory: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints."""
    for old in list_checkpoints(directory)[keep:]:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
            continue
        old.unlink(missing_ok=True)
        checksum_path(old).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- sharded (DCP)


def save_sharded(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    rank: int,
    barrier: Callable[[], None],
) -> None:
    """Write a distributed checkpoint: every rank its own shards (a collective call).

    Rank 0 prepares a hidden temporary directory, all ranks write into it with
    ``torch.distributed.checkpoint.save``, then rank 0 adds ``meta.pt`` and the
    sha256 of every file, and renames the directory into place. A job that dies
    before the rename leaves only the hidden directory, which no resume reads.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = path.with_name(f".{path.name}.partial")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
    if rank == 0:  # dcp.save returns on rank 0 after every rank's files are written
        atomic_write(tmp / META, lambda fh: torch.save({"format": FORMAT, **meta}, fh))
        _write_sums(tmp)
        shutil.rmtree(path, ignore_errors=True)  # a same-step leftover (a rerun of this step)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    barrier()


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read a distributed checkpoint into this rank's shards (resharded to this job's
    layout by DCP's planner); every rank calls it. ``path`` was verified by :func:`load`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    try:  # never torch's plain-pickle reader: see scalelab.train.dcp_safe
        dcp.load(state, storage_reader=dcp_safe.SafeReader(path), planner=dcp_safe.SafePlanner())
    except BaseException as exc:  # DCP wraps every rank's error in a CheckpointException
        unsafe = dcp_safe.unsafe_cause(exc)
        if unsafe is None:
            raise
        raise unsafe from None
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )


def _write_sums(directory: Path) -> None:
    files = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != SUMS)
    lines = "".join(f"{sha256_file(directory / name)}  {name}\n" for name in files)
    atomic_write_text(directory / SUMS, lines)


def verify_dir(directory: Path) -> None:
    """Raise ValueError unless every file of a sharded checkpoint matches SHA256SUMS
    and none is missing or unlisted."""
    try:
        listed = dict(
            reversed(line.split("  ", 1))
            for line in (directory / SUMS).read_text().splitlines()
            if line
        )
    except (OSError, ValueError):
        raise ValueError(
            f"no readable {SUMS} (the writer died before finishing, or it was removed)"
        ) from None
    present = {p.name for p in directory.iterdir() if p.is_file() and p.name != SUMS}
    if present != set(listed):
        raise ValueError(
            f"files differ from {SUMS}: missing {sorted(set(listed) - present)}, "
            f"unlisted {sorted(present - set(listed))}"
        )
    for name, expected in listed.items():
        if sha256_file(directory / name) != expected:
            raise ValueError(f"sha256 mismatch in {name}: the checkpoint is corrupt or altered")


# ----------------------------------------------------------------------------- the owner


class Checkpointer:
    """One run's checkpoints: save, find the newest valid one, prune, resume.

    Every rank holds one and calls :meth:`save` and :meth:`resume` together (both are
    collectives). ``directory`` is the run directory's checkpoint folder; ``state`` is
    the trainer's :class:`~scalelab.train.state.TrainState` (saved with the weights,
    restored in place); ``beat`` tells the watchdog a long write is progress.
    """

    def __init__(
        self, directory: Path, job: Job, state: TrainState, beat: Callable[[], None]
    ) -> None:
        self.directory, self.job, self.state, self.beat = directory, job, state, beat

    def find_latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that verifies and loads (see :func:`find_latest`)."""
        return find_latest(self.directory)

    def prune(self) -> None:
        """Keep the ``checkpoint.keep`` newest checkpoints."""
        prune(self.directory, self.job.cfg.checkpoint.keep)

    def meta(self) -> dict[str, Any]:
        """Everything in a checkpoint but the weights and optimizer state (a collective:
        it gathers every rank's RNG states)."""
        job = self.job
        rngs = job.backend.gather_object(rng_state())
        return {
            "scheduler": job.scheduler.state_dict(),
            **self.state.state_dict(),
            "rng": rngs,
            "config": job.cfg.to_dict(),
            "world_size": job.layout.world_size,
            "backend": job.backend.name,
            "global_batch": job.plan.global_batch,
            "steps_per_epoch": job.steps_per_epoch,
        }

    def save(self) -> Path:
        """All ranks call this. Sharded backends write a distributed checkpoint (each rank
        its shards); the others one file from rank 0, gathered. Atomic, checksummed."""
        job = self.job
        self.beat()
        sharded = job.backend.shards_state
        path = path_for(self.directory, self.state.global_step, sharded)
        meta = self.meta()
        if sharded:
            save_sharded(
                path, job.raw_model, job.optimizer, meta, job.layout.rank, job.backend.barrier
            )
        else:
            model_state, optim_state = job.backend.full_state(job.raw_model, job.optimizer)
            if job.main:
                save(path, {"model": model_state, "optimizer": optim_state, **meta})
        if job.main:
            self.prune()
        job.backend.barrier()
        self.beat()
        return path

    def resume(self) -> None:
        """Continue from the newest valid checkpoint: weights, schedule, position, RNG."""
        job = self.job
        found = self.find_latest() if job.main else None
        name = job.backend.broadcast_object(found[0].name if found else None)
        if name is None:
            if job.main:
                print(f"scalelab train: no checkpoint in {self.directory}; starting from scratch")
            return
        # rank 0 verified the checksums before naming the checkpoint to every rank
        saved = found[1] if found else load(self.directory / name, verified=True)
        self.check(name, saved)
        try:
            if is_sharded(Path(name)):
                load_sharded(self.directory / name, job.raw_model, job.optimizer)
            else:
                job.backend.load_full_state(
                    job.raw_model, job.optimizer, saved["model"], saved["optimizer"]
                )
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UsageError(
                f"--resume: checkpoint {name} does not fit this model/"
                f"optimizer: {str(exc).splitlines()[0]}"
            ) from None
        job.scheduler.load_state_dict(saved["scheduler"])
        self.state.load_state_dict(saved)
        self.state.resumes += 1
        self._restore_rng(saved["rng"])
        job.backend.sync_state(job.raw_model, job.optimizer)
        if job.main:
            print(
                f"scalelab train: resumed from {name} at epoch {self.state.epoch + 1} "
                f"step {self.state.step_in_epoch}"
            )
        job.metrics.write(
            {
                "kind": "resume",
                "checkpoint": name,
                "epoch": self.state.epoch,
                "step_in_epoch": self.state.step_in_epoch,
                "global_step": self.state.global_step,
            }
        )

    def check(self, name: str, saved: dict[str, Any]) -> None:
        """The position in an epoch carries over only with the same batches per epoch; the
        layout (world size, tp) changes only when asked (a different layout is a different
        sweep point, so it must not happen by accident); and the checkpoint's config must
        be this run's (a checkpoint copied from another run is refused, naming the field)."""
        job = self.job
        ranks, dist_was = saved.get("world_size"), saved["config"].get("dist", {})
        tp, pp = dist_was.get("tp", 1), dist_was.get("pp", 1)
        was = ParallelDims.of(ranks, tp, pp) if ranks else None
        now = ParallelDims.of(job.layout.world_size, job.cfg.dist.tp, job.cfg.dist.pp)
        if was != now and not job.reshard:
            raise UsageError(
                f"--resume: checkpoint {name} was written by {ranks} ranks (tp {tp}, pp {pp}), "
                f"this job has {now.world_size} (tp {now.tp}, pp {now.pp}); pass --reshard to "
                "continue the run at the new layout"
            )
        differ = config_differences(saved["config"], job.cfg.to_dict(), job.reshard)
        if differ:
            raise UsageError(
                f"--resume: checkpoint {name} belongs to another run: {differ[0]}"
                + (f" (and {len(differ) - 1} more field(s))" if len(differ) > 1 else "")
                + "; resume it with its own config, or start a new run directory"
            )
        have = (saved.get("global_batch"), saved.get("steps_per_epoch"))
        if have != (job.plan.global_batch, job.steps_per_epoch):
            raise UsageError(
                f"--resume: checkpoint {name} was taken with global batch {have[0]} and "
                f"{have[1]} steps per epoch, this config gives {job.plan.global_batch} and "
                f"{job.steps_per_epoch}: the position in the epoch would not carry over"
            )

    def _restore_rng(self, rngs: list[dict[str, Any]]) -> None:
        if len(rngs) == self.job.layout.world_size:
            set_rng_state(rngs[self.job.layout.rank])
        elif self.job.main:
            print(
                "scalelab train: warning: world size changed since the checkpoint; "
                "RNG streams restart (data order is unaffected)",
                file=sys.stderr,
            )
