"""`scalelab export` / `scalelab import`: a study handed to a collaborator, for real.

A study (the shipped workflow files + a deterministic 2-rank run under mpirun) is
exported, imported into a fresh directory, and its run is rerun there with
`scalelab reproduce`: bitwise-identical weights. A bundle with one changed byte is
rejected, naming the file, and nothing is written.

The bundle's own setup.sh, run as a collaborator with nothing installed would (no scalelab
on PATH, no PYTHONPATH): it refuses a changed byte or an old Python in one line before any
venv exists, and (marked ``setup``: a real venv install) installs the bundled scalelab,
imports the study and prints the command that reruns it, which reproduces the run.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import VENV_BIN, require
from train_support import MPIRUN, PY, TINY, TRAIN, deep_update, ok, run, write_config

SCALELAB = [PY, "-m", "scalelab"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from test_workflow import copy_workflow

    tmp = tmp_path_factory.mktemp("bundle")
    study = copy_workflow(tmp / "study")
    cfg = write_config(tmp / "run.yaml", deep_update(TINY, {"train": {"deterministic": True}}))
    ok(
        run(
            [
                *MPIRUN,
                PY,
                *TRAIN,
                "--config",
                str(cfg),
                "--out",
                str(study / "results" / "runs" / "tiny"),
            ],
            timeout=180,
        )
    )
    out = tmp / "bundle"
    proc = ok(run([*SCALELAB, "export", str(study), "--out", str(out)], timeout=300))
    assert "1 run(s)" in proc.stdout
    return out


def test_bundle_holds_workflow_lock_wheel_results_and_manifests(bundle):
    meta = json.loads((bundle / "bundle.json").read_text())
    files = meta["files"]
    for rel in (
        "study/Snakefile",
        "study/config/config.yaml",
        "study/profiles/slurm/config.yaml",
        "envs/lock-cpu.txt",
        "envs/lock-pypi.txt",
        "envs/lock-horovod.txt",
        "study/results/runs/tiny/provenance.json",
        "study/results/runs/tiny/model.pt",
        meta["wheel"],
    ):
        assert rel in files, rel
    assert meta["wheel"].startswith("dist/scalelab-") and meta["wheel"].endswith(".whl")
    assert meta["runs"][0]["run"] == "study/results/runs/tiny"
    # The inventory checks with the standard tool too.
    check = subprocess.run(
        ["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=bundle, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    # ... and covers bundle.json itself: its last line.
    sums = (bundle / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == len(files) + 1 and sums[-1].endswith("  bundle.json")


def test_import_then_reproduce_gives_the_same_weights(bundle, tmp_path):
    study = tmp_path / "colleague"
    ok(run([*SCALELAB, "import", str(bundle), "--out", str(study)], timeout=120))
    run_dir = study / "results" / "runs" / "tiny"
    assert (run_dir / "provenance.json").is_file() and (study / "Snakefile").is_file()
    rerun = tmp_path / "rerun"
    proc = ok(run([*SCALELAB, "reproduce", str(run_dir), "--out", str(rerun)], timeout=240))
    assert "reproduced" in proc.stdout
    report = json.loads((rerun / "reproduce.json").read_text())
    assert report["mode"] == "bitwise" and report["weights_equal"] and report["metrics_equal"]


def test_one_changed_byte_is_rejected_naming_the_file(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    target = copy / "study" / "results" / "runs" / "tiny" / "model.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    out = tmp_path / "study"
    proc = run([*SCALELAB, "import", str(copy), "--out", str(out)], timeout=120)
    assert proc.returncode == 1
    assert "study/results/runs/tiny/model.pt: sha256 mismatch" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("scalelab import: error: ")
    assert not out.exists()
    # A file slipped in, or one removed, is named too.
    target.write_bytes(bundle.joinpath("study/results/runs/tiny/model.pt").read_bytes())
    (copy / "study" / "extra.py").write_text("print('hi')\n")
    (copy / "envs" / "lock-cpu.txt").unlink()
    proc = run([*SCALELAB, "import", str(copy), "--check"], timeout=120)
    assert proc.returncode == 1
    assert "study/extra.py: not in the inventory" in proc.stderr
    assert "envs/lock-cpu.txt: missing" in proc.stderr


def test_export_refuses_to_write_into_the_study_or_a_foreign_directory(bundle, tmp_path):
    study = tmp_path / "s"
    (study / "results").mkdir(parents=True)
    (study / "Snakefile").write_text("")
    proc = run([*SCALELAB, "export", str(study), "--out", str(study / "results" / "b")])
    assert proc.returncode == 2 and "lies inside STUDY" in proc.stderr
    assert proc.stderr.count("\n") == 1 and not (study / "results" / "b").exists()
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("keep me")
    proc = run([*SCALELAB, "export", str(study), "--out", str(foreign)])
    assert proc.returncode == 2 and "refusing to replace it" in proc.stderr
    assert (foreign / "chapter1.tex").read_text() == "keep me"


def _rewrite_inventory(bundle: Path, change) -> None:
    """Edit bundle.json with ``change`` and recompute SHA256SUMS to match (a crafted
    inventory that is consistent with itself)."""
    from scalelab.bundle import sums_text
    from scalelab.fsio import sha256_file

    meta = json.loads((bundle / "bundle.json").read_text())
    change(meta)
    (bundle / "bundle.json").write_text(json.dumps(meta, indent=2) + "\n")
    (bundle / "SHA256SUMS").write_text(
        sums_text(meta["files"], sha256_file(bundle / "bundle.json"))
    )


@pytest.mark.parametrize(
    "study",
    ["/etc/ssh", "../../etc", "study/../..", "link"],
    ids=["absolute", "dotdot", "inner-dotdot", "symlink-out"],
)
def test_import_refuses_a_study_path_outside_the_bundle(bundle, tmp_path, study):
    """Issue 23: ``"study": "/etc/ssh"`` in bundle.json made import report "all files
    match" and copy host files into the new study. An imported study may only hold
    paths inside the bundle: no absolute path, no ``..``, no link leading out."""
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    if study == "link":
        (copy / "link").symlink_to("/etc")
    _rewrite_inventory(copy, lambda meta: meta.update(study=study))
    out = tmp_path / "study"
    for extra in (["--check"], ["--out", str(out)]):
        proc = run([*SCALELAB, "import", str(copy), *extra], timeout=120)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("scalelab import: error: ") and "Traceback" not in proc.stderr
        assert "all files match" not in proc.stdout
        assert "field 'study'" in last or "link: not in the inventory" in last, last
    assert not out.exists()


def test_import_refuses_a_results_path_outside_the_bundle(bundle, tmp_path):
    """``results`` is printed into a shell command for the user: it must be a directory
    of the imported study too."""
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    planted = tmp_path / f"PWNED-{uuid.uuid4().hex}"
    _rewrite_inventory(copy, lambda meta: meta.update(results=f"$(touch {planted})"))
    proc = run([*SCALELAB, "import", str(copy), "--out", str(tmp_path / "study")], timeout=120)
    assert proc.returncode == 1 and "field 'results'" in proc.stderr.strip().splitlines()[-1]
    assert not planted.exists() and not (tmp_path / "study").exists()


@pytest.mark.parametrize("where", ["SHA256SUMS", "bundle.json"])
def test_a_flipped_byte_in_the_inventory_itself_is_found(bundle, tmp_path, where):
    """Issue 23: a flipped byte in SHA256SUMS, or in bundle.json outside its file list,
    was accepted; SHA256SUMS now ends with bundle.json's sha256 and must equal the
    inventory line for line, so each file covers the other."""
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    target = copy / where
    data = bytearray(target.read_bytes())
    at = 3 if where == "SHA256SUMS" else data.index(b'"created_at": "') + 16
    data[at] = ord("0") if data[at] != ord("0") else ord("1")  # still a digest / a date
    target.write_bytes(bytes(data))
    out = tmp_path / "study"
    proc = run([*SCALELAB, "import", str(copy), "--out", str(out)], timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    expected = (
        "SHA256SUMS: line 1 differs" if where == "SHA256SUMS" else "bundle.json: sha256 mismatch"
    )
    assert expected in proc.stderr and not out.exists()
    assert proc.stderr.strip().splitlines()[-1].startswith("scalelab import: error: ")


def test_workflow_schema_is_a_generated_regular_file():
    """workflow/schemas/config.schema.yaml is generated from the study config's models
    (no drift), a regular file, not a symbolic link into src/."""
    from scalelab.study.config import schema_text

    path = REPO / "workflow" / "schemas" / "config.schema.yaml"
    assert path.is_file() and not path.is_symlink()
    assert path.read_text() == schema_text(), "regenerate: scalelab plan --write-schema"


def test_export_of_a_study_copied_as_the_readme_says(tmp_path):
    """Issue 23: export failed on a study copied the way the README says to share one
    (``Snakefile``, ``workflow/``, ``config/``, ``profiles/``): the schema was a link into
    src/ that dangles in the copy."""
    study = tmp_path / "study"
    study.mkdir()
    subprocess.run(
        [
            "cp",
            "-r",
            *(str(REPO / n) for n in ("Snakefile", "workflow", "config", "profiles")),
            str(study),
        ],
        check=True,
    )
    (study / "results").mkdir()
    ok(run([*SCALELAB, "export", str(study), "--out", str(tmp_path / "bundle")], timeout=300))
    files = json.loads((tmp_path / "bundle" / "bundle.json").read_text())["files"]
    assert "study/workflow/schemas/config.schema.yaml" in files


# -- the bundle's own setup.sh, as a collaborator with nothing installed runs it ----------------
def collaborator_env(**extra: str) -> dict[str, str]:
    """This machine without scalelab: no test venv on PATH, no PYTHONPATH, a plain Python 3.11;
    pip keeps its configuration (here PIP_FIND_LINKS=/opt/wheels holds the CPU torch)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(
        p
        for p in env["PATH"].split(os.pathsep)
        if p != str(VENV_BIN) and not (Path(p) / "scalelab").exists()
    )
    env["PYTHON"] = str(Path(sys.base_prefix) / "bin" / "python3")
    env.update(extra)
    assert shutil.which("scalelab", path=env["PATH"]) is None
    return env


