"""A real multi-node Slurm cluster on one machine, for tests and demos.

Layout (defaults): a Linux bridge ``slbr0`` with the controller address
10.201.0.1; one network namespace per node (``sl-n1``, ``sl-n2``, ...) joined
to the bridge by a veth pair, with addresses 10.201.0.11, .12, ...; munged
and slurmctld on the host; one slurmd per node, each in its own mount and
UTS namespace with its own hostname, hosts file and private /tmp
(see :mod:`scalelab.testcluster.nodeinit`).

Everything the cluster makes is recorded in ``STATE_DIR/cluster.json`` as it
is made, so ``down`` removes exactly that (processes by pid and by network
namespace, namespaces, veths, bridge, the state directory) even after a
half-finished ``up``. Clients talk to it through ``SLURM_CONF`` (see
:meth:`TestCluster.env`); munged runs on a socket of its own, so the cluster
never touches the machine's own Slurm or munge set-up.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from scalelab.fsio import atomic_write_text
from scalelab.testcluster.procs import _alive, _pids_in_netns, _run, _tail, _terminate
from scalelab.testcluster.spec import ClusterError, ClusterSpec, missing_requirements


class TestCluster:
    """Bring the cluster up, report on it, tear it down."""

    __test__ = False  # not a pytest test class

    def __init__(self, spec: ClusterSpec | None = None) -> None:
        self.spec = spec or ClusterSpec()
        self.dir = Path(self.spec.state_dir)
        self.state_file = self.dir / "cluster.json"
        self.conf = self.dir / "etc" / "slurm" / "slurm.conf"
        self.state: dict = {}

    # ---- state -------------------------------------------------------------------------
    def _load(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def _save(self) -> None:
        atomic_write_text(self.state_file, json.dumps(self.state, indent=2, default=str))

    def _record(self, kind: str, value) -> None:
        self.state.setdefault(kind, [])
        if value not in self.state[kind]:
            self.state[kind].append(value)
        self._save()

    @property
    def shared_dir(self) -> Path:
        """A directory every node sees: put job data here."""
        return self.dir / "shared"

    def env(self, base: dict | None = None) -> dict[str, str]:
        """Environment for Slurm clients talking to this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    # ---- up --------------------------------------------------------------------------
    def is_up(self) -> bool:
        state = self._load()
        pids = state.get("pids", {})
        if not state or not all(_alive(pids.get(k)) for k in ("munged", "slurmctld")):
            return False
        if not all(_alive(pids.get(f"slurmd-{n}")) for n in self.spec.node_names()):
            return False
        return self._nodes_ready()

    def up(self, timeout: float = 90) -> None:
        """Start the cluster; a healthy running cluster is left as it is."""
        problems = missing_requirements()
        if problems:
            raise ClusterError("cannot start the test cluster: " + "; ".join(problems))
        if self.is_up():
            print(f"test cluster already up ({self.conf})")
            return
        if self.state_file.exists():
            self.down(quiet=True)
        try:
            self._make_dirs()
            self.state = {
                "spec": {
                    k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.spec).items()
                },
                "pids": {},
            }
            self.state["spec"]["shared"] = [str(p) for p in self.spec.shared]
            self._save()
            self._make_network()
            self._write_config()
            self._start_munged()
            self._start_slurmctld(timeout)
            self._start_slurmds()
            self._wait_nodes(timeout)
        except BaseException:
            self.down(quiet=True, keep_logs=True)
            raise
        print(f"test cluster up: {self.spec.nodes} nodes; export SLURM_CONF={self.conf}")

    def _make_dirs(self) -> None:
        for sub in ("etc/slurm", "log", "run", "ctld", "shared"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        for node in self.spec.node_names():
            for sub in ("spool", "tmp"):
                (self.dir / "nodes" / node / sub).mkdir(parents=True, exist_ok=True)
            (self.dir / "nodes" / node / "tmp").chmod(0o1777)
        self.shared_dir.chmod(0o1777)

    def _make_network(self) -> None:
        s = self.spec
        _run(["ip", "link", "add", s.bridge, "type", "bridge"])
        self._record("links", s.bridge)
        _run(["ip", "addr", "add", f"{s.host_addr}/24", "dev", s.bridge])
        _run(["ip", "link", "set", s.bridge, "up"])
        for i, node in enumerate(s.node_names(), start=1):
            ns, veth, peer = s.netns(node), s.veth(i), f"{s.prefix}p{i}"
            _run(["ip", "netns", "add", ns])
            self._record("netns", ns)
            _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", peer])
            self._record("links", veth)
            _run(["ip", "link", "set", peer, "netns", ns])
            _run(["ip", "-n", ns, "link", "set", peer, "name", "eth0"])
            _run(["ip", "-n", ns, "addr", "add", f"{s.node_addr(i)}/24", "dev", "eth0"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "link", "set", veth, "master", s.bridge])
            _run(["ip", "link", "set", veth, "up"])

    def _write_config(self) -> None:
        s, d = self.spec, self.dir
        ctl_host = socket.gethostname().split(".")[0]
        hosts = ["127.0.0.1 localhost", f"{s.host_addr} {ctl_host}-ctl"]
        hosts += [f"{s.node_addr(i)} {n}" for i, n in enumerate(s.node_names(), start=1)]
        (d / "etc" / "hosts").write_text("\n".join(hosts) + "\n")
        key = d / "etc" / "munge.key"
        if not key.exists():
            _run(["mungekey", "--create", f"--keyfile={key}"])
        key.chmod(0o600)
        nodes = [
            f"NodeName={n} NodeHostname={n} NodeAddr={s.node_addr(i)} CPUs={s.cpus_per_node} "
            f"RealMemory={s.mem_mb_per_node} Features=scalelab"
            + (f" Gres=gpu:{s.gpus_per_node}" if s.gpus_per_node else "")
            + " State=UNKNOWN"
            for i, n in enumerate(s.node_names(), start=1)
        ]
        atomic_write_text(self.conf.parent / "gres.conf", self._gres_conf())
        conf = f"""# Written by scalelab testcluster; removed by `scalelab testcluster down`.
ClusterName=scalelab{s.prefix}
SlurmctldHost={ctl_host}({s.host_addr})
SlurmctldPort={s.ctld_port}
SlurmdPort={s.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/run/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
GresTypes=gpu
# The nodes are namespaces of one machine: trust the configured CPUs/memory.
SlurmdParameters=config_overrides
ReturnToService=2
# The snakemake slurm plugin polls squeue (no accounting here): keep finished jobs visible
# for an hour, so the jobs of a long workflow are still listed when it ends.
MinJobAge=3600
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
StateSaveLocation={d}/ctld
SlurmdSpoolDir={d}/nodes/%n/spool
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
TmpFS=/tmp
{chr(10).join(nodes)}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
        atomic_write_text(self.conf, conf)

    def _gres_conf(self) -> str:
        """GPUs that are a stand-in: Slurm 22.05 drops GPUs without File= ("Removing
        file-less GPU"), so each is a character device that is /dev/null (1:3), shared by
        the nodes like identical hardware. Jobs get real GRES scheduling and a real
        CUDA_VISIBLE_DEVICES; nothing can use the device as a GPU."""
        head = "# Written by scalelab testcluster. STAND-IN GPUs: null devices, not GPUs.\n"
        n = self.spec.gpus_per_node
        if not n:
            return head
        dev = self.dir / "gpudev"
        dev.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            path = dev / f"gpu{i}"
            if not path.exists():
                os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        return head + f"Name=gpu File={dev}/gpu[0-{n - 1}]\n"

    def _spawn(self, name: str, cmd: list[str], log: Path) -> int:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=self.env(),
            )
        self.state["pids"][name] = proc.pid
        self._save()
        return proc.pid

    def _start_munged(self) -> None:
        d = self.dir
        log = d / "log" / "munged.log"
        pid = self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={d}/run/munge.socket",
                f"--key-file={d}/etc/munge.key",
                f"--pid-file={d}/run/munged.pid",
                f"--seed-file={d}/run/munged.seed",
                f"--log-file={log}",
            ],
            d / "log" / "munged.out",
        )
        deadline = time.time() + 15
        while time.time() < deadline:
            if not _alive(pid):
                raise ClusterError(f"munged exited at start; last lines of {log}:\n{_tail(log)}")
            if (d / "run" / "munge.socket").exists():
                return
            time.sleep(0.2)
        raise ClusterError(f"munged did not open its socket; last lines of {log}:\n{_tail(log)}")

    def _start_slurmctld(self, timeout: float) -> None:
        log = self.dir / "log" / "slurmctld.log"
        pid = self._spawn(
            "slurmctld",
            ["slurmctld", "-D", "-i", "-f", str(self.conf)],
            self.dir / "log" / "slurmctld.out",
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not _alive(pid):
                raise ClusterError(
                    f"slurmctld exited at start; last lines of {log}:\n"
                    f"{_tail(log)}\n{_tail(self.dir / 'log' / 'slurmctld.out')}"
                )
            ping = _run(["scontrol", "ping"], check=False, env=self.env(), timeout=20)
            if ping.returncode == 0 and " UP" in ping.stdout:
                return
            time.sleep(0.5)
        raise ClusterError(
            f"slurmctld not answering after {timeout:.0f}s; last lines of {log}:\n{_tail(log)}"
        )

    def _start_slurmds(self) -> None:
        for node in self.spec.node_names():
            self._start_slurmd(node)

    def kill_node(self, node: str) -> list[int]:
        """Fail ``node`` as hardware would: SIGKILL its slurmd and every process in its
        network namespace (job steps, ranks) at once. Returns the pids killed."""
        pids = _pids_in_netns(self.spec.netns(node))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        return pids

    def restore_node(self, node: str, timeout: float = 120) -> None:
        """Start ``node``'s slurmd again after :meth:`kill_node` and return it to service."""
        self.state = self._load()
        # A node that comes back has a fresh node-local /tmp (tmpfs on real nodes): no
        # PMIx session dirs or scratch of the jobs that died with it.
        tmp = self.dir / "nodes" / node / "tmp"
        for entry in tmp.iterdir() if tmp.is_dir() else []:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        self._start_slurmd(node)
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self._node_states().get(node, "")
            if state in ("idle", "mixed", "allocated"):
                return
            if state in ("down", "drained", "draining", "idle*", "unknown"):
                _run(
                    ["scontrol", "update", f"nodename={node}", "state=resume"],
                    check=False,
                    env=self.env(),
                )
            time.sleep(1)
        raise ClusterError(
            f"{node} not back in service after {timeout:.0f}s "
            f"(state {self._node_states().get(node)})"
        )

    def _start_slurmd(self, node: str) -> None:
        s = self.spec
        cmd = [
            "unshare",
            "--mount",
            "--uts",
            "--propagation",
            "private",
            "--",
            "nsenter",
            f"--net=/run/netns/{s.netns(node)}",
            "--",
            sys.executable,
            "-m",
            "scalelab.testcluster.nodeinit",
            "--hostname",
            node,
            "--hosts-file",
            str(self.dir / "etc" / "hosts"),
            "--tmp-dir",
            str(self.dir / "nodes" / node / "tmp"),
            "--etc-slurm",
            str(self.conf.parent),
        ]
        for path in [*s.shared, self.dir]:
            cmd += ["--share", str(path)]
        cmd += ["--", "slurmd", "-D", "-f", str(self.conf), "-N", node]
        self._spawn(f"slurmd-{node}", cmd, self.dir / "log" / f"slurmd-{node}.out")

    def _node_states(self) -> dict[str, str]:
        out = _run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, env=self.env(), timeout=20)
        states = {}
        for line in out.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                states[parts[0]] = parts[1].rstrip("*~#!%$@^-")
        return states

    def _nodes_ready(self) -> bool:
        states = self._node_states()
        return all(
            states.get(n) in ("idle", "mixed", "allocated", "completing")
            for n in self.spec.node_names()
        )

    def _wait_nodes(self, timeout: float) -> None:
        deadline = time.time() + timeout
        resumed = False
        while time.time() < deadline:
            for node in self.spec.node_names():
                pid = self.state["pids"].get(f"slurmd-{node}")
                if not _alive(pid):
                    log = self.dir / "log" / f"slurmd-{node}.log"
                    raise ClusterError(
                        f"slurmd on {node} exited at start; last lines of {log}:\n{_tail(log)}\n"
                        f"{_tail(self.dir / 'log' / f'slurmd-{node}.out')}"
                    )
            if self._nodes_ready():
                return
            states = self._node_states()
            if not resumed and any(st in ("down", "drained", "draining") for st in states.values()):
                _run(
                    [
                        "scontrol",
                        "update",
                        f"nodename={','.join(self.spec.node_names())}",
                        "state=resume",
                    ],
                    check=False,
                    env=self.env(),
                )
                resumed = True
            time.sleep(0.5)
        logs = "\n".join(
            f"--- slurmd-{n}.log\n{_tail(self.dir / 'log' / f'slurmd-{n}.log')}"
            for n in self.spec.node_names()
        )
        raise ClusterError(
            f"nodes not ready after {timeout:.0f}s (states: {self._node_states()})\n{logs}"
        )

    # ---- status ------------------------------------------------------------------------
    def status(self) -> dict:
        state = self._load()
        if not state:
            return {"up": False, "daemons": {}, "nodes": {}}
        daemons = {k: {"pid": v, "alive": _alive(v)} for k, v in state.get("pids", {}).items()}
        nodes = self._node_states() if daemons.get("slurmctld", {}).get("alive") else {}
        return {
            "up": self.is_up(),
            "conf": str(self.conf),
            "daemons": daemons,
            "nodes": nodes,
            "netns": state.get("netns", []),
            "links": state.get("links", []),
        }

    # ---- down --------------------------------------------------------------------------
    def down(self, quiet: bool = False, keep_logs: bool = False) -> None:
        """Remove everything `up` made, in an order that lets daemons exit cleanly."""
        state = self.state if self.state else self._load()
        if not state and not self.dir.exists():
            if not quiet:
                print("test cluster not up")
            return
        pids = state.get("pids", {})
        if _alive(pids.get("slurmctld")):
            jobs = _run(["squeue", "-h", "-o", "%i"], check=False, env=self.env(), timeout=20)
            ids = jobs.stdout.split()
            if ids:
                _run(["scancel", *ids], check=False, env=self.env(), timeout=20)
        # Nodes first: slurmd and every process still in a node's network namespace
        # (slurmstepd and job steps can outlive slurmd).
        node_pids = [pids[k] for k in pids if k.startswith("slurmd-")]
        for ns in state.get("netns", []):
            node_pids += _pids_in_netns(ns)
        _terminate(node_pids)
        _terminate([pids.get("slurmctld")])
        _terminate([pids.get("munged")])
        for ns in state.get("netns", []):
            _run(["ip", "netns", "delete", ns], check=False)
        for link in reversed(state.get("links", [])):
            if Path(f"/sys/class/net/{link}").exists():
                _run(["ip", "link", "delete", link], check=False)
        if keep_logs:
            for sub in ("etc", "run", "ctld", "nodes", "shared"):
                shutil.rmtree(self.dir / sub, ignore_errors=True)
            self.state_file.unlink(missing_ok=True)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.state = {}
        if not quiet:
            print("test cluster down")
