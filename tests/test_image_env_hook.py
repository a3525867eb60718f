"""The GPU image's environment clean-up runs under a Debian-packaged interpreter.

Debian's and Ubuntu's python3.11 ship /usr/lib/python3.11/sitecustomize.py (a link to
/etc/python3.11), which is first on sys.path: a venv's own sitecustomize.py is never
imported. The image therefore installs its clean-up as a `.pth` hook
(containers/gpu/scalelab_image_env.py + scalelab-image-env.pth). Checked here with this
machine's Debian interpreter, /usr/bin/python3.11, in a real `-m venv`, with the files
installed where the definitions install them: no PYTHONPATH, nothing imported by hand.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO
from test_gpu_image import GPU_DEF, body, devel_files

DEBIAN_PYTHON = Path("/usr/bin/python3.11")
#: Every definition that builds a GPU image installs the hook: the hpccm one, and the last
#: stage of the staged Debian build (containers/gpu/app.def).
DEFINITIONS = [GPU_DEF, REPO / "containers" / "gpu" / "app.def"]
#: app.def copies the hook files from the repository to /opt/scalelab-dist/ first.
STAGED = {"/opt/scalelab-dist/": "containers/gpu/"}
#: A site module's Open MPI settings, which the clean-up must drop.
SITE_ENV = {
    "OMPI_MCA_btl": "openib,self",
    "OPAL_LIBDIR": "/apps/openmpi/4.1/lib",
    "SCALELAB_IMAGE": "scalelab-gpu",
    "SCALELAB_OMPI_MCA_pml": "ob1",
}
PROBE = (
    "import os, json; print(json.dumps({k: os.environ.get(k) for k in ("
    "'OMPI_MCA_btl', 'OPAL_LIBDIR', 'OMPI_MCA_pml', 'SCALELAB_DROPPED_MPI_ENV')}))"
)


def debian_python() -> Path:
    """Debian's interpreter with its own sitecustomize (this machine is Debian 12)."""
    if not DEBIAN_PYTHON.is_file() or not Path("/usr/lib/python3.11/sitecustomize.py").exists():
        pytest.fail(
            f"{DEBIAN_PYTHON} with Debian's sitecustomize.py is part of this test "
            "environment (Debian 12's python3.11 package)"
        )
    return DEBIAN_PYTHON


def hook_files(text: str) -> list[tuple[Path, str]]:
    """(repository file, name in site-packages) for each file a definition installs into the
    venv's site-packages at interpreter-start level (the hook or a sitecustomize)."""
    files = devel_files(text)
    post = "\n".join(
        s
        for s in (body(text, "post", "devel"), body(text, "post", ""), body(text, "post", "final"))
        if s
    )
    out = []
    for m in re.finditer(r"install -m \d+ ((?:\S+ )+)(\S+/site-packages/\S*|\$site/)", post):
        sources, dest = m.group(1).split(), m.group(2)
        for src in sources:
            rel = src.replace("/opt/scalelab/src/", "")
            for staged, repo_dir in STAGED.items():
                rel = rel.replace(staged, repo_dir)
            local = REPO / files.get(src, rel)
            name = dest.rsplit("/", 1)[1] or Path(src).name
            out.append((local, name))
    return out


def make_venv(tmp: Path, install: list[tuple[Path, str]]) -> Path:
    """A venv of Debian's interpreter with `install` copied into its site-packages."""
    venv = tmp / "venv"
    subprocess.run(
        [str(debian_python()), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    site = venv / "lib" / "python3.11" / "site-packages"
    assert site.is_dir()
    for src, name in install:
        shutil.copy2(src, site / name)
    return venv / "bin" / "python"


def probe(python: Path) -> dict:
    import json

    env = {"PATH": "/usr/bin:/bin", "HOME": "/root", **SITE_ENV}
    proc = subprocess.run(
        [str(python), "-c", PROBE], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(proc.stdout)


CLEANED = {
    "OMPI_MCA_btl": None,
    "OPAL_LIBDIR": None,
    "OMPI_MCA_pml": "ob1",
    "SCALELAB_DROPPED_MPI_ENV": "OMPI_MCA_btl,OPAL_LIBDIR",
}


@pytest.mark.parametrize("definition", DEFINITIONS, ids=lambda p: p.name)
def test_the_hook_runs_under_debians_python(tmp_path, definition):
    install = hook_files(definition.read_text())
    names = {name for _, name in install}
    assert names == {"scalelab_image_env.py", "scalelab-image-env.pth"}, install
    assert all(src.is_file() for src, _ in install), install
    assert probe(make_venv(tmp_path, install)) == CLEANED


def test_the_old_sitecustomize_placement_never_runs_there(tmp_path):
    # The placement before this fix (tests/data/scalelab-gpu.before.def's successor at
    # commit 1617bdf: the same module, installed as the venv's sitecustomize.py): Debian's
    # own sitecustomize wins, the host's MPI settings reach the image's MPI untouched.
    module = REPO / "containers" / "gpu" / "scalelab_image_env.py"
    python = make_venv(tmp_path, [(module, "sitecustomize.py")])
    assert probe(python) == {
        "OMPI_MCA_btl": "openib,self",
        "OPAL_LIBDIR": "/apps/openmpi/4.1/lib",
        "OMPI_MCA_pml": None,
        "SCALELAB_DROPPED_MPI_ENV": None,
    }
    # ... and the hook's files in the same venv do run (the fix, nothing else changed).
    site = python.parent.parent / "lib" / "python3.11" / "site-packages"
    shutil.copy2(module, site / "scalelab_image_env.py")
    shutil.copy2(
        REPO / "containers" / "gpu" / "scalelab-image-env.pth", site / "scalelab-image-env.pth"
    )
    assert probe(python) == CLEANED


def test_the_hook_is_inert_outside_the_image(tmp_path):
    module = REPO / "containers" / "gpu" / "scalelab_image_env.py"
    pth = REPO / "containers" / "gpu" / "scalelab-image-env.pth"
    python = make_venv(tmp_path, [(module, module.name), (pth, pth.name)])
    proc = subprocess.run(
        [str(python), "-c", PROBE],
        env={"PATH": "/usr/bin:/bin", "OMPI_MCA_btl": "openib,self"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert '"OMPI_MCA_btl": "openib,self"' in proc.stdout
