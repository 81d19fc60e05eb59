"""Growable stores of vectors in one of three forms: ``float32``, ``float16`` or ``sq8`` codes.

A :class:`VectorRows` holds rows ``0 .. len-1`` of one kind of vector (a listing's searched vector,
or one of its views) in one contiguous, capacity-doubling array, encoded on the way in and decoded
on the way out; :meth:`VectorRows.search` is the exact top-k over the stored form.

* ``float32``: the vectors as given (4 bytes per dimension).
* ``float16``: numpy's IEEE half precision (2 bytes); about 3 significant digits per component.
* ``sq8``: faiss's 8-bit scalar quantiser (``ScalarQuantizer.QT_8bit``, 1 byte) after faiss's
  random rotation (``RandomRotationMatrix``, orthogonal, so inner products are unchanged): per
  rotated dimension a range ``[vmin, vmin + vdiff]`` (min and max) learnt from the first
  :data:`SQ8_TRAIN_ROWS` rows, 256 levels; a component outside the range is clamped to it. Until
  that many rows are in, the rows are kept in float32 (``stored == "float32"``), then trained on and
  encoded once; the ranges never change after that (one index holds one model's vectors, so their
  distribution stays put).

Why the rotation: a PCA-shaped embedding puts most of its variance in a few dimensions and has
heavy-tailed ones whose min/max range wastes most of the 256 levels; rotating first makes every
dimension alike. On the 29,370 MiniLM catalogue embeddings reduced to 256 dimensions that
``samestyle bench index --vectors`` uses, 2,000 queries (one-off scripts over the same vectors),
recall@10 against exact float32 was 0.986 without it (ranges from 10,000 rows or from all rows
alike; widening the min/max by 5-20 %, mean +- 3-6 standard deviations or quantile ranges all did
no better, 0.92-0.986) and 0.992 with it (three rotation seeds: 0.9921, 0.9920, 0.9922); float16
gave 0.9988. The bench's own run: docs/SCALING.md.

The search of an sq8 store never decodes: with ``r = q . R`` the rotated query, faiss decodes code
``c`` of dimension ``d`` to ``vmin[d] + vdiff[d] * (c + 0.5) / 255``, so ``q . decoded = r . vmin +
0.5 * sum(r') + r' . c`` with ``r' = r * vdiff / 255``: the GEMM runs on the codes (cast to float32
block by block, exact small integers) against ``r'``, and the per-query constant, which does not
change the order, is added to the top-k scores. The scores are those of the decoded vectors, as
for float16.
"""

from __future__ import annotations

import faiss
import numpy as np

from samestyle.index_store.exact import Scratch, top_k_inner_product
from samestyle.topics.errors import IndexStoreError

FORMS = ("float32", "float16", "sq8")
#: Rows an sq8 store keeps in float32 before it learns its ranges from them and encodes.
SQ8_TRAIN_ROWS = 10_000
#: Seed of the sq8 rotation (any seed does as well; a fixed one makes runs repeatable).
SQ8_ROTATION_SEED = 1234
_MIN_CAPACITY = 16
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "sq8": np.dtype(np.uint8)}


def grow(array: np.ndarray, used: int, needed: int) -> np.ndarray:
    """Return ``array`` or a copy with room for ``needed`` rows (capacity doubles)."""
    if needed <= array.shape[0]:
        return array
    capacity = max(needed, 2 * array.shape[0], _MIN_CAPACITY)
    grown = np.empty((capacity, *array.shape[1:]), dtype=array.dtype)
    grown[:used] = array[:used]
    return grown


def shrink(array: np.ndarray, used: int) -> np.ndarray:
    """Give memory back after mass deletes: halve capacity while a quarter or less is used."""
    capacity = array.shape[0]
    if capacity <= 4 * _MIN_CAPACITY or used > capacity // 4:
        return array
    return array[: max(2 * used, _MIN_CAPACITY)].copy()


def check_encodable(form: str, vectors: np.ndarray, what: str) -> None:
    """IndexStoreError when finite float32 ``vectors`` cannot be stored as ``form`` (float16's
    range ends at 65504); callers check before they change anything."""
    if form == "float16" and vectors.size and float(np.abs(vectors).max()) > _FLOAT16_MAX:
        raise IndexStoreError(f"{what}: a component exceeds float16's range ({_FLOAT16_MAX:g})")


