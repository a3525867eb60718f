"""The pipeline-aware layout model (scalelab.comm.layout_model) and its hardware profiles
(scalelab.comm.hardware): each term against its owner or an independent statement of the
formula, and the directions the trade-offs must go."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from scalelab.backends.pipeline_rules import bubble_fraction
from scalelab.comm import hardware
from scalelab.comm.hardware import Profile, load, profile, shipped
from scalelab.comm.layout_model import GPTShape, Layout, predict_layout, schedule_for
from scalelab.errors import UsageError
from scalelab.train.peak import PEAK_BF16_DENSE

A100 = profile("a100-80gb")
#: Narayanan et al. 2021, Table 1: the 39.1B model (L, h, a; s = 2048, V = 51200).
GPT39 = GPTShape(layers=48, hidden=8192, heads=64, seq=2048, vocab=51200)


def layout(dp=1, tp=1, pp=1, m=1, v=1, rc=False) -> Layout:
    return Layout(dp, tp, pp, m, v, schedule_for(pp, v, m), rc)


def ring(n: int, size: float, alpha: float, beta: float) -> float:
    """Ring all-reduce written out: 2(n-1) alpha + 2(n-1)/n size/beta."""
    return 2 * (n - 1) * alpha + 2 * (n - 1) / n * size / beta


# ----------------------------------------------------------------------------- the step


@pytest.mark.parametrize("pp, v, m", [(2, 1, 1), (2, 1, 8), (4, 1, 16), (4, 2, 16), (8, 4, 32)])
def test_the_bubble_is_pipeline_rules_bubble_fraction(pp, v, m):
    p = predict_layout(GPT39, 64, layout(tp=8, pp=pp, m=m, v=v), A100)
    assert p.bubble_fraction == bubble_fraction(pp, v, m)
    busy = p.compute_s + p.tp_s + p.p2p_s
    assert p.bubble_s == pytest.approx(busy * bubble_fraction(pp, v, m), rel=1e-12)
    assert p.step_s == pytest.approx(busy + p.bubble_s + p.dp_s, rel=1e-12)


def test_without_tp_and_pp_the_step_is_compute_plus_the_dp_allreduce():
    """Narayanan et al. 2021's eq. 3 without recomputation, 72 B s L h^2 (1 + s/(6h) +
    V/(12 L h)), over the devices at the achievable FLOP/s, plus one ring all-reduce of
    the 2-byte gradients of every parameter (eq. 2) over the dp ranks."""
    s = GPTShape(layers=24, hidden=2304, heads=24, seq=2048, vocab=51200)
    batch, dp = 512, 32
    p = predict_layout(s, batch, layout(dp=dp, m=4), A100)
    h, L, seq, V = s.hidden, s.layers, s.seq, s.vocab
    flops = 72 * batch * seq * L * h**2 * (1 + seq / (6 * h) + V / (12 * L * h))
    assert p.compute_s == pytest.approx(flops / dp / (312e12 * 0.75), rel=1e-9)
    params = 12 * L * h**2 * (1 + 13 / (12 * h) + (V + seq) / (12 * L * h))
    assert p.dp_allreduce_bytes == pytest.approx(2 * params, rel=1e-9)
    # 32 ranks on 4 nodes of 8: the dp group has 8 members per node, the whole node's NICs
    dp_s = ring(dp, 2 * params, 6.6e-6, 200e9)
    assert p.dp_s == pytest.approx(dp_s, rel=1e-9)
    assert p.tp_s == p.p2p_s == p.bubble_s == 0
    assert p.step_s == pytest.approx(p.compute_s + p.dp_s, rel=1e-12)


def test_recomputation_counts_megatrons_96_b_s_l_h2():
    """With full recomputation the hardware FLOPs are eq. 3 of the paper, 96 B s L h^2
    (1 + s/(6h) + V/(16 L h)), and the model FLOPs stay the 72 of no recomputation."""
    s, batch, n = GPT39, 1536, 512
    p = predict_layout(s, batch, layout(dp=32, tp=8, pp=2, m=48, rc=True), A100)
    h, L, seq, V = s.hidden, s.layers, s.seq, s.vocab
    hw = 96 * batch * seq * L * h**2 * (1 + seq / (6 * h) + V / (16 * L * h))
    model = 72 * batch * seq * L * h**2 * (1 + seq / (6 * h) + V / (12 * L * h))
    assert p.hardware_tflops_per_device * 1e12 * p.step_s * n == pytest.approx(hw, rel=1e-9)
    assert p.model_tflops_per_device * 1e12 * p.step_s * n == pytest.approx(model, rel=1e-9)


def test_memory_falls_with_pp_and_with_recomputation():
    mem = [
        predict_layout(GPT39, 16, layout(tp=8, pp=pp, m=16), A100).memory_bytes
        for pp in (1, 2, 4, 8)
    ]
    assert mem == sorted(mem, reverse=True) and len(set(mem)) == 4
    for pp, m in ((1, 1), (2, 4), (4, 16)):
        plain = predict_layout(GPT39, 16, layout(tp=8, pp=pp, m=m), A100)
        saved = predict_layout(GPT39, 16, layout(tp=8, pp=pp, m=m, rc=True), A100)
        assert saved.activations_bytes < plain.activations_bytes / 5
        assert saved.weights_bytes == plain.weights_bytes
        assert saved.compute_s > plain.compute_s  # the extra forward


def test_gpipe_holds_every_micro_batch_and_1f1b_only_pp():
    """At the same bubble, GPipe keeps m micro-batches' activations, 1F1B min(m, pp)."""
    m = 16
    one_f = predict_layout(GPT39, 16, Layout(1, 8, 4, m, 1, "1f1b"), A100)
    gpipe = predict_layout(GPT39, 16, Layout(1, 8, 4, m, 1, "gpipe"), A100)
    assert one_f.bubble_fraction == gpipe.bubble_fraction
    assert gpipe.activations_bytes > 3 * one_f.activations_bytes