def bundle_setup(
    bundle: Path, out: Path, env: dict[str, str], horovod: bool = False, timeout: float = 120
) -> subprocess.CompletedProcess:
    """``bash BUNDLE/setup.sh --out OUT [--no-horovod]`` from outside the bundle."""
    return subprocess.run(
        ["bash", str(bundle / "setup.sh"), "--out", str(out)]
        + ([] if horovod else ["--no-horovod"]),
        cwd=out.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_error_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    """setup.sh refused: exit 2 and a single line on stderr holding ``words``."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("setup.sh: error: "), proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def test_bundle_carries_an_executable_setup_sh(bundle, tmp_path):
    meta = json.loads((bundle / "bundle.json").read_text())
    script = bundle / "setup.sh"
    assert "setup.sh" in meta["files"] and "envs/python_env.sh" in meta["files"]
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert meta["wheel"] in text and "@WHEEL@" not in text and "@SUMS@" not in text
    proc = subprocess.run(
        ["bash", str(script), "--help"], env=collaborator_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0 and "--no-horovod" in proc.stdout and "--out DIR" in proc.stdout


def test_setup_sh_refuses_a_changed_byte_before_anything(bundle, tmp_path):
    """Checked before the interpreter is even looked at (PYTHON names none here)."""
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    target = copy / "study" / "results" / "runs" / "tiny" / "model.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    out = tmp_path / "work"
    env = collaborator_env(PYTHON=str(tmp_path / "no-python"))
    one_error_line(bundle_setup(copy, out, env), "study/results/runs/tiny/model.pt", "SHA256SUMS")
    assert not out.exists()
    target.write_bytes((bundle / "study/results/runs/tiny/model.pt").read_bytes())
    (copy / "study" / "extra.py").write_text("print('hi')\n")
    one_error_line(bundle_setup(copy, out, env), "study/extra.py: not in SHA256SUMS")
    assert not out.exists()


def test_setup_sh_refuses_a_python_older_than_3_11(bundle, tmp_path):
    old = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python3")))
    require(bool(old), "no Python 3.10 on this machine (pyenv has one on the project's machines)")
    out = tmp_path / "work"
    proc = bundle_setup(bundle, out, collaborator_env(PYTHON=old[0]))
    one_error_line(proc, "Python 3.10", "3.11 to 3.14", "PYTHON=")
    assert not (out / ".venv").exists()


@pytest.mark.setup
def test_setup_sh_alone_installs_imports_and_reruns_the_study(bundle, tmp_path):
    """First without Horovod: set up and imported, and the DDP run reproduces bitwise
    although its provenance recorded the Horovod of the machine it ran on (Horovod decides
    only Horovod runs). Then again with Horovod (the cached wheel build_horovod.sh keeps):
    the finished steps are kept and the printed command is the same."""
    copy = tmp_path / "received"
    shutil.copytree(bundle, copy)
    out = tmp_path / "work"
    env = collaborator_env()
    proc = bundle_setup(copy, out, env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("setup.sh: warning:")]
    assert len(warnings) == 1 and "versions.horovod" in warnings[0], proc.stderr
    meta = json.loads((copy / "bundle.json").read_text())
    probe = (
        "import importlib.metadata as m, scalelab; print(m.version('scalelab'), scalelab.__file__)"
    )
    found = subprocess.run(
        [str(out / ".venv/bin/python"), "-c", probe], env=env, capture_output=True, text=True
    )
    version, where = ok(found).stdout.split()
    assert version == meta["scalelab"] and f"scalelab-{version}-" in meta["wheel"]
    assert Path(where).is_relative_to(out / ".venv")
    assert (out / "study/bundle.json").read_bytes() == (copy / "bundle.json").read_bytes()
    assert (out / "study/results/runs/tiny/provenance.json").is_file()
    command = proc.stdout.strip().splitlines()[-1]

    def rerun() -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "-c", command],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    done = rerun()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = list((out / "study").glob("reproduce/**/reproduce.json"))
    assert len(reports) == 1, reports
    report = json.loads(reports[0].read_text())
    assert report["mode"] == "bitwise" and report["weights_equal"] and report["metrics_equal"]
    recorded = json.loads((out / "study/results/runs/tiny/provenance.json").read_text())
    assert recorded["must_match"]["versions"]["horovod"]  # recorded, and not needed here
    again = bundle_setup(copy, out, env, horovod=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "imported before" in again.stdout and "setup.sh: warning" not in again.stderr
    assert again.stdout.strip().splitlines()[-1] == command
