"""Turn the current process into a test-cluster node, then exec a daemon.

Run inside fresh mount and UTS namespaces (``unshare --mount --uts
--propagation private``) and the node's network namespace (``nsenter --net``).
It gives the node what a real compute node has:

* its own hostname, resolvable on every node through a cluster hosts file
  bind-mounted on /etc/hosts (gloo rendezvous hangs without resolvable names);
* a private /tmp (node-local scratch; PMIx step directories must not collide);
* the cluster's slurm.conf at /etc/slurm, where jobs look for it;
* the shared paths (project, venv, data) still visible at their own paths,
  even when they live under /tmp, as on a shared filesystem.

Every mount is a plain argument-list call to mount(8); nothing goes through a shell.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
from pathlib import Path


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def prepare_node(
    hostname: str,
    hosts_file: Path,
    tmp_dir: Path,
    shared: list[Path],
    etc_slurm: Path | None = None,
) -> None:
    socket.sethostname(hostname)
    _mount("--bind", str(hosts_file), "/etc/hosts")
    if etc_slurm:
        # Jobs find the configuration where a compute node keeps it: Snakemake's job
        # step strips SLURM_* variables, SLURM_CONF included, before a rule's srun.
        _mount("--bind", str(etc_slurm), "/etc/slurm")
    # Shared paths under /tmp would vanish behind the private /tmp: mount them
    # into the node's tmp directory first, then move that whole tree onto /tmp.
    for path in shared:
        path = path.resolve()
        if path == Path("/tmp") or Path("/tmp") not in path.parents:
            continue
        target = tmp_dir / path.relative_to("/tmp")
        target.mkdir(parents=True, exist_ok=True)
        _mount("--rbind", str(path), str(target))
    _mount("--rbind", str(tmp_dir), "/tmp")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hostname", required=True)
    parser.add_argument("--hosts-file", type=Path, required=True)
    parser.add_argument("--tmp-dir", type=Path, required=True)
    parser.add_argument("--share", type=Path, action="append", default=[])
    parser.add_argument("--etc-slurm", type=Path, help="directory to mount on /etc/slurm")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- DAEMON ARGS...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to exec")
    prepare_node(args.hostname, args.hosts_file, args.tmp_dir, args.share, args.etc_slurm)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