def test_the_dp_allreduce_moves_one_tp_pp_share_over_the_dp_group_only():
    """Bytes per rank scale with 1/(tp pp) (a model whose embedding is negligible), and
    the time is the dp group's ring, none without data parallelism."""
    s = GPTShape(layers=64, hidden=4096, heads=32, seq=8, vocab=8)
    whole = predict_layout(s, 64, layout(dp=1), A100).dp_allreduce_bytes
    for tp, pp in ((1, 2), (2, 1), (2, 2), (4, 4), (8, 8)):
        p = predict_layout(s, 64, layout(dp=1, tp=tp, pp=pp, m=pp), A100)
        assert p.dp_allreduce_bytes * tp * pp == pytest.approx(whole, rel=1e-3)
        assert p.dp_s == 0
    p = predict_layout(s, 64, layout(dp=4, tp=2), A100)  # 8 ranks: one node
    assert p.dp_s == pytest.approx(ring(4, p.dp_allreduce_bytes, 5.7e-6, 300e9), rel=1e-12)
    # tp 8 fills a node: each dp group has one member per node, one NIC's share of 8
    p = predict_layout(s, 64, layout(dp=2, tp=8), A100)
    assert p.dp_crosses_nodes
    assert p.dp_s == pytest.approx(ring(2, p.dp_allreduce_bytes, 6.6e-6, 25e9), rel=1e-12)


def test_tp_communication_grows_with_tp_and_leaves_nvlink_past_a_node():
    """Megatron: 2 forward + 2 backward all-reduces of b s h activations per layer and
    micro-batch; recomputation repeats the forward's two."""
    s, batch = GPT39, 8
    times = []
    for tp in (2, 4, 8):
        p = predict_layout(s, batch, layout(tp=tp), A100)
        act = batch * s.seq * s.hidden * 2
        assert p.tp_s == pytest.approx(4 * s.layers * ring(tp, act, 5.7e-6, 300e9), rel=1e-12)
        assert not p.tp_crosses_nodes
        times.append(p.tp_s)
    assert times == sorted(times)
    wide = predict_layout(s, batch, layout(tp=16), A100)  # two whole nodes: all their NICs
    act = batch * s.seq * s.hidden * 2
    assert wide.tp_crosses_nodes and wide.tp_s > times[-1]
    assert wide.tp_s == pytest.approx(4 * s.layers * ring(16, act, 6.6e-6, 200e9), rel=1e-12)
    rc = predict_layout(s, batch, layout(tp=8, rc=True), A100)
    assert rc.tp_s == pytest.approx(1.5 * times[-1], rel=1e-12)


