"""`scalelab testcluster up|status|down|env`: the multi-node Slurm test cluster."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scalelab.testcluster.cluster import TestCluster
from scalelab.testcluster.spec import DEFAULT_STATE_DIR, ClusterError, ClusterSpec


def _cluster(args: argparse.Namespace):

    spec = ClusterSpec.from_env(
        nodes=args.nodes,
        cpus_per_node=args.cpus_per_node,
        gpus_per_node=args.gpus_per_node,
        state_dir=args.state_dir,
        shared=[p.resolve() for p in args.share],
    )
    return TestCluster(spec)


def cmd_testcluster(args: argparse.Namespace) -> int:

    cluster = _cluster(args)
    try:
        if args.action == "up":
            cluster.up(timeout=args.timeout)
        elif args.action == "down":
            cluster.down()
        elif args.action == "env":
            print(f"export SLURM_CONF={cluster.conf}")
        else:
            status = cluster.status()
            print(
                json.dumps({"ok": status["up"], **status}, indent=2)
                if args.json
                else format_status(status)
            )
            return 0 if status["up"] else 1
    except ClusterError as exc:
        print(f"scalelab testcluster {args.action}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def format_status(status: dict) -> str:
    """`testcluster status` for a person: the verdict, then one line per daemon and node."""
    lines = [
        f"test cluster: {'up' if status['up'] else 'not up'}"
        + (f" (SLURM_CONF={status['conf']})" if status.get("conf") else "")
    ]
    for name, daemon in sorted(status.get("daemons", {}).items()):
        state = "running" if daemon["alive"] else "NOT RUNNING"
        lines.append(f"  {name:<12} pid {daemon['pid']}: {state}")
    for name, state in sorted(status.get("nodes", {}).items()):
        lines.append(f"  node {name:<7} {state}")
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:

    p = sub.add_parser(
        "testcluster",
        help="a real multi-node Slurm cluster in network namespaces (root)",
        description=(
            "Start munge, slurmctld and N slurmd nodes on this machine, each node in its own "
            "network namespace with its own address, hostname and private /tmp. Needs root and "
            "the Debian packages slurm-wlm munge libpmix2 libpmix-dev iproute2. Clients use it "
            'through SLURM_CONF (eval "$(scalelab testcluster env)").'
        ),
    )
    p.add_argument("action", choices=["up", "status", "down", "env"])
    p.add_argument("--nodes", type=int, default=2, help="number of nodes (default 2)")
    p.add_argument("--cpus-per-node", type=int, default=2, help="CPUs declared per node")
    p.add_argument(
        "--gpus-per-node",
        type=int,
        default=2,
        help="count-only GPUs per node (GRES without devices; 0: none)",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"configuration, logs, spool and node /tmp dirs (default {DEFAULT_STATE_DIR})",
    )
    p.add_argument(
        "--share",
        type=Path,
        action="append",
        default=[Path.cwd()],
        help="path every node must see (default: the current directory); repeatable",
    )
    p.add_argument("--timeout", type=float, default=90, help="seconds to wait for the daemons")
    p.add_argument(
        "--json", action="store_true", help="status: print the state as one JSON document on stdout"
    )
    p.set_defaults(func=cmd_testcluster)
