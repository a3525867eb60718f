"""``scalelab reproduce``, ``scalelab runs`` and ``scalelab diff``: runs read by their provenance.

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
import contextlib
import json
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

from scalelab import provenance
from scalelab.errors import CheckFailed, UsageError

#: Metrics compared between a run and its reproduction (summary.json).
RESULT_FIELDS = ("global_steps", "train_loss", "train_acc", "val_loss", "val_acc")
#: Stated GPU tolerances (and for runs not in deterministic mode): torch.allclose.
GPU_RTOL, GPU_ATOL = 1e-4, 1e-6


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="rerun a finished run from its provenance and compare",
                       description=__doc__.split("\n\n")[1].replace("\n", " "),
                       epilog=__doc__.split("\n\n")[2].replace("\n", " "))
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="finished run (provenance.json)")
    p.add_argument("--out", type=Path, metavar="NEW_RUN_DIR",
                   help="where the rerun writes (default: reproduce/<run name> in the cwd)")
    p.add_argument("--data", metavar="DIR",
                   help="staged dataset at another path (its manifest hash must still match)")
    p.add_argument("--force", action="store_true",
                   help="rerun even where must-match fields differ (they are still listed)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the must-match fields, print the command, start nothing")
    p.add_argument("--compare-only", type=Path, metavar="OTHER_RUN_DIR",
                   help="compare RUN_DIR's results with an existing rerun, start nothing")
    p.set_defaults(func=cmd_reproduce)

    r = sub.add_parser("runs", help="table of run directories with key figures and provenance ids")
    r.add_argument("dirs", nargs="*", type=Path, metavar="DIR",
                   help="run directories or folders holding them (default: results/runs, or .)")
    r.add_argument("--json", action="store_true", help="print the rows as JSON")
    r.set_defaults(func=cmd_runs)

    d = sub.add_parser("diff", help="what differs between two runs: config, environment, "
                                    "hardware, results")
    d.add_argument("run_a", type=Path, metavar="RUN_A")
    d.add_argument("run_b", type=Path, metavar="RUN_B")
    d.add_argument("--all", action="store_true",
                   help="also incidental fields (hosts, times, job ids, launcher command)")
    d.add_argument("--json", action="store_true", help="print the differences as JSON")
    d.set_defaults(func=cmd_diff)


# ----------------------------------------------------------------------------- reproduce

def _launcher_argv(launcher: str, world: int, nodes: int, per_node: int,
                   recorded: list[str] | None) -> list[str]:
    """The command that starts ``world`` ranks the way the recorded run was started."""
    from scalelab.tools import mpirun_argv, which

    py = sys.executable
    if launcher == "single":
        return []
    if nodes > 1 and launcher != "slurm":
        # Several nodes (e.g. Open MPI ranks started by srun --mpi=pmix): srun again.
        launcher = "slurm"
    if launcher == "openmpi":
        return mpirun_argv(world, world, "launcher openmpi: mpirun not found (run ./setup.sh)")
    if launcher == "torchrun":
        return [py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    if launcher == "horovodrun":
        return [which("horovodrun") or "horovodrun", "-np", str(world)]
    if launcher == "slurm":
        if not os.environ.get("SLURM_JOB_ID"):
            raise UsageError(f"launcher slurm: the run used srun on {nodes} node(s); rerun "
                             f"inside an allocation of the same shape (salloc -N {nodes} "
                             f"--ntasks-per-node {per_node} scalelab reproduce ...)")
        mpi = next((a for a in recorded or [] if a.startswith("--mpi=")), "--mpi=pmix")
        return [which("srun") or "srun", mpi, f"--nodes={nodes}", f"--ntasks={world}",
                f"--ntasks-per-node={per_node}", "--kill-on-bad-exit=1"]
    raise UsageError(f"launcher {launcher}: reproduce does not know how to start it")


def _rerun_layout(must: dict[str, Any]) -> dict[str, Any]:
    """The launcher and layout the rerun will have: the recorded ones (a local rerun of a
    Slurm run keeps the node count only inside an allocation)."""
    nodes = must["nodes"]
    if must["launcher"] == "slurm" and os.environ.get("SLURM_JOB_NUM_NODES"):
        nodes = int(os.environ["SLURM_JOB_NUM_NODES"])
    return {"launcher": must["launcher"], "world_size": must["world_size"], "nodes": nodes,
            "tasks_per_node": must["tasks_per_node"]}


def current_must_match(manifest: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The must-match fields as the rerun would record them, computed before it starts."""
    from scalelab.train.config import from_dict

    cfg = from_dict(config)
    lock = provenance.lock_state()
    return {
        "versions": provenance.versions(),
        "lock_sha256": lock["sha256"] if lock else None,
        # reproduce reruns on the host: a run made inside an image differs here (listed).
        "image_sha256": None,
        "config_sha256": provenance.config_sha256(cfg.to_dict()),
        "data_sha256": provenance.dataset_hash(cfg)["sha256"],
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
        layout = json.loads((run_dir / "run_info.json").read_text())["layout"]
        world, local = int(layout["world_size"]), int(layout["local_world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {"launcher": layout.get("launcher"), "world_size": world,
            "nodes": max(1, world // max(1, local)), "tasks_per_node": local}


def layout_differences(must: dict[str, Any], run_dir: Path, what: str) -> list[str]:
    """Layout fields that provenance.json claims and the run in ``run_dir`` did not have."""
    ran = ran_layout(run_dir)
    if ran is None:
        return [f"layout: {run_dir}/run_info.json is missing or unreadable ({what})"]
    return [f"{key}: {must.get(key)!r} (recorded) != {ran[key]!r} ({what})"
            for key in LAYOUT_FIELDS if must.get(key) != ran[key]]


def config_differences(manifest: dict[str, Any], run_dir: Path, now_sha: str) -> list[str]:
    """The keys where provenance.json's config differs from the config the run wrote
    (config.yaml), when its hash no longer matches: the line names the key, not only
    config_sha256. Where the files are consistent (or config.yaml is gone): none."""
    import yaml

    if now_sha == manifest["must_match"].get("config_sha256"):
        return []
    try:
        ran = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return []
    ident = [json.loads(json.dumps(c if isinstance(c, dict) else {})) for c in
             (ran, manifest["config"])]
    for c in ident:  # where data lies is not part of the config's identity
        for key in ("path", "scratch"):
            (c.get("data") if isinstance(c.get("data"), dict) else {}).pop(key, None)
    a, b = (provenance.flatten(c) for c in ident)
    return [f"config.{k}: {a.get(k)!r} (the run's config.yaml) != {b.get(k)!r} "
            "(provenance.json)" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def compare_results(a: Path, b: Path, exact: bool) -> dict[str, Any]:
    """Final weights (every tensor) and summary metrics of two runs."""
    import torch

    wa = torch.load(a / "model.pt", weights_only=True, map_location="cpu")
    wb = torch.load(b / "model.pt", weights_only=True, map_location="cpu")
    tensors = []
    for name in sorted(set(wa) | set(wb)):
        ta, tb = wa.get(name), wb.get(name)
        if ta is None or tb is None:
            tensors.append({"tensor": name, "equal": False, "why": "missing in one run"})
            continue
        same_shape = ta.shape == tb.shape and ta.dtype == tb.dtype
        equal = same_shape and (torch.equal(ta, tb) if exact else bool(
            torch.allclose(ta.double(), tb.double(), rtol=GPU_RTOL, atol=GPU_ATOL)))
        diff = float((ta.double() - tb.double()).abs().max()) if same_shape and ta.numel() else 0.0
        tensors.append({"tensor": name, "equal": bool(equal), "max_abs_diff": diff})
    sa = json.loads((a / "summary.json").read_text())
    sb = json.loads((b / "summary.json").read_text())
    metrics = []
    for key in RESULT_FIELDS:
        va, vb = sa.get(key), sb.get(key)
        if exact or not isinstance(va, float) or not isinstance(vb, float):
            equal = va == vb
        else:
            equal = abs(va - vb) <= GPU_ATOL + GPU_RTOL * abs(vb)
        metrics.append({"metric": key, "run": va, "rerun": vb, "equal": equal})
    return {"mode": "bitwise" if exact else f"allclose(rtol={GPU_RTOL}, atol={GPU_ATOL})",
            "weights_equal": all(t["equal"] for t in tensors), "tensors": tensors,
            "metrics_equal": all(m["equal"] for m in metrics), "metrics": metrics}


def _finished(run_dir: Path) -> None:
    for name in ("summary.json", "model.pt"):
        if not (run_dir / name).is_file():
            raise UsageError(f"{run_dir}: not a finished run ({name} missing)")


def cmd_reproduce(args: argparse.Namespace) -> int:
    from scalelab.fsio import atomic_write_json, check_target

    manifest = provenance.load(args.run_dir)
    provenance.validate(manifest, str(args.run_dir / provenance.FILE))
    _finished(args.run_dir)
    must = manifest["must_match"]
    exact = must["deterministic"] and must["device"] != "cuda" and not _used_cuda(args.run_dir)
    if args.compare_only:
        _finished(args.compare_only)
        return _report(args.run_dir, args.compare_only, compare_results(
            args.run_dir, args.compare_only, exact), [])

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
        raise UsageError(f"{args.run_dir}: its dataset {data_path} is gone; pass --data DIR "
                         "(a copy with the same manifest)")
    now = current_must_match(manifest, config)
    differences = (config_differences(manifest, args.run_dir, now["config_sha256"])
                   + layout_differences(must, args.run_dir, "the run's run_info.json")
                   + provenance.must_match_differences(must, now))
    for line in differences:
        print(f"scalelab reproduce: must-match field differs: {line}", file=sys.stderr)
    if differences and not args.force:
        raise CheckFailed(f"{args.run_dir}: {len(differences)} must-match field(s) differ from "
                         f"this environment (listed above; first: {differences[0]}); "
                         "rerun with --force to go ahead anyway")
    if must.get("image_sha256"):
        print(f"scalelab reproduce: warning: the run used image {must['image_sha256'][:16]}...; "
              "this rerun runs on the host", file=sys.stderr)

    out = (args.out or Path("reproduce") / args.run_dir.resolve().name).absolute()
    if out.resolve() == args.run_dir.resolve():
        raise UsageError("--out: must differ from RUN_DIR (the run is the reference)")
    check_target(out, "run", inputs=[args.run_dir])
    layout = _rerun_layout(must)
    recorded = manifest["incidental"].get("launcher_argv")
    run_yaml = out / "run.yaml"
    per_rank = [sys.executable, "-m", "scalelab", "train", "--config", str(run_yaml),
                "--out", str(out)]
    prefix = _launcher_argv(layout["launcher"], layout["world_size"], layout["nodes"],
                            layout["tasks_per_node"], recorded)
    argv = prefix + (per_rank[2:] if prefix[1:3] == ["-m", "torch.distributed.run"]
                     else per_rank)
    print("scalelab reproduce:", " ".join(argv), flush=True)
    if args.dry_run:
        return 0
    code = _start(argv, out, run_yaml, config, manifest, [args.run_dir])
    if code != 0:
        raise CheckFailed(f"the rerun in {out} failed (exit {code}); see its output above")
    ran = layout_differences(must, out, "the rerun")
    if ran and not args.force:
        raise CheckFailed(f"{out}: the rerun did not run at the recorded layout: {ran[0]}")
    result = compare_results(args.run_dir, out, exact)
    atomic_write_json(out / "reproduce.json", {
        "of": str(args.run_dir.resolve()), "provenance_id": manifest["provenance_id"],
        "forced_differences": differences, **result})
    return _report(args.run_dir, out, result, differences)


def _used_cuda(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("device", "").startswith(
            "cuda")
    except (OSError, ValueError, AttributeError):
        return False


def _start(argv: list[str], out: Path, run_yaml: Path, config: dict[str, Any],
           manifest: dict[str, Any], inputs: list[Path]) -> int:
    """Run the rerun into ``out`` under fsio.guard: an earlier rerun there is replaced
    (it holds only what scalelab wrote); anything else was refused before."""
    import yaml

    from scalelab import supervise
    from scalelab.fsio import atomic_write_text, guard, write_marker
    from scalelab.launcher import rank_env
    from scalelab.train.cli import LOCK_ENV, RUN_FILES

    token = secrets.token_hex(8)
    threads = manifest["incidental"].get("env", {}).get("OMP_NUM_THREADS") or str(
        (config.get("train") or {}).get("threads") or 1)
    with guard(out, "run", inputs, token=token):
        if (out / "summary.json").exists():
            shutil.rmtree(out)  # a finished earlier rerun: this one starts afresh
        out.mkdir(parents=True, exist_ok=True)
        write_marker(out, "run", RUN_FILES)
        atomic_write_text(run_yaml, yaml.safe_dump(config, sort_keys=False))
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
    print(f"  weights: {len(result['tensors']) - len(bad)}/{len(result['tensors'])} tensors "
          f"{'identical' if result['mode'] == 'bitwise' else 'within tolerance'}")
    for t in bad[:10]:
        print(f"    {t['tensor']}: max |diff| {t.get('max_abs_diff')}")
    if forced:
        print(f"  forced past {len(forced)} must-match difference(s)")
    if not (result["weights_equal"] and result["metrics_equal"]):
        raise CheckFailed(f"{b} does not reproduce {a}: "
                          f"{len(bad)} tensor(s), "
                          f"{sum(not m['equal'] for m in result['metrics'])} metric(s) differ")
    print("scalelab reproduce: reproduced")
    return 0


# ----------------------------------------------------------------------------- runs

def find_runs(dirs: list[Path]) -> list[Path]:
    """Run directories (holding provenance.json) at or under each of ``dirs``."""
    if not dirs:
        dirs = [Path("results/runs")] if Path("results/runs").is_dir() else [Path(".")]
    found: list[Path] = []
    for d in dirs:
        if not d.exists():
            raise UsageError(f"{d}: no such directory")
        if (d / provenance.FILE).is_file():
            found.append(d)
        else:
            found.extend(sorted(p.parent for p in d.rglob(provenance.FILE)))
    return found


def run_row(run_dir: Path) -> dict[str, Any]:
    """One row of `scalelab runs`: key figures and provenance ids."""
    m = provenance.load(run_dir)
    must, inc = m["must_match"], m["incidental"]
    summary: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        summary = json.loads((run_dir / "summary.json").read_text())
    git = inc.get("git") or {}
    return {
        "run": str(run_dir), "provenance_id": m["provenance_id"],
        "status": summary.get("status", "incomplete"),
        "backend": summary.get("backend", must["backend"]), "launcher": must["launcher"],
        "world_size": must["world_size"], "nodes": must["nodes"],
        "train_loss": summary.get("train_loss"), "val_acc": summary.get("val_acc"),
        "samples_per_s": summary.get("samples_per_s"),
        "torch": must["versions"]["torch"],
        "git": (git.get("commit", "")[:10] + ("+dirty" if git.get("dirty") else "")) or None,
        "config_sha256": must["config_sha256"], "data_sha256": must["data_sha256"],
        "lock_sha256": must["lock_sha256"], "image_sha256": must["image_sha256"],
        "started_at": inc.get("started_at"),
    }


def cmd_runs(args: argparse.Namespace) -> int:
    rows = [run_row(d) for d in find_runs(args.dirs)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("scalelab runs: no run directories with provenance.json found")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(rows)} run(s)")
    cols = [("run", "run"), ("provenance_id", "prov id"), ("status", "status"),
            ("backend", "backend"), ("world_size", "ranks"), ("nodes", "nodes"),
            ("train_loss", "train loss"), ("val_acc", "val acc"), ("samples_per_s", "samples/s"),
            ("torch", "torch"), ("git", "git"), ("config_sha256", "config"),
            ("data_sha256", "data"), ("started_at", "started")]
    for _, title in cols:
        table.add_column(title, overflow="fold")
    for r in rows:
        table.add_row(*[_cell(key, r[key]) for key, _ in cols])
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    return 0


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.endswith("sha256"):
        return str(value)[:10]
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ----------------------------------------------------------------------------- diff

def run_diff(a: Path, b: Path, incidental: bool = False) -> dict[str, list[dict[str, Any]]]:
    """{section: [{field, a, b}]} for config, environment, hardware, results (+ incidental)."""
    ma, mb = provenance.load(a), provenance.load(b)

    def section(x: Any, y: Any) -> list[dict[str, Any]]:
        fx, fy = provenance.flatten(x or {}), provenance.flatten(y or {})
        return [{"field": k, "a": fx.get(k), "b": fy.get(k)}
                for k in sorted(set(fx) | set(fy)) if fx.get(k) != fy.get(k)]

    def summary(d: Path) -> dict[str, Any]:
        try:
            s = json.loads((d / "summary.json").read_text())
        except (OSError, ValueError):
            return {}
        return {k: s.get(k) for k in (*RESULT_FIELDS, "samples_per_s", "time_s", "status")}

    out = {
        "config": section(ma["config"], mb["config"]),
        "environment": section(ma["must_match"], mb["must_match"]),
        "hardware": section(ma["incidental"].get("hardware"), mb["incidental"].get("hardware")),
        "env_vars": section(ma["incidental"].get("env"), mb["incidental"].get("env")),
        "results": section(summary(a), summary(b)),
    }
    if (a / "model.pt").is_file() and (b / "model.pt").is_file():
        w = compare_results(a, b, exact=True) if (a / "summary.json").is_file() and (
            b / "summary.json").is_file() else None
        if w and not w["weights_equal"]:
            worst = max(w["tensors"], key=lambda t: t.get("max_abs_diff") or 0)
            out["results"].append({"field": "model.pt", "a": "weights",
                                   "b": f"differ (max |diff| {worst.get('max_abs_diff')})"})
    if incidental:
        keep = {k: v for k, v in ma["incidental"].items() if k not in ("hardware", "env")}
        other = {k: v for k, v in mb["incidental"].items() if k not in ("hardware", "env")}
        out["incidental"] = section(keep, other)
    return out


def cmd_diff(args: argparse.Namespace) -> int:
    diff = run_diff(args.run_a, args.run_b, args.all)
    if args.json:
        print(json.dumps(diff, indent=2, default=str))
        return 0
    total = sum(len(v) for v in diff.values())
    print(f"scalelab diff: {args.run_a} (a) vs {args.run_b} (b): {total} difference(s)")
    for name, rows in diff.items():
        print(f"{name}: {'no difference' if not rows else ''}")
        for r in rows:
            print(f"  {r['field']}: {_short(r['a'])} -> {_short(r['b'])}")
    return 0


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 70 else text[:67] + "..."
