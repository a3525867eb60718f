"""GPU acceptance: the figures a reader of docs/benchmarks.md needs from one GPU.

Prints one table headed by the card's name (and writes it as JSON with --json):

* synthetic ResNet-50 training img/s, bf16 autocast, channels_last, eager and
  torch.compile (Horovod's synthetic-benchmark style: random images, no loader);
* a small GPT-style transformer's training tokens/s and MFU (nanoGPT's estimate:
  6 N + 12 L d T FLOPs per token, against the card's dense bf16 peak from
  scalelab.train.peak.PEAK_BF16_DENSE);
* scalelab's trainer against a bare loop on the same GPU, same model, data and
  batch, interleaved rounds, median ratio of the per-round pairs.

Timing: CUDA events around the timed steps after warm-up (MLPerf-style: warm-up and
compilation are excluded and stated). Sized to finish within 6 minutes on an H100/H200.
``--smoke`` runs every path at toy sizes on the CPU (torch.compile with the 'eager'
backend, no inductor build) so the script is exercised where no GPU exists.

    python benchmarks/gpu_acceptance.py [--smoke] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from scalelab.models import build_model  # noqa: E402
from scalelab.train.peak import peak_bf16  # noqa: E402


@dataclass
class Sizes:
    """Problem sizes of one mode (full on a GPU, toy for --smoke)."""

    rn_batch: int = 256
    rn_image: int = 224
    rn_warmup: int = 15
    rn_steps: int = 40
    gpt_batch: int = 16
    gpt_seq: int = 1024
    gpt_dim: int = 768
    gpt_layers: int = 12
    gpt_heads: int = 12
    gpt_vocab: int = 50304
    gpt_warmup: int = 10
    gpt_steps: int = 30
    ovh_model: str = "resnet18"
    ovh_image: int = 64
    ovh_batch: int = 256
    ovh_steps: int = 60
    ovh_warmup: int = 10
    ovh_rounds: int = 3


SMOKE = Sizes(
    rn_batch=2,
    rn_image=32,
    rn_warmup=1,
    rn_steps=2,
    gpt_batch=2,
    gpt_seq=32,
    gpt_dim=32,
    gpt_layers=2,
    gpt_heads=2,
    gpt_vocab=128,
    gpt_warmup=1,
    gpt_steps=2,
    ovh_model="cnn",
    ovh_image=32,
    ovh_batch=16,
    ovh_steps=4,
    ovh_warmup=1,
    ovh_rounds=2,
)


class Clock:
    """Seconds between start() and stop(): CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self._a = torch.cuda.Event(enable_timing=True)
            self._b = torch.cuda.Event(enable_timing=True)
            self._a.record()
        else:
            self._t = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self._b.record()
            self._b.synchronize()
            return self._a.elapsed_time(self._b) / 1e3
        return time.perf_counter() - self._t


def autocast(device: torch.device):
    return (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if device.type == "cuda"
        else nullcontext()
    )


