"""Whether a reader schema can read what a writer schema wrote: the Avro specification's schema
resolution rules, checked statically the way Confluent's compatibility checker does.

* BACKWARD (``backward_problems(new, old)``): a reader on ``new`` reads records written with
  ``old``, so consumers can be upgraded first;
* FORWARD (``forward_problems(new, old)``): a reader on ``old`` reads records written with
  ``new``, so producers can be upgraded first;
* FULL: both. The codec reads any known version into the current one, so every version of a
  topic schema must be FULL-compatible with every other (tests/unit/topics/test_schema_history.py).

The rules: a field the reader has and the writer lacks needs a default, and a default must fit
its field's type (a union's default fits its first branch); a field only the writer has is
skipped; records, enums and fixed types match by unqualified name or a reader alias; numbers
widen (int → long → float → double) and string and bytes read each other, nothing narrows; a
writer enum symbol the reader lacks needs the reader enum's default; every branch of a writer
union must be readable, and a reader union reads whatever fits one of its branches.
``logicalType`` annotations are ignored (the wire type decides).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
_NAMED = frozenset({"record", "error", "enum", "fixed"})
#: writer type -> the reader types that read it (Avro's promotions, and the type itself)
_READS_AS = {
    "int": {"int", "long", "float", "double"},
    "long": {"long", "float", "double"},
    "float": {"float", "double"},
    "string": {"string", "bytes"},
    "bytes": {"bytes", "string"},
}


def _full_name(schema: Mapping[str, Any], namespace: str) -> str:
    name = schema["name"]
    if "." in name:
        return name
    ns = schema.get("namespace", namespace)
    return f"{ns}.{name}" if ns else name


def _namespace_of(full_name: str) -> str:
    return full_name.rpartition(".")[0]


class _Names:
    """The named types (records, enums, fixed) defined anywhere in one schema, by full name."""

    def __init__(self, schema: Any) -> None:
        self.types: dict[str, tuple[Mapping[str, Any], str]] = {}
        self._collect(schema, "")

    def _collect(self, schema: Any, namespace: str) -> None:
        if isinstance(schema, list):
            for branch in schema:
                self._collect(branch, namespace)
        elif isinstance(schema, dict):
            kind = schema.get("type")
            if kind in _NAMED:
                full = _full_name(schema, namespace)
                if full in self.types:
                    return
                self.types[full] = (schema, _namespace_of(full))
                for field in schema.get("fields", ()):
                    self._collect(field["type"], _namespace_of(full))
            elif kind == "array":
                self._collect(schema["items"], namespace)
            elif kind == "map":
                self._collect(schema["values"], namespace)
            elif isinstance(kind, (dict, list)):
                self._collect(kind, namespace)

    def resolve(self, schema: Any, namespace: str) -> tuple[Any, str]:
        """``schema`` with a name reference, or a primitive in an object with a logical type,
        replaced by the type it stands for; and the namespace that type's children inherit."""
        if isinstance(schema, str):
            if schema in _PRIMITIVES:
                return schema, namespace
            for candidate in (f"{namespace}.{schema}" if namespace and "." not in schema else schema, schema):
                if candidate in self.types:
                    return self.types[candidate]
            raise ValueError(f"unknown type name {schema!r}")
        if isinstance(schema, dict):
            kind = schema.get("type")
            if kind in _NAMED:
                return schema, _namespace_of(_full_name(schema, namespace))
            if kind not in ("array", "map"):  # {"type": "long", "logicalType": ...} and the like
                return self.resolve(kind, namespace)
        return schema, namespace


def _kind(schema: Any) -> str:
    if isinstance(schema, list):
        return "union"
    if isinstance(schema, str):
        return schema
    return "record" if schema["type"] == "error" else schema["type"]


def _at(path: str) -> str:
    return f"{path}: " if path else ""


def _label(schema: Any) -> str:
    if isinstance(schema, (str, list)):
        return schema if isinstance(schema, str) else "union"
    return str(schema.get("name", schema.get("type")))


