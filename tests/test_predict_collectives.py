"""`scalelab predict`'s model of each backend's collectives against what torch issues.

A tiny 3-block GPT on 2 real gloo ranks (torchrun), wrapped as the fsdp backend wraps it
(``fully_shard`` per block and root; resharding after forward or not) or split as the tp
layout splits it (``parallelize_module``), runs forward + backward under a dispatch mode
that records every collective and the bytes of its whole buffer. The model of
:class:`scalelab.comm.predict.CommModel` must name the same collectives, as many, with
the same byte volume.

Run as a script (by the test, under torchrun) it is the rank program.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from scalelab.comm import predict as model

BATCH, SEQ, VOCAB, LAYERS = 4, 16, 32, 3

#: torch's op names -> ours
OPS = {
    "all_reduce": "allreduce",
    "allreduce_": "allreduce",
    "_allgather_base_": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "_reduce_scatter_base_": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
}


def _gpt():
    from scalelab.models.gpt import gpt

    return gpt(VOCAB, (SEQ,), size="tiny", n_layers=LAYERS)


def rank_main(mode: str) -> None:
    """One forward + backward of the wrapped model; rank 0 prints {op: [count, bytes]}."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.debug._comm_mode import c10d_collective_ops
    from torch.utils._pytree import tree_leaves

    from scalelab.backends.fsdp import apply_tp, shard_model

    class Recorder(CommDebugMode):
        """CommDebugMode that also keeps each collective's largest buffer (the whole one:
        all-gather's output, reduce-scatter's input, allreduce's tensor)."""

        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[str, int]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs)
            packet = getattr(func, "_overloadpacket", None)
            if (
                out is not NotImplemented
                and packet is not None
                and (packet in self.comm_registry or packet in c10d_collective_ops)
            ):
                sizes = [
                    t.numel() * t.element_size()
                    for t in tree_leaves((args, kwargs, out))
                    if isinstance(t, torch.Tensor)
                ]
                self.seen.append((str(packet).split(".")[-1], max(sizes, default=0)))
            return out

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    net = _gpt()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    if mode == "tp":
        apply_tp(net, mesh)
    else:
        shard_model(net, mesh, reshard=mode == "fsdp")
    x = torch.randint(0, VOCAB, (BATCH, SEQ))
    for _ in range(2):  # the second step: nothing lazy left
        rec = Recorder()
        with rec:
            torch.nn.functional.cross_entropy(net(x), x).backward()  # logits (B, V, T)
    found: dict[str, list[int]] = {}
    for op, size in rec.seen:
        entry = found.setdefault(OPS.get(op, op), [0, 0])
        entry[0] += 1
        entry[1] += size
    if dist.get_rank() == 0:
        print(json.dumps(found), flush=True)
    dist.destroy_process_group()


def _measured(mode: str) -> dict[str, list[int]]:
    from conftest import VENV_BIN, run

    proc = run(
        [
            str(VENV_BIN / "python"),
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            __file__,
        ],
        timeout=300,
        env={
            **os.environ,
            "MODE": mode,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(Path(__file__).parent),
        },
    )
    return json.loads([x for x in proc.stdout.splitlines() if x.startswith("{")][-1])


@pytest.mark.parametrize(
    "mode, backend, tp", [("fsdp", "fsdp", 1), ("fsdp-keep", "fsdp", 1), ("tp", "ddp", 2)]
)
def test_predicted_collectives_are_the_issued_ones(mode, backend, tp):
    comm = model.comm_model(
        _gpt(), backend, tp=tp, seq_len=SEQ, reshard_after_forward=mode != "fsdp-keep"
    )
    # 2 ranks: fsdp shards over both; tp=2 leaves one data-parallel rank (no allreduce)
    predicted = comm.collectives(2, BATCH)
    measured = _measured(mode)
    assert sorted(measured) == sorted(model.counts(predicted)), (measured, predicted)
    volume = model.volume(predicted)
    for op, (n, size) in measured.items():
        assert n == model.counts(predicted)[op], (op, measured, predicted)
        assert size == pytest.approx(volume[op], rel=1e-9), (op, size, volume[op])


