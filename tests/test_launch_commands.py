"""The command lines that start ranks: launch, reproduce and `container exec` give the same
argument lists for the same inputs as before the launch commands got one owner
(scalelab.launch.commands). The expected lists are built here from the inputs, by the
rules each caller followed: srun with every flag explicit, mpirun without core binding
(root allowed, oversubscribed past this machine's cores), torchrun as
``python -m torch.distributed.run --standalone`` taking ``-m scalelab``."""

from __future__ import annotations

import itertools
import json
import os
import shlex
import sys

import pytest

from scalelab import cli, launcher, rerun
from scalelab.errors import UsageError
from scalelab.study.plan import RunPoint
from scalelab.tools import which

PY = sys.executable
TRAIN = ["train", "--config", "r.yaml", "--out", "o", "--resume"]
PREFIX = ["apptainer", "exec", "--nv", "img.sif"]


def _srun() -> str:
    return which("srun") or "srun"


def _mpirun_tail(ranks: int, cores: int) -> list[str]:
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    over = ["--oversubscribe"] if cores > (os.cpu_count() or 1) else []
    return ["-n", str(ranks), "--bind-to", "none", *root, *over]


def _torchrun(ranks: int) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]


# ----------------------------------------------------------------------------- launch


def expected_launch(
    launch: dict, point: RunPoint, args: list[str], slurm: bool, prefix: list[str] | None
) -> list[str]:
    per_rank = [*prefix, "scalelab", *args] if prefix else [PY, "-m", "scalelab", *args]
    if slurm:
        if point.ranks == 1:
            return per_rank
        gres = [f"--gres=gpu:{point.gpus_per_node}"] if point.gpus_per_task else []
        return [
            _srun(),
            f"--mpi={launch['srun_mpi']}",
            f"--nodes={point.nodes}",
            f"--ntasks={point.ranks}",
            f"--ntasks-per-node={point.tasks_per_node}",
            f"--cpus-per-task={launch['cpus_per_task']}",
            "--kill-on-bad-exit=1",
            *gres,
            *launch["extra_srun_args"],
            *per_rank,
        ]
    if point.ranks == 1 and point.backend == "none":
        return per_rank
    if launch["local"] == "torchrun":
        return _torchrun(point.ranks) + (["-m", "scalelab", *args] if not prefix else per_rank)
    return [
        which("mpirun"),
        *_mpirun_tail(point.ranks, point.ranks * launch["cpus_per_task"]),
        *per_rank,
    ]


LAUNCH_CASES = list(
    itertools.product(
        ["mpirun", "torchrun"],
        ["pmix", "pmi2"],
        [1, 4096],
        [[], ["--cpu-bind=cores", "-x"]],
        [
            ("ddp", 1, 1, 0),
            ("none", 1, 1, 0),
            ("horovod", 1, 4, 0),
            ("ddp", 2, 4, 1),
            ("fsdp", 3, 2, 2),
        ],
        [False, True],
        [None, PREFIX],
    )
)


@pytest.mark.parametrize("local, mpi, cpus, extra, shape, slurm, prefix", LAUNCH_CASES)
def test_launch_argv_is_what_it_was(local, mpi, cpus, extra, shape, slurm, prefix):
    launch = {"local": local, "srun_mpi": mpi, "cpus_per_task": cpus, "extra_srun_args": extra}
    backend, nodes, tpn, gpt = shape
    point = RunPoint(backend, "strong", nodes, tpn, gpt, 0)
    env = {"SLURM_JOB_ID": "7"} if slurm else {}
    got = launcher.launch_argv(launch, point, TRAIN, env=env, container_prefix=prefix)
    assert got == expected_launch(launch, point, TRAIN, slurm, prefix)


def test_srun_argv_of_a_point_is_what_it_was():
    launch = {"srun_mpi": "pmix", "cpus_per_task": 2, "extra_srun_args": ["--exclusive"]}
    point = RunPoint("ddp", "strong", 2, 4, 1, 0)
    assert launcher.srun_argv(launch, point) == [
        _srun(),
        "--mpi=pmix",
        "--nodes=2",
        "--ntasks=8",
        "--ntasks-per-node=4",
        "--cpus-per-task=2",
        "--kill-on-bad-exit=1",
        "--gres=gpu:4",
        "--exclusive",
    ]


