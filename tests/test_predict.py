"""Scaling prediction: ring-allreduce fit, the step-time model, the CLI end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from conftest import VENV_BIN, mpirun, run

from scalelab.comm import predict as model
from scalelab.comm.results import FIELDS

SCALELAB = str(VENV_BIN / "scalelab")
ALPHA, BETA = 20e-6, 2.5e9


def synthetic_records(world_sizes=(2,), noise=0.01, seed=3) -> list[dict]:
    rng = np.random.default_rng(seed)
    recs = []
    for n in world_sizes:
        for k in range(10, 29):  # 1 KiB .. 256 MiB
            size = 2**k
            t = float(model.ring_allreduce_time(n, size, ALPHA, BETA)) * (1 + rng.normal(0, noise))
            algbw = size / t / 1e9
            recs.append(
                {
                    "lib": "mpi4py",
                    "backend": "mpi",
                    "op": "allreduce",
                    "size_bytes": size,
                    "count": size // 4,
                    "dtype": "float32",
                    "world_size": n,
                    "nodes": n,
                    "iters": 20,
                    "warmup": 5,
                    "time_s": t,
                    "time_max_s": t,
                    "algbw_GBps": algbw,
                    "busbw_GBps": algbw * 2 * (n - 1) / n,
                    "wrong": 0,
                }
            )
    return recs


def write_commbench(path: Path, records: list[dict]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "commbench.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(records)
    return path


@pytest.mark.parametrize("world_sizes", [(2,), (2, 4, 8)])
def test_fit_recovers_alpha_beta(world_sizes):
    fit = model.fit_ring(synthetic_records(world_sizes))
    assert fit.alpha_s == pytest.approx(ALPHA, rel=0.05)
    assert fit.beta_Bps == pytest.approx(BETA, rel=0.02)
    assert fit.rms_rel_error < 0.02 and fit.world_sizes == tuple(world_sizes)


#: Allreduce times (us) of a 2-rank gloo commbench measured during a CI run on a busy
#: 2-core machine (1 KiB .. 1 MiB, 3 iterations): flat within noise.
FLAT_US = [2467.6, 1026.9, 4195.1, 2003.3, 1204.2, 2444.9, 1870.0, 3120.5, 2210.0, 2950.7, 2601.3]


def flat_records() -> list[dict]:
    recs = []
    for k, us in enumerate(FLAT_US):
        rec = synthetic_records()[0] | {
            "lib": "torch",
            "backend": "gloo",
            "size_bytes": 1024 * 2**k,
            "time_s": us * 1e-6,
        }
        recs.append(rec)
    return recs


def test_a_resolved_curve_is_not_a_bound():
    assert not model.fit_ring(synthetic_records()).beta_is_lower_bound


def test_a_flat_curve_gives_a_flagged_bandwidth_bound():
    """Noise-dominated times cannot resolve beta: the fit falls back to the best bus
    bandwidth measured (which the true beta is at least) and says so."""
    recs = flat_records()
    fit = model.fit_ring(recs)
    assert fit.beta_is_lower_bound
    best = max(r["size_bytes"] / r["time_s"] for r in recs)  # 2(n-1)/n = 1 at n = 2
    assert fit.beta_Bps == pytest.approx(best, rel=1e-9)
    assert fit.alpha_s > 0 and fit.size_range == (1024, 1024 * 2**10)
    # every measured time is at least the fitted bandwidth term: a true lower bound on beta
    assert all(r["time_s"] >= r["size_bytes"] / fit.beta_Bps * (1 - 1e-9) for r in recs)


def test_predict_on_a_flat_curve_finishes_and_flags_it(tmp_path):
    cb = write_commbench(tmp_path / "cb", flat_records())
    out = tmp_path / "pred"
    proc = run(
        [
            SCALELAB,
            "predict",
            "--commbench",
            str(cb),
            "--compute-time",
            "0.01",
            "--grad-bytes",
            "400K",
            "--global-batch",
            "32",
            "--out",
            str(out),
        ]
    )
    assert "warning:" in proc.stderr and "lower bound" in proc.stderr, proc.stderr
    assert "beta >=" in proc.stdout
    pred = pd.read_csv(out / "prediction.csv")
    assert pred["comm_s_is_upper_bound"].all()
    assert "not resolved" in (out / "prediction.md").read_text()
    assert json.loads((out / "prediction.json").read_text())["fit"]["beta_is_lower_bound"]
    resolved = tmp_path / "resolved"
    run(
        [
            SCALELAB,
            "predict",
            "--commbench",
            str(write_commbench(tmp_path / "cb2", synthetic_records())),
            "--compute-time",
            "0.01",
            "--grad-bytes",
            "400K",
            "--global-batch",
            "32",
            "--out",
            str(resolved),
        ]
    )
    assert not pd.read_csv(resolved / "prediction.csv")["comm_s_is_upper_bound"].any()


def test_model_weak_and_strong():
    fit = model.RingFit(ALPHA, BETA, 0, 0, 0, 0, 10, (2,))
    g = 100e6
    base = model.Base(
        ranks=1, compute_s=0.2, data_s=0.01, grad_bytes=g, global_batch=64, mode="weak"
    )
    pred = model.predict(base, fit, [1, 2, 8, 256]).set_index("ranks")
    t_ar8 = 2 * 7 * ALPHA + 2 * 7 / 8 * g / BETA
    assert pred.loc[1, "allreduce_s"] == 0
    assert pred.loc[8, "step_time_s"] == pytest.approx(0.21 + t_ar8)
    assert pred.loc[8, "throughput"] == pytest.approx(64 * 8 / (0.21 + t_ar8))
    assert pred.loc[8, "efficiency"] == pytest.approx(0.21 / (0.21 + t_ar8))
    strong = model.Base(
        ranks=2,
        compute_s=0.2,
        data_s=0.0,
        grad_bytes=g,
        global_batch=256,
        mode="strong",
        overlap=0.5,
    )
    sp = model.predict(strong, fit, [2, 16]).set_index("ranks")
    t_ar2 = 2 * ALPHA + g / BETA
    t_ar16 = 2 * 15 * ALPHA + 2 * 15 / 16 * g / BETA
    assert sp.loc[16, "step_time_s"] == pytest.approx(0.2 * 2 / 16 + 0.5 * t_ar16)
    assert sp.loc[16, "global_batch"] == 256
    x2 = 256 / (0.2 + 0.5 * t_ar2)
    assert sp.loc[16, "efficiency"] == pytest.approx(sp.loc[16, "throughput"] / (8 * x2))


def test_scales_up_to_64_nodes_of_4():
    assert model.scales(64, 4) == [1, 2, 4, 8, 16, 32, 64, 128, 256]


def test_cli_with_explicit_base_and_measured_table(tmp_path):
    cb = write_commbench(tmp_path / "cb", synthetic_records())
    fit = model.fit_ring(synthetic_records())
    base = model.Base(ranks=1, compute_s=0.05, data_s=0.0, grad_bytes=40e6, global_batch=32)
    truth = model.predict(base, fit, [1, 2, 4]).set_index("ranks")["throughput"]
    measured = tmp_path / "measured.csv"
    measured.write_text(
        "ranks,throughput\n"
        + "".join(f"{r},{truth[r] * (1 + d)}\n" for r, d in ((1, 0.0), (2, 0.05), (4, -0.10)))
    )
    out = tmp_path / "pred"
    proc = run(
        [
            SCALELAB,
            "predict",
            "--commbench",
            str(cb),
            "--compute-time",
            "0.05",
            "--grad-bytes",
            "40000000",
            "--global-batch",
            "32",
            "--base-ranks",
            "1",
            "--mode",
            "weak",
            "--measured-csv",
            str(measured),
            "--out",
            str(out),
        ]
    )
    assert "alpha =" in proc.stdout and "beta =" in proc.stdout
    pred = pd.read_csv(out / "prediction.csv")
    assert pred["ranks"].max() == 256 and (pred["efficiency"] <= 1.0 + 1e-9).all()
    err = pd.read_csv(out / "errors.csv").set_index("ranks")["throughput_rel_error"]
    # error = (predicted - measured) / measured, measured = truth * (1 + d)
    assert err[1] == pytest.approx(0.0, abs=1e-9)
    assert err[2] == pytest.approx(1 / 1.05 - 1, rel=1e-6)
    assert err[4] == pytest.approx(1 / 0.90 - 1, rel=1e-6)
    md = (out / "prediction.md").read_text()
    assert "2(n-1)*alpha + 2(n-1)/n * S/beta" in md and "Error at measured points" in md
    doc = json.loads((out / "prediction.json").read_text())
    assert doc["fit"]["beta_Bps"] == pytest.approx(BETA, rel=0.02)
    img = mpimg.imread(out / "prediction.png")
    assert img.shape[:2] == (450, 1000) and float(np.std(img[..., :3])) > 0.01


def test_cli_from_real_run_and_real_commbench(tmp_path):
    """The whole path: a trainer run and a measured mpi4py allreduce curve."""
    runs = tmp_path / "single"
    run(
        [
            SCALELAB,
            "train",
            "--set",
            "train.epochs=2",
            "--set",
            "train.steps_per_epoch=3",
            "--set",
            "data.num_samples=256",
            "--set",
            "data.val_samples=32",
            "--set",
            "optim.per_rank_batch_size=16",
            "--set",
            "train.threads=1",
            "--out",
            str(runs),
        ],
        timeout=120,
    )
    cb = tmp_path / "cb"
    mpirun(
        2,
        [
            SCALELAB,
            "commbench",
            "--lib",
            "mpi4py",
            "--ops",
            "allreduce",
            "--min-bytes",
            "4K",
            "--max-bytes",
            "4M",
            "--factor",
            "4",
            "--iters",
            "5",
            "--warmup",
            "2",
            "--out",
            str(cb),
        ],
        timeout=120,
    )
    out = tmp_path / "pred"
    proc = run(
        [
            SCALELAB,
            "predict",
            "--commbench",
            str(cb),
            "--run",
            str(runs),
            "--max-nodes",
            "4",
            "--ranks-per-node",
            "2",
            "--out",
            str(out),
        ]
    )
    assert "ranks 1: measured" in proc.stdout
    doc = json.loads((out / "prediction.json").read_text())
    assert doc["base"]["grad_bytes"] > 1000 and doc["base"]["mode"] == "weak"
    assert doc["fit"]["alpha_s"] >= 0 and doc["fit"]["beta_Bps"] > 0
    pred = pd.read_csv(out / "prediction.csv")
    assert list(pred["ranks"]) == [1, 2, 4, 8]
    assert len(pd.read_csv(out / "errors.csv")) == 1


def test_cli_predicts_the_collectives_of_an_fsdp_run(tmp_path):
    """`predict --run` on a real 2-rank fsdp run models all-gathers and reduce-scatters
    (FSDP2's collectives), not ddp's gradient allreduce."""
    runs = tmp_path / "fsdp"
    run(
        [
            str(VENV_BIN / "python"),
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "-m",
            "scalelab",
            "train",
            "--set",
            "model.name=gpt",
            "--set",
            "data.source=tokens",
            "--set",
            "data.num_samples=128",
            "--set",
            "data.val_samples=32",
            "--set",
            "data.seq_len=16",
            "--set",
            "data.vocab_size=32",
            "--set",
            "optim.global_batch_size=16",
            "--set",
            "train.epochs=1",
            "--set",
            "train.threads=1",
            "--set",
            "dist.backend=fsdp",
            "--out",
            str(runs),
        ],
        timeout=300,
    )
    cb = tmp_path / "cb"
    mpirun(
        2,
        [
            SCALELAB,
            "commbench",
            "--lib",
            "mpi4py",
            "--ops",
            "allreduce",
            "--min-bytes",
            "4K",
            "--max-bytes",
            "4M",
            "--factor",
            "4",
            "--iters",
            "5",
            "--warmup",
            "2",
            "--out",
            str(cb),
        ],
        timeout=120,
    )
    out = tmp_path / "pred"
    run(
        [
            SCALELAB,
            "predict",
            "--commbench",
            str(cb),
            "--run",
            str(runs),
            "--max-nodes",
            "2",
            "--ranks-per-node",
            "2",
            "--out",
            str(out),
        ]
    )
    pred = pd.read_csv(out / "prediction.csv")
    multi = pred[pred["ranks"] > 1]
    assert len(multi) and (multi["all_gather_s"] > 0).all(), pred
    assert (multi["reduce_scatter_s"] > 0).all() and (multi["allreduce_s"] == 0).all(), pred


def test_predict_builds_the_model_the_run_trained(tmp_path):
    """A 4-class staged run of 16x16 images: config.yaml's data fields say 10 classes of
    3x32x32 (their defaults), so only the recorded data spec gives the trained model."""
    import torch

    from scalelab.data.stage import StageConfig, stage
    from scalelab.models import build_model

    data = tmp_path / "staged"
    stage(
        StageConfig(
            "synthetic", data, num_samples=200, num_classes=4, image_size=(16, 16), progress=False
        )
    )
    runs = tmp_path / "run"
    run(
        [
            SCALELAB,
            "train",
            "--set",
            "data.source=staged",
            "--set",
            f"data.path={data}",
            "--set",
            "model.options={width: 8, hidden: 32}",
            "--set",
            "train.epochs=2",
            "--set",
            "train.steps_per_epoch=3",
            "--set",
            "optim.per_rank_batch_size=16",
            "--set",
            "train.threads=1",
            "--set",
            "metrics.warmup_steps=1",
            "--out",
            str(runs),
        ],
        timeout=120,
    )
    out = tmp_path / "pred"
    run(
        [
            SCALELAB,
            "predict",
            "--commbench",
            str(write_commbench(tmp_path / "cb", synthetic_records())),
            "--run",
            str(runs),
            "--max-nodes",
            "2",
            "--ranks-per-node",
            "2",
            "--out",
            str(out),
        ]
    )
    doc = json.loads((out / "prediction.json").read_text())
    trained = torch.load(runs / "model.pt", weights_only=True)
    param_bytes = sum(t.numel() * t.element_size() for t in trained.values())
    assert doc["collective_grad_bytes"] == param_bytes == doc["base"]["grad_bytes"]
    guessed = build_model("cnn", 10, (3, 32, 32), width=8, hidden=32)
    assert sum(4 * p.numel() for p in guessed.parameters()) != param_bytes
    # evaluate builds the same model from the same record
    assert (
        "test accuracy"
        in run([SCALELAB, "evaluate", "--run", str(runs), "--data", str(data)]).stdout
    )


@pytest.mark.parametrize(
    "header,row,needle",
    [
        ("op,size_bytes,world_size", "allreduce,1024,2", "missing column 'time_s'"),
        ("op,size_bytes,time_s,world_size", "allreduce,1024,0,2", "column 'time_s'"),
        ("op,size_bytes,time_s,world_size", "allreduce,-4,0.1,2", "column 'size_bytes'"),
    ],
)
def test_bad_commbench_input(tmp_path, header, row, needle):
    bad = tmp_path / "commbench.csv"
    bad.write_text(f"{header}\n{row}\n")
    out = tmp_path / "pred"
    proc = run(
        [
            SCALELAB,
            "predict",
            "--commbench",
            str(bad),
            "--compute-time",
            "0.1",
            "--grad-bytes",
            "1M",
            "--global-batch",
            "32",
            "--out",
            str(out),
        ],
        check=False,
    )
    assert proc.returncode == 2
    assert str(bad) in proc.stderr and needle in proc.stderr, proc.stderr
    assert not out.exists()


def test_missing_base_is_usage_error(tmp_path):
    cb = write_commbench(tmp_path / "cb", synthetic_records())
    proc = run(
        [
            SCALELAB,
            "predict",
            "--commbench",
            str(cb),
            "--grad-bytes",
            "1M",
            "--out",
            str(tmp_path / "pred"),
        ],
        check=False,
    )
    assert proc.returncode == 2 and "--compute-time" in proc.stderr
    assert not (tmp_path / "pred").exists()
