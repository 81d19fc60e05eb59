"""Every version of every topic schema: the one this release reads and writes, and every one a
producer may have written.

Layout of a schema folder (the packaged one is ``topics/schemas``)::

    <name>.avsc                  the current version: records decode into it and are encoded with it
    history/<name>/v<N>.avsc     every version a producer may write, N = 1, 2, ... without gaps;
                                 the current one is among them (same Parsing Canonical Form)

A version once released is never edited (its fingerprint is in records on the brokers): changing
``<name>.avsc`` means adding it as the next ``v<N>.avsc``. A version newer than the current one may
be listed too: this release then reads records written with it before it writes them itself.
``SchemaSet.load(overlay)`` lays a second folder of the same layout over the packaged one, file by
file (``SAMESTYLE_SCHEMA_DIR``): a newer version a producer writes, or another current version.
Anything inconsistent is a :class:`~samestyle.topics.errors.ConfigError` when the set is loaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastavro.schema import fingerprint, to_parsing_canonical_form

from samestyle.topics.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from importlib.resources.abc import Traversable

HISTORY = "history"
_VERSION_FILE = re.compile(r"v([1-9][0-9]*)\.avsc")


def rabin_fingerprint(data: bytes) -> bytes:
    """CRC-64-AVRO fingerprint of ``data`` (a schema's Parsing Canonical Form), as 8 little-endian bytes."""
    return bytes.fromhex(fingerprint(data.decode("utf-8"), "CRC-64-AVRO"))


@dataclass(frozen=True)
class SchemaVersion:
    """One version of one schema; ``source`` says which file it came from (for messages)."""

    name: str
    number: int
    schema: dict[str, Any]
    canonical: str
    fingerprint: bytes
    source: str

    @property
    def label(self) -> str:
        return f"{self.name} v{self.number}"


def _schema_files(root: Traversable) -> dict[str, Traversable]:
    """Relative path -> file of every ``.avsc`` in a schema folder (current files and history)."""
    files: dict[str, Traversable] = {}
    if not root.is_dir():
        raise ConfigError(f"schema folder {root} does not exist")
    for entry in root.iterdir():
        if entry.is_file() and entry.name.endswith(".avsc"):
            files[entry.name] = entry
    history = root / HISTORY
    if history.is_dir():
        for folder in history.iterdir():
            if folder.is_dir():
                for entry in folder.iterdir():
                    if entry.is_file() and entry.name.endswith(".avsc"):
                        files[f"{HISTORY}/{folder.name}/{entry.name}"] = entry
    return files


def _read(path: str, entry: Traversable) -> tuple[dict[str, Any], str]:
    try:
        schema = json.loads(entry.read_text("utf-8"))
        canonical = to_parsing_canonical_form(schema)
    except Exception as exc:  # bad JSON or not an Avro schema: say which file
        raise ConfigError(f"schema file {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(schema, dict) or schema.get("type") != "record":
        raise ConfigError(f"schema file {path}: a topic schema must be an Avro record")
    return schema, canonical


def _full_name(schema: dict[str, Any]) -> str:
    return f"{schema.get('namespace', '')}.{schema['name']}".lstrip(".")


class SchemaSet:
    """The current version and the history of every schema of one schema folder (plus overlay)."""

    def __init__(self, current: dict[str, SchemaVersion], versions: dict[str, tuple[SchemaVersion, ...]]) -> None:
        self._current = current
        self._versions = versions
        self._by_fingerprint: dict[bytes, SchemaVersion] = {}
        for history in versions.values():
            for version in history:
                other = self._by_fingerprint.setdefault(version.fingerprint, version)
                if other is not version:
                    raise ConfigError(f"{version.source} and {other.source} are the same schema "
                                      f"(fingerprint {version.fingerprint.hex()}): one version, two files")

    @classmethod
    def load(cls, overlay: Path | None = None) -> SchemaSet:
        """The packaged schema folder, with ``overlay``'s files replacing or adding files of the same path."""
        files = _schema_files(resources.files("samestyle.topics") / "schemas")
        if overlay is not None:
            files.update(_schema_files(Path(overlay)))
        return cls.from_files(files)

    @classmethod
    def from_files(cls, files: dict[str, Traversable]) -> SchemaSet:
        currents = {path[: -len(".avsc")]: entry for path, entry in files.items() if "/" not in path}
        numbered: dict[str, dict[int, tuple[str, Traversable]]] = {}
        for path, entry in files.items():
            if "/" not in path:
                continue
            _, name, file_name = path.split("/")
            match = _VERSION_FILE.fullmatch(file_name)
            if match is None:
                raise ConfigError(f"schema file {path}: history files are named v1.avsc, v2.avsc, ...")
            numbered.setdefault(name, {})[int(match.group(1))] = (path, entry)
        for name in sorted(set(numbered) - set(currents)):
            raise ConfigError(f"{HISTORY}/{name}/ has no current version {name}.avsc")
        current: dict[str, SchemaVersion] = {}
        versions: dict[str, tuple[SchemaVersion, ...]] = {}
        for name in sorted(currents):
            schema, canonical = _read(f"{name}.avsc", currents[name])
            found = numbered.get(name, {})
            if not found:
                raise ConfigError(f"{name}.avsc has no history: add it as {HISTORY}/{name}/v1.avsc")
            if sorted(found) != list(range(1, len(found) + 1)):
                raise ConfigError(f"{HISTORY}/{name}/ has versions {sorted(found)}: a version is missing "
                                  "(every version ever written must stay readable)")
            history = []
            for number in sorted(found):
                path, entry = found[number]
                version_schema, version_canonical = _read(path, entry)
                if _full_name(version_schema) != _full_name(schema):
                    raise ConfigError(f"schema file {path} is the record {_full_name(version_schema)!r}, "
                                      f"but {name}.avsc is {_full_name(schema)!r}")
                history.append(SchemaVersion(name, number, version_schema, version_canonical,
                                             rabin_fingerprint(version_canonical.encode("utf-8")), path))
            matches = [v for v in history if v.canonical == canonical]
            if not matches:
                raise ConfigError(f"{name}.avsc is none of the versions in {HISTORY}/{name}/: a changed schema "
                                  f"is a new version, add it as {HISTORY}/{name}/v{len(history) + 1}.avsc")
            # The current file's docs and defaults are what readers use (neither is in the canonical form).
            current[name] = SchemaVersion(name, matches[0].number, schema, canonical, matches[0].fingerprint,
                                          f"{name}.avsc")
            versions[name] = tuple(history)
        return cls(current, versions)

    def names(self) -> list[str]:
        """Every schema name (the stems of the current ``.avsc`` files), sorted."""
        return sorted(self._current)

    def current(self, name: str) -> SchemaVersion:
        """The version records of ``name`` decode into and are encoded with."""
        if name not in self._current:
            raise ConfigError(f"no Avro schema {name!r}; known: {', '.join(self.names())}")
        return self._current[name]

    def versions(self, name: str) -> tuple[SchemaVersion, ...]:
        """Every known version of ``name``, oldest first (the current one included)."""
        self.current(name)
        return self._versions[name]

    def version_of(self, fingerprint: bytes) -> SchemaVersion | None:
        """The version (of any schema) whose fingerprint this is, if it is known."""
        return self._by_fingerprint.get(fingerprint)


__all__ = ["HISTORY", "SchemaSet", "SchemaVersion", "rabin_fingerprint"]