def test_launch_of_any_command_prints_the_mpirun_line(monkeypatch, capsys):
    """`scalelab launch -- commbench ...` (what the commbench rule runs) outside Slurm."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert (
        cli.main(
            [
                "launch",
                "--dry-run",
                "--nodes",
                "1",
                "--tasks-per-node",
                "3",
                "--cpus-per-task",
                "2",
                "--",
                "commbench",
                "--lib",
                "gloo",
            ]
        )
        == 0
    )
    line = capsys.readouterr().out.strip()
    assert line == "scalelab launch: " + " ".join(
        [which("mpirun"), *_mpirun_tail(3, 6), PY, "-m", "scalelab", "commbench", "--lib", "gloo"]
    )


# ----------------------------------------------------------------------------- reproduce


def expected_rerun(
    launcher_name: str, world: int, nodes: int, per_node: int, recorded: list[str] | None
) -> list[str]:
    if launcher_name == "single":
        return []
    if nodes > 1:
        launcher_name = "slurm"
    if launcher_name == "openmpi":
        return [which("mpirun"), *_mpirun_tail(world, world)]
    if launcher_name == "torchrun":
        return _torchrun(world)
    if launcher_name == "horovodrun":
        return [which("horovodrun") or "horovodrun", "-np", str(world)]
    mpi = next((a for a in recorded or [] if a.startswith("--mpi=")), "--mpi=pmix")
    return [
        _srun(),
        mpi,
        f"--nodes={nodes}",
        f"--ntasks={world}",
        f"--ntasks-per-node={per_node}",
        "--kill-on-bad-exit=1",
    ]


RERUN_CASES = list(
    itertools.product(
        ["single", "openmpi", "torchrun", "horovodrun", "slurm"],
        [(1, 1, 1), (4, 1, 4), (8, 2, 4), (4096, 1, 4096)],
        [None, ["srun", "--mpi=pmi2", "-N2"], ["mpirun", "-n", "2"]],
    )
)


@pytest.mark.parametrize("name, shape, recorded", RERUN_CASES)
def test_reproduce_launcher_argv_is_what_it_was(monkeypatch, name, shape, recorded):
    world, nodes, per_node = shape
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    got = rerun._launcher_argv(name, world, nodes, per_node, recorded)
    assert got == expected_rerun(name, world, nodes, per_node, recorded)


def test_reproduce_of_a_slurm_run_outside_an_allocation_is_refused(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(UsageError, match="launcher slurm: the run used srun on 2 node"):
        rerun._launcher_argv("openmpi", 8, 2, 4, None)
    with pytest.raises(UsageError, match="launcher pbs: reproduce does not know"):
        rerun._launcher_argv("pbs", 2, 1, 2, None)


# ----------------------------------------------------------------------------- container exec

EXEC_CASES = list(itertools.product([1, 3], [1, 4], [None, "pmi2"], [[], ["--cpu-bind=cores"]]))


@pytest.mark.parametrize("nodes, tpn, mpi, flags", EXEC_CASES)
def test_container_exec_under_srun_is_what_it_was(tmp_path, capsys, nodes, tpn, mpi, flags):
    config = tmp_path / "config.yaml"
    config.write_text(
        json.dumps(
            {
                "container": {"image": "img.sif", "userns": "false", "nv": False},
                "launch": {"extra_srun_args": flags},
            }
        )
    )
    argv = [
        "container",
        "exec",
        "--dry-run",
        "--config",
        str(config),
        "--runtime",
        "apptainer",
        "--srun",
        "--nodes",
        str(nodes),
        "--ntasks-per-node",
        str(tpn),
        *(["--srun-mpi", mpi] if mpi else []),
        "--",
        "python",
        "-c",
        "print(1)",
    ]
    assert cli.main(argv) == 0
    want = [
        "srun",
        f"--mpi={mpi or 'pmix'}",
        f"--nodes={nodes}",
        f"--ntasks-per-node={tpn}",
        f"--ntasks={nodes * tpn}",
        *flags,
        "apptainer",
        "exec",
        "img.sif",
        "python",
        "-c",
        "print(1)",
    ]
    assert capsys.readouterr().out.strip() == shlex.join(want)


# ----------------------------------------------------------------------------- one owner


def test_reproduce_of_a_torchrun_run_hands_torchrun_the_module():
    """torchrun takes a module or a script: the rerun's ranks run `-m scalelab train`, as
    launch's do (before the launch commands had one owner, reproduce passed `scalelab`
    as a script path, which torchrun's ranks cannot open)."""
    from pathlib import Path

    layout = {"launcher": "torchrun", "world_size": 2, "nodes": 1, "tasks_per_node": 2}
    argv = rerun.rerun_argv(layout, None, Path("o/run.yaml"), Path("o"))
    assert argv == [
        *_torchrun(2),
        "-m",
        "scalelab",
        "train",
        "--config",
        "o/run.yaml",
        "--out",
        "o",
    ]
    launched = launcher.launch_argv(
        {"local": "torchrun", "cpus_per_task": 1},
        RunPoint("ddp", "strong", 1, 2, 0, 0),
        ["x"],
        env={},
    )
    assert launched[: len(_torchrun(2)) + 2] == argv[: len(_torchrun(2)) + 2]


