"""The Snakemake report as a reader sees it: rendered by headless Chromium.

A small study runs through the workflow (DDP at 1 and 2 ranks, 2 repeats, commbench,
plus a crafted published table with a 125% point), `snakemake --report` bundles it,
and Chromium renders the report while tests/scripts/report_walk.js clicks through
every category and result (eye button: what is shown; info button: its caption and
labels). The assertions are on that rendered DOM: the table with its flags beside the
figures, every plot a real image, the commbench curves, one caption per item.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO
from test_workflow import copy_workflow, snakemake

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: Headless flags for a root user on a machine without a display or network
#: (the background-networking flags stop Chromium calling home through a closed network).
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WALK = REPO / "tests" / "scripts" / "report_walk.js"

CRAFTED = "ranks,throughput,repeat,label\n" + "".join(
    f"{n},{x},{i},crafted\n"
    for n, xs in ((1, (100, 101, 99)), (2, (250, 252, 248)))
    for i, x in enumerate(xs)
)


def render(page: Path, profile: Path, budget_ms: int = 60000) -> str:
    """The DOM of ``page`` after its scripts ran (virtual time, so no wall-clock waits)."""
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: run envs/test_env.sh (./setup.sh --test-env)")
    proc = subprocess.run(
        [
            CHROMIUM,
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0 and "</html>" in proc.stdout, proc.stderr[-2000:]
    return proc.stdout


def data_uri(uri: str) -> bytes:
    head, _, payload = uri.partition(",")
    assert head.startswith("data:") and head.endswith(";base64"), head[:80]
    return base64.b64decode(payload)


@pytest.fixture(scope="module")
def walked(tmp_path_factory) -> dict:
    """Run the study, build the report, walk it in Chromium; return what the walk saw."""
    base = tmp_path_factory.mktemp("report")
    wd = copy_workflow(base / "wf")
    (wd / "crafted.csv").write_text(CRAFTED)
    cfg = yaml.safe_load((wd / ".test" / "config.yaml").read_text())
    cfg["sweep"].update(backends=["ddp"], repeats=2)
    cfg["commbench"] = {"libs": ["torch"], "max_bytes": "1M", "iters": 3}
    cfg.setdefault("analysis", {})["from_csv"] = ["crafted.csv"]
    (wd / "report.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(wd, ["--cores", "2", "--configfile", "report.yaml"])
    snakemake(wd, ["--cores", "1", "--configfile", "report.yaml", "--report", "report.html"])
    report = (wd / "report.html").read_text()
    end = report.rfind("</body>")
    page = base / "walk.html"
    page.write_text(report[:end] + "<script>" + WALK.read_text() + "</script>" + report[end:])
    dom = render(page, base / "profile")
    tag = '<pre id="scalelab-walk">'
    start = dom.rfind(tag)
    assert start >= 0, "the walk did not finish (no result element in the DOM)"
    seen = json.loads(html.unescape(dom[start + len(tag) : dom.index("</pre>", start)]))
    seen["workdir"] = wd
    seen["profile"] = base / "profile"
    return seen


def items(seen: dict) -> dict[str, dict]:
    return {" ".join(i["labels"]): i for group in seen["categories"].values() for i in group}


def test_landing_page_shows_the_study_and_its_categories(walked):
    landing = walked["landing"]
    assert "scalelab scaling study" in landing
    for category in ("Scaling analysis", "Communication", "Prediction", "Configuration"):
        assert category in landing and category in walked["categories"]


def test_every_item_has_its_own_label_and_caption(walked):
    found = items(walked)
    expected = {
        "table: scaling with flags",
        "table: scaling.csv",
        "plot: throughput",
        "plot: efficiency",
        "plot: breakdown",
        "plot: fits",
        "plot: backends",
        "commbench: torch",
        "prediction: DDP at larger scales",
        "prediction: error at measured scales",
        "effective config",
    }
    assert expected <= set(found), set(found)
    captions = {}
    for name, item in found.items():
        info = item["info"]
        assert "DESCRIPTION" in info.upper(), name
        caption = info.upper().split("DESCRIPTION", 1)[1].split("SIZE", 1)[0].strip()
        assert len(caption) > 60, (name, caption)
        captions[name] = caption
    assert len(set(captions.values())) == len(captions), "two items share a caption"
    assert "COLLECTIVE BENCHMARK OF TORCH" in captions["commbench: torch"]  # wildcard filled in


def test_scaling_table_shows_flags_beside_the_figures(walked, tmp_path):
    item = items(walked)["table: scaling with flags"]
    assert item["frame"], "the table item is not shown in the report"
    page = tmp_path / "table.html"
    page.write_bytes(data_uri(item["frame"]))  # exactly what the report's frame displays
    dom = render(page, walked["profile"], budget_ms=2000)
    first_table = re.search(r"<table>(.*?)</table>", dom, re.S).group(1)  # the scaling table
    rows = re.findall(r"<tr>(.*?)</tr>", first_table, re.S)
    cells = [
        [
            html.unescape(re.sub(r"<[^>]+>", "", c)).strip()
            for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", r, re.S)
        ]
        for r in rows
    ]
    header = cells[0]
    eff = header.index("efficiency (flags)")
    crafted = [r for r in cells if r and r[0] == "crafted"]
    runs = [r for r in cells if r and r[0] == "runs"]
    assert [r[header.index("ranks")] for r in runs] == ["1", "2"]
    assert [r[eff] for r in crafted] == ["100.0%", "⚠ 125.0% (superlinear)"]
    assert '<td class="anomaly">' in dom
    legend = re.search(r'<ul id="flags">(.*?)</ul>', dom, re.S).group(1)
    assert "superlinear (1 of" in html.unescape(legend)
    # the same flags in the machine-readable table on disk
    csv = pd.read_csv(walked["workdir"] / "results" / "analysis" / "scaling.csv")
    assert list(csv[csv["source"] == "crafted"]["flags"].fillna("")) == ["", "superlinear"]
    # every efficiency above 100% carries a flag in the rendered table
    for r in cells[1:]:
        value = r[eff].lstrip("⚠ ").split("%")[0]
        if value not in ("", "-") and float(value) > 100.0:
            assert "(" in r[eff], r


def test_plots_and_commbench_curves_are_real_images(walked):
    found = items(walked)
    for name in (
        "plot: throughput",
        "plot: efficiency",
        "plot: breakdown",
        "plot: fits",
        "plot: backends",
        "commbench: torch",
        "prediction: DDP at larger scales",
    ):
        uri = found[name]["img"]
        assert uri and uri.startswith("data:image/png"), name
        img = mpimg.imread(io.BytesIO(data_uri(uri)), format="png")
        assert img.shape[0] >= 300 and img.shape[1] >= 500, (name, img.shape)
        assert float(np.std(img[..., :3])) > 0.01, f"{name} is blank"


def test_csv_item_is_the_plain_table(walked):
    item = items(walked)["table: scaling.csv"]
    assert item["download"] and item["download"].startswith("data:text/csv")
    disk = (walked["workdir"] / "results" / "analysis" / "scaling.csv").read_text()
    assert "flags" in disk.splitlines()[0]
    # the prediction's check against the measured scales travels with the report too
    errors = items(walked)["prediction: error at measured scales"]
    assert errors["download"] and errors["download"].startswith("data:text/csv")
    table = data_uri(errors["download"]).decode()
    assert "throughput_rel_error" in table.splitlines()[0]
    assert len(table.splitlines()) == 1 + 2  # the ddp runs measured at 1 and 2 ranks
