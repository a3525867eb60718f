import json

from conftest import VENV_BIN, run, tool_env


def test_local_mode_ready_here():
    proc = run([str(VENV_BIN / "scalelab"), "doctor", "--mode", "local", "--json"])
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    probes = {p["name"]: p for p in report["probes"]}
    assert probes["torch"]["ok"] and "2.13.0" in probes["torch"]["detail"]
    assert probes["horovod"]["ok"]
    assert "mpi" in probes["horovod"]["detail"] and "gloo" in probes["horovod"]["detail"]
    assert "Open MPI" in probes["mpi4py"]["detail"]


def test_slurm_mode_without_slurm_clients_exits_1_and_names_them():
    # A PATH with only the venv: the Slurm clients in /usr/bin are gone.
    env = tool_env({"PATH": str(VENV_BIN)})
    proc = run([str(VENV_BIN / "scalelab"), "doctor", "--mode", "slurm"], env=env, check=False)
    assert proc.returncode == 1
    missing = [line for line in proc.stderr.splitlines() if line.startswith("missing")]
    names = {line.split(":")[1].split("(")[0].strip() for line in missing}
    assert {"sbatch", "srun", "squeue", "scontrol"} <= names
    assert all("fix:" in line for line in missing)


def test_container_mode_reports_apptainer_missing():
    # No apptainer binary can exist on these machines (no package for it here).
    env = tool_env({"PATH": str(VENV_BIN)})
    proc = run([str(VENV_BIN / "scalelab"), "doctor", "--mode", "container"], env=env, check=False)
    assert proc.returncode == 1
    assert "apptainer" in proc.stderr and "apptainer.org" in proc.stderr


def test_slurm_mode_ready_on_test_cluster(cluster):
    proc = run(
        [str(VENV_BIN / "scalelab"), "doctor", "--mode", "slurm", "--json"], env=cluster.env()
    )
    report = json.loads(proc.stdout)
    probes = {p["name"]: p for p in report["probes"]}
    assert report["ok"], proc.stderr
    assert "pmix" in probes["srun-pmix"]["detail"]


def test_json_and_human_forms_agree_on_a_missing_mode():
    """--json is one document with the verdict and what is missing; the same exit code."""
    env = tool_env({"PATH": str(VENV_BIN)})
    args = [str(VENV_BIN / "scalelab"), "doctor", "--mode", "slurm"]
    human = run(args, env=env, check=False)
    proc = run([*args, "--json"], env=env, check=False)
    report = json.loads(proc.stdout)
    assert proc.returncode == human.returncode == 1
    assert report["ok"] is False and report["mode"] == "slurm"
    assert {"sbatch", "srun", "squeue", "scontrol"} <= set(report["missing"])
    assert not {p["name"] for p in report["probes"] if p["ok"]} & set(report["missing"])


def test_without_leaves_a_component_out_of_the_modes_needs():
    """setup.sh passes --without horovod where it could not build Horovod: the local mode is
    then ready without it, and every other need still counts."""
    from scalelab.doctor import Probe, missing_for

    probes = [
        Probe(n, n != "horovod", "")
        for n in ("python", "torch", "mpirun", "mpi4py", "horovod", "snakemake")
    ]
    assert [p.name for p in missing_for("local", probes)] == ["horovod"]
    assert missing_for("local", probes, without=["horovod"]) == []
    probes[1] = Probe("torch", False, "")
    assert [p.name for p in missing_for("local", probes, without=["horovod"])] == ["torch"]
    # The CLI refuses a component no mode knows.
    proc = run(
        [str(VENV_BIN / "scalelab"), "doctor", "--without", "nonsense"], check=False, env=tool_env()
    )
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