#: Programs that start ranks; their command lines are built in scalelab.launch.commands.
LAUNCHER_NAMES = {"srun", "mpirun", "mpiexec", "prterun", "torchrun", "horovodrun"}
TORCHRUN_MODULE = "torch.distributed.run"
OWNER = "launch/commands.py"
#: Modules that name a launcher for another reason than starting ranks, and why.
EXCEPTIONS = {
    "doctor.py": "its probes look each program up by name and ask it for its version or "
    "plugins (`srun --mpi=list`); they start no ranks",
    "sysfacts.py": "records the version of the mpirun on PATH for a run's manifest",
}


def _names_a_launcher(node) -> bool:
    """A launcher's name as a constant, or `which(<launcher>)` (optionally `or "name"`)."""
    import ast

    if isinstance(node, ast.Constant):
        return node.value in LAUNCHER_NAMES
    if isinstance(node, ast.BoolOp):
        return any(_names_a_launcher(v) for v in node.values)
    return _which_launcher(node)


def _which_launcher(node) -> bool:
    import ast

    if not isinstance(node, ast.Call) or not node.args:
        return False
    func = node.func
    name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
    arg = node.args[0]
    return name == "which" and isinstance(arg, ast.Constant) and arg.value in LAUNCHER_NAMES


def launcher_commands(source: str) -> list[str]:
    """Where ``source`` builds a launcher command line: an argument list whose first item
    is a launcher (a list of launcher names alone is a vocabulary, not a command), a
    lookup of a launcher's path, the torchrun module, or a shell string starting with a
    launcher and a flag (docstrings and argparse help are prose)."""
    import ast

    tree = ast.parse(source)
    prose = {
        id(n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
    }  # docstrings
    prose |= {
        id(k.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        for k in n.keywords
        if k.arg in ("help", "description", "epilog")
    }
    found = []
    for node in ast.walk(tree):
        where = f"line {getattr(node, 'lineno', '?')}"
        if (
            isinstance(node, (ast.List, ast.Tuple))
            and node.elts
            and _names_a_launcher(node.elts[0])
        ):
            # A command line goes on with a flag or a computed argument; a tuple of
            # program names alone (``program in ("srun", "mpirun")``) is a vocabulary.
            if any(
                not isinstance(e, ast.Constant) or str(e.value).startswith("-")
                for e in node.elts[1:]
            ):
                found.append(f"{where}: argument list starting with a launcher")
        elif _which_launcher(node):
            found.append(f"{where}: {ast.unparse(node)}")
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and (id(node) not in prose)
        ):
            words = node.value.split()
            if node.value == TORCHRUN_MODULE or (
                len(words) > 1 and words[0] in LAUNCHER_NAMES and words[1][:1] == "-"
            ):
                found.append(f"{where}: {node.value!r}")
    return found


def test_the_launcher_detector_finds_what_it_must():
    assert launcher_commands('argv = ["srun", f"--mpi={m}"]')
    assert launcher_commands('argv = [which("mpirun") or "mpirun", "-n", "2"]')
    assert launcher_commands('p = shutil.which("srun")')
    assert launcher_commands('argv = [py, "-m", "torch.distributed.run"]')
    assert launcher_commands('os.system("mpirun -n 2 python x.py")')
    assert not launcher_commands('LAUNCHERS = ("srun", "mpirun", "torchrun")')
    assert not launcher_commands('choices = ["mpirun", "torchrun"]')
    assert not launcher_commands('def f():\n    """Runs srun --mpi=pmix ...."""\n')
    assert not launcher_commands('p.add_argument("--mpi", help="srun --mpi type")')
    assert not launcher_commands('ok = program in ("srun", "mpirun", "orterun")')


def test_launcher_command_lines_are_built_in_one_module():
    from pathlib import Path

    import scalelab

    root = Path(scalelab.__file__).parent
    offenders, used = {}, set()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        found = launcher_commands(path.read_text())
        if not found:
            continue
        excused = [e for e in EXCEPTIONS if rel == e or rel.startswith(e)]
        if rel == OWNER:
            continue
        if excused:
            used.update(excused)
            continue
        offenders[rel] = found
    assert not offenders, f"launcher command lines outside {OWNER}: {offenders}"
    assert used == set(EXCEPTIONS), f"exceptions that excuse nothing: {set(EXCEPTIONS) - used}"
    assert launcher_commands((root / OWNER).read_text())  # the owner does build them
