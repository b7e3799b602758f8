"""Opening an index store by location: a file path is the embedded SQLite store, a ``postgresql://`` URL
the PostgreSQL + pgvector one. Both implement :class:`lamina.rag.types.Store`."""

from __future__ import annotations

import os
from typing import Any

from lamina.rag.types import Store

__all__ = ["is_postgres", "open_store"]


def is_postgres(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` names a PostgreSQL server (``postgresql://`` or ``postgres://``)."""
    return str(location).startswith(("postgresql://", "postgres://"))


def open_store(
    location: str | os.PathLike[str],
    embedding_model: str | None = None,
    dim: int | None = None,
    **options: Any,
) -> Store:
    """The store at ``location`` (created when new: then ``embedding_model`` and ``dim`` are required).

    Raises ``ConfigError`` when the store was built with another embedding model, naming both.
    ``options`` go to the store class (``ann_threshold`` for SQLite, ``table`` for PostgreSQL).
    """
    if is_postgres(location):
        from lamina.rag.store_pg import PgStore

        return PgStore(str(location), embedding_model, dim, **options)
    from lamina.rag.store_sqlite import SqliteStore

    return SqliteStore(location, embedding_model, dim, **options)
