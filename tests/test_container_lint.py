"""The definition-file linter catches each violation it promises to."""

import re

import pytest
from conftest import REPO, VENV_BIN, run

from scalelab.container.lint import REQUIRED_SECTIONS, lint_file, lint_text

GPU = (REPO / "containers" / "scalelab-gpu.def").read_text()
DEVEL_DIGEST = "sha256:d49bb8a4ff97fb5fe477947a3f02aa8c0a53eae77e11f00ec28618a0bcaa2ad1"
DEVEL = "nvcr.io/nvidia/cuda"


def codes(text: str, tmp_path=None) -> set[str]:
    if tmp_path is not None:
        path = tmp_path / "x.def"
        path.write_text(text)
        return {v.code for v in lint_file(path)}
    return {v.code for v in lint_text(text)}


def drop_section(text: str, name: str) -> str:
    """Remove every `%name` section (header and body) from the final stage."""
    return re.sub(rf"(?ms)^%{name}\n.*?(?=^%|^\Z|\Z)", "", text)


def test_committed_files_are_clean():
    assert codes(GPU) == set()


def test_unpinned_base():
    text = GPU.replace(f"From: {DEVEL}@{DEVEL_DIGEST}", f"From: {DEVEL}:12.6.3-devel-ubuntu22.04")
    violations = lint_text(text)
    assert [v.code for v in violations] == ["L002"]
    assert violations[0].line == 4 and "not pinned by digest" in violations[0].message


def test_latest_tag():
    text = GPU.replace(f"From: {DEVEL}@{DEVEL_DIGEST}", "From: ubuntu:latest")
    assert codes(text) == {"L002", "L003"}
    # `latest` anywhere else (an image pulled in %post) is caught too
    text = GPU.replace("    set -eu\n", "    set -eu\n    apptainer pull docker://busybox:latest\n")
    assert codes(text) == {"L003"}


def test_tag_and_digest_together():
    tagged = f"{DEVEL}:12.6.3-devel-ubuntu22.04@{DEVEL_DIGEST}"
    text = GPU.replace(f"{DEVEL}@{DEVEL_DIGEST}", tagged)
    assert codes(text) == {"L004"}


@pytest.mark.parametrize("section", REQUIRED_SECTIONS)
def test_missing_section(section):
    final_start = GPU.index("Stage: final")
    text = GPU[:final_start] + drop_section(GPU[final_start:], section)
    assert f"%{section}\n" not in text[final_start:]
    found = lint_text(text)
    assert any(v.code == "L005" and f"%{section}" in v.message for v in found), found


def test_required_sections_in_devel_stage_do_not_count():
    final_start = GPU.index("Stage: final")
    tail = drop_section(GPU[final_start:], "help")
    head = GPU[:final_start].replace("Stage: devel\n", "Stage: devel\n%help\n    devel help\n")
    text = head + tail
    assert "L005" in codes(text)


def test_empty_test_section():
    text = re.sub(r"(?ms)^%test\n.*\Z", "%test\n", GPU)
    assert codes(text) == {"L005"}


def test_labels_without_versions():
    text = GPU.replace("org.scalelab.torch.version 2.13.0", "org.scalelab.torch.version recent")
    assert codes(text) == {"L006"}
    text = GPU.replace("    org.scalelab.horovod.version 0.28.1\n", "")
    found = lint_text(text)
    assert [v.code for v in found] == ["L006"] and "horovod.version is missing" in found[0].message
    # `none` is fine for an optional component, not for torch; extra version labels
    # (nccl, ucx) must be versions too
    cuda, torch = "org.scalelab.cuda.version", "org.scalelab.torch.version"
    assert codes(GPU.replace(f"{cuda} 12.6.3", f"{cuda} none")) == set()
    assert codes(GPU.replace(f"{torch} 2.13.0", f"{torch} none")) == {"L006"}
    nccl = "org.scalelab.nccl.version"
    assert codes(GPU.replace(f"{nccl} 2.29.3", f"{nccl} from-torch")) == {"L006"}


def test_source_commit_label():
    label = "    org.scalelab.source-commit {{ SOURCE_COMMIT }}\n"
    assert codes(GPU.replace(label, "")) == {"L007"}
    filled = GPU.replace("{{ SOURCE_COMMIT }}", "1f7f6344480bd5dd0a7cd9103f2d68a14ba2158a")
    assert codes(filled) == set()


def test_each_bad_label_is_reported_once_with_its_value():
    text = GPU.replace("org.scalelab.torch.version 2.13.0", "org.scalelab.torch.version recent")
    assert [v.message for v in lint_text(text)] == [
        "label org.scalelab.torch.version is 'recent', not a version"
    ]
    text = GPU.replace("{{ SOURCE_COMMIT }}", "main")
    assert [v.message for v in lint_text(text)] == [
        "label org.scalelab.source-commit must be a commit or a build-arg placeholder, got 'main'"
    ]


def test_not_a_definition_file(tmp_path):
    assert codes("hello\n") == {"L001"}
    assert [v.code for v in lint_file(tmp_path / "absent.def")] == ["L000"]


def test_spython_parse_is_part_of_the_lint(tmp_path):
    assert codes(GPU, tmp_path) == set()
    # A stage with two From: lines is ambiguous: spython keeps the first, the scanner the last.
    second_from = "From: other@sha256:" + "0" * 64 + "\n"
    text = GPU.replace("Stage: final\n", "Stage: final\n" + second_from, 1)
    assert "L001" in codes(text, tmp_path)


def test_lint_command_exit_status(tmp_path):
    good = tmp_path / "good.def"
    good.write_text(GPU)
    bad = tmp_path / "bad.def"
    bad.write_text(drop_section(GPU, "help"))
    scalelab = str(VENV_BIN / "scalelab")
    assert run([scalelab, "container", "lint", str(good)]).returncode == 0
    proc = run([scalelab, "container", "lint", str(good), str(bad)], check=False)
    assert proc.returncode == 1
    assert proc.stdout.strip().splitlines() == [
        f"{bad}:{_final_bootstrap_line(bad)}: L005 final stage has no %help section"
    ]


def _final_bootstrap_line(path) -> int:
    lines = path.read_text().splitlines()
    return max(i for i, line in enumerate(lines, start=1) if line.startswith("BootStrap:"))
