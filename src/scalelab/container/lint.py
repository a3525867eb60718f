"""A linter for Apptainer definition files: pinned bases, required sections, versioned labels.

spython's parser reads the stages, their ``From:`` headers, labels, runscript
and test; it folds ``%help`` into comments, so a small scanner of ``%section``
lines finds the sections and their line numbers. Rules apply to the final
stage (the image users get); every stage's base must be pinned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

#: Sections the final stage must have.
REQUIRED_SECTIONS = ("labels", "help", "environment", "runscript", "test")
#: Labels the final stage must carry; values must look like versions.
VERSION_LABELS = ("python", "torch", "horovod", "mpi", "mpi4py", "cuda")
#: Components that may be absent from an image (value `none`). Any other
#: `org.scalelab.<x>.version` label present (nccl, ucx, pmix...) must be a version too.
OPTIONAL_COMPONENTS = ("cuda",)
COMMIT_LABEL = "org.scalelab.source-commit"
LABEL_PREFIX = "org.scalelab."
VERSION_RE = re.compile(r"^\d+(\.\d+)*(-\d+)?$")
DIGEST_RE = re.compile(r"@sha256:[0-9a-f]{64}$")
COMMIT_RE = re.compile(r"^([0-9a-f]{7,40}(-dirty)?|\{\{\s*[A-Z_][A-Z0-9_]*\s*\}\})$")
LATEST_RE = re.compile(r"(^|[\s/:@])[\w.\-/]+:latest\b")
SECTION_RE = re.compile(r"^%([A-Za-z]+)\b")
HEADER_RE = re.compile(r"^(bootstrap|from|stage)\s*:\s*(.*)$", re.IGNORECASE)


@dataclass(frozen=True)
class Violation:
    """One problem, located."""

    code: str
    line: int
    message: str

    def format(self, path: str) -> str:
        return f"{path}:{self.line}: {self.code} {self.message}"


@dataclass
class _Stage:
    start: int
    bootstrap: str = ""
    base: str = ""
    base_line: int = 0
    sections: dict[str, list[int]] = field(default_factory=dict)
    """Section name -> line numbers of its `%name` headers."""
    section_lines: dict[int, list[str]] = field(default_factory=dict)
    """Header line number -> the section's non-blank, non-comment lines."""


def _scan(text: str) -> list[_Stage]:
    """Split a definition file into stages; record headers and section positions."""
    stages: list[_Stage] = []
    current_section: int | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip()
        header = HEADER_RE.match(line)
        if header and (current_section is None or header.group(1).lower() == "bootstrap"):
            key, value = header.group(1).lower(), header.group(2).strip()
            if key == "bootstrap":
                stages.append(_Stage(start=number))
                current_section = None
                stages[-1].bootstrap = value.lower()
            elif stages and key == "from":
                stages[-1].base, stages[-1].base_line = value, number
            continue
        section = SECTION_RE.match(line)
        if section and stages:
            name = section.group(1).lower()
            stages[-1].sections.setdefault(name, []).append(number)
            stages[-1].section_lines[number] = []
            current_section = number
            continue
        if current_section is not None and line.strip() and not line.lstrip().startswith("#"):
            stages[-1].section_lines[current_section].append(line.strip())
    return stages


def _labels(stage: _Stage) -> dict[str, tuple[str, int]]:
    out: dict[str, tuple[str, int]] = {}
    for start in stage.sections.get("labels", []):
        for offset, entry in enumerate(stage.section_lines[start], start=1):
            key, _, value = entry.partition(" ")
            out[key] = (value.strip(), start + offset)
    return out


def _spython_check(path: Path) -> tuple[list[str] | None, str | None]:
    """The bases spython reads, stage by stage; or the parser's error."""
    from spython.main.parse.parsers import SingularityParser

    try:
        recipe = SingularityParser(str(path)).recipe
    except Exception as exc:  # spython raises plain exceptions on malformed files
        return None, f"{type(exc).__name__}: {exc}"
    stages = list(recipe.values()) if isinstance(recipe, dict) else [recipe]
    return [getattr(s, "fromHeader", None) or "" for s in stages], None


