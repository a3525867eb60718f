"""Malformed workflow configs are refused at plan time, one line naming the field.

Most cases run in-process through `study_config.validate`, the function the workflow's
common.smk calls when Snakemake builds the DAG. A sample runs through a real
`snakemake -n` (one error line, exit 2), and a few without `-n` to show that nothing is
staged, logged or submitted.
"""

from __future__ import annotations

import copy
import subprocess

import pytest
import yaml
from conftest import REPO
from reliability import tally_fixtures
from test_workflow import copy_workflow, snakemake

from scalelab.errors import UsageError
from scalelab.study import config as study_config

BASE = yaml.safe_load((REPO / ".test" / "config.yaml").read_text())
NAN, INF = float("nan"), float("inf")

tally, _count = tally_fixtures(
    "configs-rejected-before-submit", "cases_tried", "rejected_with_one_line_before_submit"
)


def _set(path: str, value):
    """A mutation that sets `a.b.c` (creating sections) to `value`."""

    def mutate(cfg: dict) -> None:
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    return mutate


def _drop(path: str):
    def mutate(cfg: dict) -> None:
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        del node[last]

    return mutate


def _both(*mutations):
    def mutate(cfg: dict) -> None:
        for m in mutations:
            m(cfg)

    return mutate


# (case id, mutation, text the one-line error must contain: the field, and the point
# where the error depends on one)
CASES = [
    # -- unknown keys and typos, with a suggestion
    ("top-level typo", _set("sweeep", {}), "sweeep: unknown key (did you mean 'sweep'?)"),
    ("top-level unknown", _set("colour", "blue"), "colour: unknown key"),
    ("data typo", _set("data.shard", 2), "data.shard: unknown key (did you mean 'shards'?)"),
    ("sweep typo", _set("sweep.node", [1]), "sweep.node: unknown key"),
    ("launch typo", _set("launch.timeout", 5), "launch.timeout: unknown key"),
    (
        "resources typo",
        _set("resources.partition", "gpu"),
        "resources.partition: unknown key (did you mean 'slurm_partition'?)",
    ),
    ("rule override unknown rule", _set("resources.rules.trian", {}), "resources.rules.trian"),
    ("train section typo", _set("train.trian", {}), "train.trian': unknown key"),
    (
        "train.optim typo",
        _set("train.optim.global_btach_size", 32),
        "field 'train.optim.global_btach_size': unknown key (did you mean 'global_batch_size'?)",
    ),
    ("train.model typo", _set("train.model.nmae", "cnn"), "train.model.nmae"),
    ("train.train typo", _set("train.train.epoch", 3), "did you mean 'epochs'"),
    (
        "model option typo",
        _set("train.model", {"name": "resnet", "options": {"depht": 18}}),
        "field 'train.model.options.depht': not an option of model 'resnet' "
        "(did you mean 'depth'?)",
    ),
    # -- types
    ("lr as text", _set("train.optim.lr", "fast"), "field 'train.optim.lr': expected a number"),
    ("lr 1e-3 as YAML 1.1 text", _set("train.optim.lr", "1e-3"), "write 1.0e-3"),
    (
        "batch as float",
        _set("train.optim.global_batch_size", 32.5),
        "train.optim.global_batch_size': expected an integer",
    ),
    ("epochs as text", _set("train.train.epochs", "three"), "train.train.epochs"),
    (
        "deterministic as text",
        _set("train.train.deterministic", "yes"),
        "train.train.deterministic': expected true or false",
    ),
    ("optim not a mapping", _set("train.optim", 5), "field 'train.optim': expected a mapping"),
    ("train not a mapping", _set("train", [1]), "train: expected a mapping, got [1]"),
    (
        "nodes as text",
        _set("sweep.nodes", ["two"]),
        "sweep.nodes[0]: expected an integer, got 'two'",
    ),
    ("repeats as float", _set("sweep.repeats", 1.5), "sweep.repeats"),
    ("split not a list", _set("data.split", 0.8), "data.split"),
    ("shards as text", _set("data.shards", "four"), "data.shards"),
    ("threshold as text", _set("analysis.threshold", "high"), "analysis.threshold"),
    # -- enums and registries
    (
        "unknown model",
        _set("train.model.name", "alexnet"),
        "field 'train.model.name': unknown model",
    ),
    ("model near miss", _set("train.model.name", "resnt"), "did you mean 'resnet'?"),
    ("unknown backend", _set("sweep.backends", ["mpich"]), "sweep.backends[0]: expected one of"),
    ("unknown mode", _set("sweep.modes", ["medium"]), "sweep.modes[0]"),
    ("unknown source", _set("data.source", "imagenet"), "data.source"),
    ("unknown optimizer", _set("train.optim.name", "lamb"), "train.optim.name"),
    (
        "unknown compression",
        _set("train.dist", {"horovod": {"compression": "int8"}}),
        "train.dist.horovod.compression",
    ),
    ("unknown commbench lib", _set("commbench.libs", ["nccl"]), "commbench.libs[0]"),
    ("unknown launcher", _set("launch.local", "srun"), "launch.local"),
    # -- ranges and non-finite numbers
    ("lr negative", _set("train.optim.lr", -0.1), "field 'train.optim.lr': must be > 0"),
    ("lr zero", _set("train.optim.lr", 0), "train.optim.lr"),
    ("lr nan", _set("train.optim.lr", NAN), "train.optim.lr: must be a finite number"),
    ("lr inf", _set("train.optim.lr", INF), "train.optim.lr: must be a finite number"),
    (
        "momentum negative",
        _set("train.optim.momentum", -0.5),
        "train.optim.momentum': must be >= 0",
    ),
    ("momentum one", _set("train.optim.momentum", 1.0), "train.optim.momentum': must be < 1"),
    ("momentum nan", _set("train.optim.momentum", NAN), "train.optim.momentum"),
    ("gamma zero", _set("train.optim.gamma", 0.0), "train.optim.gamma': must be > 0"),
    ("gamma above one", _set("train.optim.gamma", 2.0), "train.optim.gamma': must be <= 1"),
    ("gamma inf", _set("train.optim.gamma", INF), "train.optim.gamma"),
    ("weight decay negative", _set("train.optim.weight_decay", -1e-4), "train.optim.weight_decay"),
    ("epochs zero", _set("train.train.epochs", 0), "field 'train.train.epochs': must be >= 1"),
    ("epochs negative", _set("train.train.epochs", -3), "train.train.epochs"),
    ("accumulation zero", _set("train.optim.grad_accum_steps", 0), "train.optim.grad_accum_steps"),
    ("batch zero", _set("train.optim.global_batch_size", 0), "train.optim.global_batch_size"),
    ("timeout too small", _set("launch.timeout_s", 1), "launch.timeout_s: must be >= 10, got 1"),
    ("nodes zero", _set("sweep.nodes", [0]), "sweep.nodes[0]: must be >= 1, got 0"),
    ("nodes negative", _set("sweep.nodes", [-2]), "sweep.nodes[0]"),
    ("duplicate nodes", _set("sweep.nodes", [1, 1]), "sweep.nodes"),
    ("repeats zero", _set("sweep.repeats", 0), "sweep.repeats"),
    ("cpus per task zero", _set("launch.cpus_per_task", 0), "launch.cpus_per_task"),
    ("threshold above one", _set("analysis.threshold", 1.5), "analysis.threshold"),
    ("retries negative", _set("resources.retries", -1), "resources.retries"),
    ("runtime zero", _set("resources.runtime", 0), "resources.runtime"),
    ("max bytes malformed", _set("commbench.max_bytes", "lots"), "commbench.max_bytes"),
    # -- data splits
    ("split nan", _set("data.split", [NAN, 0.1, 0.1]), "data.split[0]: must be a finite number"),
    ("split inf", _set("data.split", [0.8, INF, 0.1]), "data.split[1]"),
    ("split sum", _set("data.split", [0.5, 0.1, 0.1]), "data.split: fractions"),
    (
        "train fraction zero",
        _set("data.split", [0.0, 0.5, 0.5]),
        "data.split[0]: the train fraction must be > 0",
    ),
    (
        "empty validation split",
        _set("data.split", [0.9, 0.0, 0.1]),
        "data.split[1]: the validation fraction must be > 0",
    ),
    ("empty test split", _set("data.split", [0.9, 0.1, 0.0]), "data.split[2]: the test fraction"),
    (
        "tiny validation split",
        _set("data.split", [0.899, 0.001, 0.1]),
        "data.split[1]: 0.001 of 600 images over 4 classes leaves the validation split empty",
    ),
    (
        "split fraction above one",
        _set("data.split", [1.2, -0.1, -0.1]),
        "data.split[0]: must be <= 1.0, got 1.2",
    ),
    # -- paths that must exist (a stat each, no walk)
    (
        "imagefolder path missing",
        _both(_set("data.source", "imagefolder"), _set("data.path", "/no/such/folder")),
        "data.path: no such directory: /no/such/folder",
    ),
    (
        "npz path missing",
        _both(_set("data.source", "npz"), _set("data.path", "/no/such.npz")),
        "data.path: no such file: /no/such.npz",
    ),
    (
        "imagefolder without path",
        _set("data.source", "imagefolder"),
        "data.path: required for source 'imagefolder'",
    ),
    (
        "from_csv missing",
        _set("analysis.from_csv", ["/no/such/table.csv"]),
        "analysis.from_csv[0]: no such file",
    ),
    # -- cross-field, per sweep point
    (
        "batch not divisible by 3 ranks",
        _set("sweep.nodes", [1, 3]),
        "sweep point ddp-strong-n3-t1-g0-r0: field 'train.optim.global_batch_size': 32 is not "
        "divisible by world_size * grad_accum_steps = 3 * 1",
    ),
    (
        "batch not divisible by ranks x accumulation",
        _set("train.optim", {"global_batch_size": 18, "grad_accum_steps": 2, "lr": 0.05}),
        "sweep point ddp-strong-n1-t2-g0-r0: field 'train.optim.global_batch_size': 18 is not "
        "divisible by world_size * grad_accum_steps = 2 * 2",
    ),
    (
        "fewer samples than one batch",
        _set("train.optim.global_batch_size", 1024),
        "larger than the training split",
    ),
    (
        "weak batch grows past the data",
        _both(
            _set("sweep.modes", ["weak"]),
            _set("train.train.epochs", 5),
            _set("train.optim.global_batch_size", 400),
        ),
        "sweep point ddp-weak-n1-t2-g0-r0: field 'train.optim.global_batch_size': a global batch "
        "of 800",
    ),
    # issue 25: the largest weak point has one step per epoch, eaten by the warm-up
    (
        "weak point without a timed step",
        _both(_set("sweep.modes", ["weak"]), _set("train.optim.global_batch_size", 240)),
        "sweep point ddp-weak-n1-t2-g0-r0: field 'train.optim.global_batch_size': a global batch "
        "of 480 gives 1 step(s) per epoch",
    ),
    (
        "steps cap inside the warm-up",
        _set("train.train", {"epochs": 1, "steps_per_epoch": 3}),
        "sweep point ddp-strong-n1-t1-g0-r0: field 'train.optim.global_batch_size': a global "
        "batch of 32 gives 3 step(s) per epoch",
    ),
    (
        "both batch sizes",
        _set("train.optim.per_rank_batch_size", 16),
        "train.optim.per_rank_batch_size': give either",
    ),
    (
        "too many ranks for the node",
        _both(_set("sweep.tasks_per_node", [4]), _set("cluster.cpus_per_node", 2)),
        "sweep.tasks_per_node[0]: 4 tasks x 1 CPUs",
    ),
    (
        "more nodes than the cluster",
        _both(_set("sweep.nodes", [1, 4]), _set("cluster.nodes", 3)),
        "sweep.nodes[1]: 4 nodes, but the cluster has 3",
    ),
    (
        "more GPUs than a node",
        _set("sweep.gpus_per_task", [1]),
        "sweep.gpus_per_task[0]: 1 tasks x 1 GPUs do not fit a node of 0 GPUs",
    ),
    ("backend none on 2 ranks", _set("sweep.backends", ["none"]), "sweep.backends: backend 'none'"),
    (
        "tensor parallel does not divide the ranks",
        _set("train.dist", {"tp": 2}),
        "sweep point ddp-strong-n1-t1-g0-r0: field 'train.dist.tp': tp=2 needs a multiple of 2 "
        "ranks; this point has 1",
    ),
    (
        "workflow-owned backend",
        _set("train.dist", {"backend": "ddp"}),
        "train.dist.backend: set by the workflow from sweep.backends",
    ),
    ("workflow-owned data path", _set("train.data", {"path": "/x"}), "train.data.path: set by"),
    # -- bounded sweep
    (
        "huge repeats",
        _set("sweep.repeats", 100_000_000),
        "sweep.repeats: the sweep has 400000000 points",
    ),
    (
        "many nodes x repeats",
        _both(_set("sweep.nodes", list(range(1, 41))), _set("sweep.repeats", 20)),
        "sweep.nodes: the sweep has 3200 points",
    ),
    # -- strings that reach a command line
    (
        "results with $()",
        _set("results", "res$(touch /tmp/pwned)"),
        "results: character '$' is not allowed in a path",
    ),
    ("results with backtick", _set("results", "res`id`"), "results: character '`'"),
    ("results with ;", _set("results", "res;id"), "results: character ';'"),
    ("results with newline", _set("results", "res\nid"), "results: character '\\n'"),
    ("results starting with -", _set("results", "-rf"), "results: a path must not start"),
    (
        "data path with $()",
        _both(_set("data.source", "npz"), _set("data.path", "$(id).npz")),
        "data.path: character '$'",
    ),
    ("scratch with ;", _set("data.scratch", "/tmp;id"), "data.scratch: character ';'"),
    (
        "from_csv with backtick",
        _set("analysis.from_csv", ["`id`.csv"]),
        "analysis.from_csv[0]: character '`'",
    ),
    (
        "image with $()",
        _both(_set("container.image", "/x/$(id).sif")),
        "container.image: character '$'",
    ),
    ("bind with ;", _set("container.binds", ["/data;id"]), "container.binds[0]: character ';'"),
    (
        "partition with $()",
        _set("resources.slurm_partition", "gpu$(id)"),
        "resources.slurm_partition: character '$'",
    ),
    (
        "account with space",
        _set("resources.slurm_account", "a b"),
        "resources.slurm_account: character ' ' is not allowed",
    ),
    ("qos with ;", _set("resources.qos", "high;id"), "resources.qos: character ';'"),
    (
        "constraint with $()",
        _set("resources.constraint", "a100$(id)"),
        "resources.constraint: character '$'",
    ),
    (
        "rule partition with backtick",
        _set("resources.rules.stage", {"slurm_partition": "`id`"}),
        "resources.rules.stage.slurm_partition: character '`'",
    ),
    (
        "slurm_extra raw string",
        _set("resources.slurm_extra", "--exclusive --requeue"),
        "resources.slurm_extra",
    ),
    (
        "slurm_extra with ;",
        _set("resources.slurm_extra", ["--begin=now;id"]),
        "resources.slurm_extra[0]: character ';' is not allowed",
    ),
    (
        "slurm_extra two options in one item",
        _set("resources.slurm_extra", ["--exclusive --requeue"]),
        "resources.slurm_extra[0]: character ' '",
    ),
    (
        "slurm_extra managed option",
        _set("resources.slurm_extra", ["--mem=1"]),
        "resources.slurm_extra[0]: --mem is set by the workflow",
    ),
    (
        "slurm_extra not an option",
        _set("resources.slurm_extra", ["requeue"]),
        "expected --option or --option=value",
    ),
    (
        "srun args with $()",
        _set("launch.extra_srun_args", ["--cpu-bind=$(id)"]),
        "launch.extra_srun_args[0]: character '$'",
    ),
    ("srun mpi with ;", _set("launch.srun_mpi", "pmix; rm -rf /"), "launch.srun_mpi"),
    (
        "socket ifname with backtick",
        _set("launch.socket_ifname", "eth0`id`"),
        "launch.socket_ifname: character '`'",
    ),
    (
        "exec flag with ;",
        _set("container.exec_flags", ["--cleanenv;id"]),
        "container.exec_flags[0]: character ';'",
    ),
    ("container env bad name", _set("container.env", {"A;B": "1"}), "container.env.A;B"),
    ("sha256 malformed", _set("container.sha256", "abc"), "container.sha256"),
    # -- issue 23's probe: integers that are floats, numbers past physical bounds,
    # results over the study, a model on the wrong kind of data
    ("repeats 1.0", _set("sweep.repeats", 1.0), "sweep.repeats: expected an integer, got 1.0"),
    (
        "tasks_per_node floats",
        _set("sweep.tasks_per_node", [1.0, 2.0]),
        "sweep.tasks_per_node[0]: expected an integer, got 1.0",
    ),
    ("nodes float", _set("sweep.nodes", [1.5]), "sweep.nodes[0]: expected an integer, got 1.5"),
    ("results /", _set("results", "/"), "results: '/' is the filesystem root"),
    ("results config", _set("results", "config"), "results: 'config' is config/, a directory"),
    ("results .test", _set("results", ".test"), "results: '.test' is .test/, a directory"),
    (
        "results inside workflow",
        _set("results", "workflow/out"),
        "results: 'workflow/out' is inside workflow/",
    ),
    ("results the study", _set("results", "."), "results: '.' is the study directory itself"),
    ("lr 1e308", _set("train.optim.lr", 1e308), "train.optim.lr': must be <= 10"),
    (
        "timeout_s 1e100",
        _set("launch.timeout_s", 1e100),
        "launch.timeout_s: expected an integer, got 1e+100",
    ),
    (
        "timeout_s past a week",
        _set("launch.timeout_s", 10**9),
        "launch.timeout_s: must be <= 604800, got 1000000000",
    ),
    (
        "gpt on image data",
        _set("train.model", {"name": "gpt"}),
        "train.model.name: model 'gpt' trains on token sequences, but data.source 'synthetic'",
    ),
    (
        "cnn on token data",
        _set("data.source", "tokens"),
        "train.model.name: model 'cnn' trains on images, but data.source 'tokens'",
    ),
    ("seed past 2**32", _set("train.seed", 2**40), "train.seed': must be <= 4294967295"),
    ("image shape too large", _set("train.data", {"image_shape": [3, 65536, 65536]}), "train.data"),
]


