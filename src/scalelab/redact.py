"""Which environment variables and command-line values may enter a run directory, redacted."""

from __future__ import annotations

import base64
import os
import re
from typing import Any

#: Environment variables copied into the manifest (MLPerf-style system description):
#: communication libraries' tuning, thread counts, device selection, Slurm's layout.
ENV_PREFIXES = ("NCCL_", "OMPI_", "PMIX_", "UCX_", "HOROVOD_")
ENV_NAMES = frozenset(
    {
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "CUDA_VISIBLE_DEVICES",
        "CUDA_DEVICE_ORDER",
        "CUBLAS_WORKSPACE_CONFIG",
        "GLOO_SOCKET_IFNAME",
        "PYTHONHASHSEED",
        "TORCH_NCCL_BLOCKING_WAIT",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING",
        "SLURM_JOB_ID",
        "SLURM_JOB_NAME",
        "SLURM_JOB_NODELIST",
        "SLURM_JOB_NUM_NODES",
        "SLURM_JOB_PARTITION",
        "SLURM_JOB_CPUS_PER_NODE",
        "SLURM_NTASKS",
        "SLURM_NTASKS_PER_NODE",
        "SLURM_TASKS_PER_NODE",
        "SLURM_CPUS_PER_TASK",
        "SLURM_STEP_ID",
        "SLURM_STEP_NODELIST",
        "SLURM_STEP_NUM_NODES",
        "SLURM_STEP_NUM_TASKS",
        "SLURM_STEP_TASKS_PER_NODE",
        "SLURM_GPUS_PER_NODE",
        "SLURM_GPUS_PER_TASK",
        "SLURM_CLUSTER_NAME",
        "SLURM_ARRAY_JOB_ID",
        "SLURM_ARRAY_TASK_ID",
        "SLURM_RESTART_COUNT",
    }
)
#: Names dropped even when allow-listed, and values redacted in command lines: they look
#: like credentials (HF_TOKEN, PMIX_PWD, OMPI_MCA_..._pass, AWS_SECRET_ACCESS_KEY, ...).
#: Broad on purpose: a tuning variable lost from a manifest costs little, a leaked
#: password a lot. The provenance schema refuses the same names (a test keeps them equal).
SECRET_NAME = re.compile(
    r"TOKEN|SECRET|PASS|PWD|KEY|CREDENTIAL|PRIVATE|AUTH|COOKIE|"
    r"SESSION|SIGNATURE|CERT",
    re.IGNORECASE,
)
#: ``NAME=value`` inside an argument (``-x HF_TOKEN=..``, ``--export=ALL,HF_TOKEN=..``,
#: ``--token=..``, ``bash -c "X_KEY=.. cmd"``): the value runs to the next blank, quote, or
#: ``,NAME=`` of a list.
_ASSIGNMENT = re.compile(
    r"(?P<name>[A-Za-z_][\w.-]*)=(?P<value>(?:(?!,[A-Za-z_][\w.-]*=)"
    r"[^\s'\"])*)"
)
#: ``scheme://user:password@host``: the password goes, the user and host stay.
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][\w+.-]*://[^/\s:@]*):(?P<pw>[^/\s@]*)@")
#: Options whose next argument is ``NAME VALUE`` (Open MPI's ``--mca NAME VALUE``).
_PAIR_OPTIONS = frozenset({"--mca", "-mca", "--gmca", "-gmca", "--prtemca", "--pmixmca"})
REDACTED = "<redacted>"


def allowed_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The allow-listed part of the environment (never a credential-like name, and no
    password of a URL in a value)."""
    environ = os.environ if environ is None else environ
    return {
        k: redact_text(v)
        for k, v in sorted(environ.items())
        if (k in ENV_NAMES or k.startswith(ENV_PREFIXES)) and not SECRET_NAME.search(k)
    }


def redact_text(text: str) -> str:
    """``text`` without the values of credential-like ``NAME=value`` pairs and without the
    passwords of ``scheme://user:password@`` URLs."""

    def assignment(m: re.Match) -> str:
        if SECRET_NAME.search(m["name"]):
            return f"{m['name']}={REDACTED}"
        return f"{m['name']}={redact_text(m['value'])}"  # --export=HF_TOKEN=..: nested

    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}:{REDACTED}@", text)
    return _ASSIGNMENT.sub(assignment, text)


def _secret_option(arg: str) -> bool:
    """``--password``, ``--api-key``: an option whose next argument is a credential."""
    return arg.startswith("-") and "=" not in arg and bool(SECRET_NAME.search(arg.lstrip("-")))


def redact_argv(argv: list[str]) -> list[str]:
    """A command line fit for a manifest: credential-like ``NAME=value`` pairs anywhere in
    an argument (``--export=ALL,HF_TOKEN=..``, ``--token=..``), the argument after a
    credential-like option (``--password x``, ``--mca sec_pass x``) and URL passwords
    lose their values."""
    out: list[str] = []
    hide_next = False
    for i, arg in enumerate(argv):
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        out.append(redact_text(arg))
        pair = i > 0 and argv[i - 1] in _PAIR_OPTIONS and SECRET_NAME.search(arg)
        hide_next = bool(pair) or _secret_option(arg)
    return out


def secret_forms(secrets: list[str]) -> list[str]:
    """Each secret as it may be printed: in clear and base64-encoded (a Docker config's
    ``auth`` is base64 of ``user:password``), longest first so no part is left over."""
    forms: set[str] = set()
    for secret in secrets:
        if len(secret) < 4:  # too short to tell from ordinary text; still never printed by us
            continue
        forms.add(secret)
        forms.add(base64.b64encode(secret.encode()).decode())
        forms.add(base64.b64encode(secret.encode()).decode().rstrip("="))
    return sorted(forms, key=len, reverse=True)


def redact_secrets(text: str, secrets: list[str]) -> str:
    """``text`` without the given secrets (clear or base64) and without what
    :func:`redact_text` removes: for output of a tool that was handed credentials."""
    for form in secret_forms(secrets):
        text = text.replace(form, REDACTED)
    return redact_text(text)


def redact_tree(obj: Any) -> Any:
    """A JSON-like document fit to leave the run directory (a tracker's params, tags and
    artifacts): a string under a credential-like key loses its value, every other string
    goes through :func:`redact_text`; structure and numbers stay."""
    if isinstance(obj, dict):
        return {
            key: REDACTED
            if isinstance(value, str) and SECRET_NAME.search(str(key))
            else redact_tree(value)
            for key, value in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [redact_tree(item) for item in obj]
    return redact_text(obj) if isinstance(obj, str) else obj
