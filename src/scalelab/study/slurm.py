"""A run point's placement as the Snakemake Slurm executor plugin's resources.

Site settings (partition, account, constraint, qos, extra sbatch options), limits
(runtime, memory) and retries per rule, and the nodes, tasks and GPUs of one training
point (:func:`point_resources`), which the workflow's train and commbench rules use.
"""

from __future__ import annotations

import shlex
from typing import Any

from scalelab.study.plan import RunPoint

#: Rules that run as Slurm jobs under --profile slurm (effective_config runs locally).
SLURM_RULES = ("stage", "train", "evaluate", "commbench", "analyze", "predict")

#: Rules where a retry can help: training resumes from its newest checkpoint after a
#: preemption or a node failure; commbench is a fresh measurement. The others are
#: deterministic (a second try fails the same way), so they never retry.
RETRYABLE_RULES = ("train", "commbench")


def rule_settings(cfg: dict, rule: str) -> dict[str, Any]:
    """Site settings and limits of one rule: the resources section, then its per-rule
    override (resources.rules.RULE), then the retry policy."""
    res = cfg["resources"]
    keys = (
        "slurm_partition",
        "slurm_account",
        "constraint",
        "qos",
        "slurm_extra",
        "mem_mb_per_cpu",
        "runtime",
    )
    out = {k: res.get(k) for k in keys}
    if rule != "train":
        # runtime and memory of the top level are those of the (large) training jobs.
        out["runtime"], out["mem_mb_per_cpu"] = res["small_runtime"], res["small_mem_mb_per_cpu"]
    out["retries"] = res["retries"] if rule in RETRYABLE_RULES else 0
    if rule == "commbench":
        # Placed like the training it predicts: the training jobs' placement overrides
        # apply to it too (its own override, below, still wins).
        train = res["rules"].get("train", {})
        out.update({k: train[k] for k in _PLACEMENT if train.get(k) is not None})
    out.update({k: v for k, v in res["rules"].get(rule, {}).items() if v is not None})
    return out


#: Where a job runs (as opposed to how long and how big it is).
_PLACEMENT = ("slurm_partition", "slurm_account", "constraint", "qos", "slurm_extra")


def slurm_resources(cfg: dict, rule: str) -> dict[str, Any]:
    """The slurm executor plugin's resources for `rule`: only the keys the config sets."""
    s = rule_settings(cfg, rule)
    out = {
        k: s[k]
        for k in ("slurm_partition", "slurm_account", "constraint", "qos")
        if s[k] is not None
    }
    if s["slurm_extra"]:
        # The plugin pastes slurm_extra into a shell command: every item was checked
        # (--option=value, safe characters) and is quoted here once more.
        out["slurm_extra"] = " ".join(shlex.quote(o) for o in s["slurm_extra"])
    out["runtime"] = s["runtime"]
    out["mem_mb_per_cpu"] = s["mem_mb_per_cpu"]
    return out


def gpu_gres(point: RunPoint) -> str | None:
    """The per-node GPU request of a point (sbatch and srun ``--gres``), or None on CPU.

    All ranks of a node share all of that node's GPUs (``--gres=gpu:G`` per node, no
    ``--gpus-per-task``): per-task binding hides the other GPUs of the node from each rank,
    and NCCL's intra-node paths (P2P/NVLink, CUDA IPC) need to see them. Each rank then
    takes the GPU of its local rank.
    """
    return f"gpu:{point.gpus_per_node}" if point.gpus_per_task else None


def point_resources(point: RunPoint, cfg: dict, rule: str) -> dict:
    """Resources of one job for Snakemake's slurm executor plugin (None: leave unset).

    * 1 rank: no ``mpi`` resource. The plugin then runs the job under its own
      ``srun -n1`` step, and ``scalelab launch`` runs the rank directly inside it.
      (The plugin refuses ``mpi`` jobs with one task.)
    * N ranks: ``mpi`` set, so the rule's command runs in the batch script and starts the
      ranks itself with srun; sbatch gets ``--nodes``, ``--ntasks`` and, in slurm_extra,
      ``--ntasks-per-node`` so every node holds the same number of ranks.
    * GPUs: ``--gres=gpu:G`` per node (see :func:`gpu_gres`) and ``tasks_per_gpu=0``,
      without which the plugin adds ``--ntasks-per-gpu=<tasks>``, contradicting the gres.
    """
    site = slurm_resources(cfg, rule)
    extra = [site.pop("slurm_extra")] if site.get("slurm_extra") else []
    if point.ranks > 1:
        extra.append(f"--ntasks-per-node={point.tasks_per_node}")
    gres = gpu_gres(point)
    return {
        **{k: None for k in ("slurm_partition", "slurm_account", "constraint", "qos")},
        **site,
        "mpi": "srun" if point.ranks > 1 else None,
        "nodes": point.nodes,
        "tasks": point.ranks,
        "cpus_per_task": cfg["launch"]["cpus_per_task"],
        "gres": gres,
        "tasks_per_gpu": 0 if gres else None,
        "slurm_extra": " ".join(extra) or None,
    }
