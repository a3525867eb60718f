"""Scaling analysis: formulas on published-style tables, fits, plots, real runs, bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from conftest import VENV_BIN, mpirun, run

from scalelab.analysis import plots, scaling

SCALELAB = str(VENV_BIN / "scalelab")

# Published-style strong-scaling table (images/s of a ResNet-50-like job, 1..64 GPUs).
PUBLISHED = """gpus,nodes,throughput,time,label
1,1,1000,1200,paper
2,1,1950,615.4,paper
4,1,3800,315.8,paper
8,1,7200,166.7,paper
16,2,13000,92.3,paper
32,4,22000,54.5,paper
64,8,35000,34.3,paper
"""


def analyze(args: list[str], check: bool = True):
    return run([SCALELAB, "analyze", *args], timeout=120, check=check)


def read_scaling(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "scaling.csv")


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> tuple[Path, Path]:
    """The published table analysed once by the CLI: (csv, out)."""
    base = tmp_path_factory.mktemp("published")
    csv = base / "paper.csv"
    csv.write_text(PUBLISHED)
    out = base / "out"
    analyze(["--from-csv", str(csv), "--out", str(out)])
    return csv, out


def test_efficiency_is_throughput_ratio_over_n(published):
    _, out = published
    t = read_scaling(out).sort_values("workers")
    x1 = t["throughput"].iloc[0]
    expected = t["throughput"] / (t["workers"] * x1)
    assert np.allclose(t["efficiency"], expected, rtol=1e-3)
    assert t["efficiency"].iloc[0] == pytest.approx(1.0)
    assert t["efficiency"].iloc[-1] == pytest.approx(35000 / (64 * 1000), rel=1e-3)


def test_speedup_karp_flatt_marginal_gain_hand_computed(published):
    _, out = published
    t = read_scaling(out).set_index("workers")
    # speedup S = X_N / X_1
    assert t.loc[8, "speedup"] == pytest.approx(7.2, rel=1e-6)
    assert t.loc[64, "speedup"] == pytest.approx(35.0, rel=1e-6)
    # Karp-Flatt e = (1/S - 1/p) / (1 - 1/p), by hand
    assert t.loc[8, "karp_flatt"] == pytest.approx((1 / 7.2 - 1 / 8) / (1 - 1 / 8), rel=1e-6)
    assert t.loc[8, "karp_flatt"] == pytest.approx(0.0158730, rel=1e-4)
    assert t.loc[64, "karp_flatt"] == pytest.approx((1 / 35 - 1 / 64) / (1 - 1 / 64), rel=1e-6)
    assert math.isnan(t.loc[1, "karp_flatt"])
    # marginal gain per doubling 8 -> 16: 13000/7200 - 1
    assert t.loc[16, "marginal_gain_per_doubling"] == pytest.approx(13000 / 7200 - 1, rel=1e-6)
    # cost proxy: GPUs x time / 3600 GPU-hours per unit of work
    assert t.loc[16, "cost_per_epoch_h"] == pytest.approx(16 * 92.3 / 3600, rel=1e-6)
    assert t.loc[16, "cost_unit"] == "GPU-h"
    # sweet spot: largest scale with efficiency >= 0.7 (16 GPUs: 81%; 32 GPUs: 68.75%)
    assert list(t.index[t["sweet_spot"]]) == [16]


def test_outputs_complete_and_plots_are_real_images(published):
    _, out = published
    for name in (
        "runs.csv",
        "runs.parquet",
        "scaling.csv",
        "scaling.parquet",
        "fits.csv",
        "scaling.md",
        "analysis.json",
    ):
        assert (out / name).stat().st_size > 0, name
    assert pd.read_parquet(out / "scaling.parquet").shape == read_scaling(out).shape
    md = (out / "scaling.md").read_text()
    assert "| paper | external | strong |" in md and "Karp-Flatt" in md
    height, width = int(plots.FIGSIZE[1] * plots.DPI), int(plots.FIGSIZE[0] * plots.DPI)
    for name in plots.NAMES:
        img = mpimg.imread(out / "plots" / f"{name}.png")
        assert img.shape[:2] == (height, width), name
        assert float(np.std(img[..., :3])) > 0.01, f"{name}.png is blank"
        svg = (out / "plots" / f"{name}.svg").read_text()
        assert "<svg" in svg and len(svg) > 2000, name
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.")]


def test_relative_to_smallest_configuration_and_threshold(tmp_path):
    csv = tmp_path / "from8.csv"
    csv.write_text("GPUs,Images/s\n8,7200\n16,13000\n32,22000\n64,35000\n")
    out = tmp_path / "out"
    analyze(["--from-csv", str(csv), "--out", str(out), "--threshold", "0.8"])
    t = read_scaling(out).set_index("workers")
    assert t.loc[32, "efficiency"] == pytest.approx((22000 / 7200) / 4, rel=1e-3)
    assert t.loc[16, "karp_flatt"] == pytest.approx((1 / (13000 / 7200) - 0.5) / 0.5, rel=1e-6)
    assert list(t.index[t["sweet_spot"]]) == [16]  # 16: 90.3%, 32: 76.4% < 0.8


def test_time_only_table_strong_and_weak(tmp_path):
    csv = tmp_path / "times.csv"
    csv.write_text("ranks,time,mode\n1,100,strong\n4,30,strong\n1,10,weak\n4,12.5,weak\n")
    out = tmp_path / "out"
    analyze(["--from-csv", str(csv), "--out", str(out)])
    t = read_scaling(out).set_index(["mode", "workers"])
    assert t.loc[("strong", 4), "speedup"] == pytest.approx(100 / 30, rel=1e-6)
    # weak: work grows with N, so efficiency = T_1 / T_N
    assert t.loc[("weak", 4), "efficiency"] == pytest.approx(10 / 12.5, rel=1e-6)
    assert set(t["throughput_unit"]) == {"work/s"}


def test_amdahl_fit_recovers_parallel_fraction(tmp_path):
    rng = np.random.default_rng(7)
    p = np.array([1, 2, 4, 8, 16, 32, 64], dtype=float)
    f_true = 0.95
    x = 500.0 * scaling.amdahl(p, f_true) * (1 + rng.normal(0, 0.005, p.size))
    x[0] = 500.0
    csv = tmp_path / "amdahl.csv"
    pd.DataFrame({"gpus": p, "throughput": x}).to_csv(csv, index=False)
    out = tmp_path / "out"
    analyze(["--from-csv", str(csv), "--out", str(out)])
    fit = pd.read_csv(out / "fits.csv").iloc[0]
    assert abs(fit["amdahl_parallel_fraction"] - f_true) / f_true < 0.01
    summary = json.loads((out / "analysis.json").read_text())
    assert summary["fits"][0]["amdahl_parallel_fraction"] == pytest.approx(
        fit["amdahl_parallel_fraction"]
    )


@pytest.mark.parametrize("f_true", [0.5, 0.9, 0.99])
def test_fits_recover_synthetic_fractions(f_true):
    p = np.array([1, 2, 4, 8, 16, 32], dtype=float)
    f, _, rms = scaling.fit_fraction(scaling.amdahl, p, scaling.amdahl(p, f_true))
    assert f == pytest.approx(f_true, rel=1e-4) and rms < 1e-6
    f, _, _ = scaling.fit_fraction(scaling.gustafson, p, scaling.gustafson(p, f_true))
    assert f == pytest.approx(f_true, rel=1e-4)


# --------------------------------------------------------------------------- real runs

TRAIN = [
    "train",
    "--set",
    "train.epochs=2",
    "--set",
    "train.steps_per_epoch=4",
    "--set",
    "data.num_samples=512",
    "--set",
    "data.val_samples=64",
    "--set",
    "optim.per_rank_batch_size=16",
    "--set",
    "train.threads=1",
    "--set",
    "metrics.warmup_steps=1",
]


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory) -> Path:
    """Runs made by the trainer: 1 rank, 2 ranks DDP (with a workflow sweep.json), 2 Horovod."""
    root = tmp_path_factory.mktemp("runs")
    run([SCALELAB, *TRAIN, "--out", str(root / "single")], timeout=120)
    mpirun(
        2, [SCALELAB, *TRAIN, "--set", "dist.backend=ddp", "--out", str(root / "ddp2")], timeout=120
    )
    (root / "ddp2" / "sweep.json").write_text(
        json.dumps(
            {
                "run_id": "ddp-weak-n1-t2-g0-r0",
                "ranks": 2,
                "backend": "ddp",
                "mode": "weak",
                "nodes": 1,
                "tasks_per_node": 2,
                "gpus_per_task": 0,
                "repeat": 0,
            }
        )
    )
    mpirun(
        2,
        [SCALELAB, *TRAIN, "--set", "dist.backend=horovod", "--out", str(root / "hvd2")],
        timeout=120,
    )
    return root


def test_analysis_of_real_runs(real_runs, tmp_path):
    out = tmp_path / "out"
    proc = analyze([str(real_runs), "--out", str(out), "--target-accuracy", "0.05"])
    assert "ddp" in proc.stdout and "horovod" in proc.stdout
    runs = pd.read_csv(out / "runs.csv").set_index("run_id")
    assert set(runs.index) == {"single", "ddp-weak-n1-t2-g0-r0", "hvd2"}
    assert runs.loc["ddp-weak-n1-t2-g0-r0", "ranks"] == 2
    assert runs.loc["hvd2", "backend"] == "horovod" and runs.loc["single", "backend"] == "none"
    assert (runs["samples_per_s"] > 0).all() and (runs["global_batch"] > 0).all()
    assert (runs["compute_s"] > 0).all() and (runs["epoch_time_s"] > 0).all()
    assert runs.loc["hvd2", "comm_s"] > 0  # Horovod's allreduce time is measured
    assert runs["time_to_target_s"].notna().all()
    assert runs["provenance"].nunique() == 3
    t = read_scaling(out)
    # the single-process run is the baseline of both backends
    for backend in ("ddp", "horovod"):
        grp = t[t["backend"] == backend].set_index("ranks")
        assert list(grp.index) == [1, 2]
        x1, x2 = grp.loc[1, "throughput"], grp.loc[2, "throughput"]
        assert grp.loc[2, "efficiency"] == pytest.approx(x2 / (2 * x1), rel=1e-3)
        assert grp.loc[2, "cost_unit"] == "core-h"
    for name in plots.NAMES:
        img = mpimg.imread(out / "plots" / f"{name}.png")
        assert img.shape[:2] == (500, 800) and float(np.std(img[..., :3])) > 0.01


# --------------------------------------------------------------------------- bad input


def assert_usage_error(args: list[str], out: Path, *needles: str) -> None:
    proc = analyze([*args, "--out", str(out)], check=False)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("scalelab analyze: error:") and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists(), "partial output left behind"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_empty_results_directory(tmp_path):
    empty = tmp_path / "results"
    empty.mkdir()
    assert_usage_error([str(empty)], tmp_path / "out", str(empty), "no run directories")


def test_run_without_summary(real_runs, tmp_path):
    broken = tmp_path / "results" / "ddp2"
    shutil.copytree(real_runs / "ddp2", broken, ignore=shutil.ignore_patterns("checkpoints"))
    (broken / "summary.json").unlink()
    shutil.copytree(
        real_runs / "single",
        tmp_path / "results" / "single",
        ignore=shutil.ignore_patterns("checkpoints"),
    )
    assert_usage_error(
        [str(tmp_path / "results")],
        tmp_path / "out",
        str(broken / "summary.json"),
        "did not complete",
    )


def test_csv_missing_column(tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text("gpus,speed\n1,100\n2,190\n")
    assert_usage_error(
        ["--from-csv", str(csv)], tmp_path / "out", str(csv), "missing column", "throughput"
    )


@pytest.mark.parametrize("value", ["0", "-5", "abc"])
def test_csv_non_positive_or_non_numeric(tmp_path, value):
    csv = tmp_path / "bad.csv"
    csv.write_text(f"gpus,throughput\n1,100\n2,{value}\n")
    assert_usage_error(
        ["--from-csv", str(csv)], tmp_path / "out", str(csv), "column 'throughput'", "line 3"
    )


def test_csv_non_positive_scale(tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text("ranks,throughput\n0,100\n2,190\n")
    assert_usage_error(["--from-csv", str(csv)], tmp_path / "out", str(csv), "column 'ranks'")


def test_failure_keeps_previous_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("kept")
    csv = tmp_path / "bad.csv"
    csv.write_text("gpus,throughput\n1,-1\n")
    proc = analyze(["--from-csv", str(csv), "--out", str(out)], check=False)
    assert proc.returncode == 2
    assert [p.name for p in out.iterdir()] == ["previous.txt"]


def test_bad_threshold(tmp_path):
    csv = tmp_path / "ok.csv"
    csv.write_text("gpus,throughput\n1,100\n2,190\n")
    assert_usage_error(
        ["--from-csv", str(csv), "--threshold", "1.5"], tmp_path / "out", "--threshold"
    )


# --------------------------------------------------------------------------- anomaly flags


def _repeats_csv(path: Path, points: dict[int, list[float]]) -> Path:
    rows = ["ranks,throughput,repeat,label"]
    rows += [f"{n},{x},{i},crafted" for n, xs in points.items() for i, x in enumerate(xs)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_125_percent_with_small_spread_is_flagged_beside_the_figure(tmp_path):
    csv = _repeats_csv(tmp_path / "t.csv", {1: [100, 101, 99], 2: [250, 252, 248]})
    out = tmp_path / "out"
    analyze(["--from-csv", str(csv), "--out", str(out)])
    t = read_scaling(out).set_index("workers")
    assert t.loc[2, "efficiency"] == pytest.approx(1.25)
    assert t.loc[2, "efficiency_spread"] == pytest.approx(math.hypot(0.02, 4 / 250))
    assert bool(t.loc[2, "flag_superlinear"]) and t.loc[2, "flags"] == "superlinear"
    assert pd.isna(t.loc[1, "flags"])  # the 100% baseline: nothing to say
    md = (out / "scaling.md").read_text()
    assert "125.0% (superlinear)" in md
    assert "superlinear (1 of 2 rows): efficiency above 100%" in md
    page = (out / "scaling.html").read_text()
    assert '<td class="anomaly">&#9888; 125.0% (superlinear)</td>' in page


def test_within_noise_is_not_flagged_and_plain_scaling_carries_no_flag(tmp_path):
    csv = _repeats_csv(
        tmp_path / "t.csv", {1: [100, 90, 110], 2: [210, 190, 230], 4: [340, 330, 350]}
    )
    out = tmp_path / "out"
    analyze(["--from-csv", str(csv), "--out", str(out)])
    t = read_scaling(out).set_index("workers")
    assert t.loc[2, "efficiency"] == pytest.approx(1.05)
    assert not t["flag_superlinear"].any()
    assert t.loc[2, "flags"] == "within noise"  # above 100% is never printed bare
    assert t["flags"].isna()[[1, 4]].all()  # 100% baseline and 85%: nothing to say
    md = (out / "scaling.md").read_text()
    assert "105.0% (within noise)" in md and "superlinear" not in md.split("Flags:")[1]
    assert 'class="anomaly"' not in (out / "scaling.html").read_text()


def test_single_repeat_and_spread_larger_than_effect_are_marked(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("ranks,throughput\n1,100\n2,204\n")
    out = tmp_path / "out"
    analyze(["--from-csv", str(csv), "--out", str(out)])
    t = read_scaling(out).set_index("workers")
    # one repeat: no spread was measured, so 102% cannot be cleared as noise
    assert t.loc[2, "flags"] == "superlinear; single repeat"
    assert t.loc[1, "flags"] == "single repeat"
    assert "n/a (1 repeat)" in (out / "scaling.md").read_text()

    noisy = _repeats_csv(tmp_path / "n.csv", {1: [100, 70, 130], 2: [105, 80, 130]})
    analyze(["--from-csv", str(noisy), "--out", str(tmp_path / "out2")])
    t = read_scaling(tmp_path / "out2").set_index("workers")
    assert t.loc[2, "flags"] == "noisy" and bool(t.loc[2, "flag_noisy"])


# --------------------------------------------------------------------------- safe labels


@pytest.mark.parametrize(
    "label",
    [
        '=HYPERLINK("http://x")',
        "+1+2",
        "@SUM(A1)",
        "-2+3",
        "<script>alert(1)</script>",
        "a<b",
        " =1",
    ],
)
def test_formula_or_html_labels_are_refused_naming_file_and_row(tmp_path, label):
    csv = tmp_path / "t.csv"
    pd.DataFrame({"gpus": [1, 2], "throughput": [100, 190], "label": ["ok", label]}).to_csv(
        csv, index=False
    )
    assert_usage_error(
        ["--from-csv", str(csv)], tmp_path / "out", str(csv), "line 3", "column 'label'"
    )


def test_labels_are_escaped_in_markdown_and_html_but_plain_in_csv(tmp_path):
    label = "A & B | *x* [y](z) `q`"
    csv = tmp_path / "t.csv"
    pd.DataFrame({"gpus": [1, 2], "throughput": [100, 190], "label": [label] * 2}).to_csv(
        csv, index=False
    )
    out = tmp_path / "out"
    analyze(["--from-csv", str(csv), "--out", str(out)])
    assert set(read_scaling(out)["source"]) == {label}  # pandas reads back what was given
    assert set(pd.read_csv(out / "runs.csv")["source"]) == {label}
    md = (out / "scaling.md").read_text()
    assert r"A &amp; B \| \*x\* \[y\](z) \`q\`" in md and label not in md
    assert "A &amp; B | *x* [y](z) `q`" in (out / "scaling.html").read_text()


def test_formula_run_directory_name_is_refused(real_runs, tmp_path):
    bad = tmp_path / "=cmd"
    shutil.copytree(real_runs / "single", bad, ignore=shutil.ignore_patterns("checkpoints"))
    assert_usage_error([str(bad)], tmp_path / "out", str(bad), "directory name")


def test_flag_rule_in_process():
    """k x spread is the bar: the same 110% is an anomaly at 2% spread, noise at 20%."""

    def table(spread: float) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "efficiency": [1.0, 1.10],
                "speedup": [1.0, 2.2],
                "p": [1, 2],
                "repeats": [3, 3],
                "base_repeats": [3, 3],
                "efficiency_spread": [spread, spread],
            }
        )

    assert list(scaling.flag(table(0.02))["flags"]) == ["", "superlinear"]
    assert list(scaling.flag(table(0.20))["flags"]) == ["", "within noise"]
    assert list(scaling.flag(table(0.02), k=6.0)["flags"]) == ["", "within noise"]


# --------------------------------------------------------------------------- exact fits


def test_two_configurations_give_an_exact_fit_without_uncertainty(tmp_path):
    """One free point for one parameter: 'exact through 2 points', no +- and no error
    figure (issue 24: the default study printed +-4.9e-11 and 0.00%)."""
    csv = tmp_path / "two.csv"
    csv.write_text("gpus,throughput\n1,100\n2,190\n")
    out = tmp_path / "out"
    proc = analyze(["--from-csv", str(csv), "--out", str(out)])
    assert "(exact through 2 points)" in proc.stdout
    fit = pd.read_csv(out / "fits.csv").iloc[0]
    assert fit["fit_points"] == 2 and fit["amdahl_exact"] and fit["gustafson_exact"]
    for model, law in (("amdahl", scaling.amdahl), ("gustafson", scaling.gustafson)):
        f = fit[f"{model}_parallel_fraction"]
        assert float(law(2.0, f)) == pytest.approx(1.9, rel=1e-6)  # through the point
        assert math.isnan(fit[f"{model}_parallel_fraction_stderr"])
        assert math.isnan(fit[f"{model}_rms_rel_error"])
    md = (out / "scaling.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| two |") and "exact" in line)
    assert row.count("none: exact through 2 points") == 2 and row.count("n/a (exact)") == 2
    assert "e-1" not in row and "0.00%" not in row
    assert "none: exact through 2 points" in (out / "scaling.html").read_text()
    fig = plots.fits(read_scaling(out), 0.7, pd.read_csv(out / "fits.csv"))
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert sum("(exact through 2 points)" in label for label in labels) == 2
    plots.pyplot().close(fig)


def test_three_configurations_are_a_fit_with_uncertainty(tmp_path):
    csv = tmp_path / "three.csv"
    csv.write_text("gpus,throughput\n1,100\n2,190\n4,330\n")
    out = tmp_path / "out"
    analyze(["--from-csv", str(csv), "--out", str(out)])
    fit = pd.read_csv(out / "fits.csv").iloc[0]
    assert fit["fit_points"] == 3 and not fit["amdahl_exact"] and not fit["gustafson_exact"]
    assert fit["amdahl_parallel_fraction_stderr"] > 0 and fit["amdahl_rms_rel_error"] > 0
    fits_md = (out / "scaling.md").read_text().split("## Model fits")[1]
    rows = [line for line in fits_md.splitlines() if line.startswith("| three |")]
    assert len(rows) == 1 and "exact" not in rows[0] and "n/a" not in rows[0]


def test_exact_fit_rule_in_process():
    """Exact only with one free point the model can reach; a superlinear point lies
    outside f in [0, 1] (the fit sits at its bound, with a real misfit to report)."""
    p = np.array([1.0, 2.0])
    assert scaling.exact_fit(scaling.amdahl, p, np.array([1.0, 1.9]))
    assert not scaling.exact_fit(scaling.amdahl, p, np.array([1.0, 2.3]))
    assert not scaling.exact_fit(
        scaling.amdahl, np.array([1.0, 2.0, 4.0]), np.array([1.0, 1.9, 3.3])
    )
    f, err, rms = scaling.fit_fraction(scaling.amdahl, p, np.array([1.0, 1.9]))
    assert math.isnan(err) and rms < 1e-6
    f, err, rms = scaling.fit_fraction(scaling.amdahl, p, np.array([1.0, 2.3]))
    assert f == pytest.approx(1.0) and math.isnan(err) and rms > 0.05
