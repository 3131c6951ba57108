"""
A PostgreSQL database of its own for one test or one benchmark run: created
with a random name on a server the caller names (a ``postgresql://`` URL on
which that user may create databases), dropped afterwards, so that runs never
see each other's rows.  Used by ``tests/storehelpers.py`` and ``bench/``.
"""

from __future__ import annotations

import secrets
from urllib.parse import unquote, urlsplit, urlunsplit

__all__ = ["create_database", "drop_database", "first_line"]


def first_line(error: Exception) -> str:
    """The first line of a driver error's message (psycopg's run over several)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def create_database(server: str, prefix: str, connect_timeout: int = 5) -> str:
    """
    Create an empty database named ``prefix`` and random hex on ``server``
    and return its URL (``server`` with the new database as its path).
    ImportError without psycopg; ``psycopg.Error`` when the server does not
    answer or refuses.
    """
    import psycopg
    from psycopg import sql

    name = prefix + secrets.token_hex(8)
    with psycopg.connect(server, autocommit=True, connect_timeout=connect_timeout) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return urlunsplit(urlsplit(server)._replace(path="/" + name))


def drop_database(server: str, url: str, connect_timeout: int = 5) -> None:
    """Drop the database ``url`` names (made by :func:`create_database` on ``server``), sessions and all."""
    import psycopg
    from psycopg import sql

    name = unquote(urlsplit(url).path.lstrip("/"))
    with psycopg.connect(server, autocommit=True, connect_timeout=connect_timeout) as connection:
        connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))
