"""The report's sections on layouts: the pipeline's columns, memory per rank, what sharding
bought against DDP at the same ranks, and what activation recomputation saved and cost.

Split from :mod:`scalelab.analysis.report`, which writes them into scaling.md, scaling.html
and analysis.json.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from scalelab.analysis.scaling import GROUP, is_memory_baseline
from scalelab.backends.registry import with_capability

#: The pipeline's columns, after tp, in the tables of a study where some configuration
#: has pipeline stages (each where the table has it: the fits have no bubble).
PIPELINE_COLUMNS = [
    ("pp", "pp", "g"),
    ("microbatches", "m", "g"),
    ("schedule", "schedule", ""),
    ("bubble", "bubble", ".3g"),
]


#: After the pipeline's, where some configuration recomputed its activations.
RECOMPUTE_COLUMN = ("recompute", "recompute", "")


def with_pipeline(
    table: pd.DataFrame, columns: list[tuple[str, str, str]]
) -> list[tuple[str, str, str]]:
    """``columns`` with :data:`PIPELINE_COLUMNS` after tp where some row has pp > 1, and
    :data:`RECOMPUTE_COLUMN` where some row recomputed, so a study without either reads
    as it always did."""
    extra = []
    if "pp" in table and (table["pp"] > 1).any():
        extra += [c for c in PIPELINE_COLUMNS if c[0] in table]
    if "recompute" in table and table["recompute"].astype(bool).any():
        extra.append(RECOMPUTE_COLUMN)
    at = [c[0] for c in columns].index("tp") + 1
    return [*columns[:at], *extra, *columns[at:]]


MIB = 2.0**20

MEMORY_COLUMNS = [
    ("backend", "backend", ""),
    ("mode", "mode", ""),
    ("tp", "tp", "g"),
    ("ranks", "ranks", "g"),
    ("param_mib", "params MiB/rank", ".4g"),
    ("grad_mib", "grads MiB/rank", ".4g"),
    ("optim_mib", "optimizer MiB/rank", ".4g"),
    ("state_mib", "total MiB/rank", ".4g"),
    ("cuda_mib", "CUDA peak MiB", ".4g"),
    ("memory_vs_ddp", "params+optimizer vs ddp", ".2f"),
]
#: The measured activation peak, before the CUDA peak, where some run measured it.
ACTIVATION_COLUMN = ("act_mib", "activations MiB/rank", ".4g")


def memory_columns(rows: pd.DataFrame) -> list[tuple[str, str, str]]:
    """The memory table's columns: the pipeline's and the activation peak where present."""
    cols = with_pipeline(rows, MEMORY_COLUMNS)
    if "act_mib" in rows and rows["act_mib"].notna().any():
        cols.insert([c[0] for c in cols].index("cuda_mib"), ACTIVATION_COLUMN)
    return cols


def memory_table(table: pd.DataFrame) -> pd.DataFrame:
    """The rows with measured per-rank state bytes, in MiB (rank 0's local tensors)."""
    rows = table[table["state_bytes_per_rank"].notna()].sort_values(
        ["source", "mode", "ranks", "backend", "tp", "pp", "microbatches"]
    )
    return rows.assign(
        param_mib=rows["param_bytes_per_rank"] / MIB,
        grad_mib=rows["grad_bytes_per_rank"] / MIB,
        optim_mib=rows["optim_state_bytes_per_rank"] / MIB,
        state_mib=rows["state_bytes_per_rank"] / MIB,
        cuda_mib=rows["cuda_max_allocated_bytes"] / MIB,
        act_mib=rows["activation_bytes_per_rank"] / MIB,
    )


def memory_comparisons(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Every measured point against DDP at the same ranks (``memory_vs_ddp``), >1 rank."""
    rows = table[table["memory_vs_ddp"].notna() & (table["ranks"] > 1) & ~is_memory_baseline(table)]
    rows = rows.sort_values(["source", "mode", "ranks", "backend", "tp", "pp", "microbatches"])
    return [
        {
            "source": r.source,
            "backend": r.backend,
            "mode": r.mode,
            "tp": float(r.tp),
            "pp": float(r.pp),
            "microbatches": float(r.microbatches),
            "ranks": float(r.ranks),
            "param_optim_bytes_per_rank": float(r.param_optim_bytes_per_rank),
            "ddp_param_optim_bytes_per_rank": float(r.param_optim_bytes_per_rank / r.memory_vs_ddp),
            "ratio": float(r.memory_vs_ddp),
        }
        for r in rows.itertuples()
    ]


def _layout(c: dict[str, Any]) -> str:
    return (
        c["backend"]
        + (f" tp={c['tp']:g}" if c["tp"] != 1 else "")
        + (f" pp={c['pp']:g} m={c['microbatches']:g}" if c["pp"] != 1 else "")
    )


def sharding_sentence(table: pd.DataFrame) -> str:
    """What sharding bought, in one sentence computed from the measured bytes."""
    found = memory_comparisons(table)
    if not found:
        sharded = bool(
            (
                table["backend"].isin(with_capability("shards_state"))
                | (table["tp"] > 1)
                | (table["pp"] > 1)
            ).any()
        )
        why = (
            "no run with measured per-rank state bytes beside a ddp run at the same ranks"
            if sharded
            else "no sharded run in this study; sweep `backends: [ddp, fsdp]` "
            "or `tp: [1, 2]` to measure it"
        )
        return f"What sharding bought: nothing to compare ({why})."
    found.sort(
        key=lambda c: (
            c["backend"] not in with_capability("shards_state"),
            c["tp"],
            c["pp"],
            c["ranks"],
        )
    )
    parts = [
        f"{_layout(c)} at {c['ranks']:g} ranks {c['ratio']:.2f}x "
        f"({c['param_optim_bytes_per_rank'] / MIB:.3g} vs "
        f"{c['ddp_param_optim_bytes_per_rank'] / MIB:.3g} MiB)"
        for c in found
    ]
    parts[0] = (
        parts[0]
        .replace(" ranks ", " ranks holds ", 1)
        .replace("x (", "x of ddp's parameter + optimizer-state bytes per rank (", 1)
    )
    return (
        "What sharding bought: "
        + "; ".join(parts)
        + " (rank 0's measured local tensors, against ddp at the same ranks)."
    )


def recompute_comparisons(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Each configuration that recomputed its activations against the same one without
    (same series but recompute, same ranks), both with a measured activation peak."""
    keys = [c for c in GROUP if c != "recompute"] + ["ranks"]
    measured = table[table["activation_bytes_per_rank"].notna()]
    plain = measured[~measured["recompute"].astype(bool)].set_index(keys)
    found = []
    for _, r in measured[measured["recompute"].astype(bool)].iterrows():
        key = tuple(r[k] for k in keys)
        if key not in plain.index:
            continue
        base = plain.loc[[key]].iloc[0]
        found.append(
            {
                **{k: r[k] if isinstance(r[k], str) else float(r[k]) for k in keys},
                "activation_bytes_per_rank": float(r["activation_bytes_per_rank"]),
                "without_bytes_per_rank": float(base["activation_bytes_per_rank"]),
                "throughput_ratio": float(r["throughput"] / base["throughput"]),
            }
        )
    return found


def recompute_sentence(table: pd.DataFrame) -> str | None:
    """What activation recomputation saved, from the measured peaks, and what it cost in
    throughput; None where no run recomputed (nothing to say)."""
    if not table["recompute"].astype(bool).any():
        return None
    found = recompute_comparisons(table)
    if not found:
        return (
            "What activation recomputation saved: nothing to compare (no run that "
            "recomputed beside the same configuration without, both measured)."
        )
    parts = [
        f"{_layout(c)} at {c['ranks']:g} ranks keeps "
        f"{c['activation_bytes_per_rank'] / c['without_bytes_per_rank']:.2f}x "
        f"({c['activation_bytes_per_rank'] / MIB:.3g} vs {c['without_bytes_per_rank'] / MIB:.3g}"
        f" MiB) at {c['throughput_ratio']:.2f}x the throughput"
        for c in found
    ]
    return (
        "What activation recomputation saved: "
        + "; ".join(parts)
        + " (rank 0's measured activation peak, against the same configuration without)."
    )
