"""Predict step time, throughput and efficiency at scale from one measured configuration.

Model (stated in every output)::

    ring allreduce of S bytes on n ranks:
        t_ar(n, S) = 2(n-1) * alpha + 2(n-1)/n * S / beta
    step time on N ranks:
        t_step(N) = t_data(N) + t_compute(N) + (1 - overlap) * t_ar(N, G)
    weak scaling   (per-rank batch b fixed):  t_compute(N) = t_compute(N0), t_data likewise
    strong scaling (global batch B fixed):    t_compute(N) = t_compute(N0) * N0 / N, t_data likewise
    throughput X(N) = global batch / t_step(N);   efficiency E(N) = X(N) / ((N / N0) X(N0))

alpha (latency per ring step, s) and beta (bandwidth, B/s) are fitted to the
commbench allreduce curve by non-negative least squares on relative residuals
(so 1 KiB and 256 MiB weigh alike). G is the gradient size in bytes, overlap
the fraction of the allreduce hidden behind compute (0: none).

Why this model: a bandwidth-optimal ring allreduce sends 2(n-1)/n of the buffer
per rank in 2(n-1) steps (Patarasuk & Yuan 2009; Thakur, Rabenseifner & Gropp
2005); it is what NCCL and Gloo use for large messages. Not modelled: hierarchy
(intra- vs inter-node links; fit on an inter-node curve for multi-node
predictions), tree algorithms at small sizes, contention, stragglers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from scalelab.errors import UsageError

MODEL = ("t_ar(n,S) = 2(n-1)*alpha + 2(n-1)/n * S/beta;  "
         "t_step(N) = t_data(N) + t_compute(N) + (1-overlap)*t_ar(N, grad_bytes);  "
         "weak: t_compute, t_data constant; strong: scaled by N0/N;  "
         "X(N) = global_batch(N)/t_step(N);  E(N) = X(N) / ((N/N0) X(N0))")


def ring_allreduce_time(n: np.ndarray | float, size_bytes: np.ndarray | float, alpha: float,
                        beta: float) -> np.ndarray:
    """Seconds of a ring allreduce of ``size_bytes`` on ``n`` ranks (0 for n = 1)."""
    n = np.asarray(n, dtype=float)
    s = np.asarray(size_bytes, dtype=float)
    return 2.0 * (n - 1.0) * alpha + 2.0 * (n - 1.0) / n * s / beta


@dataclass(frozen=True)
class RingFit:
    """Fitted ring-allreduce parameters and how well they describe the curve."""

    alpha_s: float
    beta_Bps: float
    alpha_stderr_s: float
    beta_stderr_Bps: float
    rms_rel_error: float
    max_rel_error: float
    points: int
    world_sizes: tuple[int, ...]


def fit_ring(records: Iterable[dict], min_bytes: float = 0.0,
             max_bytes: float = math.inf) -> RingFit:
    """Fit alpha and beta to the allreduce records of a commbench output."""
    from scipy.optimize import nnls

    rows = [r for r in records if r["op"] == "allreduce" and r["world_size"] >= 2
            and min_bytes <= r["size_bytes"] <= max_bytes]
    if len(rows) < 2:
        raise UsageError("commbench: need allreduce results on >= 2 ranks at >= 2 message sizes "
                         "(in the --min/--max-fit-bytes range) to fit latency and bandwidth")
    n = np.array([r["world_size"] for r in rows], dtype=float)
    s = np.array([r["size_bytes"] for r in rows], dtype=float)
    t = np.array([r["time_s"] for r in rows], dtype=float)
    design = np.column_stack([2 * (n - 1), 2 * (n - 1) / n * s]) / t[:, None]
    coef, _ = nnls(design, np.ones_like(t))
    alpha, inv_beta = float(coef[0]), float(coef[1])
    if inv_beta <= 0:
        raise UsageError("commbench: the allreduce time does not grow with the message size; "
                         "cannot fit a bandwidth (use larger sizes)")
    resid = design @ coef - 1.0
    dof = max(len(t) - 2, 1)
    try:
        cov = np.linalg.inv(design.T @ design) * float(resid @ resid) / dof
        a_err, ib_err = float(np.sqrt(cov[0, 0])), float(np.sqrt(cov[1, 1]))
    except np.linalg.LinAlgError:
        a_err = ib_err = math.nan
    beta = 1.0 / inv_beta
    return RingFit(
        alpha_s=alpha, beta_Bps=beta, alpha_stderr_s=a_err,
        beta_stderr_Bps=ib_err * beta * beta,
        rms_rel_error=float(np.sqrt(np.mean(resid ** 2))),
        max_rel_error=float(np.max(np.abs(resid))), points=len(t),
        world_sizes=tuple(sorted({int(x) for x in n})))


@dataclass(frozen=True)
class Base:
    """The measured configuration the prediction starts from."""

    ranks: int
    compute_s: float
    data_s: float
    grad_bytes: float
    global_batch: float
    mode: str = "weak"
    overlap: float = 0.0

    def check(self) -> None:
        for name in ("ranks", "compute_s", "grad_bytes", "global_batch"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise UsageError(f"base configuration: {name} = {value!r} must be > 0")
        if not (math.isfinite(self.data_s) and self.data_s >= 0):
            raise UsageError(f"base configuration: data_s = {self.data_s!r} must be >= 0")
        if self.mode not in ("weak", "strong"):
            raise UsageError(f"--mode: {self.mode!r} is not weak or strong")
        if not 0 <= self.overlap <= 1:
            raise UsageError(f"--overlap: {self.overlap} must be in [0, 1]")


def check_curve(records: Iterable[dict], run: dict, allow_cpu_curve: bool = False) -> None:
    """Refuse to extrapolate a GPU study from an allreduce curve measured on the CPU.

    A gloo or MPI curve on host buffers says nothing about NCCL on GPUs (other links,
    other algorithms, bandwidth that differs by orders of magnitude): a prediction fitted to
    it would look precise and be wrong. ``allow_cpu_curve`` is the explicit override
    (e.g. to study the CPU fallback on purpose).
    """
    if allow_cpu_curve or not (run.get("gpus") or 0) > 0:
        return
    backends = sorted({str(r.get("backend")) for r in records})
    if "nccl" not in backends:
        raise UsageError(
            f"--commbench: the run trained on GPUs but the allreduce curve was measured with "
            f"{', '.join(backends)} on host buffers; a CPU curve cannot predict NCCL on GPUs. "
            f"Run commbench on the study's GPU nodes (the workflow places it like the "
            f"training), or pass --allow-cpu-curve to fit it anyway")


def predict(base: Base, fit: RingFit, ranks: Iterable[int]) -> pd.DataFrame:
    """Predicted step time, throughput and efficiency at each rank count."""
    base.check()
    n = np.array(sorted(set(int(r) for r in ranks) | {base.ranks}), dtype=float)
    scale = np.ones_like(n) if base.mode == "weak" else base.ranks / n
    batch = base.global_batch * (n / base.ranks if base.mode == "weak" else np.ones_like(n))
    comm = ring_allreduce_time(n, base.grad_bytes, fit.alpha_s, fit.beta_Bps)
    step = (base.data_s + base.compute_s) * scale + (1.0 - base.overlap) * comm
    throughput = batch / step
    x0 = throughput[n == base.ranks][0]
    return pd.DataFrame({
        "ranks": n, "global_batch": batch, "compute_s": base.compute_s * scale,
        "data_s": base.data_s * scale, "allreduce_s": comm,
        "exposed_comm_s": (1.0 - base.overlap) * comm, "step_time_s": step,
        "throughput": throughput, "speedup": throughput / x0,
        "efficiency": throughput / (x0 * n / base.ranks),
    })


def compare(pred: pd.DataFrame, measured: pd.DataFrame) -> pd.DataFrame:
    """Prediction error at the measured rank counts: (predicted - measured) / measured."""
    rows = []
    for rec in measured.itertuples():
        hit = pred[pred["ranks"] == rec.ranks]
        if hit.empty:
            continue
        p = hit.iloc[0]
        step = getattr(rec, "step_time_s", math.nan)
        rows.append({
            "ranks": rec.ranks, "measured_throughput": rec.throughput,
            "predicted_throughput": p["throughput"],
            "throughput_rel_error": (p["throughput"] - rec.throughput) / rec.throughput,
            "measured_step_time_s": step, "predicted_step_time_s": p["step_time_s"],
            "step_time_rel_error": (p["step_time_s"] - step) / step if step > 0 else math.nan,
        })
    return pd.DataFrame(rows, columns=["ranks", "measured_throughput", "predicted_throughput",
                                       "throughput_rel_error", "measured_step_time_s",
                                       "predicted_step_time_s", "step_time_rel_error"])


def scales(max_nodes: int, ranks_per_node: int) -> list[int]:
    """Rank counts 1, 2, ..., ranks_per_node, then ranks_per_node x 2, 4, ..., max_nodes nodes."""
    if max_nodes < 1 or ranks_per_node < 1:
        raise UsageError("--max-nodes and --ranks-per-node must be >= 1")
    out = {1}
    r = 1
    while r < ranks_per_node:
        out.add(r)
        r *= 2
    nodes = 1
    while nodes <= max_nodes:
        out.add(nodes * ranks_per_node)
        nodes *= 2
    out.add(max_nodes * ranks_per_node)
    return sorted(out)


def fit_dict(fit: RingFit) -> dict:
    d = asdict(fit)
    d["world_sizes"] = list(fit.world_sizes)
    return d