class _Resolution:
    """The schema resolution check of one (writer, reader) pair."""

    def __init__(self, writer: Any, reader: Any) -> None:
        self.writer_names = _Names(writer)
        self.reader_names = _Names(reader)
        self._in_progress: set[tuple[str, str]] = set()

    def problems(self, writer: Any, reader: Any, path: str, w_ns: str = "", r_ns: str = "") -> list[str]:
        """Why ``reader`` cannot read every value ``writer`` writes (empty: it can)."""
        writer, w_ns = self.writer_names.resolve(writer, w_ns)
        reader, r_ns = self.reader_names.resolve(reader, r_ns)
        w_kind, r_kind = _kind(writer), _kind(reader)
        if w_kind == "union":
            return [p for branch in writer for p in self.problems(branch, reader, f"{path}<{_label(branch)}>",
                                                                   w_ns, r_ns)]
        if r_kind == "union":
            if any(not self.problems(writer, branch, path, w_ns, r_ns) for branch in reader):
                return []
            return [(f"{_at(path)}the writer's {_label(writer)} fits no branch of the reader's union "
                    f"{[_label(b) for b in reader]}")]
        if w_kind in _PRIMITIVES or r_kind in _PRIMITIVES or w_kind != r_kind:
            if r_kind in _READS_AS.get(w_kind, {w_kind}):
                return []
            return [f"{_at(path)}the writer's {w_kind} cannot be read as {r_kind}"]
        if w_kind in ("record", "enum", "fixed") and not self._same_name(writer, reader, w_ns, r_ns):
            return [(f"{_at(path)}the writer's {w_kind} {_full_name(writer, w_ns)} is not the reader's "
                    f"{_full_name(reader, r_ns)} (nor one of its aliases)")]
        if w_kind == "record":
            return self._record(writer, reader, path, w_ns, r_ns)
        if w_kind == "enum":
            unknown = [s for s in writer["symbols"] if s not in reader["symbols"]]
            if unknown and "default" not in reader:
                return [f"{_at(path)}the reader's enum lacks the writer's symbol(s) {unknown} and has no default"]
            return []
        if w_kind == "fixed":
            if writer["size"] != reader["size"]:
                return [f"{_at(path)}fixed size {writer['size']} cannot be read as size {reader['size']}"]
            return []
        if w_kind == "array":
            return self.problems(writer["items"], reader["items"], f"{path}[]", w_ns, r_ns)
        return self.problems(writer["values"], reader["values"], f"{path}{{}}", w_ns, r_ns)  # map

    def _record(self, writer: Mapping[str, Any], reader: Mapping[str, Any], path: str, w_ns: str,
                r_ns: str) -> list[str]:
        pair = (_full_name(writer, w_ns), _full_name(reader, r_ns))
        if pair in self._in_progress:  # a recursive type: these fields are being checked already
            return []
        self._in_progress.add(pair)
        try:
            written = {f["name"]: f for f in writer["fields"]}
            problems: list[str] = []
            for field in reader["fields"]:
                where = f"{path}.{field['name']}" if path else field["name"]
                source = next((written[n] for n in (field["name"], *field.get("aliases", ())) if n in written), None)
                if source is None:
                    if "default" not in field:
                        problems.append(f"{where}: the reader's field has no default and the writer does not write it")
                    continue
                problems += self.problems(source["type"], field["type"], where, w_ns, r_ns)
            return problems
        finally:
            self._in_progress.discard(pair)

    @staticmethod
    def _same_name(writer: Mapping[str, Any], reader: Mapping[str, Any], w_ns: str, r_ns: str) -> bool:
        unqualified = writer["name"].rpartition(".")[2] == reader["name"].rpartition(".")[2]
        r_space = _namespace_of(_full_name(reader, r_ns))
        aliases = {a if "." in a else f"{r_space}.{a}".lstrip(".") for a in reader.get("aliases", ())}
        return unqualified or _full_name(writer, w_ns) in aliases


def default_problems(schema: Mapping[str, Any]) -> list[str]:
    """Fields of ``schema`` (nested records included) whose default does not fit the field's type."""
    names = _Names(schema)

    def fits(value: Any, field_type: Any, namespace: str) -> bool:
        resolved, ns = names.resolve(field_type, namespace)
        kind = _kind(resolved)
        if kind == "union":
            return fits(value, resolved[0], ns)
        if kind == "null":
            return value is None
        if kind == "boolean":
            return isinstance(value, bool)
        if kind in ("int", "long"):
            return isinstance(value, int) and not isinstance(value, bool)
        if kind in ("float", "double"):
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind in ("string", "bytes", "fixed"):
            return isinstance(value, str)
        if kind == "enum":
            return value in resolved["symbols"]
        if kind == "array":
            return isinstance(value, list) and all(fits(v, resolved["items"], ns) for v in value)
        if kind == "map":
            return isinstance(value, dict) and all(fits(v, resolved["values"], ns) for v in value.values())
        return isinstance(value, dict) and all(  # record
            fits(value[f["name"]], f["type"], ns) if f["name"] in value else "default" in f
            for f in resolved["fields"])

    problems = []
    for full, (named, namespace) in names.types.items():
        for field in named.get("fields", ()):
            if "default" in field and not fits(field["default"], field["type"], namespace):
                problems.append(f"{full}.{field['name']}: default {field['default']!r} does not fit the "
                                "field's type (a union's default must fit its first branch)")
    return problems


def resolution_problems(writer: Mapping[str, Any], reader: Mapping[str, Any]) -> list[str]:
    """Why a reader on ``reader`` cannot read every record written with ``writer`` (empty: it can)."""
    check = _Resolution(writer, reader)
    return check.problems(writer, reader, "") + [f"reader: {p}" for p in default_problems(reader)]


def backward_problems(new: Mapping[str, Any], old: Mapping[str, Any]) -> list[str]:
    """BACKWARD: a reader on ``new`` reading records written with ``old``."""
    return resolution_problems(writer=old, reader=new)


def forward_problems(new: Mapping[str, Any], old: Mapping[str, Any]) -> list[str]:
    """FORWARD: a reader on ``old`` reading records written with ``new``."""
    return resolution_problems(writer=new, reader=old)


__all__ = ["backward_problems", "default_problems", "forward_problems", "resolution_problems"]
