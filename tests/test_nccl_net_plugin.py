"""container.nccl_net_plugin: a site's NCCL network plugin bound into the image.

The plugin here is a STAND-IN: a tiny shared library built by the test (gcc) under the
name NCCL opens, ``libnccl-net-<name>.so``, linked against a stand-in ``libfabric.so.1``
in a second directory (as aws-ofi-nccl links the site's libfabric). It is bound by the
option into the real CPU image (tests/container_image.py; built or found cached) and
loaded by name with ctypes inside a real `apptainer exec`: that is what NCCL's plugin
loader does (dlopen of libnccl-net-<name>.so). NCCL itself cannot load it without a GPU.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import run
from container_image import require_apptainer, session_image

from scalelab.container.config import ContainerConfig
from scalelab.container.nccl_net import CONTAINER_DIR
from scalelab.container.wiring import job_container
from scalelab.errors import UsageError

pytestmark = pytest.mark.timeout(2400)  # may wait for the CPU image's build

FABRIC_C = "int fi_standin_version(void) { return 1022; }\n"
PLUGIN_C = """
extern int fi_standin_version(void);
/* NCCL looks a plugin up by versioned symbols such as ncclNetPlugin_v8; a stand-in's
   answer is the version of the libfabric it was linked against. */
int ncclNetPlugin_standin(void) { return fi_standin_version(); }
"""


def build_standin(tmp: Path, name: str) -> tuple[Path, Path]:
    """(plugin dir with libnccl-net-<name>.so, libfabric dir with libfabric.so.1)."""
    gcc = shutil.which("gcc") or pytest.fail("gcc is part of this test environment")
    plugin, fabric = tmp / "plugin", tmp / "fabric"
    plugin.mkdir()
    fabric.mkdir()
    (tmp / "fabric.c").write_text(FABRIC_C)
    (tmp / "plugin.c").write_text(PLUGIN_C)
    subprocess.run(
        [
            gcc,
            "-shared",
            "-fPIC",
            "-Wl,-soname,libfabric.so.1",
            "-o",
            str(fabric / "libfabric.so.1"),
            str(tmp / "fabric.c"),
        ],
        check=True,
    )
    # Linked by soname, no RUNPATH: the loader must find libfabric on the library path.
    subprocess.run(
        [
            gcc,
            "-shared",
            "-fPIC",
            "-o",
            str(plugin / f"libnccl-net-{name}.so"),
            str(tmp / "plugin.c"),
            str(fabric / "libfabric.so.1"),
        ],
        check=True,
    )
    needed = subprocess.run(
        ["readelf", "-d", str(plugin / f"libnccl-net-{name}.so")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "[libfabric.so.1]" in needed and "RUNPATH" not in needed and "RPATH" not in needed
    return plugin, fabric


PROBE = """
import ctypes, json, os, sys
try:
    lib = ctypes.CDLL(sys.argv[1])
    answer = lib.ncclNetPlugin_standin()
except OSError as exc:
    answer = str(exc)
maps = [l.split()[-1] for l in open('/proc/self/maps') if 'libfabric' in l or 'nccl-net' in l]
print(json.dumps({"answer": answer, "plugin_env": os.environ.get("NCCL_NET_PLUGIN"),
                  "ld": os.environ.get("LD_LIBRARY_PATH", ""), "maps": sorted(set(maps))}))
"""


def probe(image: Path, cfg: dict, library: str) -> dict:
    argv, _ = job_container({"image": str(image), "nv": False, **cfg})
    proc = run([*argv, "python", "-c", PROBE, library], timeout=300)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_plugin_is_bound_and_loads_by_name_in_the_real_image(tmp_path):
    require_apptainer()
    image = session_image()["path"]
    plugin, fabric = build_standin(tmp_path, "standin")
    library = "libnccl-net-standin.so"
    without = probe(image, {}, library)
    assert "cannot open shared object file" in str(without["answer"]), without
    assert without["plugin_env"] is None
    cfg = {"nccl_net_plugin": {"dir": str(plugin), "name": "standin", "lib_dirs": [str(fabric)]}}
    got = probe(image, cfg, library)
    assert got["answer"] == 1022, got  # the plugin loaded, and its libfabric resolved
    assert got["plugin_env"] == "standin"
    assert got["maps"] == [f"{CONTAINER_DIR}-lib0/libfabric.so.1", f"{CONTAINER_DIR}/{library}"], (
        got
    )
    # In front of the image's own library path, which stays (the CPU image's Horovod
    # needs /opt/venv/lib on it).
    assert got["ld"].startswith(f"{CONTAINER_DIR}:{CONTAINER_DIR}-lib0:"), got
    assert "/opt/venv/lib" in got["ld"].split(":"), got


def test_plugin_config_becomes_binds_and_env():
    cfg = ContainerConfig.from_mapping(
        {
            "image": "/shared/scalelab-gpu.sif",
            "binds": ["/data"],
            "env": {"NCCL_DEBUG": "INFO"},
            "nccl_net_plugin": {
                "dir": "/opt/aws-ofi-nccl/lib/",
                "name": "ofi",
                "lib_dirs": ["/opt/cray/libfabric/lib64"],
            },
        }
    )
    assert cfg.bind_specs == [
        "/data",
        f"/opt/aws-ofi-nccl/lib:{CONTAINER_DIR}:ro",
        f"/opt/cray/libfabric/lib64:{CONTAINER_DIR}-lib0:ro",
    ]
    assert cfg.env_pairs == (
        ("NCCL_DEBUG", "INFO"),
        ("NCCL_NET_PLUGIN", "ofi"),
        (
            "LD_LIBRARY_PATH",
            f"{CONTAINER_DIR}:{CONTAINER_DIR}-lib0${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}",
        ),
    )
    plain = ContainerConfig.from_mapping({"image": "/x.sif", "nccl_net_plugin": None})
    assert plain.nccl_net_plugin is None and plain.env_pairs == () and plain.bind_specs == []


@pytest.mark.parametrize(
    "plugin, message",
    [
        ({"name": "ofi"}, "container.nccl_net_plugin.dir: give the absolute host directory"),
        ({"dir": "lib", "name": "ofi"}, "container.nccl_net_plugin.dir: give the absolute"),
        ({"dir": "/opt/ofi"}, "container.nccl_net_plugin.name: give the plugin's name"),
        ({"dir": "/opt/ofi", "name": "../x"}, "container.nccl_net_plugin.name:"),
        (
            {"dir": "/opt/ofi", "name": "ofi", "lib_dirs": "/x"},
            "container.nccl_net_plugin.lib_dirs:",
        ),
        (
            {"dir": "/opt/ofi", "name": "ofi", "path": "/x"},
            "container.nccl_net_plugin.path: unknown key",
        ),
        ({"dir": "/opt/o:fi", "name": "ofi"}, "may not hold ':'"),
        ("/opt/ofi", "container.nccl_net_plugin: must be a mapping"),
    ],
)
def test_plugin_config_errors_name_the_field(plugin, message):
    with pytest.raises(UsageError) as err:
        ContainerConfig.from_mapping({"image": "/x.sif", "nccl_net_plugin": plugin})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_plugin_and_env_may_not_both_set_its_variables():
    with pytest.raises(UsageError, match=r"^container\.env\.NCCL_NET_PLUGIN: set by "):
        ContainerConfig.from_mapping(
            {
                "image": "/x.sif",
                "env": {"NCCL_NET_PLUGIN": "ib"},
                "nccl_net_plugin": {"dir": "/o", "name": "ofi"},
            }
        )
