"""Issue 23, secrets: `redact_argv` and the provenance environment allow-list against a
table of credential shapes. The probe found `--export=ALL,HF_TOKEN=...` kept in clear and
PMIX_PWD / OMPI_MCA_*pass* kept by the allow-list; every row plants a distinct value and
asserts it is gone while the harmless parts stay.
"""

from __future__ import annotations

import json
import re
import uuid

import pytest
from reliability import tally_fixtures

from scalelab import provenance, redact
from scalelab.redact import REDACTED, SECRET_NAME, allowed_env, redact_argv

# docs/reliability.md: credential shapes in command lines and the environment.
tally, _count = tally_fixtures("secret-shapes", tried="cases tried", passed="redacted or dropped")


def planted() -> str:
    return f"s3cr3t-{uuid.uuid4().hex[:12]}"


#: (id, argv with {s} where the secret goes, parts that must stay readable)
ARGV_SHAPES = [
    ("mpirun-x", ["mpirun", "-x", "HF_TOKEN={s}", "-x", "NCCL_DEBUG=INFO"], ["NCCL_DEBUG=INFO"]),
    (
        "srun-export-list",
        ["srun", "--export=ALL,HF_TOKEN={s},NCCL_DEBUG=INFO", "train"],
        ["--export=ALL,HF_TOKEN=", "NCCL_DEBUG=INFO"],
    ),
    ("srun-export-first", ["srun", "--export=X_TOKEN={s}", "train"], ["--export=X_TOKEN="]),
    ("option-equals", ["tool", "--token={s}"], ["--token="]),
    (
        "option-space",
        ["tool", "--password", "{s}", "--config", "c.yaml"],
        ["--password", "--config", "c.yaml"],
    ),
    ("option-api-key", ["tool", "--api-key", "{s}"], ["--api-key"]),
    ("env-pwd", ["env", "PMIX_PWD={s}", "prog"], ["PMIX_PWD=", "prog"]),
    ("env-pass", ["mpirun", "-x", "OMPI_MCA_sec_munge_pass={s}"], ["OMPI_MCA_sec_munge_pass="]),
    ("env-secret", ["env", "AWS_SECRET_ACCESS_KEY={s}"], ["AWS_SECRET_ACCESS_KEY="]),
    ("env-key", ["env", "WANDB_API_KEY={s}"], ["WANDB_API_KEY="]),
    (
        "mca-pair",
        ["mpirun", "--mca", "sec_munge_passphrase", "{s}", "-n", "2"],
        ["--mca", "sec_munge_passphrase", "-n", "2"],
    ),
    (
        "url-password",
        ["git", "clone", "https://alice:{s}@git.example.org/x.git"],
        ["https://alice:", "@git.example.org/x.git"],
    ),
    (
        "url-in-option",
        ["pip", "--index-url=https://bob:{s}@pypi.example.org/simple"],
        ["--index-url=https://bob:", "@pypi.example.org/simple"],
    ),
    (
        "shell-string",
        ["bash", "-c", "HF_TOKEN={s} python train.py --lr 0.1"],
        ["HF_TOKEN=", "python train.py --lr 0.1"],
    ),
]


@pytest.mark.parametrize("shape", ARGV_SHAPES, ids=[s[0] for s in ARGV_SHAPES])
def test_redact_argv_hides_every_credential_shape(shape):
    _, template, kept = shape
    secret = planted()
    argv = [a.format(s=secret) for a in template]
    out = redact_argv(argv)
    assert secret not in json.dumps(out), out
    assert REDACTED in " ".join(out)
    assert len(out) == len(argv)
    for part in kept:
        assert part in " ".join(out), (part, out)


@pytest.mark.parametrize(
    "argv",
    [
        ["mpirun", "-n", "2", "--bind-to", "none", "python", "-m", "scalelab", "train"],
        ["srun", "--export=ALL,NCCL_DEBUG=INFO", "--ntasks-per-node=2", "--mpi=pmix"],
        ["scalelab", "train", "--config", "run.yaml", "--out", "runs/x", "--resume"],
        ["git", "clone", "https://git.example.org/x.git"],
    ],
)
def test_redact_argv_leaves_harmless_command_lines_alone(argv):
    assert redact_argv(argv) == argv


#: Environment names the allow-list must drop, with an allowed prefix or not.
SECRET_ENV = [
    "PMIX_PWD",
    "OMPI_MCA_sec_munge_pass",
    "OMPI_MCA_PASSWORD",
    "NCCL_X_TOKEN",
    "HOROVOD_SECRET",
    "UCX_KEY",
    "NCCL_IB_PKEY_SECRET",
    "OMPI_MCA_api_key",
    "PMIX_SECURITY_CREDENTIAL",
    "HF_TOKEN",
    "SLURM_JOB_PASSWORD",
]
KEPT_ENV = {
    "NCCL_DEBUG": "INFO",
    "OMPI_MCA_btl": "tcp,self",
    "PMIX_RANK": "0",
    "OMP_NUM_THREADS": "4",
    "SLURM_JOB_ID": "7",
    "UCX_TLS": "tcp",
}


def test_allow_list_drops_every_credential_name_and_keeps_the_rest():
    secrets = {name: planted() for name in SECRET_ENV}
    env = {**secrets, **KEPT_ENV, "HOME": "/root"}
    kept = allowed_env(env)
    assert kept == KEPT_ENV
    assert not any(v in json.dumps(kept) for v in secrets.values())


def test_allow_list_redacts_a_url_password_in_a_kept_value():
    secret = planted()
    kept = allowed_env({"PMIX_SERVER_URI": f"tcp://pmix:{secret}@10.0.0.1:5000"})
    assert kept == {"PMIX_SERVER_URI": f"tcp://pmix:{REDACTED}@10.0.0.1:5000"}


def test_no_allow_listed_name_looks_like_a_credential():
    assert [n for n in redact.ENV_NAMES if SECRET_NAME.search(n)] == []


def test_the_schema_refuses_the_same_names_as_the_allow_list():
    """One owner: the provenance schema's copy of the pattern is SECRET_NAME's."""
    schema = json.loads(provenance.SCHEMA.read_text())
    names = schema["properties"]["incidental"]["properties"]["env"]["propertyNames"]
    assert names["not"]["pattern"] == f"(?i)({SECRET_NAME.pattern})"
    for name in SECRET_ENV:
        assert re.search(names["not"]["pattern"], name)
