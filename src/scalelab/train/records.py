"""What a run writes about itself: run_info.json at the start, summary.json at the end.

The summary's presence marks a completed run; its figures come from the epoch
history (throughput excludes warm-up) plus facts measured on the model and
the backend (parameters, FLOPs, per-rank memory, MFU on GPUs).
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from scalelab.backends import library_versions
from scalelab.data.spec import FIELD as DATA_SPEC
from scalelab.models.gpt import lm_facts
from scalelab.provenance import redact_argv
from scalelab.train.metrics import model_facts, peak_bf16, throughput
from scalelab.train.setup import Job
from scalelab.train.state import TrainState


def run_info(job: Job) -> dict[str, Any]:
    """How this run was started: layout, hosts, device, plan, precision, versions, image."""
    from scalelab.container.wiring import inside_image_info

    device, cfg = job.device, job.cfg
    return {
        "layout": asdict(job.layout), "hostnames": job.hostnames, "backend": job.backend.name,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        platform.processor() or platform.machine(),
        "threads_per_rank": job.threads, "plan": asdict(job.plan),
        DATA_SPEC: job.spec.to_dict(),  # what predict and evaluate build the model for
        "steps_per_epoch": job.steps_per_epoch,
        "precision": "bf16" if job.use_bf16 else "fp32", "channels_last": job.channels_last,
        "compile": cfg.train.compile, "deterministic": cfg.train.deterministic,
        "resume": job.resume, "argv": redact_argv(list(sys.argv)),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     **library_versions(), "numpy": np.__version__},
        "container": inside_image_info(),  # None on the host; proof of the image otherwise
    }


def summary(job: Job, state: TrainState, reasons: dict[str, str]) -> dict[str, Any]:
    """summary.json: the run's figures (every rank computes it; rank 0 writes it)."""
    cfg, plan, history = job.cfg, job.plan, state.history
    last = history[-1] if history else {}
    rate = throughput(history)
    comm = [e["comm_s"] for e in history if e["comm_s"] is not None]
    world = job.layout.world_size
    out = {
        "status": "completed", "epochs": cfg.train.epochs, "global_steps": state.global_step,
        "steps_per_epoch": job.steps_per_epoch, "world_size": world,
        "backend": job.backend.name, "launcher": job.layout.launcher, "device": str(job.device),
        "global_batch_size": plan.global_batch, "per_rank_batch_size": plan.per_rank_batch,
        "grad_accum_steps": plan.accum_steps, "lr": plan.lr,
        "train_loss": last.get("train_loss"), "train_acc": last.get("train_acc"),
        "val_loss": last.get("val_loss"), "val_acc": last.get("val_acc"),
        "samples_per_s": rate,
        "samples_per_s_per_rank": rate / world if rate else None,
        "throughput_excludes": "first epoch" if len(history) > 1 else
        f"first {cfg.metrics.warmup_steps} steps",
        "time_s": sum(e["time_s"] for e in history),
        "time_split_s": {
            "data": sum(e["data_s"] for e in history),
            "compute": sum(e["compute_s"] for e in history),
            "comm": sum(comm) if comm else None,
        },
        "resumes": state.resumes, "model_file": "model.pt",
    }
    out.update(model_facts(cfg.model.name, cfg.model.options, job.train_set.num_classes,
                           job.train_set.image_shape, job.raw_model, job.device,
                           out["samples_per_s_per_rank"], job.use_bf16))
    out.update(job.backend.memory_facts())
    out.update(lm_facts(job.raw_model, out, job.device, peak_bf16))
    out.update(energy_facts(history, reasons))
    return out


def energy_facts(history: list[dict[str, Any]], reasons: dict[str, str]) -> dict[str, Any]:
    """Joules per trained sample over the epochs the throughput covers (the first is
    warm-up when there are several), from the rank-summed counters of each epoch.

    ``reasons`` (this rank's, why a counter could not be opened) is reported when no
    figure exists, so a missing number explains itself rather than reading as zero.
    """
    epochs = history[1:] if len(history) > 1 else history
    joules = [e.get("energy_j") for e in epochs]
    if not epochs or any(j is None for j in joules):
        return {"energy_j": None, "joules_per_sample": None, "energy_sources": [],
                "energy_unavailable": reasons or {"all": "an epoch has no energy reading"}}
    samples = sum(e["energy_samples"] for e in epochs)
    seconds = sum(e["energy_s"] for e in epochs)
    return {"energy_j": sum(joules), "joules_per_sample": sum(joules) / samples,
            "energy_power_w": sum(joules) / seconds if seconds > 0 else None,
            "energy_sources": sorted({s for e in epochs for s in e["energy_sources"]}),
            "energy_excludes": "first epoch and validation" if len(history) > 1 else
            "validation", "energy_unavailable": reasons}
