"""The SQLite backend: one connection in one thread (one Key Distributor per file)."""

from __future__ import annotations

from twisted.enterprise import adbapi

__all__ = ["connection_pool"]


def connection_pool(path: str) -> adbapi.ConnectionPool:
    return adbapi.ConnectionPool(
        "sqlite3", path, check_same_thread=False, cp_min=1, cp_max=1, cp_noisy=False)
