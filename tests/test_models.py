"""The model registry and the plain-torch models."""

from __future__ import annotations

import pytest
import torch

from scalelab.data.spec import DataSpec
from scalelab.errors import UsageError
from scalelab.models import build_model, model_names


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet_matches_reference_parameter_counts() -> None:
    # The reference ImageNet ResNets (torchvision's resnet18/resnet50) have these counts.
    assert n_params(build_model("resnet18", 1000, (3, 224, 224))) == 11_689_512
    assert n_params(build_model("resnet50", 1000, (3, 224, 224))) == 25_557_032
    assert n_params(build_model("resnet", 1000, (3, 224, 224), depth=18)) == 11_689_512


@pytest.mark.parametrize(
    "name, opts",
    [
        ("cnn", {}),
        ("resnet18", {"width": 16}),
        ("resnet50", {"width": 8}),
        ("vit", {"dim": 48, "depth": 2, "heads": 2}),
    ],
)
def test_forward_backward(name: str, opts: dict) -> None:
    torch.manual_seed(0)
    model = build_model(name, 7, (3, 32, 32), **opts)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 7, (4,))
    logits = model(x)
    assert logits.shape == (4, 7)
    torch.nn.functional.cross_entropy(logits, y).backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all()
        for p in model.parameters()
        if p.requires_grad
    )


def test_small_images_get_the_cifar_stem() -> None:
    small = build_model("resnet18", 10, (3, 32, 32))
    large = build_model("resnet18", 10, (3, 96, 96))
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in small.modules())
    assert any(isinstance(m, torch.nn.MaxPool2d) for m in large.modules())
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cnn_has_no_batchnorm_and_resnet_has() -> None:
    def has_bn(m: torch.nn.Module) -> bool:
        return any(isinstance(x, torch.nn.modules.batchnorm._BatchNorm) for x in m.modules())

    assert not has_bn(build_model("cnn", 10, (1, 28, 28)))
    assert has_bn(build_model("resnet18", 10, (3, 32, 32)))


def test_zero_init_residual() -> None:
    model = build_model("resnet18", 10, (3, 32, 32), zero_init_residual=True)
    last_bns = [b.last_bn().weight.detach() for b in model.modules() if hasattr(b, "last_bn")]
    assert last_bns and all(float(w.abs().sum()) == 0.0 for w in last_bns)


def test_unknown_model_names_field_and_choices() -> None:
    with pytest.raises(UsageError) as err:
        build_model("resnet51", 10, (3, 32, 32))
    message = str(err.value)
    assert "model.name" in message and "'resnet51'" in message
    assert all(name in message for name in model_names())


def test_bad_options() -> None:
    with pytest.raises(UsageError, match=r"model\.options\.depth.*valid: width, hidden"):
        build_model("cnn", 10, (3, 32, 32), depth=3)
    with pytest.raises(UsageError, match="patch_size"):
        build_model("vit", 10, (3, 30, 30), patch_size=4)
    with pytest.raises(UsageError, match="depth must be one of"):
        build_model("resnet", 10, (3, 32, 32), depth=20)


# --------------------------------------------------------------------------- FLOPs, MFU facts


def test_flops_per_sample_match_published_counts() -> None:
    from scalelab.models.flops import forward_flops

    # ResNet-50 at 224 px: 4.09 GMACs per image (2 FLOPs per multiply-add).
    rn50 = forward_flops("resnet50", {}, DataSpec(1000, (3, 224, 224)))
    assert rn50 == pytest.approx(2 * 4.089e9, rel=0.01)
    # The small CNN by hand: two 3x3 convs and two linear layers (MACs x 2).
    cnn = forward_flops("cnn", {}, DataSpec(10, (3, 32, 32)))
    by_hand = 2 * (32 * 32 * 32 * 3 * 9 + 16 * 16 * 64 * 32 * 9 + 4096 * 128 + 128 * 10)
    assert cnn == pytest.approx(by_hand, rel=1e-6)