@pytest.mark.parametrize("case, mutate, expected", CASES, ids=[c[0] for c in CASES])
def test_malformed_config_is_refused_with_one_line(case, mutate, expected):
    cfg = copy.deepcopy(BASE)
    mutate(cfg)
    with pytest.raises(UsageError) as err:
        study_config.validate(cfg)
    message = str(err.value)
    assert expected in message, message
    assert "\n" not in message and message.startswith("config: ")


def test_matrix_is_large_and_the_base_is_valid():
    assert len(CASES) >= 60
    study_config.validate(copy.deepcopy(BASE))  # every case fails because of its own mutation


# A sample through the real `snakemake -n` (one error line naming the field, exit 2),
# sharing one workflow copy.
SAMPLE = [
    "lr nan",
    "train.optim typo",
    "batch not divisible by 3 ranks",
    "unknown model",
    "empty test split",
    "results with $()",
    "huge repeats",
    "from_csv missing",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return copy_workflow(tmp_path_factory.mktemp("matrix") / "wf")


def _write(wd, case: str) -> str:
    _, mutate, expected = next(c for c in CASES if c[0] == case)
    cfg = copy.deepcopy(BASE)
    mutate(cfg)
    (wd / "bad.yaml").write_text(yaml.safe_dump(cfg))
    return expected


@pytest.mark.parametrize("case", SAMPLE)
def test_snakemake_dry_run_refuses_with_one_line(workdir, case):
    expected = _write(workdir, case)
    proc = snakemake(workdir, ["-n", "--cores", "1", "--configfile", "bad.yaml"], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"scalelab workflow: error: {errors[0].split('error: ', 1)[1]}"], errors
    assert expected.split(": ", 1)[-1][:40] in errors[0] or expected in errors[0], errors
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "case", ["lr negative", "batch not divisible by 3 ranks", "slurm_extra with ;"]
)
def test_real_run_stages_logs_and_submits_nothing(cluster, tmp_path, case):
    """Without -n, under --profile slurm on the test cluster: no job, no file."""
    wd = copy_workflow(cluster.shared_dir / f"matrix-{tmp_path.name}")
    _write(wd, case)
    env = cluster.env()
    before = subprocess.run(
        ["squeue", "--states=all", "-h", "-o", "%i"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    proc = snakemake(wd, ["--profile", "slurm", "--configfile", "bad.yaml"], env=env, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    after = subprocess.run(
        ["squeue", "--states=all", "-h", "-o", "%i"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert after == before  # nothing submitted
    for made in ("results", "logs", ".snakemake/slurm_logs"):
        assert not (wd / made).exists(), made


# -- Documents the one loader (scalelab.docload) refuses before any value is used: the
# probe's duplicate keys, alias bombs and encodings (issue 23), each one line naming the
# file and, where the parser knows it, the line.
BASE_TEXT = (REPO / ".test" / "config.yaml").read_text()
_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
)
FILE_CASES = {
    "duplicate results": (
        BASE_TEXT + "results: /tmp/elsewhere\n",
        "duplicate key 'results' (first at line 3)",
    ),
    "duplicate lr": (
        BASE_TEXT.replace("    lr: 0.05\n", "    lr: 0.05\n    lr: 500\n"),
        "duplicate key 'lr'",
    ),
    "alias bomb": (BASE_TEXT + _BOMB, "through its aliases (an alias bomb?)"),
    "recursive alias": (BASE_TEXT + "extra: &x [1, *x]\n", "recursive alias"),
    "non-UTF-8": (BASE_TEXT.encode() + b"# caf\xe9\n", "not UTF-8 text"),
    "UTF-16": (BASE_TEXT.encode("utf-16"), "line 1: UTF-16 text"),
    "empty": ("", "is empty"),
    "comments only": ("# nothing\n", "is empty"),
    "null": ("null\n", "line 1: holds null, expected a mapping"),
    "scalar": ("results\n", "line 1: holds a string, expected a mapping"),
    "list": ("- results\n", "line 1: holds a list, expected a mapping"),
    "two documents": (BASE_TEXT + "---\nresults: x\n", "not valid YAML"),
    "JSON duplicate key": ('{"results": "a", "results": "b"}', "duplicate key 'results'"),
}


def _write_case(directory, case: str):
    text, expected = FILE_CASES[case]
    path = directory / ("bad.json" if case.startswith("JSON") else "bad.yaml")
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path, expected


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_malformed_file_is_refused_with_one_line(tmp_path, case):
    import time

    path, expected = _write_case(tmp_path, case)
    started = time.monotonic()
    with pytest.raises(UsageError) as err:
        study_config.load(path)
    message = str(err.value)
    assert time.monotonic() - started < 2.0  # the alias bomb fails fast
    assert message.startswith(f"{path}: ") and expected in message, message
    assert "\n" not in message


@pytest.mark.parametrize("case", ["duplicate results", "alias bomb", "UTF-16", "null"])
def test_plan_refuses_a_malformed_file_with_one_line(tmp_path, case):
    """`scalelab plan FILE`: exit 2, one line naming the file."""
    import sys

    path, expected = _write_case(tmp_path, case)
    proc = subprocess.run(
        [sys.executable, "-m", "scalelab", "plan", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"scalelab plan: error: {path}: {proc.stderr.split(f'{path}: ', 1)[1].strip()}"
    ]
    assert expected in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "case", ["duplicate results", "alias bomb", "recursive alias", "UTF-16", "empty", "scalar"]
)
def test_snakemake_refuses_a_malformed_default_config(tmp_path, case):
    """config/config.yaml is read by scalelab's loader before Snakemake's (Snakefile)."""
    wd = copy_workflow(tmp_path / "wf")
    path, expected = _write_case(tmp_path, case)
    (wd / "config" / "config.yaml").write_bytes(path.read_bytes())
    proc = snakemake(wd, ["-n", "--cores", "1"], check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert (
        errors
        == [
            line
            for line in errors
            if line.startswith("scalelab workflow: error: config/config.yaml: ")
        ]
        and len(errors) == 1
    ), errors
    assert expected in errors[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "case", ["duplicate results", "duplicate lr", "alias bomb", "recursive alias"]
)
def test_snakemake_refuses_a_malformed_configfile(workdir, case):
    """--configfile: Snakemake reads it first (it has no other hook), then the Snakefile's
    check refuses it in one line, fast, before any value is used."""
    path, expected = _write_case(workdir, case)
    proc = snakemake(
        workdir, ["-n", "--cores", "1", "--configfile", path.name], check=False, timeout=60
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and expected in errors[0], errors
    assert "Traceback" not in proc.stderr
