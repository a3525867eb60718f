"""`scalelab evaluate`: the final weights of a run on a held-out split.

Training reports validation accuracy along the way; the test split is kept
for this one, final measurement, so model selection never sees it. One process
on the CPU (or one GPU): evaluation is cheap next to training and its result
must not depend on how many ranks trained the model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from scalelab.errors import UsageError


def evaluate(run_dir: str | Path, data_dir: str | Path, split: str = "test",
             batch_size: int = 256) -> dict:
    """Loss and accuracy of RUN_DIR/model.pt on `split` of the staged data."""
    import numpy as np
    import torch

    from scalelab.data.shards import open_split
    from scalelab.fsio import sha256_file
    from scalelab.models import build_model
    from scalelab.train.config import load as load_config

    run_dir = Path(run_dir)
    summary_file, model_file = run_dir / "summary.json", run_dir / "model.pt"
    for needed in (summary_file, model_file, run_dir / "config.yaml"):
        if not needed.exists():
            raise UsageError(f"{needed}: missing; the run did not complete")
    cfg = load_config(run_dir / "config.yaml")
    dataset = open_split(data_dir, split)
    if len(dataset) == 0:
        raise UsageError(f"--split {split}: {data_dir} holds no samples in it; an accuracy "
                         "over zero samples means nothing")
    model = build_model(cfg.model.name, dataset.num_classes, dataset.image_shape,
                        **cfg.model.options)
    try:
        state = torch.load(model_file, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise UsageError(f"{model_file}: cannot load the weights ({exc})") from None
    model.eval()
    start = time.perf_counter()
    loss_sum, correct, n = 0.0, 0, len(dataset)
    per_class = np.zeros((dataset.num_classes, 2), dtype=np.int64)  # [correct, total]
    with torch.inference_mode():
        for lo in range(0, n, batch_size):
            idx = np.arange(lo, min(lo + batch_size, n))
            x, y = dataset.get_batch(idx)
            x, y = torch.from_numpy(x), torch.from_numpy(y)
            logits = model(x)
            loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
            hit = (logits.argmax(1) == y).numpy()
            correct += int(hit.sum())
            np.add.at(per_class, (y.numpy(), 0), hit.astype(np.int64))
            np.add.at(per_class, (y.numpy(), 1), 1)
    return {
        "run_dir": str(run_dir),
        "split": split,
        "samples": n,
        "loss": loss_sum / max(n, 1),
        "accuracy": correct / max(n, 1),
        "per_class_accuracy": [c / t if t else None for c, t in per_class.tolist()],
        "model_sha256": sha256_file(model_file),
        "time_s": time.perf_counter() - start,
    }


def _is_evaluation(path: Path) -> bool:
    """Whether ``path`` is an earlier `evaluate --out` (the only file it may replace)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and {"run_dir", "split", "model_sha256"} <= doc.keys()


def cmd_evaluate(args: argparse.Namespace) -> int:
    from scalelab.fsio import atomic_write_text, check_file_target

    if args.batch_size < 1:
        raise UsageError(f"--batch-size: {args.batch_size} must be >= 1")
    if args.out:
        check_file_target(args.out, [args.run, args.data], is_ours=_is_evaluation)
    result = evaluate(args.run, args.data, args.split, args.batch_size)
    text = json.dumps(result, indent=2)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    print(f"{args.run}: {args.split} accuracy {result['accuracy']:.4f} loss "
          f"{result['loss']:.4f} on {result['samples']} samples")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a run's final weights on a held-out split",
                       description=(__doc__ or "").splitlines()[0])
    p.add_argument("--run", required=True, type=Path, help="run directory (with model.pt)")
    p.add_argument("--data", required=True, type=Path, help="staged data directory")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", type=Path,
                   help="write the result as JSON here (atomically; an existing file is "
                        "replaced only if it is an earlier evaluation)")
    p.set_defaults(func=cmd_evaluate)
