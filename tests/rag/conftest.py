"""Fixtures of the rag tests: a real PostgreSQL server with pgvector, started once per session
(:func:`pg_local.local_postgres`: the ``pgserver`` wheel's binaries, its own data directory and free
port, stopped at the end)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pg_local import local_postgres


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str | None]:
    """``postgresql://`` URL of a fresh server with the vector extension available; None (the PostgreSQL
    tests skip) when pgserver is not installed or the server cannot start."""
    with local_postgres() as url:
        yield url
