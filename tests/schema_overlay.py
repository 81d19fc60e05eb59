"""A test-only next version of ``listing.avsc`` and schema folders that overlay the packaged one
(``SAMESTYLE_SCHEMA_DIR``), for the schema-evolution tests (unit and on the real broker)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from samestyle.topics.history import SchemaSet

#: The field the test-only version adds (a default, so both directions resolve).
NEXT_FIELD = "condition"


def next_listing_schema() -> dict[str, Any]:
    """The packaged listing schema plus one optional field: what a real next version could look like."""
    schema = copy.deepcopy(SchemaSet.load().current("listing").schema)
    schema["fields"].append({"name": NEXT_FIELD, "type": ["null", "string"], "default": None,
                             "doc": "Test only: the item's condition (new, used, refurbished)."})
    return schema


def write_overlay(root: Path, *, current: dict[str, dict[str, Any]] | None = None,
                  history: dict[tuple[str, int], dict[str, Any]] | None = None) -> Path:
    """A schema folder at ``root``: ``current`` names replace ``<name>.avsc``, ``history`` adds
    ``history/<name>/v<N>.avsc`` files."""
    root.mkdir(parents=True, exist_ok=True)
    for name, schema in (current or {}).items():
        (root / f"{name}.avsc").write_text(json.dumps(schema, indent=1), encoding="utf-8")
    for (name, number), schema in (history or {}).items():
        folder = root / "history" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"v{number}.avsc").write_text(json.dumps(schema, indent=1), encoding="utf-8")
    return root
