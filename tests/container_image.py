"""The real CPU image the container tests share, built (or found cached) once per session.

`scalelab container build` caches the debootstrap base and the pinned stack under
~/.cache/scalelab/images/ by the hash of their inputs; the thin scalelab stage is cached
by the hash of scalelab's sources. A fresh CI machine builds it cold (a few minutes);
later sessions find it. The image is published under the cache directory, which the
test cluster's nodes see (their /tmp is private).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import REPO, VENV_BIN, run

SCALELAB = str(VENV_BIN / "scalelab")
#: Generous: a cold build on a 2-core CI machine (base, wheelhouse, stack, squash, %test).
BUILD_TIMEOUT_S = 1800


def require_apptainer() -> str:
    """The real apptainer; a skip only off CI (CI sets SCALELAB_REQUIRE_CLUSTER=1: a failure)."""
    path = shutil.which("apptainer")
    if path is None:
        reason = (
            "apptainer not installed (the test environment installs it: "
            "bash envs/install_apptainer.sh, or ./setup.sh --test-env)"
        )
        if os.environ.get("SCALELAB_REQUIRE_CLUSTER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def image_dir() -> Path:
    root = Path(os.environ.get("SCALELAB_CACHE", Path.home() / ".cache" / "scalelab"))
    return root / "images"


@functools.cache
def session_image() -> dict:
    """{"path", "sha256", "record"} of the image `scalelab container build` made, once per
    pytest process: every container test module's `cpu_image` fixture returns this."""
    require_apptainer()
    reuse = os.environ.get("SCALELAB_TEST_IMAGE")
    if reuse:  # a developer's shortcut: an image built before (CI never sets it)
        out = Path(reuse)
        record = json.loads(out.with_name(out.name + ".build.json").read_text())
        return {"path": out, "sha256": record["sha256"], "record": record, "log": ""}
    # One published copy per checkout: a suite run from another clone (CI in /tmp, say)
    # must not replace the file under this one's feet. The build cache itself is shared.
    checkout = hashlib.sha256(str(REPO).encode()).hexdigest()[:12]
    out = image_dir() / "test-session" / checkout / "scalelab-cpu.sif"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    proc = run(
        [SCALELAB, "container", "build", "--image", str(out), "--force"], timeout=BUILD_TIMEOUT_S
    )
    record = json.loads(out.with_name(out.name + ".build.json").read_text())
    print(f"cpu image ready in {time.monotonic() - t0:.1f} s:\n{proc.stdout}")
    return {"path": out, "sha256": record["sha256"], "record": record, "log": proc.stdout}