def test_model_facts_on_cpu_and_the_peak_table() -> None:
    from scalelab.train.peak import peak_bf16
    from scalelab.train.records import model_facts

    model = build_model("cnn", 10, (3, 32, 32))
    facts = model_facts(
        "cnn", {}, DataSpec(10, (3, 32, 32)), model, torch.device("cpu"), 500.0, False
    )
    assert facts["num_params"] == n_params(model) == 545_098
    assert facts["grad_bytes"] == 4 * 545_098
    assert facts["flops_per_sample_train"] == 3 * facts["flops_per_sample_forward"]
    assert facts["mfu"] is None and "CPU" in facts["mfu_peak"]
    # specific names before generic ones: an H100 PCIe is not an SXM, an L40S not an L4
    assert peak_bf16("NVIDIA H100 PCIe")[0] == 756e12
    assert peak_bf16("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert peak_bf16("NVIDIA H200")[0] == 989e12
    assert peak_bf16("NVIDIA A100-SXM4-80GB")[0] == 312e12
    assert peak_bf16("NVIDIA L40S")[0] == 362e12 and peak_bf16("NVIDIA L4")[0] == 121e12
    assert peak_bf16("Tesla V100-SXM2-16GB") is None


def test_gpu_acceptance_smoke_runs_every_path(tmp_path) -> None:
    """benchmarks/gpu_acceptance.sh --smoke: every benchmark at toy sizes on the CPU."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        ["bash", str(repo / "benchmarks" / "gpu_acceptance.sh"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=600,
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHON": sys.executable,
            "OUT": str(tmp_path),
            "HOME": str(tmp_path),
        },
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GPU acceptance on CPU (smoke run)" in proc.stdout
    res = json.loads((tmp_path / "gpu_acceptance.json").read_text())
    for key in ("resnet50_eager", "resnet50_compile", "transformer", "gpt_fsdp", "overhead"):
        assert res[key]["wall_s"] > 0, key
    # scalelab's own GPT under fsdp: figures from its summary; on the CPU no MFU, and why
    assert res["gpt_fsdp"]["tokens_per_s"] > 0 and res["gpt_fsdp"]["mfu_lm"] is None
    assert "CPU" in res["gpt_fsdp"]["mfu_peak"]
    assert res["resnet50_eager"]["img_s"] > 0 and res["transformer"]["tokens_s"] > 0
    assert res["overhead"]["rounds"] == 2 and res["overhead"]["ratio_median"] > 0
    assert (tmp_path / "gpu_acceptance.md").read_text().count("\n| ") >= 6


def test_phase_timer_splits_gpu_time_from_event_gaps() -> None:
    """The CUDA branch's arithmetic, with stand-in events (no GPU here): comm is the gap
    backward -> reduced, data start -> ready, compute the rest of ready -> end."""
    from types import SimpleNamespace

    from scalelab.train.timing import PhaseTimer

    clock = {"t": 0.0}

    class Event:  # stands in for torch.cuda.Event: records the current fake time (ms)
        def __init__(self, enable_timing: bool) -> None:
            self.t = None

        def record(self) -> None:
            self.t = clock["t"]

        def synchronize(self) -> None: ...

        def elapsed_time(self, other: Event) -> float:
            return other.t - self.t

    timer = PhaseTimer(torch.device("cpu"))
    timer.cuda = True
    timer._torch = SimpleNamespace(cuda=SimpleNamespace(Event=Event))
    for comm in (5.0, None):  # Horovod-like step, then a backend that does not measure comm
        for name, advance in (("start", 2.0), ("ready", 30.0), ("backward", 5.0), ("reduced", 3.0)):
            timer.mark(name)
            clock["t"] += advance
        timer.end(step_s=99.0, data_s=99.0, comm_s=comm)  # host times are ignored on GPUs
    data, compute, comm = timer.collect()
    assert data == pytest.approx(2 * 2.0e-3)
    assert comm == pytest.approx(5.0e-3)  # only the step whose backend measures comm
    assert compute == pytest.approx((30 + 3) * 1e-3 + (30 + 5 + 3) * 1e-3)
    assert timer.collect() == (0.0, 0.0, 0.0)  # collected once

    cpu = PhaseTimer(torch.device("cpu"))  # the CPU keeps the host clock, as before
    cpu.end(step_s=1.0, data_s=0.25, comm_s=0.5)
    cpu.end(step_s=1.0, data_s=0.25, comm_s=None)
    assert cpu.collect() == pytest.approx((0.5, 0.25 + 0.75, 0.5))
