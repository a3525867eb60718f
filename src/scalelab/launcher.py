"""Start the ranks of one training job of the sweep: `scalelab launch`.

This is the piece that replaces a hand-written sbatch script: from the
workflow config and a run id it writes the run's own config
(RUN_DIR/run.yaml) and sweep point (RUN_DIR/sweep.json), then starts the
ranks with an explicit argument list:

* inside a Slurm allocation (SLURM_JOB_ID set): ``srun --mpi=pmix -N .. -n ..
  --ntasks-per-node .. --cpus-per-task ..`` with every flag explicit, because
  the Snakemake slurm plugin's job step strips most SLURM_* variables;
* elsewhere: ``mpirun -n R`` or ``torchrun --nproc-per-node R`` on this machine.

With a container configured, the container call goes inside srun/mpirun
(``srun ... apptainer exec IMAGE scalelab train ...``), the hybrid model. The command
lines themselves are built in :mod:`scalelab.launch.commands`; this module decides
which one a sweep point gets and prepares and runs it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import sys
from collections.abc import Callable
from dataclasses import MISSING
from pathlib import Path

from pydantic import ValidationError

from scalelab import docload, supervise
from scalelab.backends import DEFAULT, SINGLE
from scalelab.backends.config import ElasticConfig
from scalelab.backends.pipeline_rules import SCHEDULES
from scalelab.config_types import format_error
from scalelab.container import job_container
from scalelab.errors import UsageError
from scalelab.launch import commands
from scalelab.layout import expand_hostlist, port_for
from scalelab.rundir import LOCK_ENV, RunDir
from scalelab.study import config as study_config
from scalelab.study import plan as study_plan
from scalelab.study.checks import GENERATED_SOURCES
from scalelab.study.plan import RunPoint
from scalelab.study.slurm import gpu_gres
from scalelab.tracking import config as tracking_config


def run_config(cfg: dict, point: RunPoint, data_dir: str | Path) -> dict:
    """The `scalelab train` config of one sweep point (:func:`scalelab.study.plan.run_config`)."""
    return study_plan.run_config(cfg, point, data_dir)


def config_digest(run_cfg: dict, point: RunPoint) -> str:
    blob = json.dumps({"config": run_cfg, "point": point.as_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def in_slurm_allocation(env: dict[str, str] | None = None) -> bool:
    return bool((env if env is not None else os.environ).get("SLURM_JOB_ID"))


def train_args(run_yaml: Path, out_dir: Path) -> list[str]:
    return ["train", "--config", str(run_yaml), "--out", str(out_dir), "--resume"]


def srun_argv(launch: dict, point: RunPoint) -> list[str]:
    """srun for every rank of ``point`` inside an allocation, with the site's extra flags."""
    return commands.srun(
        mpi=launch["srun_mpi"],
        nodes=point.nodes,
        ntasks=point.ranks,
        tasks_per_node=point.tasks_per_node,
        cpus_per_task=launch["cpus_per_task"],
        gres=gpu_gres(point),
        flags=launch["extra_srun_args"],
    )


def local_argv(launch: dict, point: RunPoint) -> list[str]:
    """The launcher of ``point``'s ranks on this machine: launch.local (mpirun or torchrun)."""
    ranks = point.ranks
    if launch["local"] == "torchrun":
        return commands.torchrun(ranks)
    return commands.mpirun(
        ranks,
        ranks * launch["cpus_per_task"],
        "launch.local: mpirun not found (run ./setup.sh, or use torchrun)",
    )


