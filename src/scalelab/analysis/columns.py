"""The tidy run table's vocabulary: its columns and what each means, the numeric ones, the
summary keys of the measured memory and energy, the flag of an untimed run, and the rule a
label must obey to be safe in a spreadsheet or a web page.

:mod:`scalelab.analysis.runs` fills these columns from run directories,
:mod:`scalelab.analysis.runs_csv` from published tables.
"""

from __future__ import annotations

from scalelab.errors import UsageError

#: The tidy per-run columns (one row per run or per CSV row). NaN: not known.
COLUMNS: dict[str, str] = {
    "source": "where the row comes from: 'runs' or the CSV's label/file stem",
    "run_id": "run identifier (sweep.json run_id, else directory name; CSV: file:line)",
    "backend": "ddp | horovod | none | external (CSV without a backend column)",
    "mode": "strong (fixed global batch) | weak (fixed per-rank batch)",
    "nodes": "nodes used",
    "ranks": "processes (world size)",
    "gpus": "GPUs used (0 on CPU)",
    "workers": "N of the scaling formulas: GPUs when > 0, else ranks",
    "cores_per_rank": "CPU cores (threads) per rank, for the core-hour cost proxy",
    "repeat": "repeat index of the same configuration",
    "global_batch": "samples per optimizer step over all ranks",
    "samples_per_s": "training throughput, samples/s over all ranks, warm-up excluded",
    "throughput": "what the scaling metrics use: samples_per_s, else work/s from a time column",
    "throughput_unit": "samples/s, or work/s when derived from a time",
    "epoch_time_s": "seconds per epoch (CSV: the time column, seconds per unit of work)",
    "step_time_s": "seconds per optimizer step",
    "data_s": "seconds per step waiting for data",
    "compute_s": "seconds per step of forward/backward/optimizer not hidden behind comm",
    "comm_s": "seconds per step of exposed gradient communication",
    "final_accuracy": "validation accuracy after the last epoch (0..1)",
    "test_accuracy": "accuracy of the final weights on the test split (evaluation.json, 0..1; "
    "per token for a language model)",
    "test_perplexity": "perplexity of a language model's final weights on the test split "
    "(evaluation.json; NaN for classifiers)",
    "time_to_target_s": "seconds of training until validation accuracy first reached the target",
    "grad_bytes": "bytes of gradients allreduced per step (NaN unless known)",
    "tp": "tensor-parallel ranks per model replica (1: none); a tp > 1 point is its own series",
    "pp": "pipeline stages per model replica (1: none); each pp, m and schedule is its own series",
    "microbatches": "micro-batches per pipeline step, m (1 without a pipeline)",
    "schedule": "pipeline schedule ('no pipeline' without one)",
    "bubble": "pipeline bubble, idle over ideal compute time: (pp - 1) / (v m) (0 without a "
    "pipeline; the trainer's figure where its summary has one)",
    "param_bytes_per_rank": "parameter bytes rank 0 holds (its local shards), measured",
    "grad_bytes_per_rank": "gradient bytes rank 0 holds, measured",
    "optim_state_bytes_per_rank": "optimizer-state bytes rank 0 holds (moments, momentum)",
    "state_bytes_per_rank": "parameter + gradient + optimizer-state bytes of rank 0",
    "cuda_max_allocated_bytes": "CUDA allocator peak of rank 0 (GPU runs only)",
    "activation_bytes_per_rank": "peak bytes autograd kept for backward on rank 0 in the first "
    "step (measured; a pipeline's in-flight micro-batches included)",
    "recompute": "whether blocks recomputed their activations in backward (the summary's "
    "activation_checkpointing, else the run config's for a pipeline); its own series",
    "joules_per_sample": "energy per trained sample over all ranks (NVML GPUs, RAPL CPU "
    "packages + DRAM; NaN where no counter could be read)",
    "energy_power_w": "average power over the timed epochs, watts (same counters)",
    "provenance": "provenance id: the trainer's, else a hash of config+run_info+summary; "
    "CSV: file:line",
    "flags": "'no timed steps' when summary.json has no throughput (every step of each epoch "
    "was warm-up), 'world size changed' when an elastic run lost or gained nodes (its "
    "throughput mixes world sizes): its timings are NaN and the scaling metrics leave it out",
}

NUMERIC = (
    "nodes",
    "ranks",
    "gpus",
    "workers",
    "cores_per_rank",
    "repeat",
    "global_batch",
    "samples_per_s",
    "throughput",
    "epoch_time_s",
    "step_time_s",
    "data_s",
    "compute_s",
    "comm_s",
    "final_accuracy",
    "test_accuracy",
    "test_perplexity",
    "time_to_target_s",
    "grad_bytes",
    "tp",
    "pp",
    "microbatches",
    "bubble",
    "param_bytes_per_rank",
    "grad_bytes_per_rank",
    "optim_state_bytes_per_rank",
    "state_bytes_per_rank",
    "cuda_max_allocated_bytes",
    "activation_bytes_per_rank",
    "joules_per_sample",
    "energy_power_w",
)

#: Memory columns and the summary.json keys they come from (the trainer's memory_facts).
MEMORY_KEYS = {
    "param_bytes_per_rank": "rank0_param_bytes",
    "grad_bytes_per_rank": "rank0_grad_bytes",
    "optim_state_bytes_per_rank": "rank0_optim_state_bytes",
    "state_bytes_per_rank": "rank0_state_bytes",
    "cuda_max_allocated_bytes": "cuda_max_allocated_bytes",
    "activation_bytes_per_rank": "rank0_activation_peak_bytes",
}
#: Energy columns and their summary.json keys (the trainer's energy_facts).
ENERGY_KEYS = {"joules_per_sample": "joules_per_sample", "energy_power_w": "energy_power_w"}

NAN = float("nan")

#: The ``schedule`` of a row without a pipeline: a word, not an empty cell, so a CSV read
#: back keeps the row in its series (pandas reads an empty cell as NaN, and groups drop it).
NO_SCHEDULE = "no pipeline"

#: The ``flags`` code of a run whose summary.json has ``samples_per_s: null``: the warm-up
#: steps took every step the throughput counts (e.g. one step per epoch at many ranks).
NO_TIMED_STEPS = "no timed steps"
#: The ``flags`` code of an elastic run whose world size changed (summary.json's
#: ``world_size_changed``): its throughput mixes world sizes, so it is no scaling point.
WORLD_SIZE_CHANGED = "world size changed"

#: A cell starting with one of these is a formula to Excel/LibreOffice/Sheets (OWASP
#: "CSV Injection"); tab and carriage return are on the same list.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def check_label(value: str, where: str) -> str:
    """``value`` if it is safe as a plain label, else a UsageError naming ``where``.

    Labels end up in scaling.csv (opened in spreadsheets), scaling.md and the HTML
    report: one that a spreadsheet would run as a formula, or that carries HTML
    markup or control characters, is refused at input rather than altered, so the
    CSV stays plain (pandas reads back exactly what was given). Markdown and HTML
    outputs escape everything else.
    """
    text = str(value)
    bad = ""
    if text.lstrip(" ").startswith(FORMULA_START):
        bad = f"starts with {text.lstrip(' ')[0]!r} (a spreadsheet would run it as a formula)"
    elif "<" in text or ">" in text:
        bad = "contains '<' or '>' (HTML markup)"
    elif any(ord(c) < 32 or ord(c) == 127 for c in text):
        bad = "contains a control character"
    if bad:
        raise UsageError(
            f"{where}: label {text!r} {bad}; use letters, digits and "
            "punctuation other than = + - @ < > at the start"
        )
    return text
