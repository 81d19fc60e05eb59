"""Atomic on-disk snapshots of a live index.

A root holds snapshot directories and ``CURRENT``, which names the committed one and is replaced
atomically only after the new snapshot is fsynced and renamed into place, so a crash leaves the
previous complete snapshot. Nothing is pickled (``.npy`` read with ``allow_pickle=False``, JSON).
One writer per root. Layout: docs/INTERNALS.md.

Format 2 keeps each vector store in its stored form (float32, float16 or SQ8 codes with their
ranges) and the payloads in ``payloads.jsonl``; format 1 (float32 only, payloads in
``meta.json``) is still read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from samestyle.topics.errors import IndexStoreError

FORMAT = "samestyle.index_store"
FORMAT_VERSION = 2
#: Format versions this code reads (it writes :data:`FORMAT_VERSION`).
READ_VERSIONS = (1, 2)
CURRENT = "CURRENT"
META = "meta.json"
_NAME = re.compile(r"^snapshot-(\d{10})$")
_TMP_PREFIX = ".tmp-snapshot-"
_CHUNK = 16 << 20


def has_snapshot(root: str | Path) -> bool:
    """True when ``root`` holds a committed snapshot (a ``CURRENT`` pointer)."""
    return (Path(root) / CURRENT).is_file()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _next_name(root: Path) -> str:
    seqs = [int(m.group(1)) for p in root.iterdir() if (m := _NAME.match(p.name))]
    return f"snapshot-{max(seqs, default=0) + 1:010d}"


def write_snapshot(
    root: str | Path,
    meta: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    writers: Mapping[str, Callable[[Path], None]] | None = None,
) -> Path:
    """Write ``arrays`` (``.npy``), files made by ``writers`` and ``meta.json`` as a new snapshot.

    Returns the committed snapshot directory. Older snapshots under ``root`` are removed once the
    new one is published.
    """
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(_TMP_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        name = _next_name(root)
        tmp = root / f"{_TMP_PREFIX}{name}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            files: dict[str, dict[str, Any]] = {}
            for fname, array in arrays.items():
                with open(tmp / fname, "wb") as f:
                    np.save(f, array, allow_pickle=False)
                    f.flush()
                    os.fsync(f.fileno())
            for fname, write in (writers or {}).items():
                write(tmp / fname)
                with open(tmp / fname, "rb") as f:
                    os.fsync(f.fileno())
            for fname in [*arrays, *(writers or {})]:
                path = tmp / fname
                files[fname] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
            full_meta = {**meta, "format": FORMAT, "version": FORMAT_VERSION, "files": files}
            with open(tmp / META, "w", encoding="utf-8") as f:
                json.dump(full_meta, f, allow_nan=False)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            final = root / name
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        pointer = root / f"{_TMP_PREFIX}{CURRENT}-{uuid.uuid4().hex}"
        with open(pointer, "w", encoding="utf-8") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer, root / CURRENT)
        _fsync_dir(root)
    except (OSError, RuntimeError) as e:  # faiss.write_index raises RuntimeError
        raise IndexStoreError(f"cannot write index snapshot under {root}: {e}") from e
    for old in root.iterdir():
        if _NAME.match(old.name) and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


class SnapshotReader:
    """Reads and verifies the committed snapshot under ``root``; every failure is IndexStoreError."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        pointer = root / CURRENT
        if not pointer.is_file():
            raise IndexStoreError(f"no index snapshot in {root} (missing {CURRENT})")
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise IndexStoreError(f"cannot read {pointer}: {e}") from e
        if not _NAME.match(name):
            raise IndexStoreError(f"corrupt index snapshot: {pointer} names {name!r}")
        self.path = root / name
        try:
            with open(self.path / META, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise IndexStoreError(f"corrupt index snapshot {self.path}: cannot read {META}: {e}") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise IndexStoreError(f"corrupt index snapshot {self.path}: {META} is not an index snapshot")
        version = meta.get("version")
        if version not in READ_VERSIONS or isinstance(version, bool):
            raise IndexStoreError(
                f"index snapshot {self.path} has format version {version!r}; "
                f"this code reads versions {', '.join(map(str, READ_VERSIONS))}"
            )
        files = meta.get("files")
        if not isinstance(files, dict):
            raise self.corrupt("no file list in meta.json")
        self.meta: dict[str, Any] = meta
        self.files: dict[str, Any] = files
        self.version: int = version

    def corrupt(self, reason: str) -> IndexStoreError:
        return IndexStoreError(f"corrupt index snapshot {self.path}: {reason}")

    def verified(self, fname: str) -> Path:
        """Path of a data file after checking its size and checksum against meta.json."""
        entry = self.files.get(fname)
        if not isinstance(entry, dict):
            raise self.corrupt(f"{fname} is not listed in meta.json")
        path = self.path / fname
        try:
            size = path.stat().st_size
            if size != entry.get("bytes"):
                raise self.corrupt(f"{fname} has {size} bytes, meta.json says {entry.get('bytes')}")
            if _sha256(path) != entry.get("sha256"):
                raise self.corrupt(f"{fname} checksum mismatch")
        except OSError as e:
            raise self.corrupt(f"cannot read {fname}: {e}") from e
        return path

    def load_array(self, fname: str) -> np.ndarray:
        """Load a verified ``.npy`` file, whatever its dtype and shape (the caller checks them)."""
        path = self.verified(fname)
        try:
            return np.ascontiguousarray(np.load(path, allow_pickle=False))
        except (OSError, ValueError) as e:
            raise self.corrupt(f"cannot load {fname}: {e}") from e

    def array(self, fname: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """Load a verified ``.npy`` file and check its dtype and shape."""
        array = self.load_array(fname)
        if array.dtype != dtype or array.shape != shape:
            raise self.corrupt(
                f"{fname} is {array.dtype}{list(array.shape)}, expected {np.dtype(dtype)}{list(shape)}"
            )
        return array