def test_p2p_sends_are_b_s_h_each_way_on_the_boundary_link():
    s, m = GPT39, 8
    inside = predict_layout(s, 8, layout(tp=4, pp=2, m=m), A100)  # 8 ranks: one node
    act = 1 * s.seq * s.hidden * 2
    assert not inside.p2p_crosses_nodes
    assert inside.p2p_s == pytest.approx(2 * m * (5.7e-6 + act / 300e9), rel=1e-12)
    across = predict_layout(s, 8, layout(tp=8, pp=2, m=m), A100)  # stage 2 on node 2
    assert across.p2p_crosses_nodes
    assert across.p2p_s == pytest.approx(2 * m * (6.6e-6 + act / (200e9 / 8)), rel=1e-12)
    interleaved = predict_layout(s, 8, layout(tp=8, pp=2, m=m, v=2), A100)
    assert interleaved.p2p_s == pytest.approx(2 * across.p2p_s, rel=1e-12)
    assert interleaved.bubble_fraction == across.bubble_fraction / 2


def test_the_model_needs_no_torch():
    code = (
        "import sys, scalelab.comm.advisor, scalelab.comm.advise_cli; "
        "print(sorted(m for m in ('torch', 'numpy', 'pandas') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "[]", out.stderr


# ----------------------------------------------------------------------------- profiles


def _figures(model, path=""):
    """Every (path, figure) with a source in a profile, walked from the pydantic model."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, (hardware.Figure, hardware.Count, hardware.Fraction)):
            yield f"{path}{name}", value
        elif isinstance(value, hardware.Link):
            yield from _figures(value, f"{path}{name}.")


def test_the_shipped_profiles_validate_and_cite_every_figure():
    profiles = load().profiles
    assert {"a100-80gb", "this-machine"} <= set(profiles)
    for name, prof in profiles.items():
        found = dict(_figures(prof))
        assert {"achievable_fraction", "memory_bytes", "devices_per_node"} <= set(found), name
        assert {"intra_node.bandwidth_Bps", "inter_node.latency_s"} <= set(found), name
        for where, fig in found.items():
            assert fig.source.strip() and fig.value > 0, (name, where)
        flops, source = prof.peak()
        assert flops > 0 and source.strip(), name


def test_every_card_of_the_peak_table_has_a_profile_with_its_peak():
    peaks = {prof.peak() for prof in shipped().profiles.values()}
    for _, flops, source in PEAK_BF16_DENSE:
        assert (flops, source) in peaks, source


def test_a_figure_without_its_source_is_refused_with_the_field(tmp_path):
    doc = yaml.safe_load(hardware.PROFILES_FILE.read_text())
    del doc["profiles"]["a100-80gb"]["memory_bytes"]["source"]
    bad = tmp_path / "hw.yaml"
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(UsageError) as err:
        load(bad)
    assert "profiles.a100-80gb.memory_bytes.source" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_device_outside_the_peak_table_needs_a_measured_peak():
    raw = yaml.safe_load(hardware.PROFILES_FILE.read_text())["profiles"]["a100-80gb"]
    with pytest.raises(ValueError, match="peak_flops"):
        Profile.model_validate({**raw, "device": "Some Accelerator 9000"})


def test_an_unknown_profile_is_one_line_naming_the_valid_ones():
    with pytest.raises(UsageError, match="unknown profile 'a1000'; valid: .*a100-80gb"):
        profile("a1000")
