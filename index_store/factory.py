"""Build an index backend by name (``"faiss"`` or ``"milvus"``); pymilvus is imported only for Milvus."""

from __future__ import annotations

from samestyle.index_store.backend import BACKENDS, FaissBackend, IndexBackend
from samestyle.topics.errors import ConfigError, IndexStoreError


def create_backend(name: str, *, kind: str = "flat", n_views: int = 0, milvus_uri: str | None = None,
                   milvus_prefix: str = "samestyle", consistency: str = "Strong",
                   milvus_token: str | None = None) -> IndexBackend:
    """The backend called ``name`` (``"faiss"`` or ``"milvus"``); Milvus needs ``milvus_uri``, and
    ConfigError says how to install it when ``pymilvus`` is missing."""
    if name == "faiss":
        return FaissBackend(kind, n_views=n_views)
    if name == "milvus":
        if not milvus_uri:
            raise IndexStoreError("the milvus backend needs milvus_uri")
        try:
            from samestyle.index_store.milvus import MilvusBackend  # pymilvus is an optional extra
        except ImportError as exc:
            raise ConfigError(f"the milvus index backend needs pymilvus (and milvus-lite for a local .db file): "
                              f"pip install 'samestyle[milvus]' ({exc})") from None

        return MilvusBackend(milvus_uri, n_views=n_views, prefix=milvus_prefix, consistency=consistency,
                             token=milvus_token or "")
    raise IndexStoreError(f"unknown index backend {name!r}; expected one of {BACKENDS}")


__all__ = ["create_backend"]
