"""Predict step time, throughput and efficiency at scale from one measured configuration.

Model (stated in every output)::

    ring allreduce of S bytes on n ranks:
        t_ar(n, S) = 2(n-1) * alpha + 2(n-1)/n * S / beta
    step time on N ranks:
        t_step(N) = t_data(N) + t_compute(N) + (1 - overlap) * t_ar(N, G)
    weak scaling   (per-rank batch b fixed):  t_compute(N) = t_compute(N0), t_data likewise
    strong scaling (global batch B fixed):    t_compute(N) = t_compute(N0) * N0 / N, t_data likewise
    throughput X(N) = global batch / t_step(N);   efficiency E(N) = X(N) / ((N / N0) X(N0))

The allreduce term is that of ddp and horovod. Other backends issue other collectives
(:class:`CommModel`, counted by :mod:`scalelab.comm.collectives` and checked against
what torch issues): fsdp all-gathers every shard group's parameters in forward and
again in backward (2G - 1 for G groups, the root kept) and reduce-scatters their
gradients (G); tensor parallelism adds 6 allreduces of a block's activations per block
(b x T x d x 4 bytes, b the per-rank batch) among the tp ranks, and data-parallel
collectives run over world / tp ranks on 1/tp of the split weights. All-gather and
reduce-scatter cost (n-1) alpha + (n-1)/n S/beta on the same fitted ring.

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
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scalelab.analysis.runs import load_run
from scalelab.backends.parallel_dims import ParallelDims
from scalelab.backends.registry import DEFAULT, with_capability
from scalelab.comm.collectives import (
    Collective,
    counts,
    ddp_step,
    fsdp_groups,
    fsdp_step,
    tp_local_bytes,
    tp_step,
)
from scalelab.data.kinds import TOKENS
from scalelab.data.registry import data_source
from scalelab.data.spec import DataSpec
from scalelab.errors import UsageError
from scalelab.models import build
from scalelab.rundir import RunDir
from scalelab.train.config import from_dict

if TYPE_CHECKING:
    from scalelab.data.spec import DataSpec

MODEL = (
    "t_ar(n,S) = 2(n-1)*alpha + 2(n-1)/n * S/beta;  "
    "t_step(N) = t_data(N) + t_compute(N) + (1-overlap)*t_ar(N, grad_bytes);  "
    "weak: t_compute, t_data constant; strong: scaled by N0/N;  "
    "X(N) = global_batch(N)/t_step(N);  E(N) = X(N) / ((N/N0) X(N0))"
)


def ring_allreduce_time(
    n: np.ndarray | float, size_bytes: np.ndarray | float, alpha: float, beta: float
) -> np.ndarray:
    """Seconds of a ring allreduce of ``size_bytes`` on ``n`` ranks (0 for n = 1)."""
    n = np.asarray(n, dtype=float)
    s = np.asarray(size_bytes, dtype=float)
    return 2.0 * (n - 1.0) * alpha + 2.0 * (n - 1.0) / n * s / beta


@dataclass(frozen=True)
class RingFit:
    """Fitted ring-allreduce parameters and how well they describe the curve.

    ``beta_is_lower_bound`` is set when the measured times do not grow measurably with the
    message size (latency and noise dominate, as on a shared machine or with small sizes):
    beta is then the best bus bandwidth measured, which the true bandwidth is at least, so
    every communication time predicted from it is an upper bound.
    """

    alpha_s: float
    beta_Bps: float
    alpha_stderr_s: float
    beta_stderr_Bps: float
    rms_rel_error: float
    max_rel_error: float
    points: int
    world_sizes: tuple[int, ...]
    beta_is_lower_bound: bool = False
    size_range: tuple[float, float] = (math.nan, math.nan)


#: The slope (1/beta) must exceed this many standard errors to count as measured.
SLOPE_SIGMAS = 2.0


def fit_ring(
    records: Iterable[dict], min_bytes: float = 0.0, max_bytes: float = math.inf
) -> RingFit:
    """Fit alpha and beta to the allreduce records of a commbench output.

    Least squares on relative error (each size counts alike), with both terms >= 0. When
    the bandwidth term is not resolved, beta falls back to a flagged lower bound.
    """
    from scipy.optimize import nnls

    rows = [
        r
        for r in records
        if r["op"] == "allreduce"
        and r["world_size"] >= 2
        and min_bytes <= r["size_bytes"] <= max_bytes
    ]
    if len(rows) < 2:
        raise UsageError(
            "commbench: need allreduce results on >= 2 ranks at >= 2 message sizes "
            "(in the --min/--max-fit-bytes range) to fit latency and bandwidth"
        )
    n = np.array([r["world_size"] for r in rows], dtype=float)
    s = np.array([r["size_bytes"] for r in rows], dtype=float)
    t = np.array([r["time_s"] for r in rows], dtype=float)
    lat, vol = 2 * (n - 1), 2 * (n - 1) / n * s  # time = lat * alpha + vol / beta
    design = np.column_stack([lat, vol]) / t[:, None]
    coef, _ = nnls(design, np.ones_like(t))
    a_err, ib_err = _stderr(design, coef)
    alpha, inv_beta = float(coef[0]), float(coef[1])
    bound = not inv_beta > SLOPE_SIGMAS * (0.0 if math.isnan(ib_err) else ib_err)
    if bound:
        inv_beta = float(np.min(t / vol))  # 1 / best bus bandwidth: t >= vol / beta
        x = lat / t  # alpha alone, by the same relative least squares
        alpha = max(0.0, float(x @ (1.0 - vol * inv_beta / t) / (x @ x)))
        coef = np.array([alpha, inv_beta])
        a_err, ib_err = math.nan, math.nan
    resid = design @ coef - 1.0
    beta = 1.0 / inv_beta
    return RingFit(
        alpha_s=alpha,
        beta_Bps=beta,
        alpha_stderr_s=a_err,
        beta_stderr_Bps=ib_err * beta * beta,
        rms_rel_error=float(np.sqrt(np.mean(resid**2))),
        max_rel_error=float(np.max(np.abs(resid))),
        points=len(t),
        world_sizes=tuple(sorted({int(x) for x in n})),
        beta_is_lower_bound=bound,
        size_range=(float(s.min()), float(s.max())),
    )


def _stderr(design: np.ndarray, coef: np.ndarray) -> tuple[float, float]:
    """Standard errors of the two fitted coefficients (nan when they cannot be told apart)."""
    resid = design @ coef - 1.0
    dof = max(len(resid) - 2, 1)
    try:
        cov = np.linalg.inv(design.T @ design) * float(resid @ resid) / dof
    except np.linalg.LinAlgError:
        return math.nan, math.nan
    return float(np.sqrt(cov[0, 0])), float(np.sqrt(cov[1, 1]))


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
            f"training), or pass --allow-cpu-curve to fit it anyway"
        )


@dataclass(frozen=True)
class CommModel:
    """The collectives one optimizer step issues under a backend, at any world size.

    ``grad_bytes``: the unsharded gradient (fp32 parameter) bytes; ``group_bytes``:
    fsdp's shard groups (blocks, root last), of one tensor-parallel rank's part when
    tp > 1; ``local_bytes``: one tensor-parallel rank's parameter bytes (what a
    data-parallel allreduce moves when tp > 1). ``n_layers``, ``d_model``, ``seq_len``:
    the transformer's, for the tensor-parallel allreduces of activations.
    """

    backend: str = DEFAULT
    grad_bytes: float = 0.0
    tp: int = 1
    group_bytes: tuple[float, ...] = ()
    local_bytes: float | None = None
    reshard_after_forward: bool = True
    param_scale: float = 1.0
    accum_steps: int = 1
    n_layers: int = 0
    d_model: int = 0
    seq_len: int = 0
    act_bytes: int = 4

    def collectives(self, ranks: int, per_rank_batch: float) -> list[Collective]:
        """The step's collectives on ``ranks`` ranks, ``per_rank_batch`` samples each
        (a tensor-parallel group shares its batch); none on a group of one rank. The
        gradient reduction runs over the layout's dp group only, the activations'
        all-reduces over its tp group, per layer (a tp that does not divide ``ranks``:
        data parallelism alone)."""
        dims = self.dims(ranks)
        dp, tp = dims.dp, dims.tp
        if self.backend in with_capability("shards_state"):
            groups = list(self.group_bytes) or [self.grad_bytes / tp]
            out = fsdp_step(
                groups, dp, self.reshard_after_forward, self.accum_steps, self.param_scale
            )
        else:
            local = self.local_bytes if self.local_bytes and tp > 1 else self.grad_bytes
            out = ddp_step(local, dp)
        if tp > 1:
            out += tp_step(
                self.n_layers,
                round(per_rank_batch * self.seq_len),
                self.d_model,
                tp,
                self.act_bytes,
                self.accum_steps,
            )
        return [c for c in out if c.ranks > 1 and c.count > 0]

    def dims(self, ranks: int) -> ParallelDims:
        """The layout at ``ranks`` ranks: this model's tp where it divides them, else none."""
        dims = ParallelDims.of(ranks, self.tp)
        return dims if dims.fits else ParallelDims.of(ranks)

    def describe(self, ranks: int, per_rank_batch: float) -> str:
        """One line: what the step issues at ``ranks`` (count and bytes per op)."""
        found = self.collectives(ranks, per_rank_batch)
        if not found:
            return f"{self.backend} at {ranks} rank(s): no collectives"
        parts = [
            f"{n} {op} ({volume(found)[op] / 2**20:.3g} MiB)" for op, n in counts(found).items()
        ]
        tp = f" tp={self.tp}" if self.tp > 1 else ""
        return f"{self.backend}{tp} at {ranks} ranks, per step: " + ", ".join(parts)


