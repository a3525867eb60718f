"""``scalelab reproduce``: rerun a finished run from its provenance and compare the results.

``reproduce RUN_DIR`` reruns a finished run from its provenance.json (same config, data
hash and seeds, same launcher and layout) into a new run directory and compares the
results: on CPU in deterministic mode the final weights and metrics must be
bitwise identical; on GPUs, within the tolerances printed. Before anything starts,
every must-match field of the manifest (versions, lock, image, config, data, seeds,
world size, layout, launcher) is compared with what the rerun would use; a difference
is refused, one line per field, unless ``--force``.

Exit codes: 0 reproduced; 1 a must-match field differs (without --force), the rerun
failed or its results differ; 2 bad usage (no manifest, unfinished run, bad path).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from scalelab import provenance, supervise, sysfacts
from scalelab.errors import CheckFailed, UsageError
from scalelab.launch import commands
from scalelab.launcher import rank_env
from scalelab.rundir import LOCK_ENV, RunDir
from scalelab.train.config import from_dict

#: Metrics compared between a run and its reproduction (summary.json).
RESULT_FIELDS = ("global_steps", "train_loss", "train_acc", "val_loss", "val_acc")
#: Stated GPU tolerances (and for runs not in deterministic mode): torch.allclose.
GPU_RTOL, GPU_ATOL = 1e-4, 1e-6


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce",
        help="rerun a finished run from its provenance and compare",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
        epilog=__doc__.split("\n\n")[2].replace("\n", " "),
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="finished run (provenance.json)")
    p.add_argument(
        "--out",
        type=Path,
        metavar="NEW_RUN_DIR",
        help="where the rerun writes (default: reproduce/<run name> in the cwd)",
    )
    p.add_argument(
        "--data",
        metavar="DIR",
        help="staged dataset at another path (its manifest hash must still match)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="rerun even where must-match fields differ (they are still listed)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the must-match fields, print the command, start nothing",
    )
    p.add_argument(
        "--compare-only",
        type=Path,
        metavar="OTHER_RUN_DIR",
        help="compare RUN_DIR's results with an existing rerun, start nothing",
    )
    p.set_defaults(func=cmd_reproduce)


# ----------------------------------------------------------------------------- reproduce


def _launcher_argv(
    launcher: str, world: int, nodes: int, per_node: int, recorded: list[str] | None
) -> list[str]:
    """The command that starts ``world`` ranks the way the recorded run was started."""
    if launcher == "single":
        return []
    if nodes > 1 and launcher != "slurm":
        # Several nodes (e.g. Open MPI ranks started by srun --mpi=pmix): srun again.
        launcher = "slurm"
    if launcher == "openmpi":
        return commands.mpirun(world, world, "launcher openmpi: mpirun not found (run ./setup.sh)")
    if launcher == "torchrun":
        return commands.torchrun(world)
    if launcher == "horovodrun":
        return commands.horovodrun(world)
    if launcher == "slurm":
        if not os.environ.get("SLURM_JOB_ID"):
            raise UsageError(
                f"launcher slurm: the run used srun on {nodes} node(s); rerun "
                f"inside an allocation of the same shape (salloc -N {nodes} "
                f"--ntasks-per-node {per_node} scalelab reproduce ...)"
            )
        mpi = next((a for a in recorded or [] if a.startswith("--mpi=")), "--mpi=pmix")
        return commands.srun(
            mpi=mpi.removeprefix("--mpi="), nodes=nodes, ntasks=world, tasks_per_node=per_node
        )
    raise UsageError(f"launcher {launcher}: reproduce does not know how to start it")


def rerun_argv(
    layout: dict[str, Any], recorded: list[str] | None, run_yaml: Path, out: Path
) -> list[str]:
    """The rerun's whole command line: the recorded launcher, then `scalelab train` per rank."""
    prefix = _launcher_argv(
        layout["launcher"],
        layout["world_size"],
        layout["nodes"],
        layout["tasks_per_node"],
        recorded,
    )
    per_rank = commands.scalelab_command(["train", "--config", str(run_yaml), "--out", str(out)])
    return commands.compose(prefix, per_rank)