def test_prediction_uses_the_backend_s_collectives():
    fit = model.RingFit(20e-6, 2.5e9, 0, 0, 0, 0, 10, (2,))
    net = _gpt()
    grad = sum(p.numel() * 4 for p in net.parameters())
    base = model.Base(
        ranks=2, compute_s=0.01, data_s=0.0, grad_bytes=grad, global_batch=8, mode="strong"
    )
    ddp = model.predict(base, fit, [2, 4, 8])
    assert ddp["comm_s"].tolist() == pytest.approx(
        model.ring_allreduce_time(ddp["ranks"], grad, fit.alpha_s, fit.beta_Bps).tolist()
    )
    fsdp = model.predict(base, fit, [2, 4, 8], model.comm_model(net, "fsdp"))
    assert (fsdp["allreduce_s"] == 0).all() and (fsdp["all_gather_s"] > 0).all()
    # bandwidth terms: fsdp moves 1.5x ddp's bytes less half the root's (ZeRO-3)
    groups = model.fsdp_groups(net)
    beta_only = model.RingFit(0.0, 2.5e9, 0, 0, 0, 0, 10, (2,))
    ratio = (
        model.predict(base, beta_only, [8], model.comm_model(net, "fsdp"))["comm_s"]
        / model.predict(base, beta_only, [8])["comm_s"]
    )
    assert ratio.tolist() == pytest.approx([1.5 - groups[-1] / (2 * grad)] * 2)
    tp = model.predict(base, fit, [1, 2, 3, 4, 8], model.comm_model(net, "ddp", tp=2, seq_len=SEQ))
    assert tp["ranks"].tolist() == [2, 4, 8]  # only multiples of tp exist
    assert tp.loc[0, "allreduce_s"] > 0  # the activations' allreduces at dp = 1
    assert "allreduce" in tp.attrs["comm"] and "tp=2" in tp.attrs["comm"]


@pytest.mark.parametrize(
    "mixed, device, scale",
    [("bf16", "cpu", 0.5), ("auto", "cpu", 1.0), ("auto", "cuda:0", 0.5), ("fp32", "cuda:0", 1.0)],
)
def test_comm_model_from_run_reads_the_layout(tmp_path, mixed, device, scale):
    """A run directory as the trainer writes it: backend and tp from the summary, the model
    from config.yaml, bf16 all-gathers where the fsdp backend would have used them."""
    import yaml

    cfg = {
        "model": {"name": "gpt", "options": {"size": "tiny", "n_layers": LAYERS}},
        "data": {"source": "tokens", "seq_len": SEQ, "vocab_size": VOCAB},
        "optim": {"grad_accum_steps": 2},
        "dist": {"backend": "fsdp", "tp": 2, "fsdp": {"mixed_precision": mixed}},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "summary.json").write_text(
        json.dumps(
            {
                "world_size": 4,
                "samples_per_s": 10.0,
                "global_batch_size": 8,
                "backend": "fsdp",
                "tp": 2,
                "device": device,
            }
        )
    )
    comm = model.comm_model_from_run(tmp_path)
    assert (comm.backend, comm.tp, comm.seq_len, comm.accum_steps) == ("fsdp", 2, SEQ, 2)
    assert comm.param_scale == scale
    assert comm.group_bytes == tuple(model.fsdp_groups(_gpt(), 2))
    volume = model.volume(comm.collectives(4, BATCH))
    groups = comm.group_bytes
    gathers = 2 * sum(groups) - groups[-1]  # twice per block, the root once, per micro-batch
    assert volume["all_gather"] == pytest.approx(2 * gathers * scale)
    assert volume["reduce_scatter"] == pytest.approx(sum(groups))  # fp32, once per step


if __name__ == "__main__":
    rank_main(os.environ["MODE"])
    sys.exit(0)
