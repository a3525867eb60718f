"""The layout advisor (``scalelab predict --advise``): which layouts it enumerates, that
its answer holds together, and the Megatron-LM paper's rows run through it
(docs/pipeline-advisor.md carries the comparison; here only structural facts, no
predicted numbers)."""

from __future__ import annotations

import json

import pytest
from conftest import scalelab_main

from scalelab.comm.advisor import advise, layout_problems, why_loses
from scalelab.comm.hardware import profile
from scalelab.comm.layout_model import GPTShape, Layout, predict_layout, schedule_for
from scalelab.errors import UsageError

A100 = profile("a100-80gb")
GB80 = 80e9

#: Narayanan et al. 2021 (SC21), Table 1, three rows: (billions of parameters, L, h, a,
#: t, p, GPUs, global batch, achieved teraFLOP/s per GPU); s = 2048, V = 51200 for all.
PAPER_ROWS = {
    "1.7B": (1.7, 24, 2304, 24, 1, 1, 32, 512, 137),
    "145.6B": (145.6, 80, 12288, 96, 8, 8, 1536, 2304, 148),
    "1008B": (1008.0, 128, 25600, 160, 8, 64, 3072, 3072, 163),
}


@pytest.fixture(scope="module", params=sorted(PAPER_ROWS))
def paper(request):
    billions, layers, hidden, heads, t, p, gpus, batch, _ = PAPER_ROWS[request.param]
    shape = GPTShape(layers, hidden, heads, 2048, 51200)
    return shape, t, p, gpus, batch, billions, advise(shape, batch, gpus, A100, "a100-80gb")


def test_the_paper_models_have_the_papers_parameter_counts(paper):
    shape, *_, billions, _ = paper
    assert shape.params() / 1e9 == pytest.approx(billions, rel=0.03)


def test_the_advice_on_a_paper_row_fits_and_uses_every_gpu(paper):
    shape, t, p, gpus, batch, _, advice = paper
    best = advice.best
    assert best.memory_bytes <= GB80 and advice.fits(best)
    for pred in advice.layouts:
        lay = pred.layout
        assert lay.dp * lay.tp * lay.pp == gpus
        assert not layout_problems(shape, batch, lay), lay
    fitting = [x for x in advice.layouts if advice.fits(x)]
    assert [x.step_s for x in fitting] == sorted(x.step_s for x in fitting)
    assert fitting[0] is best and why_loses(best, best, advice.memory_limit) == "best"
    for loser in advice.layouts[1:]:
        reason = why_loses(loser, best, advice.memory_limit)
        assert reason.startswith("over memory" if not advice.fits(loser) else "+"), reason


def test_the_papers_own_layout_is_a_candidate_that_fits_80_gb(paper):
    """The paper's (t, p) with micro-batches of one sequence and recomputation (which
    the paper's FLOP count assumes) exists, and its predicted memory fits an A100."""
    shape, t, p, gpus, batch, _, advice = paper
    dp = gpus // (t * p)
    m = batch // dp
    theirs = Layout(dp, t, p, m, 1, schedule_for(p, 1, m), activation_checkpointing=True)
    assert not layout_problems(shape, batch, theirs)
    assert (dp, t, p) in {(x.layout.dp, x.layout.tp, x.layout.pp) for x in advice.layouts}
    assert predict_layout(shape, batch, theirs, A100).memory_bytes <= GB80


def test_every_listed_layout_is_the_best_of_its_split():
    shape = GPTShape(8, 256, 8, 128, 1000)
    advice = advise(shape, 32, 8, A100, "a100-80gb")
    splits = [(x.layout.dp, x.layout.tp, x.layout.pp) for x in advice.layouts]
    assert len(splits) == len(set(splits))
    assert advice.candidates > len(advice.layouts)
    # every micro-batch count of a split that exists was predicted: pp=2 (4 layers per
    # stage, v in 1, 2, 4) and m dividing the replica's batch of 32 / dp
    for lay in (Layout(2, 2, 2, 16, 4, "interleaved-1f1b"), Layout(4, 1, 2, 1, 1, "gpipe")):
        assert not layout_problems(shape, 32, lay)