def _sq8_quantizer(dim: int, ranges: np.ndarray | None = None) -> faiss.ScalarQuantizer:
    quantizer = faiss.ScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit)  # min/max ranges
    if ranges is not None:
        faiss.copy_array_to_vector(np.ascontiguousarray(ranges, dtype=np.float32).ravel(), quantizer.trained)
    return quantizer


def sq8_rotation(dim: int, seed: int = SQ8_ROTATION_SEED) -> np.ndarray:
    """faiss's random rotation ``R [dim, dim]`` (orthogonal; a vector ``x`` rotates to ``x @ R.T``)."""
    rotation = faiss.RandomRotationMatrix(dim, dim)
    rotation.init(seed)
    return faiss.vector_to_array(rotation.A).reshape(dim, dim).astype(np.float32)


class VectorRows:
    """Rows ``[len, dim]`` of vectors stored as ``form``; one caller at a time (the index's lock).

    Writes take finite float32 ``[m, dim]`` arrays (checked by the caller); reads return float32.
    """

    def __init__(self, dim: int, form: str = "float32", *, train_rows: int = SQ8_TRAIN_ROWS) -> None:
        if form not in FORMS:
            raise IndexStoreError(f"unknown vector form {form!r}; expected one of {FORMS}")
        if not isinstance(train_rows, int) or isinstance(train_rows, bool) or train_rows < 1:
            raise IndexStoreError(f"sq8 train_rows must be an int >= 1, got {train_rows!r}")
        self.dim = dim
        self.form = form
        self.train_rows = train_rows
        self._n = 0
        self._quantizer: faiss.ScalarQuantizer | None = None
        self._rotation = np.empty((0, dim), dtype=np.float32)  # [dim, dim], sq8 once trained
        self._vmin = np.empty(0, dtype=np.float32)  # [dim] of the rotated vectors
        self._step = np.empty(0, dtype=np.float32)  # [dim] vdiff / 255
        self._data = np.empty((0, dim), dtype=_DTYPES[self.stored])  # [capacity, dim]

    @property
    def stored(self) -> str:
        """The form the rows are held in now: ``form``, except ``float32`` for an untrained sq8."""
        return "float32" if self.form == "sq8" and self._quantizer is None else self.form

    def __len__(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        """Bytes of the rows in use (the array's spare capacity is never written, so not resident)."""
        return self._n * self.dim * self._data.itemsize

    # ---------------------------------------------------------------- writing

    def append(self, vectors: np.ndarray) -> np.ndarray:
        """Add rows ``[m, dim]`` at the end; returns their row numbers ``[m]`` int64."""
        m = vectors.shape[0]
        start = self._n
        codes = self._encode(vectors)
        self._data = grow(self._data, start, start + m)
        self._data[start : start + m] = codes
        self._n = start + m
        if self.stored != self.form and self._n >= self.train_rows:
            self._train()
        return np.arange(start, start + m, dtype=np.int64)

    def put(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Overwrite existing ``rows`` with ``vectors [len(rows), dim]``."""
        self._data[rows] = self._encode(vectors)

    def move(self, source: int, target: int) -> None:
        """Copy row ``source`` over row ``target`` as stored (no re-encoding)."""
        self._data[target] = self._data[source]

    def truncate(self, n: int) -> None:
        """Keep rows ``0 .. n-1``."""
        self._n = min(self._n, n)

    def shrink(self) -> None:
        self._data = shrink(self._data, self._n)

    # ---------------------------------------------------------------- reading

    def decode(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``[len(rows), dim]`` float32, as the search sees them."""
        codes = self._data[rows]
        if self.stored == "sq8":
            rotated = self._vmin + self._step * (codes.astype(np.float32) + 0.5)  # [m, dim]
            return np.ascontiguousarray(rotated @ self._rotation, dtype=np.float32)
        return codes.astype(np.float32)

    def all(self) -> np.ndarray:
        """Every row, decoded: ``[len, dim]`` float32 (a view when stored as float32)."""
        if self.stored == "float32":
            return self._data[: self._n]
        return self.decode(np.arange(self._n))

    def search(self, queries: np.ndarray, k: int, scratch: Scratch) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` of the stored rows by inner product with ``queries [nq, dim]``:
        ``(scores [nq, k'], rows [nq, k'])`` as :func:`~samestyle.index_store.exact.top_k_inner_product`."""
        codes = self._data[: self._n]  # a contiguous view: read in place
        if self.stored != "sq8":
            return top_k_inner_product(queries, codes, k, scratch=scratch)
        rotated = queries @ self._rotation.T  # [nq, dim]
        scaled = np.ascontiguousarray(rotated * self._step, dtype=np.float32)  # [nq, dim]
        offset = rotated @ self._vmin + 0.5 * scaled.sum(axis=1, dtype=np.float32)  # [nq]
        scores, rows = top_k_inner_product(scaled, codes, k, scratch=scratch)
        return scores + offset[:, None].astype(np.float32), rows

    # -------------------------------------------------------------- snapshots

    def state(self) -> tuple[np.ndarray, np.ndarray | None]:
        """``(rows as stored [len, dim], sq8 parameters or None)`` for a snapshot; the parameters
        are ``[2 + dim, dim]`` float32: vmin, vdiff, then the rotation's rows."""
        if self._quantizer is None:
            return self._data[: self._n], None
        ranges = faiss.vector_to_array(self._quantizer.trained).reshape(2, self.dim)
        return self._data[: self._n], np.concatenate([ranges, self._rotation])

    @classmethod
    def restore(cls, dim: int, form: str, codes: np.ndarray, sq8: np.ndarray | None, *,
                train_rows: int = SQ8_TRAIN_ROWS) -> VectorRows:
        """The store a :meth:`state` describes; IndexStoreError when the pieces do not fit."""
        rows = cls(dim, form, train_rows=train_rows)
        if sq8 is not None:
            if form != "sq8" or sq8.dtype != np.float32 or sq8.shape != (2 + dim, dim):
                raise IndexStoreError(f"sq8 parameters of shape {list(sq8.shape)} for a {form} store of dim {dim}")
            rows._set_quantizer(_sq8_quantizer(dim, sq8[:2]), sq8[2:])
        expected = _DTYPES[rows.stored]
        if codes.dtype != expected or codes.ndim != 2 or codes.shape[1] != dim:
            raise IndexStoreError(
                f"{form} rows stored as {codes.dtype}{list(codes.shape)}, expected {expected}[n, {dim}]")
        rows._data = np.ascontiguousarray(codes)
        rows._n = codes.shape[0]
        return rows

    # ---------------------------------------------------------------- internals

    def _encode(self, vectors: np.ndarray) -> np.ndarray:
        stored = self.stored
        if stored == "float16":
            return vectors.astype(np.float16)
        if stored == "sq8":
            assert self._quantizer is not None
            return self._quantizer.compute_codes(np.ascontiguousarray(vectors @ self._rotation.T, dtype=np.float32))
        return vectors

    def _train(self) -> None:
        rotation = sq8_rotation(self.dim)
        sample = np.ascontiguousarray(self._data[: self._n] @ rotation.T, dtype=np.float32)  # float32 until now
        quantizer = _sq8_quantizer(self.dim)
        quantizer.train(sample)
        self._set_quantizer(quantizer, rotation)
        self._data = quantizer.compute_codes(sample)

    def _set_quantizer(self, quantizer: faiss.ScalarQuantizer, rotation: np.ndarray) -> None:
        ranges = faiss.vector_to_array(quantizer.trained)  # [vmin (dim), vdiff (dim)]
        self._quantizer = quantizer
        self._rotation = np.ascontiguousarray(rotation, dtype=np.float32)
        self._vmin = np.ascontiguousarray(ranges[: self.dim], dtype=np.float32)
        self._step = np.ascontiguousarray(ranges[self.dim :] / 255.0, dtype=np.float32)


__all__ = ["FORMS", "SQ8_ROTATION_SEED", "SQ8_TRAIN_ROWS", "VectorRows", "check_encodable", "grow", "shrink",
           "sq8_rotation"]
