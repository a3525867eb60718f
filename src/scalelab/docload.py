"""The one loader of every YAML and JSON document scalelab reads.

Workflow configs, run configs, ``bundle.json``, ``provenance.json`` and the records
runs write all come through :func:`load` (a file) or :func:`loads` (text), because the
plain loaders fail in ways a user cannot act on:

* a duplicate key silently wins (a second ``results:`` moves every output);
* a few lines of aliases expand to 9**9 values when anything walks them (a YAML alias
  bomb), and a recursive alias raises ``RecursionError`` in any walk;
* non-UTF-8, UTF-16, empty, null and scalar documents give tracebacks or messages that
  do not name the file.

Here each of these is one :class:`~scalelab.errors.UsageError` line naming the file
(and the line where the parser knows it), checked on the composed YAML node graph
before a single Python object is built. Snakemake's YTE templates (``__use_yte__``) are
code, so :func:`refuse_yte` is the one check that refuses them unless the user opts in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from scalelab.errors import UsageError

#: Largest document read (bytes): configs are a few KiB, inventories of large studies
#: a few MiB.
MAX_BYTES = 32 * 1024 * 1024
#: Largest number of values a YAML document may expand to through its aliases.
MAX_NODES = 200_000
#: Deepest nesting of a document (configs nest about 5 levels).
MAX_DEPTH = 64

_BOMS = {
    b"\xff\xfe\x00\x00": "UTF-32",
    b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe": "UTF-16",
    b"\xfe\xff": "UTF-16",
}
_MERGE = "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader; the checks run on its node graph (see :func:`_check_graph`)."""


def _fail(
    label: str, message: str, line: int | None = None, error: type[UsageError] = UsageError
) -> UsageError:
    where = f"{label}: line {line}" if line else label
    return error(f"{where}: {message}".replace("\n", " "))


