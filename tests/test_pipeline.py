"""Pipeline parallelism: the layout rules against an independent statement of torch's
conditions, the bubble fraction, the GPT's split into stages, and a real 2-rank gloo
pipeline whose loss, gradients and SGD step equal a one-process run of the same GPT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from scalelab.backends.pipeline_rules import (
    SCHEDULES,
    bubble_fraction,
    pipeline_problems,
    stage_ranks,
)
from scalelab.backends.registry import BACKENDS, CHOICES, MPI, SINGLE

# ----------------------------------------------------------------------------- the rules

#: torch 2.13's conditions, written out by hand: schedule -> (stages per rank it takes,
#: None for any; m >= pp; m divisible by max(1, m // pp)).
TORCH_RULES = {
    "gpipe": (1, False, False),
    "1f1b": (1, True, False),
    "interleaved-1f1b": (None, False, True),
    "interleaved-zero-bubble": (None, False, True),
    "zbv-zero-bubble": (2, False, False),
}


def expected(pp, v, m, schedule, n_layers, backend, model) -> list[str]:
    """The fields that must be named, in order, for this layout (independent of the code)."""
    if pp == 1:
        return []
    fields = []
    if backend in (MPI, SINGLE):
        fields.append("dist.pp")
    if model != "gpt":
        fields.append("dist.pp")
    per_rank, m_ge_pp, rounds = TORCH_RULES[schedule]
    if per_rank is not None and v != per_rank:
        fields.append("dist.virtual_stages")
    if n_layers is not None and n_layers % (pp * v):
        fields.append("dist.virtual_stages" if v > 1 else "dist.pp")
    if m_ge_pp and m < pp:
        fields.append("dist.microbatches")
    if rounds and m % max(1, m // pp):
        fields.append("dist.microbatches")
    return fields


def test_schedules_are_the_torch_rules() -> None:
    assert set(SCHEDULES) == set(TORCH_RULES)


@pytest.mark.parametrize("schedule", list(TORCH_RULES))
def test_rules_matrix(schedule: str) -> None:
    """pp 1..4 x v 1..3 x m 1..9 x every backend choice x a GPT of 2, 4, 12 layers and a
    CNN: the fields named are the hand-written rule's, each line names its field."""
    checked = 0
    for pp in range(1, 5):
        for v in range(1, 4):
            for m in range(1, 10):
                for backend in CHOICES:
                    for model, n_layers in (("gpt", 2), ("gpt", 4), ("gpt", 12), ("cnn", None)):
                        got = pipeline_problems(pp, v, m, schedule, n_layers, backend, model)
                        want = expected(pp, v, m, schedule, n_layers, backend, model)
                        assert [p.field for p in got] == want, (
                            pp,
                            v,
                            m,
                            backend,
                            model,
                            n_layers,
                            got,
                        )
                        assert all(p.line().startswith("field 'dist.") for p in got)
                        assert all("\n" not in p.line() for p in got)
                        checked += 1
    assert checked == 4 * 3 * 9 * len(CHOICES) * 4


def lines(*args, **kwargs) -> list[str]:
    return [p.line() for p in pipeline_problems(*args, **kwargs)]


def test_rules_lines_for_the_issue_cases() -> None:
    """The cases issue 27 names, word for word."""
    ddp = BACKENDS[0]
    assert lines(2, 2, 4, "interleaved-1f1b", 2, ddp, "gpt") == [
        "field 'dist.virtual_stages': the model's 2 layers do not split over pp x v "
        "= 2 x 2 = 4 stages"
    ]
    assert lines(4, 1, 2, "1f1b", 4, ddp, "gpt") == [
        "field 'dist.microbatches': schedule 1f1b needs m >= pp = 4 micro-batches, not 2"
    ]
    assert lines(4, 1, 2, "gpipe", 4, ddp, "gpt") == []
    assert lines(2, 2, 5, "interleaved-1f1b", 4, ddp, "gpt") == [
        "field 'dist.microbatches': schedule interleaved-1f1b needs m divisible by its "
        "rounds max(1, m // pp) = 2; m = 5"
    ]
    assert lines(2, 1, 2, "1f1b", 2, MPI, "gpt") == [
        f"field 'dist.pp': pipeline parallelism (pp=2) needs a torch.distributed backend, not {MPI}"
    ]
    assert lines(2, 1, 2, "1f1b", None, ddp, "cnn") == [
        "field 'dist.pp': model 'cnn' does not split into pipeline stages (pp > 1 supports: gpt)"
    ]
    assert lines(2, 1, 2, "dualpipe", 2, ddp, "gpt") == [
        "field 'dist.schedule': unknown schedule 'dualpipe'; valid: " + ", ".join(SCHEDULES)
    ]
    assert lines(2, 1, 3, "gpipe", 2, ddp, "gpt", batch=8) == [
        "field 'dist.microbatches': 3 micro-batches do not split the pipeline's batch of 8 evenly"
    ]
    assert lines(0, 1, 1, "gpipe", 2, ddp, "gpt") == ["field 'dist.pp': 0 must be an integer >= 1"]
    assert lines(1, 1, 1, "gpipe", 3, MPI, "cnn") == []