def volume(collectives: list[Collective]) -> dict[str, float]:
    """Bytes per op over a step: count x the whole (unsharded) buffer of each collective."""
    out: dict[str, float] = {}
    for c in collectives:
        out[c.op] = out.get(c.op, 0.0) + c.count * c.size_bytes
    return out


def comm_model(
    model,
    backend: str,
    tp: int = 1,
    seq_len: int = 0,
    accum_steps: int = 1,
    reshard_after_forward: bool = True,
    param_scale: float = 1.0,
) -> CommModel:
    """The :class:`CommModel` of ``model`` (a torch module, built unsharded) under a layout."""
    full = float(sum(p.numel() * p.element_size() for p in model.parameters()))
    groups = tuple(fsdp_groups(model, tp)) if backend in with_capability("shards_state") else ()
    return CommModel(
        backend=backend,
        grad_bytes=full,
        tp=tp,
        group_bytes=groups,
        local_bytes=tp_local_bytes(model, tp),
        accum_steps=accum_steps,
        reshard_after_forward=reshard_after_forward,
        param_scale=param_scale,
        n_layers=int(getattr(model, "n_layers", 0)),
        d_model=int(getattr(model, "d_model", 0)),
        seq_len=seq_len,
    )


def comm_model_from_run(run_dir: str | Path) -> CommModel:
    """The base run's :class:`CommModel`: its backend and tp (sweep.json, summary.json)
    and the model it trained, rebuilt from its config.yaml (the trainer's resolved config)
    and the data spec it recorded."""

    run_dir = Path(run_dir)
    row = load_run(run_dir)
    run = RunDir(run_dir)
    cfg = run.config(missing_ok=False)
    dist = cfg.get("dist") or {}
    try:
        run_cfg = from_dict(cfg)
    except UsageError as exc:
        raise UsageError(f"{run.config_path}: {exc}") from None
    spec = trained_spec(run_dir, run_cfg)
    model = build(run_cfg.model.name, run_cfg.model.options, spec)
    fsdp = dist.get("fsdp") or {}
    return comm_model(
        model,
        str(row["backend"]),
        int(row["tp"]),
        seq_len=spec.input_shape[0] if run_cfg.data.source == TOKENS else 0,
        accum_steps=int((cfg.get("optim") or {}).get("grad_accum_steps", 1)),
        reshard_after_forward=bool(fsdp.get("reshard_after_forward", True)),
        param_scale=0.5 if _bf16_params(fsdp, row) else 1.0,
    )


