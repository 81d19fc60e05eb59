"""Build an index backend by name (``"faiss"`` or ``"milvus"``); pymilvus is imported only for Milvus."""

from __future__ import annotations

from samestyle.index_store.backend import BACKENDS, FaissBackend, IndexBackend
from samestyle.topics.errors import IndexStoreError


def create_backend(name: str, *, kind: str = "flat", n_views: int = 0, milvus_uri: str | None = None,
                   milvus_prefix: str = "samestyle", consistency: str = "Strong") -> IndexBackend:
    """The backend called ``name`` (``"faiss"`` or ``"milvus"``); Milvus needs ``milvus_uri``."""
    if name == "faiss":
        return FaissBackend(kind, n_views=n_views)
    if name == "milvus":
        if not milvus_uri:
            raise IndexStoreError("the milvus backend needs milvus_uri")
        from samestyle.index_store.milvus import MilvusBackend  # pymilvus is an optional extra

        return MilvusBackend(milvus_uri, n_views=n_views, prefix=milvus_prefix, consistency=consistency)
    raise IndexStoreError(f"unknown index backend {name!r}; expected one of {BACKENDS}")


__all__ = ["create_backend"]