def resnet50_img_s(device: torch.device, s: Sizes, compile_: bool, smoke: bool) -> dict:
    """Synthetic ResNet-50 training throughput (random images and labels on the device)."""
    torch.manual_seed(0)
    model = build_model("resnet50", 1000, (3, s.rn_image, s.rn_image)).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step_model = (
        torch.compile(model, backend="eager" if smoke else "inductor") if compile_ else model
    )
    x = torch.randn(s.rn_batch, 3, s.rn_image, s.rn_image, device=device)
    x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (s.rn_batch,), device=device)

    def step() -> None:
        with autocast(device):
            loss = F.cross_entropy(step_model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(s.rn_warmup):  # compilation happens here, excluded from the timing
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    clock = Clock(device)
    clock.start()
    for _ in range(s.rn_steps):
        step()
    sec = clock.stop()
    return {"img_s": s.rn_batch * s.rn_steps / sec, "warmup_s": warm}


class Block(nn.Module):
    """Pre-norm GPT block: causal self-attention (SDPA: flash on Hopper) + MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A GPT-2-small-sized decoder (124M parameters at the full sizes), tied embeddings."""

    def __init__(self, s: Sizes) -> None:
        super().__init__()
        self.tok = nn.Embedding(s.gpt_vocab, s.gpt_dim)
        self.pos = nn.Embedding(s.gpt_seq, s.gpt_dim)
        self.blocks = nn.ModuleList(Block(s.gpt_dim, s.gpt_heads) for _ in range(s.gpt_layers))
        self.ln = nn.LayerNorm(s.gpt_dim)
        self.head = nn.Linear(s.gpt_dim, s.gpt_vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def transformer_tokens_s(device: torch.device, s: Sizes) -> dict:
    """Training tokens/s and MFU of the small GPT (AdamW, bf16 autocast, eager)."""
    torch.manual_seed(0)
    model = GPT(s).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type == "cuda")
    idx = torch.randint(0, s.gpt_vocab, (s.gpt_batch, s.gpt_seq + 1), device=device)
    x, y = idx[:, :-1], idx[:, 1:]

    def step() -> None:
        with autocast(device):
            logits = model(x)
        loss = F.cross_entropy(logits.float().view(-1, s.gpt_vocab), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(s.gpt_warmup):
        step()
    clock = Clock(device)
    clock.start()
    for _ in range(s.gpt_steps):
        step()
    sec = clock.stop()
    tokens_s = s.gpt_batch * s.gpt_seq * s.gpt_steps / sec
    # nanoGPT's estimate_mfu: 6N per token for the weights (N without the position table),
    # plus 12 L d T for attention.
    n = sum(p.numel() for p in model.parameters()) - model.pos.weight.numel()
    flops_per_token = 6 * n + 12 * s.gpt_layers * s.gpt_dim * s.gpt_seq
    peak = peak_bf16(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    return {
        "tokens_s": tokens_s,
        "params": n,
        "flops_per_token": flops_per_token,
        "mfu": tokens_s * flops_per_token / peak[0] if peak else None,
        "peak": f"{peak[0] / 1e12:g} TFLOP/s dense bf16 ({peak[1]})" if peak else None,
    }


def bare_samples_s(device: torch.device, s: Sizes) -> float:
    """The floor: the same model, data, batch, precision and layout as the trainer's run,
    in ~20 lines (no metrics, checkpoints, signals, validation)."""
    from scalelab.data.synthetic import SyntheticDataset

    torch.manual_seed(0)
    shape = (3, s.ovh_image, s.ovh_image)
    data = SyntheticDataset(s.ovh_batch * (s.ovh_steps + s.ovh_warmup), 10, shape, seed=0)
    model = build_model(s.ovh_model, 10, shape).to(device)
    cl = device.type == "cuda"
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    clock = Clock(device)
    for step in range(s.ovh_warmup + s.ovh_steps):
        if step == s.ovh_warmup:
            clock.start()
        ids = torch.arange(step * s.ovh_batch, (step + 1) * s.ovh_batch).numpy()
        xb, yb = data.get_batch(ids)
        xb = torch.from_numpy(xb).to(device, non_blocking=True)
        if cl:
            xb = xb.to(memory_format=torch.channels_last)
        yb = torch.from_numpy(yb).to(device, non_blocking=True)
        with autocast(device):
            loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return s.ovh_batch * s.ovh_steps / clock.stop()


def trainer_samples_s(device: torch.device, s: Sizes, work: Path, i: int) -> float:
    """scalelab's trainer, in this process (backend none, one device)."""
    from scalelab.train import run

    cfg = {
        "seed": 0,
        "model": {"name": s.ovh_model},
        "data": {
            "source": "synthetic",
            "image_shape": [3, s.ovh_image, s.ovh_image],
            "num_classes": 10,
            "num_samples": s.ovh_batch * (s.ovh_steps + s.ovh_warmup),
            "val_split": None,
        },
        "optim": {"global_batch_size": s.ovh_batch, "lr": 0.01, "momentum": 0.9},
        "train": {"epochs": 1, "progress": False, "device": device.type, "threads": None},
        "metrics": {"warmup_steps": s.ovh_warmup},
        "checkpoint": {"every_epochs": 0},
        "dist": {"backend": "none"},
    }
    summary = run(cfg, work / f"train{i}")
    return float(summary["samples_per_s"])


def gpt_fsdp(device: torch.device, s: Sizes, smoke: bool) -> dict:
    """scalelab's own GPT under its fsdp backend on one device (issue 18's MFU figure):
    bf16 mixed precision on GPUs, seeded synthetic tokens; MFU from the run's summary
    (6N + 12LTd FLOPs per token against the card's dense bf16 peak)."""
    from scalelab.train import run

    n = s.gpt_batch * (s.gpt_steps + s.gpt_warmup)
    cfg = {
        "seed": 0,
        "model": {"name": "gpt", "options": {"size": "tiny" if smoke else "small"}},
        "data": {
            "source": "tokens",
            "num_samples": n,
            "val_samples": s.gpt_batch,
            "seq_len": s.gpt_seq,
            "vocab_size": s.gpt_vocab,
        },
        "optim": {"name": "adamw", "global_batch_size": s.gpt_batch, "lr": 3e-4},
        "train": {"epochs": 1, "progress": False, "device": device.type},
        "metrics": {"warmup_steps": s.gpt_warmup},
        "checkpoint": {"every_epochs": 0},
        "dist": {"backend": "fsdp"},
    }
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29561")):
        os.environ.setdefault(key, value)
    with tempfile.TemporaryDirectory(prefix="scalelab-gpu-gpt-") as tmp:
        summary = run(cfg, Path(tmp) / "gpt-fsdp")
    return {
        k: summary.get(k)
        for k in (
            "num_params",
            "tokens_per_s",
            "mfu_lm",
            "mfu_peak",
            "cuda_max_allocated_bytes",
            "rank0_state_bytes",
            "val_perplexity",
            "joules_per_sample",
            "energy_power_w",
            "energy_unavailable",
        )
    }


def overhead(device: torch.device, s: Sizes) -> dict:
    """Interleaved rounds (bare, trainer, bare, ...): the paired ratio shares the momentary
    state of the machine; the median over rounds is reported with its range."""
    ratios, bare, ours = [], [], []
    with tempfile.TemporaryDirectory(prefix="scalelab-gpu-acc-") as tmp:
        for i in range(s.ovh_rounds):
            bare.append(bare_samples_s(device, s))
            ours.append(trainer_samples_s(device, s, Path(tmp), i))
            ratios.append(ours[-1] / bare[-1])
    return {
        "bare_samples_s": statistics.median(bare),
        "trainer_samples_s": statistics.median(ours),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "rounds": s.ovh_rounds,
        "model": s.ovh_model,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--smoke",
        action="store_true",
        help="toy sizes, CPU allowed, torch.compile with the eager backend",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print(
            "gpu_acceptance: error: no GPU visible (use --smoke to exercise it on the CPU)",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s = SMOKE if args.smoke else Sizes()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        card = torch.cuda.get_device_name(device)
    else:
        card = "CPU (smoke run)"
    t0 = time.perf_counter()
    res = {
        "card": card,
        "torch": torch.__version__,
        "smoke": args.smoke,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    stages = [
        ("resnet50_eager", lambda: resnet50_img_s(device, s, False, args.smoke)),
        ("resnet50_compile", lambda: resnet50_img_s(device, s, True, args.smoke)),
        ("transformer", lambda: transformer_tokens_s(device, s)),
        ("gpt_fsdp", lambda: gpt_fsdp(device, s, args.smoke)),
        ("overhead", lambda: overhead(device, s)),
    ]
    for name, fn in stages:
        t = time.perf_counter()
        res[name] = fn()
        res[name]["wall_s"] = time.perf_counter() - t
        print(
            f"gpu_acceptance: {name} done in {res[name]['wall_s']:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    res["total_s"] = time.perf_counter() - t0
    print(table(res, s))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


def _n(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def table(r: dict, s: Sizes) -> str:
    """One Markdown table with the card's name."""
    rn, rc, tf, ov = r["resnet50_eager"], r["resnet50_compile"], r["transformer"], r["overhead"]
    mfu = f"{tf['mfu']:.1%}" if tf["mfu"] is not None else "n/a (no published peak)"
    g = r["gpt_fsdp"]
    g_mfu = f"{g['mfu_lm']:.1%}" if g.get("mfu_lm") is not None else f"n/a ({g.get('mfu_peak')})"
    g_mem = (
        f", peak {g['cuda_max_allocated_bytes'] / 2**30:.1f} GiB"
        if g.get("cuda_max_allocated_bytes")
        else ""
    )
    g_energy = (
        f", {g['joules_per_sample']:.4g} J/sample at {g['energy_power_w']:.0f} W"
        if g.get("joules_per_sample") is not None
        else f", energy n/a ({g.get('energy_unavailable')})"
    )
    lines = [
        f"GPU acceptance on {r['card']} (torch {r['torch']}, {r['date']}, "
        f"{r['total_s']:.0f} s{', SMOKE: toy sizes, figures mean nothing' if r['smoke'] else ''})",
        "",
        "| benchmark | figure | vs baseline in the same run |",
        "|---|---:|---|",
        f"| ResNet-50 synthetic, bf16, channels_last, batch {s.rn_batch}, eager | "
        f"{_n(rn['img_s'])} img/s | baseline |",
        f"| ResNet-50 synthetic, bf16, channels_last, batch {s.rn_batch}, torch.compile | "
        f"{_n(rc['img_s'])} img/s | x{rc['img_s'] / rn['img_s']:.2f} of eager "
        f"(compile + warm-up {rc['warmup_s']:.0f} s excluded) |",
        f"| GPT {tf['params'] / 1e6:.0f}M params, seq {s.gpt_seq}, batch {s.gpt_batch}, "
        f"bf16, eager | {_n(tf['tokens_s'])} tokens/s | MFU {mfu} |",
        f"| scalelab train, gpt {g['num_params'] / 1e6:.0f}M, dist.backend fsdp, 1 device, "
        f"seq {s.gpt_seq}, batch {s.gpt_batch} | {_n(g['tokens_per_s'] or 0)} tokens/s | "
        f"MFU {g_mfu}{g_mem}{g_energy} |",
        f"| scalelab train vs bare loop, {ov['model']} {s.ovh_image}px, batch {s.ovh_batch} | "
        f"{_n(ov['trainer_samples_s'])} vs {_n(ov['bare_samples_s'])} samples/s | "
        f"ratio {ov['ratio_median']:.3f} (median of {ov['rounds']} interleaved rounds, "
        f"range {ov['ratio_min']:.3f}-{ov['ratio_max']:.3f}) |",
    ]
    if tf.get("peak"):
        lines += ["", f"MFU peak: {tf['peak']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