def trained_spec(run_dir: Path, cfg: Any) -> DataSpec:
    """The data spec the run's model was built for: as recorded in the run directory;
    for a run from before it was recorded, its generated source's (exact) or, for data
    on disk, the config's data fields (a guess, said on stderr)."""

    source = data_source(cfg.data.source)
    spec = RunDir(run_dir).data_spec() or (source.spec(cfg) if source.generated else None)
    if spec is None:
        print(
            f"scalelab predict: warning: {run_dir} records no data spec (an older run); "
            "its model is built for config.yaml's data.num_classes and data.image_shape",
            file=sys.stderr,
        )
        spec = DataSpec(cfg.data.num_classes, tuple(cfg.data.image_shape))
    return spec


def _bf16_params(fsdp: dict, row: dict) -> bool:
    """Whether the fsdp run gathered bf16 parameters (``dist.fsdp.mixed_precision``, as
    the backend decides it: bf16, or auto on a GPU); its gradients reduce in fp32."""
    want = fsdp.get("mixed_precision", "auto")
    return str(row["backend"]) in with_capability("shards_state") and (
        want == "bf16" or (want == "auto" and row["gpus"] > 0)
    )


def predict(
    base: Base, fit: RingFit, ranks: Iterable[int], comm: CommModel | None = None
) -> pd.DataFrame:
    """Predicted step time, throughput and efficiency at each rank count.

    ``comm``: the collectives of the base run's backend (default: ddp's one allreduce
    of ``base.grad_bytes``); the per-op times are columns, ``comm_s`` their sum.
    """
    base.check()
    comm = comm or CommModel(DEFAULT, base.grad_bytes)
    # with tensor parallelism only multiples of tp exist
    n = np.array(
        sorted({int(r) for r in ranks if ParallelDims.of(int(r), comm.tp).fits} | {base.ranks}),
        dtype=float,
    )
    scale = np.ones_like(n) if base.mode == "weak" else base.ranks / n
    batch = base.global_batch * (n / base.ranks if base.mode == "weak" else np.ones_like(n))
    per_op = {op: np.zeros_like(n) for op in ("allreduce", "all_gather", "reduce_scatter")}
    for i, (ranks_i, batch_i) in enumerate(zip(n, batch, strict=True)):
        dp = comm.dims(int(ranks_i)).replicas
        for c in comm.collectives(int(ranks_i), batch_i / dp):
            per_op[c.op][i] += c.seconds(fit.alpha_s, fit.beta_Bps)
    total = sum(per_op.values())
    step = (base.data_s + base.compute_s) * scale + (1.0 - base.overlap) * total
    throughput = batch / step
    x0 = throughput[n == base.ranks][0]
    out = pd.DataFrame(
        {
            "ranks": n,
            "global_batch": batch,
            "compute_s": base.compute_s * scale,
            "data_s": base.data_s * scale,
            "allreduce_s": per_op["allreduce"],
            "all_gather_s": per_op["all_gather"],
            "reduce_scatter_s": per_op["reduce_scatter"],
            "comm_s": total,
            "exposed_comm_s": (1.0 - base.overlap) * total,
            "step_time_s": step,
            "throughput": throughput,
            "speedup": throughput / x0,
            "efficiency": throughput / (x0 * n / base.ranks),
            # beta unresolved: the times above are upper bounds, the efficiencies lower ones
            "comm_s_is_upper_bound": fit.beta_is_lower_bound,
        }
    )
    last = int(n[-1])
    out.attrs["comm"] = comm.describe(last, float(batch[-1]) / comm.dims(last).replicas)
    out.attrs["backend"] = comm.backend
    out.attrs["grad_bytes"] = comm.grad_bytes  # of the model the collectives carry
    return out


def compare(pred: pd.DataFrame, measured: pd.DataFrame) -> pd.DataFrame:
    """Prediction error at the measured rank counts: (predicted - measured) / measured."""
    rows = []
    for rec in measured.itertuples():
        hit = pred[pred["ranks"] == rec.ranks]
        if hit.empty:
            continue
        p = hit.iloc[0]
        step = getattr(rec, "step_time_s", math.nan)
        rows.append(
            {
                "ranks": rec.ranks,
                "measured_throughput": rec.throughput,
                "predicted_throughput": p["throughput"],
                "throughput_rel_error": (p["throughput"] - rec.throughput) / rec.throughput,
                "measured_step_time_s": step,
                "predicted_step_time_s": p["step_time_s"],
                "step_time_rel_error": (p["step_time_s"] - step) / step if step > 0 else math.nan,
            }
        )
    return pd.DataFrame(
        rows,
        columns=[
            "ranks",
            "measured_throughput",
            "predicted_throughput",
            "throughput_rel_error",
            "measured_step_time_s",
            "predicted_step_time_s",
            "step_time_rel_error",
        ],
    )


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
    d["size_range"] = list(fit.size_range)
    return d
