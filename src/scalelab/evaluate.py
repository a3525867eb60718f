"""`scalelab evaluate`: the final weights of a run on a held-out split.

Training reports validation accuracy along the way; the test split is kept
for this one, final measurement, so model selection never sees it. One process
on the CPU (or one GPU): evaluation is cheap next to training and its result
must not depend on how many ranks trained the model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

from scalelab.data.registry import data_source
from scalelab.data.spec import DataSpec
from scalelab.errors import BadInputData, UsageError
from scalelab.fsio import atomic_write_text, sha256_file
from scalelab.models import build
from scalelab.output_guard import guard
from scalelab.rundir import RunDir
from scalelab.train.config import load as load_config


def evaluate(
    run_dir: str | Path, data_dir: str | Path | None, split: str = "test", batch_size: int = 256
) -> dict:
    """Loss and accuracy of RUN_DIR/model.pt on ``split``: of the staged data in
    ``data_dir``, or, for a generated source (tokens, synthetic), its generated test split.
    Language models also get perplexity; accuracy is then per token."""
    import torch

    run = RunDir(run_dir)
    model_file = run.model_path
    for needed in (run.summary_path, model_file, run.config_path):
        if not needed.exists():
            raise UsageError(f"{needed}: missing; the run did not complete")
    cfg = load_config(run.config_path)
    dataset = _dataset(cfg, data_dir, split)
    model = build(cfg.model.name, cfg.model.options, _spec(run, dataset))
    try:
        state = torch.load(model_file, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise UsageError(f"{model_file}: cannot load the weights ({exc})") from None
    model.eval()
    start = time.perf_counter()
    sums = _score(model, dataset, batch_size)
    loss = sums["loss_sum"] / sums["targets"]
    out = {
        "run_dir": str(run.path),
        "split": split,
        "samples": len(dataset),
        "source": cfg.data.source,
        "loss": loss,
        "accuracy": sums["correct"] / sums["targets"],
    }
    if sums["sequences"]:
        out.update(tokens=sums["targets"], perplexity=math.exp(loss))
    else:
        out["per_class_accuracy"] = [c / t if t else None for c, t in sums["per_class"]]
    out.update(model_sha256=sha256_file(model_file), time_s=time.perf_counter() - start)
    return out


def _spec(run, dataset):
    """The data spec the run (a RunDir) trained with (recorded; an older run: the scored
    split's); a split of other samples cannot be scored by this model."""

    scored = DataSpec.of(dataset)
    trained = run.data_spec() or scored
    if scored.input_shape != trained.input_shape:
        raise UsageError(
            f"--data: its samples have shape {list(scored.input_shape)}, the run "
            f"trained on {list(trained.input_shape)}"
        )
    return trained


def _dataset(cfg, data_dir: str | Path | None, split: str):
    """The split to score: generated for a generated source, else read from ``data_dir``."""
    from scalelab.data.shards import open_split

    generated = data_source(cfg.data.source).test_split(cfg)
    if generated is not None:
        if data_dir is not None:
            raise UsageError(
                f"--data: the run's data is generated (data.source: "
                f"{cfg.data.source}), and so is its test split; omit --data"
            )
        if split != "test":
            raise UsageError(
                f"--split {split}: a generated source has only a test split here "
                "(validation is scored during training)"
            )
        return generated
    if data_dir is None:
        raise UsageError(
            f"--data: required (the run trained on data.source "
            f"{cfg.data.source!r}: give the staged data directory)"
        )
    try:
        dataset = open_split(data_dir, split)
    except BadInputData as exc:  # no such split (or no dataset): the user's input, exit 2
        raise BadInputData(f"--split {split}: {exc}") from None
    if len(dataset) == 0:
        raise UsageError(
            f"--split {split}: {data_dir} holds no samples in it; an accuracy "
            "over zero samples means nothing"
        )
    return dataset


def _score(model, dataset, batch_size: int) -> dict:
    """Summed loss, hits and targets over the split (a label, or each token of a sequence)."""
    import numpy as np
    import torch

    sums = {"loss_sum": 0.0, "correct": 0, "targets": 0, "sequences": False}
    per_class = np.zeros((dataset.num_classes, 2), dtype=np.int64)  # [correct, total]
    with torch.inference_mode():
        for lo in range(0, len(dataset), batch_size):
            x, y = dataset.get_batch(np.arange(lo, min(lo + batch_size, len(dataset))))
            x, y = torch.from_numpy(x), torch.from_numpy(y)
            logits = model(x)
            sums["loss_sum"] += torch.nn.functional.cross_entropy(
                logits.float(), y, reduction="sum"
            ).item()
            hit = (logits.argmax(1) == y).numpy()
            sums["correct"] += int(hit.sum())
            sums["targets"] += y.numel()
            sums["sequences"] = y.ndim > 1
            if y.ndim == 1:
                np.add.at(per_class, (y.numpy(), 0), hit.astype(np.int64))
                np.add.at(per_class, (y.numpy(), 1), 1)
    sums["per_class"] = per_class.tolist()
    return sums


def _is_evaluation(path: Path) -> bool:
    """Whether ``path`` is an earlier `evaluate --out` (the only file it may replace)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and {"run_dir", "split", "model_sha256"} <= doc.keys()


def cmd_evaluate(args: argparse.Namespace) -> int:

    if args.batch_size < 1:
        raise UsageError(f"--batch-size: {args.batch_size} must be >= 1")
    with contextlib.ExitStack() as stack:
        if args.out:  # refused before the evaluation; locked until the result is written
            stack.enter_context(
                guard(
                    args.out,
                    "evaluation",
                    [p for p in (args.run, args.data) if p],
                    is_ours=_is_evaluation,
                )
            )
        result = evaluate(args.run, args.data, args.split, args.batch_size)
        text = json.dumps(result, indent=2)
        if args.out:
            atomic_write_text(args.out, text + "\n")
    ppl = f" perplexity {result['perplexity']:.3f}" if "perplexity" in result else ""
    print(
        f"{args.run}: {args.split} accuracy {result['accuracy']:.4f} loss "
        f"{result['loss']:.4f}{ppl} on {result['samples']} samples"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="evaluate a run's final weights on a held-out split",
        description=(__doc__ or "").splitlines()[0],
    )

    p.add_argument("--run", required=True, type=Path, help=f"run directory (with {RunDir.MODEL})")
    p.add_argument(
        "--data",
        type=Path,
        help="staged data directory (required for staged data; omitted for a "
        "generated source, whose test split is generated)",
    )
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--out",
        type=Path,
        help="write the result as JSON here (atomically; an existing file is "
        "replaced only if it is an earlier evaluation)",
    )
    p.set_defaults(func=cmd_evaluate)