def test_rules_import_no_torch() -> None:
    code = (
        "import sys; import scalelab.backends.pipeline_rules; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_stage_ranks() -> None:
    assert stage_ranks(2, 1, "1f1b") == [[0], [1]]
    assert stage_ranks(2, 2, "interleaved-1f1b") == [[0, 2], [1, 3]]
    assert stage_ranks(4, 2, "zbv-zero-bubble") == [[0, 7], [1, 6], [2, 5], [3, 4]]


def test_bubble_fraction() -> None:
    assert bubble_fraction(1, 1, 1) == 0.0
    assert bubble_fraction(2, 1, 1) == 1.0
    assert bubble_fraction(4, 1, 8) == 3 / 8
    assert bubble_fraction(4, 2, 8) == 3 / 16  # interleaving halves it
    assert bubble_fraction(8, 4, 16) == pytest.approx(7 / 64)
    with pytest.raises(ValueError, match="m=0"):
        bubble_fraction(2, 1, 0)


# ----------------------------------------------------------------------------- the split

VOCAB, SEQ, BATCH, LAYERS = 64, 16, 8, 4


def _model_and_batch():
    import torch

    from scalelab.models.gpt import gpt

    torch.manual_seed(0)
    model = gpt(VOCAB, (SEQ,), size="tiny", n_layers=LAYERS)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(VOCAB, (BATCH, SEQ), generator=gen)
    y = torch.randint(VOCAB, (BATCH, SEQ), generator=gen)
    return model, x, y


def test_stages_chained_are_the_model_and_keep_its_names() -> None:
    import torch

    from scalelab.backends.pipeline import split_gpt
    from scalelab.errors import UsageError

    model, x, _ = _model_and_batch()
    stages = [split_gpt(model, s, 4) for s in range(4)]
    h = x
    for stage in stages:
        h = stage(h)
    assert torch.equal(h, model(x))
    names = [n for s in stages for n, _ in s.named_parameters()]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert "blocks.3.attn.q.weight" in dict(stages[3].named_parameters())
    assert "tok.weight" in dict(stages[0].named_parameters())
    assert "head.weight" in dict(stages[3].named_parameters())
    with pytest.raises(UsageError, match="^field 'dist.pp': the model's 4 layers"):
        split_gpt(model, 0, 3)


# ----------------------------------------------------------------------------- 2 ranks

RANK_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[3])
    from test_pipeline import _model_and_batch
    from scalelab.backends.pipeline import build_pipeline, split_for_rank
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for schedule, v, m in json.loads(sys.argv[2]):
        model, x, y = _model_and_batch()
        local, modules = split_for_rank(model, rank, 2, v, schedule)
        pipe = build_pipeline(modules, rank, 2, v, m, schedule, torch.device("cpu"))
        logits = pipe.forward(x)  # evaluation's path: the stages in order, no schedule
        out = pipe.step(x, y)
        grads = {n: p.grad.clone() for n, p in local.named_parameters()}
        torch.optim.SGD(local.parameters(), lr=0.5).step()
        params = {n: p.detach().clone() for n, p in local.named_parameters()}
        torch.save({"loss": out and out[0], "step_logits": out and out[1], "logits": logits,
                    "grads": grads, "params": params}, f"{sys.argv[1]}/{schedule}-{rank}.pt")
        dist.barrier()
    try:
        pipe.step(x[:6], y[:6])
    except Exception as err:
        with open(f"{sys.argv[1]}/uneven-{rank}.txt", "w") as f:
            f.write(f"{type(err).__name__}: {err}")
    dist.destroy_process_group()
""")

#: (schedule, v, m) the 2-rank run checks.
CASES = [
    ("gpipe", 1, 4),
    ("1f1b", 1, 4),
    ("interleaved-1f1b", 2, 4),
    ("interleaved-zero-bubble", 2, 4),
    ("zbv-zero-bubble", 2, 4),
]


def test_two_rank_pipeline_equals_one_process(tmp_path: Path) -> None:
    """Every schedule on 2 gloo ranks (tiny GPT with 4 layers, batch 8, m = 4): the loss,
    every gradient and every parameter after one SGD step equal the one-process run's
    within 1e-6."""
    import torch

    from scalelab.backends.pipeline import lm_loss

    script = tmp_path / "pipe.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-port", "29671", str(script), str(tmp_path), json.dumps(CASES)]
    cmd += [str(Path(__file__).parent)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    torch.set_num_threads(1)
    model, x, y = _model_and_batch()
    ref_logits = model(x)
    loss = lm_loss(ref_logits, y)
    loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    ref_params = {n: p.detach().clone() for n, p in model.named_parameters()}

    report = {}
    for schedule, _, _ in CASES:
        ranks = [torch.load(tmp_path / f"{schedule}-{r}.pt") for r in (0, 1)]
        losses = [r["loss"] for r in ranks if r["loss"] is not None]
        assert len(losses) == 1, schedule  # only the rank holding the last stage
        grads = {n: g for r in ranks for n, g in r["grads"].items()}
        params = {n: p for r in ranks for n, p in r["params"].items()}
        assert set(grads) == set(ref_grads) == set(params), schedule
        last = next(r for r in ranks if r["loss"] is not None)
        assert [r["logits"] is None for r in ranks] == [r is not last for r in ranks]
        diffs = {
            "loss": float((losses[0] - loss.detach()).abs()),
            "logits": float((last["logits"] - ref_logits.detach()).abs().max()),
            "step_logits": float((last["step_logits"] - ref_logits.detach()).abs().max()),
            "grad": max(float((grads[n] - ref_grads[n]).abs().max()) for n in ref_grads),
            "param": max(float((params[n] - ref_params[n]).abs().max()) for n in ref_params),
        }
        report[schedule] = diffs
        assert max(diffs.values()) <= 1e-6, (schedule, diffs)
    for r in (0, 1):  # 6 samples in 4 micro-batches: refused before any send
        assert (tmp_path / f"uneven-{r}.txt").read_text() == (
            "UsageError: field 'dist.microbatches': 4 micro-batches do not split the "
            "pipeline's batch of 6 evenly"
        )
    print("max |pipeline - one process|:", json.dumps(report))