def elastic_argv(
    launch: dict, point: RunPoint, elastic: dict, env: dict[str, str] | None = None
) -> list[str]:
    """One torchrun elastic agent per node (``dist.elastic``): inside Slurm, ``srun`` starts
    one agent on each of the point's nodes, without ``--kill-on-bad-exit`` and with
    ``--no-kill`` so a lost node does not end the others' step; the agents meet at the
    allocation's first node. Outside Slurm, one agent runs every rank on this machine
    (a failed worker is restarted up to ``max_restarts`` times)."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID") or point.run_id
    restarts = elastic["max_restarts"]
    if not in_slurm_allocation(env):
        return commands.torchrun_elastic(
            nproc_per_node=point.ranks,
            min_nodes=1,
            max_nodes=1,
            max_restarts=restarts,
            endpoint=f"127.0.0.1:{port_for(f'elastic-{job}-{os.getpid()}')}",
            run_id=point.run_id,
        )
    hosts = expand_hostlist(env.get("SLURM_JOB_NODELIST", ""))
    if not hosts:
        raise UsageError("dist.elastic: SLURM_JOB_NODELIST is empty; no rendezvous host")
    agents = commands.srun(
        mpi=commands.SRUN_NO_MPI,
        nodes=point.nodes,
        ntasks=point.nodes,
        tasks_per_node=1,
        cpus_per_task=launch["cpus_per_task"] * point.tasks_per_node,
        kill_on_bad_exit=False,
        gres=gpu_gres(point),
        flags=["--no-kill", *launch["extra_srun_args"]],
    )
    return [
        *agents,
        *commands.torchrun_elastic(
            nproc_per_node=point.tasks_per_node,
            min_nodes=elastic["min_nodes"],
            max_nodes=min(elastic["max_nodes"], point.nodes),
            max_restarts=restarts,
            endpoint=f"{hosts[0]}:{port_for(f'elastic-{job}')}",
            run_id=f"{point.run_id}-{job}",
        ),
    ]


def launch_argv(
    launch: dict,
    point: RunPoint,
    args: list[str],
    env: dict[str, str] | None = None,
    container_prefix: list[str] | None = None,
    elastic: dict | None = None,
) -> list[str]:
    """The whole command line that starts `scalelab ARGS` on every rank of `point`
    (``elastic``: the run config's ``dist.elastic``, torchrun's elastic agents)."""
    per_rank = commands.scalelab_command(args, container_prefix)
    if elastic:
        if container_prefix:
            raise UsageError(
                "field 'train.dist.elastic': not with container.enabled yet (torchrun's "
                "agent would have to run inside the image)"
            )
        return commands.compose(elastic_argv(launch, point, elastic, env), per_rank)
    if in_slurm_allocation(env):
        if point.ranks == 1:
            # A 1-rank job is submitted without the `mpi` resource: the slurm plugin's job
            # step already runs this command under `srun -n1` on the allocated node. A
            # second srun inside it would wait for resources the step holds; run directly.
            return per_rank
        return commands.compose(srun_argv(launch, point), per_rank)
    if point.ranks == 1 and point.backend == SINGLE:
        return per_rank
    return commands.compose(local_argv(launch, point), per_rank)


def rank_env(launch: dict) -> dict[str, str]:
    env = dict(os.environ)
    threads = str(launch["cpus_per_task"])
    env["OMP_NUM_THREADS"] = threads
    env["MKL_NUM_THREADS"] = threads
    ifname = launch.get("socket_ifname")
    if ifname:
        env["GLOO_SOCKET_IFNAME"] = ifname
        env["NCCL_SOCKET_IFNAME"] = ifname
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    # Horovod's MPI library is the venv's libmpi: keep it findable on every node.
    libdir = str(Path(sys.executable).parent.parent / "lib")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH")) if p)
    return env


def prepare_run_dir(
    out_dir: Path,
    run_cfg: dict,
    point: RunPoint,
    tracking: tracking_config.StudySettings | None = None,
) -> Path:
    """Write run.yaml, sweep.json and the study's tracking settings (tracking.json, when
    a tracker is on); a run dir left by a different config is cleared.

    An identical config keeps the directory so `--resume` continues from its
    newest checkpoint (a requeued or retried job); a changed config must not
    resume from checkpoints that belong to another experiment. Only a directory
    marked as a scalelab run is ever cleared (output_guard.guard checked and locked it).
    """
    digest = config_digest(run_cfg, point)
    run_dir = RunDir(out_dir)
    run_dir.prepare_launch(digest)
    run_dir.write_run_config(run_cfg)
    run_dir.write_sweep({**point.as_dict(), "config_sha256": digest})
    run_dir.set_tracking(
        tracking_config.for_run(tracking, point.run_id).model_dump(mode="json")
        if tracking is not None
        else None
    )
    return run_dir.run_config_path


def job_spec(cfg: dict, run_id: str, data_dir: str | Path) -> dict:
    """Everything one training job needs, as plain JSON.

    The workflow passes it as a rule parameter, so Snakemake re-runs a job
    exactly when its own spec changes, not when another sweep point does.
    """
    point = study_plan.find(cfg, run_id)
    return {
        "point": point.as_dict(),
        "run_config": run_config(cfg, point, data_dir),
        "launch": cfg["launch"],
        "container": cfg.get("container", {}),
    }


def container_setup(
    container: dict, run_config: dict | None = None, *, dry_run: bool = False
) -> tuple[list[str], dict | None]:
    """The `apptainer exec ... IMAGE` prefix and the image's provenance, or ([], None).

    The image is checked (present, sha256 equal to the pin) before any rank
    starts, so a wrong image fails the job at once with one line. A dry run derives
    no tree (Charliecloud, Podman): it only names it.
    """
    if not container.get("enabled"):
        return [], None

    # The dataset and node-local scratch must be seen inside the image at the same paths.
    data = (run_config or {}).get("data", {})
    binds = [str(Path(p).resolve()) for p in (data.get("path"), data.get("scratch")) if p]
    return job_container(container, binds=binds, pwd=os.getcwd(), derive=not dry_run)


def _point(d: dict) -> RunPoint:
    fields = RunPoint.__dataclass_fields__
    missing = [k for k, f in fields.items() if k not in d and f.default is MISSING]
    if missing:
        raise UsageError(f"--spec: field 'point' lacks {', '.join(missing)}")
    point = RunPoint(**{k: d[k] for k in fields if k in d})
    check_point(point, lambda name: f"--spec: field 'point.{name}'")
    return point


#: The least value of each count of a sweep point (an int, never a float or a bool).
_POINT_MINIMUMS = {
    "nodes": 1,
    "tasks_per_node": 1,
    "gpus_per_task": 0,
    "repeat": 0,
    "tp": 1,
    "pp": 1,
    "microbatches": 1,
}
#: Counts a point may leave out (None: not swept).
_POINT_OPTIONAL = ("microbatches",)
#: Most ranks one job may start: beyond this a typo, not a job.
MAX_RANKS = 1 << 20


def local_rank_limit() -> int:
    """Most ranks one machine may start outside Slurm (oversubscribed 8x at most):
    beyond this, mpirun would fork processes until the machine stops."""
    return max(64, 8 * (os.cpu_count() or 1))


def check_point(
    point: RunPoint, name: Callable[[str], str], env: dict[str, str] | None = None
) -> None:
    """Refuse a layout that cannot run, in one line naming the field (``name(field)``):
    counts below their minimum or not integers, or more ranks than this machine (outside
    Slurm) or any job could start. Outside Slurm a point of N nodes runs its N x T ranks
    on this machine (the local reference of a multi-node study, compared with its Slurm
    run in tests/test_workflow.py), so only the rank count is bounded there."""
    for field_name, least in _POINT_MINIMUMS.items():
        value = getattr(point, field_name)
        if value is None and field_name in _POINT_OPTIONAL:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{name(field_name)}: {value!r} is not an integer")
        if value < least:
            raise UsageError(f"{name(field_name)}: {value} must be >= {least}")
    if point.schedule is not None and point.schedule not in SCHEDULES:
        raise UsageError(
            f"{name('schedule')}: unknown schedule {point.schedule!r}; "
            f"valid: {', '.join(SCHEDULES)}"
        )
    if point.ranks > MAX_RANKS:
        raise UsageError(
            f"{name('nodes')} x {name('tasks_per_node')}: {point.ranks} ranks, "
            f"more than {MAX_RANKS}"
        )
    if in_slurm_allocation(env):
        return
    if point.ranks > local_rank_limit():
        raise UsageError(
            f"{name('nodes')} x {name('tasks_per_node')}: {point.ranks} ranks on "
            f"this machine ({os.cpu_count()} CPUs), more than {local_rank_limit()}"
        )


def _spec_parts(spec: object) -> tuple[RunPoint, Path | None]:
    """The sweep point and data directory of a job spec (None: a source every rank
    generates, nothing staged); one line naming a missing field."""
    if not isinstance(spec, dict):
        raise UsageError("--spec: expected a JSON object (what `job_spec` writes)")
    for key in ("point", "run_config", "launch"):
        if not isinstance(spec.get(key), dict):
            raise UsageError(f"--spec: field '{key}' is missing or not an object")
    point = _point(spec["point"])
    data = spec["run_config"].get("data") or {}
    if data.get("source") in GENERATED_SOURCES:
        return point, None
    path = data.get("path")
    if not isinstance(path, str) or not path:
        raise UsageError("--spec: field 'run_config.data.path' is missing")
    return point, Path(path)


def _generic_point(args: argparse.Namespace) -> RunPoint:
    point = RunPoint(DEFAULT, "strong", args.nodes, args.tasks_per_node, args.gpus_per_task, 0)
    check_point(point, lambda name: f"--{name.replace('_', '-')}")
    return point


def _elastic(run_config: dict) -> dict | None:
    """The run config's ``dist.elastic`` with its defaults (None: not elastic); one line
    naming the field when it is wrong (the trainer would refuse it too, but only after
    the agents started)."""
    raw = (run_config.get("dist") or {}).get("elastic")
    if raw is None:
        return None
    try:
        return ElasticConfig.model_validate(raw).model_dump()
    except ValidationError as exc:
        raise UsageError(format_error(exc, ElasticConfig, "train.dist.elastic.")) from None


def cmd_launch(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if command:
        # Any scalelab sub-command on every rank (e.g. commbench), same launcher logic.
        launch = study_config.validate_launch(
            {"local": args.local, "srun_mpi": args.mpi, "cpus_per_task": args.cpus_per_task}
        )
        argv = launch_argv(launch, _generic_point(args), command)
        print("scalelab launch:", " ".join(argv), flush=True)
        if args.dry_run:
            return 0
        return supervise.run(argv, rank_env(launch))
    if args.spec:
        spec = docload.loads(args.spec, "--spec", fmt="json", mapping=False)
    else:
        if not (args.config and args.run):
            raise UsageError("give --spec JSON, or --config FILE and --run ID")
        spec = job_spec(study_config.load(args.config), args.run, args.data)
    point, data_dir = _spec_parts(spec)
    try:
        launch = study_config.validate_launch(spec["launch"])
    except UsageError as exc:
        raise UsageError(f"--spec: field {exc}") from None
    if data_dir is not None and not (data_dir / "index.json").exists():
        raise UsageError(
            f"data {data_dir}: no staged dataset (index.json missing); run `scalelab stage` first"
        )
    if not args.out:
        raise UsageError("--out: the run directory is required")
    out_dir = Path(args.out)
    run_dir = RunDir(out_dir)
    run_dir.check()  # guard's check: a dry run too refuses what it may not replace
    prefix, image = container_setup(
        spec.get("container") or {}, spec["run_config"], dry_run=args.dry_run
    )
    tracking = tracking_config.from_environ()  # the study's, exported by the workflow
    argv = launch_argv(
        launch,
        point,
        train_args(run_dir.run_config_path, out_dir),
        container_prefix=prefix,
        elastic=_elastic(spec["run_config"]),
    )
    print("scalelab launch:", " ".join(argv), flush=True)
    if args.dry_run:
        return 0  # a dry run touches nothing: no run directory, no lock
    token = secrets.token_hex(8)
    with run_dir.guard(force=args.force, token=token):
        prepare_run_dir(out_dir, spec["run_config"], point, tracking)
        if image:
            run_dir.write_container(image)
        env = {**rank_env(launch), LOCK_ENV: token}
        return supervise.run(argv, env, out_dir)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch",
        help="start every rank of one training job of the sweep",
        description=(__doc__ or "").split("\n\n")[1].replace("\n", " "),
    )
    p.add_argument("--spec", help="job spec as JSON (what the workflow passes)")
    p.add_argument("--config", help="workflow config (config/config.yaml), with --run and --data")
    p.add_argument("--run", help="run id of the sweep point, e.g. ddp-strong-n1-t2-g0-r0")
    p.add_argument("--data", help="staged data directory")
    p.add_argument("--out", help="run directory")
    p.add_argument(
        "--dry-run", action="store_true", help="print the command; start, write and delete nothing"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="take over a stale lock of the run directory whose writer cannot be proven dead",
    )
    g = p.add_argument_group("any other scalelab command: scalelab launch [flags] -- ARGS")
    g.add_argument("--nodes", type=int, default=1, help="nodes (inside a Slurm allocation)")
    g.add_argument("--tasks-per-node", type=int, default=2, help="ranks per node")
    g.add_argument("--cpus-per-task", type=int, default=1, help="cores per rank")
    g.add_argument(
        "--gpus-per-task",
        type=int,
        default=0,
        help="GPUs per rank (the node's ranks share --gres=gpu:N of the node)",
    )
    g.add_argument(
        "--local", choices=["mpirun", "torchrun"], default="mpirun", help="launcher outside Slurm"
    )
    g.add_argument("--mpi", default="pmix", help="srun --mpi type inside Slurm")
    p.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        help="-- scalelab sub-command and its arguments, run on every rank",
    )
    p.set_defaults(func=cmd_launch)