def test_layouts_that_cannot_exist_are_not_candidates():
    shape = GPTShape(layers=6, hidden=96, heads=6, seq=16, vocab=50)
    assert layout_problems(shape, 8, Layout(1, 4, 1, 1))  # 6 heads over tp 4
    assert layout_problems(shape, 8, Layout(1, 1, 4, 4, 1, "1f1b"))  # 6 layers over pp 4
    assert layout_problems(shape, 8, Layout(1, 1, 2, 1, 1, "1f1b"))  # 1F1B needs m >= pp
    assert layout_problems(shape, 6, Layout(4, 1, 1, 1))  # 6 sequences over dp 4
    advice = advise(shape, 8, 8, A100, "a100-80gb")
    assert all(not layout_problems(shape, 8, x.layout) for x in advice.layouts)
    assert any("dp=1 tp=8 pp=1" in s for s in advice.skipped)


def test_a_world_size_no_layout_fits_is_one_line():
    rc, out, err = scalelab_main(
        "predict", "--advise", "--model", "tiny", "--world-size", 7, "--global-batch", 8
    )
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scalelab predict: error: --world-size: no ")


def test_no_layout_within_the_memory_limit_is_one_line_naming_the_smallest():
    rc, out, err = scalelab_main(
        "predict", "--advise", "--model", "small", "--world-size", 4, "--global-batch", 8,
        "--memory-limit", "1M",
    )  # fmt: skip
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "--memory-limit: no layout of 4 ranks fits" in lines[0]
    with pytest.raises(UsageError, match="needs"):
        advise(GPTShape(12, 768, 12, 1024, 50257), 8, 4, A100, "a100-80gb", memory_limit=1e6)


def test_the_cli_prints_the_table_and_the_json_agrees():
    args = ["predict", "--advise", "--model", "mini", "--world-size", 4, "--global-batch", 8]
    rc, out, err = scalelab_main(*args)
    assert rc == 0, err
    assert "**Best: dp " in out and "| why it loses |" in out and "| best |" in out
    rc, doc, err = scalelab_main(*args, "--json")
    assert rc == 0, err
    advice = json.loads(doc)
    assert advice["ok"] is True and advice["hardware"] == "this-machine"
    best = advice["best"]
    assert best["dp"] * best["tp"] * best["pp"] == 4 == advice["world_size"]
    assert advice["layouts"][0]["why"] == "best"
    assert best["memory_bytes"] <= advice["memory_limit_bytes"]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--advise", "--world-size", 4, "--global-batch", 8], "--layers: required"),
        (["--advise", "--model", "tiny", "--global-batch", 8], "--world-size: required"),
        (["--advise", "--model", "tiny", "--world-size", 4], "--global-batch: required"),
        (["--advise", "--model", "tiny", "--world-size", 4, "--global-batch", 2.5], "whole"),
        (["--advise", "--model", "tiny", "--world-size", 10**9, "--global-batch", 8], "16384"),
        (["--advise", "--model", "tiny", "--world-size", 4, "--global-batch", 8,
          "--hardware", "tpu"], "unknown profile 'tpu'"),
        (["--advise", "--model", "tiny", "--world-size", 4, "--global-batch", 8,
          "--commbench", "x"], "--commbench: not used with --advise"),
        (["--layers", 4, "--commbench", "x", "--out", "y"], "--layers: only with --advise"),
        (["--commbench", "x"], "--out: required"),
        (["--advise", "--layers", 2, "--hidden", 30, "--heads", 4, "--world-size", 2,
          "--global-batch", 2], "not divisible"),
    ],
)  # fmt: skip
def test_bad_advisor_input_is_one_line(argv, needle):
    rc, out, err = scalelab_main("predict", *argv)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and needle in lines[0], err