def read_bytes(path: str | Path, label: str, max_bytes: int = MAX_BYTES) -> bytes:
    """The file's bytes; a missing, unreadable or oversized file is one UsageError line."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except IsADirectoryError:
        raise _fail(label, "is a directory, expected a file") from None
    except FileNotFoundError:
        raise _fail(label, "no such file") from None
    except OSError as exc:
        raise _fail(label, exc.strerror or str(exc)) from None
    if len(data) > max_bytes:
        raise _fail(
            label,
            f"larger than {max_bytes // (1024 * 1024)} MiB; not a document "
            "scalelab writes or reads",
        )
    return data


def decode(data: bytes, label: str, error: type[UsageError] = UsageError) -> str:
    """UTF-8 text (a UTF-8 byte-order mark is dropped); UTF-16/32 and bad bytes refused."""
    for bom, name in _BOMS.items():
        if data.startswith(bom):
            raise _fail(label, f"{name} text (byte-order mark); save it as UTF-8", 1, error)
    if b"\x00" in data[:4] and len(data) >= 2:
        raise _fail(label, "UTF-16 or UTF-32 text (NUL bytes); save it as UTF-8", 1, error)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise _fail(
            label,
            f"not UTF-8 text (byte {exc.start}: "
            f"{data[exc.start : exc.start + 1]!r}); save it as UTF-8",
            line,
            error,
        ) from None


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _check_keys(
    node: yaml.MappingNode, loader: _Loader, label: str, error: type[UsageError]
) -> None:
    """A key written twice in one mapping (merge keys ``<<`` may override, as YAML says)."""
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == _MERGE or not isinstance(key_node, yaml.ScalarNode):
            continue
        key = loader.construct_object(key_node)
        try:
            hash(key)
        except TypeError:  # unhashable: the constructor says so
            continue
        if key in seen:
            raise _fail(
                label,
                f"duplicate key {key!r} (first at line {seen[key]}); write each key once",
                _line(key_node),
                error,
            )
        seen[key] = _line(key_node)


def _check_graph(
    root: yaml.Node, loader: _Loader, label: str, max_nodes: int, error: type[UsageError]
) -> None:
    """Duplicate keys, recursive aliases, depth and the expanded size, on the node graph.

    Aliases share nodes, so sizes are memoized per node: the walk is linear in the file
    while the count is what any later walk of the built objects would visit."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def walk(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise _fail(label, "recursive alias (a value contains itself)", _line(node), error)
        if depth > MAX_DEPTH:
            raise _fail(label, f"nested deeper than {MAX_DEPTH} levels", _line(node), error)
        active.add(key)
        if isinstance(node, yaml.MappingNode):
            _check_keys(node, loader, label, error)
            children = [n for pair in node.value for n in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        total = 1
        for child in children:
            total += walk(child, depth + 1)
            if total > max_nodes:
                raise _fail(
                    label,
                    f"expands to more than {max_nodes} values through its aliases (an alias bomb?)",
                    _line(node),
                    error,
                )
        active.discard(key)
        sizes[key] = total
        return total

    walk(root, 0)


def parse_yaml(
    text: str, label: str, max_nodes: int = MAX_NODES, error: type[UsageError] = UsageError
) -> Any:
    """One YAML document, checked on its node graph before it is built (None: empty)."""
    try:
        loader = _Loader(text)  # the reader refuses control characters here, before any node
    except yaml.YAMLError as exc:
        raise _fail(label, f"not valid YAML: {str(exc).splitlines()[0]}", None, error) from None
    try:
        node = loader.get_single_node()
        if node is None:
            raise _fail(label, "is empty (no document); expected a mapping", None, error)
        _check_graph(node, loader, label, max_nodes, error)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid"
        raise _fail(
            label, f"not valid YAML: {problem}", mark.line + 1 if mark else None, error
        ) from None
    except yaml.YAMLError as exc:
        raise _fail(label, f"not valid YAML: {str(exc).splitlines()[0]}", None, error) from None
    except RecursionError:
        raise _fail(label, "nested too deeply", None, error) from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise _fail(label, f"bad value: {exc}", None, error) from None
    finally:
        loader.dispose()


def _pairs(label: str, error: type[UsageError]):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise _fail(label, f"duplicate key {key!r}; write each key once", None, error)
            out[key] = value
        return out

    return hook


def parse_json(text: str, label: str, error: type[UsageError] = UsageError) -> Any:
    """One JSON document; duplicate keys refused at any level."""
    if not text.strip():
        raise _fail(label, "is empty (no document); expected a JSON object", None, error)
    try:
        return json.loads(text, object_pairs_hook=_pairs(label, error))
    except json.JSONDecodeError as exc:
        raise _fail(
            label, f"not valid JSON: {exc.msg} (column {exc.colno})", exc.lineno, error
        ) from None
    except RecursionError:
        raise _fail(label, "nested too deeply", None, error) from None
    except ValueError as exc:
        raise _fail(label, f"bad value: {exc}", None, error) from None


def _kind(value: Any) -> str:
    names = {
        type(None): "null",
        str: "a string",
        int: "a number",
        float: "a number",
        bool: "true/false",
        list: "a list",
    }
    return names.get(type(value), type(value).__name__)


def loads(
    text: str | bytes,
    label: str,
    *,
    fmt: str = "yaml",
    mapping: bool = True,
    max_nodes: int = MAX_NODES,
    error: type[UsageError] = UsageError,
) -> Any:
    """Parse ``text`` (``fmt`` yaml or json) named ``label`` in errors; with ``mapping``
    the document must be a mapping (every document scalelab reads is one)."""
    if isinstance(text, bytes):
        text = decode(text, label, error)
    doc = (
        parse_json(text, label, error)
        if fmt == "json"
        else parse_yaml(text, label, max_nodes, error)
    )
    if mapping and not isinstance(doc, dict):
        raise _fail(
            label, f"holds {_kind(doc)}, expected a mapping of keys at the top level", 1, error
        )
    return doc


def fmt_of(path: str | Path) -> str:
    """json for ``*.json``, yaml for everything else (YAML reads JSON, but JSON's own
    parser gives the better messages)."""
    return "json" if str(path).endswith(".json") else "yaml"


def load(
    path: str | Path,
    label: str | None = None,
    *,
    fmt: str | None = None,
    mapping: bool = True,
    max_bytes: int = MAX_BYTES,
    max_nodes: int = MAX_NODES,
    error: type[UsageError] = UsageError,
) -> Any:
    """Read and parse the document at ``path`` (see the module doc). ``label`` names it in
    errors (default: the path); ``error`` is raised for bad content (a record scalelab
    wrote passes :class:`~scalelab.errors.CheckFailed`); a missing file is a UsageError."""
    label = label or str(path)
    data = read_bytes(path, label, max_bytes)
    return loads(
        data, label, fmt=fmt or fmt_of(path), mapping=mapping, max_nodes=max_nodes, error=error
    )


#: The key that makes Snakemake run a config as a YTE template (Python expressions).
YTE_KEY = "__use_yte__"


def uses_yte(doc: Any) -> bool:
    """Whether Snakemake would evaluate ``doc`` as a YTE template (run code in it)."""
    return isinstance(doc, dict) and bool(doc.get(YTE_KEY))


def refuse_yte(doc: Any, label: str, how_to_allow: str) -> None:
    """A config that turns on YTE is code: refused unless the user said they trust it."""
    if uses_yte(doc):
        raise UsageError(
            f"{label}: {YTE_KEY}: true makes Snakemake run the Python in this "
            f"config when it loads it (YTE templates); {how_to_allow}"
        )