def lint_text(text: str, path: Path | None = None) -> list[Violation]:
    """All violations in a definition file's text (path: for spython, which reads files)."""
    stages = _scan(text)
    if not stages:
        return [Violation("L001", 1, "no `Bootstrap:` header: not a definition file")]
    out = _parser_disagrees(stages, path) + _latest_tags(text)
    for stage in stages:
        out += _unpinned_base(stage)
    final = stages[-1]
    out += _missing_sections(final)
    if "labels" in final.sections:
        out += _bad_labels(final)
    return sorted(out, key=lambda v: (v.line, v.code))


def _parser_disagrees(stages: list[_Stage], path: Path | None) -> list[Violation]:
    """L001: spython cannot parse the file, or reads other bases than the scanner."""
    if path is None:
        return []
    bases, error = _spython_check(path)
    if error:
        return [Violation("L001", 1, f"spython cannot parse it: {error}")]
    if bases != [s.base for s in stages]:
        return [
            Violation(
                "L001",
                1,
                f"spython reads the bases as {bases}, the scanner as {[s.base for s in stages]}",
            )
        ]
    return []


def _latest_tags(text: str) -> list[Violation]:
    """L003: any line naming a `latest` tag."""
    return [
        Violation("L003", number, "uses a `latest` tag: pin a version and a digest")
        for number, line in enumerate(text.splitlines(), start=1)
        if LATEST_RE.search(line)
    ]


def _unpinned_base(stage: _Stage) -> list[Violation]:
    """L002/L004: a registry base must be pinned by digest alone (localimage is a file)."""
    if stage.bootstrap not in ("docker", "oras", "library"):
        return []
    line, base = stage.base_line or stage.start, stage.base
    if not base:
        return [Violation("L002", line, "stage has no `From:` base")]
    if not DIGEST_RE.search(base):
        return [
            Violation(
                "L002", line, f"base {base} is not pinned by digest (From: name@sha256:<64 hex>)"
            )
        ]
    if ":" in base.split("@", 1)[0].rsplit("/", 1)[-1]:
        return [
            Violation(
                "L004",
                line,
                f"base {base} has a tag and a digest: Apptainer's "
                "docker transport rejects that; keep the digest",
            )
        ]
    return []


def _missing_sections(final: _Stage) -> list[Violation]:
    """L005: the final stage lacks a required section, or has it empty."""
    out = []
    for name in REQUIRED_SECTIONS:
        if name not in final.sections:
            out.append(Violation("L005", final.start, f"final stage has no %{name} section"))
        elif not any(final.section_lines[n] for n in final.sections[name]):
            out.append(Violation("L005", final.sections[name][0], f"%{name} is empty"))
    return out


def _bad_labels(final: _Stage) -> list[Violation]:
    """L006: required version labels missing or not versions, and any other
    ``org.scalelab.*.version`` label not a version; L007: the source commit label."""
    labels = _labels(final)
    header = final.sections["labels"][0]
    out = []
    for component in VERSION_LABELS:
        key = f"{LABEL_PREFIX}{component}.version"
        value, where = labels.get(key, ("", header))
        if not value:
            out.append(Violation("L006", where, f"label {key} is missing"))
        elif not VERSION_RE.match(value) and not (
            value == "none" and component in OPTIONAL_COMPONENTS
        ):
            out.append(Violation("L006", where, f"label {key} is {value!r}, not a version"))
    required = {f"{LABEL_PREFIX}{c}.version" for c in VERSION_LABELS}
    for key, (value, where) in labels.items():
        if (
            key.startswith(LABEL_PREFIX)
            and key.endswith(".version")
            and key not in required
            and not (VERSION_RE.match(value) or value == "none")
        ):
            out.append(Violation("L006", where, f"label {key} is {value!r}, not a version"))
    commit, where = labels.get(COMMIT_LABEL, ("", header))
    if not COMMIT_RE.match(commit):
        out.append(
            Violation(
                "L007",
                where,
                f"label {COMMIT_LABEL} must be a commit or a build-arg placeholder, got {commit!r}",
            )
        )
    return out


def lint_file(path: str | Path) -> list[Violation]:
    """Lint one file; a missing file is itself a violation."""
    p = Path(path)
    if not p.is_file():
        return [Violation("L000", 0, "file not found")]
    return lint_text(p.read_text(), p)