def _rerun_layout(must: dict[str, Any]) -> dict[str, Any]:
    """The launcher and layout the rerun will have: the recorded ones (a local rerun of a
    Slurm run keeps the node count only inside an allocation)."""
    nodes = must["nodes"]
    if must["launcher"] == "slurm" and os.environ.get("SLURM_JOB_NUM_NODES"):
        nodes = int(os.environ["SLURM_JOB_NUM_NODES"])
    return {
        "launcher": must["launcher"],
        "world_size": must["world_size"],
        "nodes": nodes,
        "tasks_per_node": must["tasks_per_node"],
    }


def current_must_match(manifest: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The must-match fields as the rerun would record them, computed before it starts."""

    cfg = from_dict(config)
    lock = sysfacts.lock_state()
    return {
        "versions": sysfacts.versions(),
        "lock_sha256": lock["sha256"] if lock else None,
        # reproduce reruns on the host: a run made inside an image differs here (listed).
        "image_sha256": None,
        "config_sha256": provenance.config_sha256(cfg.to_dict()),
        "data_sha256": sysfacts.dataset_hash(cfg)["sha256"],
        "seed": cfg.seed,
        "deterministic": bool(cfg.train.deterministic),
        "device": cfg.train.device,
        "backend": cfg.dist.backend,
        **_rerun_layout(manifest["must_match"]),
    }


#: The layout fields of must_match: the rerun starts what the manifest records, so they
#: are checked against what the run itself (and then the rerun) detected instead.
LAYOUT_FIELDS = ("launcher", "world_size", "nodes", "tasks_per_node")


def ran_layout(run_dir: Path) -> dict[str, Any] | None:
    """The layout a run detected when it started (run_info.json, written by the trainer),
    in must_match's terms; None when the record is missing."""
    try:
        layout = RunDir(run_dir).run_info()["layout"]
        world, local = int(layout["world_size"]), int(layout["local_world_size"])
    except (UsageError, ValueError, KeyError, TypeError):
        return None
    return {
        "launcher": layout.get("launcher"),
        "world_size": world,
        "nodes": max(1, world // max(1, local)),
        "tasks_per_node": local,
    }


def layout_differences(must: dict[str, Any], run_dir: Path, what: str) -> list[str]:
    """Layout fields that provenance.json claims and the run in ``run_dir`` did not have."""
    ran = ran_layout(run_dir)
    if ran is None:
        return [f"layout: {RunDir(run_dir).run_info_path} is missing or unreadable ({what})"]
    return [
        f"{key}: {must.get(key)!r} (recorded) != {ran[key]!r} ({what})"
        for key in LAYOUT_FIELDS
        if must.get(key) != ran[key]
    ]


def config_differences(manifest: dict[str, Any], run_dir: Path, now_sha: str) -> list[str]:
    """The keys where provenance.json's config differs from the config the run wrote
    (config.yaml), when its hash no longer matches: the line names the key, not only
    config_sha256. Where the files are consistent (or config.yaml is gone): none."""
    if now_sha == manifest["must_match"].get("config_sha256"):
        return []
    try:
        ran = RunDir(run_dir).config(missing_ok=False)
    except UsageError:
        return []
    ident = [
        json.loads(json.dumps(c if isinstance(c, dict) else {})) for c in (ran, manifest["config"])
    ]
    for c in ident:  # where data lies is not part of the config's identity
        for key in ("path", "scratch"):
            (c.get("data") if isinstance(c.get("data"), dict) else {}).pop(key, None)
    a, b = (provenance.flatten(c) for c in ident)
    return [
        f"config.{k}: {a.get(k)!r} (the run's config.yaml) != {b.get(k)!r} (provenance.json)"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def compare_results(a: Path, b: Path, exact: bool) -> dict[str, Any]:
    """Final weights (every tensor) and summary metrics of two runs."""
    import torch

    ra, rb = RunDir(a), RunDir(b)
    wa = torch.load(ra.model_path, weights_only=True, map_location="cpu")
    wb = torch.load(rb.model_path, weights_only=True, map_location="cpu")
    tensors = []
    for name in sorted(set(wa) | set(wb)):
        ta, tb = wa.get(name), wb.get(name)
        if ta is None or tb is None:
            tensors.append({"tensor": name, "equal": False, "why": "missing in one run"})
            continue
        same_shape = ta.shape == tb.shape and ta.dtype == tb.dtype
        equal = same_shape and (
            torch.equal(ta, tb)
            if exact
            else bool(torch.allclose(ta.double(), tb.double(), rtol=GPU_RTOL, atol=GPU_ATOL))
        )
        diff = float((ta.double() - tb.double()).abs().max()) if same_shape and ta.numel() else 0.0
        tensors.append({"tensor": name, "equal": bool(equal), "max_abs_diff": diff})
    sa, sb = ra.summary(), rb.summary()
    metrics = []
    for key in RESULT_FIELDS:
        va, vb = sa.get(key), sb.get(key)
        if exact or not isinstance(va, float) or not isinstance(vb, float):
            equal = va == vb
        else:
            equal = abs(va - vb) <= GPU_ATOL + GPU_RTOL * abs(vb)
        metrics.append({"metric": key, "run": va, "rerun": vb, "equal": equal})
    return {
        "mode": "bitwise" if exact else f"allclose(rtol={GPU_RTOL}, atol={GPU_ATOL})",
        "weights_equal": all(t["equal"] for t in tensors),
        "tensors": tensors,
        "metrics_equal": all(m["equal"] for m in metrics),
        "metrics": metrics,
    }


def _finished(run_dir: Path) -> None:
    rd = RunDir(run_dir)
    for path in (rd.summary_path, rd.model_path):
        if not path.is_file():
            raise UsageError(f"{run_dir}: not a finished run ({path.name} missing)")


def cmd_reproduce(args: argparse.Namespace) -> int:
    manifest = provenance.load(args.run_dir)
    provenance.validate(manifest, str(RunDir(args.run_dir).provenance_path))
    _finished(args.run_dir)
    must = manifest["must_match"]
    exact = must["deterministic"] and must["device"] != "cuda" and not _used_cuda(args.run_dir)
    if args.compare_only:
        _finished(args.compare_only)
        return _report(
            args.run_dir,
            args.compare_only,
            compare_results(args.run_dir, args.compare_only, exact),
            [],
        )

    config = json.loads(json.dumps(manifest["config"]))
    if args.data:
        config.setdefault("data", {})["path"] = str(Path(args.data).resolve())
    elif (config.get("data") or {}).get("path"):
        # A relative path is relative to the study's directory (an imported study: its own
        # copy); else the path the run resolved it to. Either way its hash is checked below.
        recorded = manifest["incidental"]["data"].get("path")
        if not Path(config["data"]["path"]).exists() and recorded:
            config["data"]["path"] = recorded
    data_path = (config.get("data") or {}).get("path")
    if data_path and not Path(data_path).exists():
        raise UsageError(
            f"{args.run_dir}: its dataset {data_path} is gone; pass --data DIR "
            "(a copy with the same manifest)"
        )
    now = current_must_match(manifest, config)
    differences = (
        config_differences(manifest, args.run_dir, now["config_sha256"])
        + layout_differences(must, args.run_dir, "the run's run_info.json")
        + provenance.must_match_differences(must, now)
    )
    for line in differences:
        print(f"scalelab reproduce: must-match field differs: {line}", file=sys.stderr)
    if differences and not args.force:
        raise CheckFailed(
            f"{args.run_dir}: {len(differences)} must-match field(s) differ from "
            f"this environment (listed above; first: {differences[0]}); "
            "rerun with --force to go ahead anyway"
        )
    if must.get("image_sha256"):
        print(
            f"scalelab reproduce: warning: the run used image {must['image_sha256'][:16]}...; "
            "this rerun runs on the host",
            file=sys.stderr,
        )

    out = (args.out or Path("reproduce") / args.run_dir.resolve().name).absolute()
    if out.resolve() == args.run_dir.resolve():
        raise UsageError("--out: must differ from RUN_DIR (the run is the reference)")
    RunDir(out).check(inputs=[args.run_dir])
    layout = _rerun_layout(must)
    recorded = manifest["incidental"].get("launcher_argv")
    run_yaml = RunDir(out).run_config_path
    argv = rerun_argv(layout, recorded, run_yaml, out)
    print("scalelab reproduce:", " ".join(argv), flush=True)
    if args.dry_run:
        return 0
    code = _start(argv, out, config, manifest, [args.run_dir])
    if code != 0:
        raise CheckFailed(f"the rerun in {out} failed (exit {code}); see its output above")
    ran = layout_differences(must, out, "the rerun")
    if ran and not args.force:
        raise CheckFailed(f"{out}: the rerun did not run at the recorded layout: {ran[0]}")
    result = compare_results(args.run_dir, out, exact)
    RunDir(out).write_reproduce(
        {
            "of": str(args.run_dir.resolve()),
            "provenance_id": manifest["provenance_id"],
            "forced_differences": differences,
            **result,
        }
    )
    return _report(args.run_dir, out, result, differences)


def _used_cuda(run_dir: Path) -> bool:
    try:
        return RunDir(run_dir).summary().get("device", "").startswith("cuda")
    except (UsageError, AttributeError):
        return False


def _start(
    argv: list[str], out: Path, config: dict[str, Any], manifest: dict[str, Any], inputs: list[Path]
) -> int:
    """Run the rerun into ``out`` under output_guard.guard: an earlier rerun there is replaced
    (it holds only what scalelab wrote); anything else was refused before."""

    token = secrets.token_hex(8)
    threads = manifest["incidental"].get("env", {}).get("OMP_NUM_THREADS") or str(
        (config.get("train") or {}).get("threads") or 1
    )
    with RunDir(out).guard(inputs, token=token) as run_dir:
        run_dir.prepare_rerun()  # a finished earlier rerun: this one starts afresh
        run_dir.write_run_config(config)
        env = {**rank_env({"cpus_per_task": threads}), LOCK_ENV: token}
        recorded = manifest["incidental"].get("env", {})
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # as the run had them
            if name in recorded:
                env[name] = recorded[name]
            else:
                env.pop(name, None)
        return supervise.run(argv, env, out)


def _report(a: Path, b: Path, result: dict[str, Any], forced: list[str]) -> int:
    print(f"scalelab reproduce: compared {a} with {b} ({result['mode']})")
    for m in result["metrics"]:
        flag = "same" if m["equal"] else "DIFFERS"
        print(f"  {m['metric']:<14} {m['run']!s:<24} {m['rerun']!s:<24} {flag}")
    bad = [t for t in result["tensors"] if not t["equal"]]
    print(
        f"  weights: {len(result['tensors']) - len(bad)}/{len(result['tensors'])} tensors "
        f"{'identical' if result['mode'] == 'bitwise' else 'within tolerance'}"
    )
    for t in bad[:10]:
        print(f"    {t['tensor']}: max |diff| {t.get('max_abs_diff')}")
    if forced:
        print(f"  forced past {len(forced)} must-match difference(s)")
    if not (result["weights_equal"] and result["metrics_equal"]):
        raise CheckFailed(
            f"{b} does not reproduce {a}: "
            f"{len(bad)} tensor(s), "
            f"{sum(not m['equal'] for m in result['metrics'])} metric(s) differ"
        )
    print("scalelab reproduce: reproduced")
    return 0
