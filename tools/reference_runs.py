"""Reference trainings whose results must not change while code moves.

Runs small deterministic trainings through the real launchers (one process, torchrun on
gloo, the venv's mpirun for Horovod) and prints, per run, the sha256 of ``model.pt`` and
of ``metrics.jsonl`` with its timing and host fields removed. ``--check`` compares with
``tools/reference_hashes.json`` and exits 1 on any change; ``--write`` records the
current values there (do that only on a commit whose behaviour is the reference).

    .venv/bin/python tools/reference_runs.py --check [--only cnn-ddp2,gpt-tp2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
HASHES = HERE / "reference_hashes.json"
PY = sys.executable
BIN = Path(PY).parent
TORCHRUN = [PY, "-m", "torch.distributed.run", "--nproc-per-node"]
MPIRUN = [str(BIN / "mpirun"), "--allow-run-as-root", "--oversubscribe", "-n"]

#: Fields of metrics.jsonl that describe the computation (everything else is timing,
#: energy or the host, which differ between two identical runs).
KEEP = (
    "kind",
    "epoch",
    "epochs",
    "step",
    "global_step",
    "loss",
    "acc",
    "lr",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "world_size",
    "backend",
    "resume",
    "timed_samples",
    "energy_samples",
)

CNN: dict[str, Any] = {
    "seed": 7,
    "model": {"name": "cnn", "options": {"width": 8, "hidden": 32}},
    "data": {
        "source": "synthetic",
        "num_samples": 256,
        "val_samples": 64,
        "image_shape": [3, 16, 16],
        "num_classes": 4,
    },
    "optim": {
        "global_batch_size": 32,
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 1e-3,
        "warmup_epochs": 0.5,
    },
    "train": {"epochs": 1, "threads": 1, "progress": False, "deterministic": True},
    "metrics": {"warmup_steps": 1},
    "checkpoint": {"every_epochs": 0},
}
GPT: dict[str, Any] = {
    "seed": 11,
    "model": {"name": "gpt", "options": {"size": "tiny"}},
    "data": {
        "source": "tokens",
        "num_samples": 128,
        "val_samples": 32,
        "seq_len": 16,
        "vocab_size": 32,
    },
    "optim": {"name": "sgd", "global_batch_size": 16, "lr": 0.1, "momentum": 0.9},
    "train": {"epochs": 1, "threads": 1, "progress": False, "deterministic": True},
    "metrics": {"warmup_steps": 1},
    "checkpoint": {"every_epochs": 0},
}


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(base))
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


#: A step with no launcher: keep only the oldest checkpoint and the config (a stopped run).
STOPPED = ["stopped"]


#: name -> list of (launcher argv, config, extra train args); later steps reuse the run dir.
def cases() -> dict[str, list[tuple[list[str], dict[str, Any], list[str]]]]:
    ckpt = {"checkpoint": {"every_epochs": 1}, "train": {"epochs": 2}}
    return {
        "cnn-single": [([PY], merged(CNN, {"dist": {"backend": "none"}}), [])],
        "cnn-ddp2": [
            (
                [
                    *TORCHRUN,
                    "2",
                ],
                merged(CNN, {"dist": {"backend": "ddp"}}),
                [],
            )
        ],
        "cnn-horovod2": [([*MPIRUN, "2", PY], merged(CNN, {"dist": {"backend": "horovod"}}), [])],
        "gpt-single": [([PY], merged(GPT, {"dist": {"backend": "none"}}), [])],
        "gpt-fsdp2": [([*TORCHRUN, "2"], merged(GPT, {"dist": {"backend": "fsdp"}}), [])],
        "gpt-tp2": [([*TORCHRUN, "4"], merged(GPT, {"dist": {"backend": "ddp", "tp": 2}}), [])],
        "gpt-fsdp-tp2": [
            ([*TORCHRUN, "4"], merged(GPT, {"dist": {"backend": "fsdp", "tp": 2}}), [])
        ],
        "cnn-ddp2-2epochs": [
            ([*TORCHRUN, "2"], merged(CNN, merged(ckpt, {"dist": {"backend": "ddp"}})), [])
        ],
        "gpt-fsdp2-2epochs": [
            ([*TORCHRUN, "2"], merged(GPT, merged(ckpt, {"dist": {"backend": "fsdp"}})), [])
        ],
        # A run of 2 epochs stopped after its epoch-1 checkpoint (the epoch-2 checkpoint,
        # summary and model removed, as a kill after the first checkpoint leaves it), resumed.
        "cnn-ddp2-resume": [
            ([*TORCHRUN, "2"], merged(CNN, merged(ckpt, {"dist": {"backend": "ddp"}})), []),
            ([], {}, STOPPED),
            (
                [*TORCHRUN, "2"],
                merged(CNN, merged(ckpt, {"dist": {"backend": "ddp"}})),
                ["--resume"],
            ),
        ],
        "gpt-fsdp2-resume": [
            ([*TORCHRUN, "2"], merged(GPT, merged(ckpt, {"dist": {"backend": "fsdp"}})), []),
            ([], {}, STOPPED),
            (
                [*TORCHRUN, "2"],
                merged(GPT, merged(ckpt, {"dist": {"backend": "fsdp"}})),
                ["--resume"],
            ),
        ],
    }


def clean_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OMPI_", "PMIX_", "SLURM_", "PMI_", "HOROVOD_"))
        and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    return env


def metrics_digest(path: Path) -> str:
    rows = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        rows.append({k: rec[k] for k in KEEP if k in rec})
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def stop_after_first_checkpoint(out: Path) -> None:
    """Leave RUN_DIR as a run killed right after its first checkpoint leaves it."""
    ckpts = sorted((out / "checkpoints").iterdir())
    first = ckpts[0].name.split(".")[0]
    for path in ckpts:
        if not path.name.startswith(first):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    cut = next(i for i, line in enumerate(lines) if json.loads(line)["kind"] == "epoch") + 1
    metrics.write_text("".join(lines[:cut]))
    for name in ("summary.json", "model.pt"):
        (out / name).unlink()


def run_case(name: str, steps: list, root: Path) -> dict[str, str]:
    out = root / name
    for i, (launcher, cfg, extra) in enumerate(steps):
        if not launcher:
            stop_after_first_checkpoint(out)
            continue
        config = root / f"{name}-{i}.yaml"
        config.write_text(yaml.safe_dump(cfg))
        cmd = [
            *launcher,
            "-m",
            "scalelab",
            "train",
            "--config",
            str(config),
            "--out",
            str(out),
            *extra,
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=clean_env(), timeout=600, check=False
        )
        if proc.returncode != 0:
            raise SystemExit(f"{name}: step {i} exited {proc.returncode}\n{proc.stderr[-2000:]}")
    model = hashlib.sha256((out / "model.pt").read_bytes()).hexdigest()
    return {"model.pt": model, "metrics": metrics_digest(out / "metrics.jsonl")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="compare with reference_hashes.json")
    mode.add_argument("--write", action="store_true", help="record the current hashes")
    p.add_argument("--only", help="comma-separated case names")
    args = p.parse_args(argv)
    table = cases()
    names = args.only.split(",") if args.only else list(table)
    known = json.loads(HASHES.read_text()) if HASHES.exists() else {}
    changed = 0
    with tempfile.TemporaryDirectory() as tmp:
        got = {}
        for name in names:
            got[name] = run_case(name, table[name], Path(tmp))
            want = known.get(name)
            same = want == got[name]
            changed += args.check and not same
            mark = "same" if same else ("CHANGED" if want else "new")
            print(
                f"{name:18} model.pt {got[name]['model.pt'][:16]}  "
                f"metrics {got[name]['metrics'][:16]}  {mark}",
                flush=True,
            )
    if args.write:
        HASHES.write_text(json.dumps({**known, **got}, indent=1, sort_keys=True) + "\n")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
