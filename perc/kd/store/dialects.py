"""
Every difference between the SQL of SQLite and of PostgreSQL the store uses,
in one place.  Statements elsewhere are written once with ``?`` placeholders
and ``{blob}``/``{real}`` type names; a :class:`Dialect` turns them into its
database's spelling and supplies the few statements that differ outright.
"""

from __future__ import annotations

import sqlite3

__all__ = ["POSTGRESQL", "SQLITE", "Dialect"]


class Dialect:
    """SQLite's spelling; :class:`PostgreSQLDialect` overrides what differs."""

    name = "sqlite"
    #: DB-API module given to ``adbapi.ConnectionPool``.
    module = "sqlite3"
    types = {"blob": "BLOB", "real": "REAL",
             # The database's clock in seconds since the epoch: leases are
             # written and judged on one clock, whatever the nodes' clocks say.
             "now": "((julianday('now') - 2440587.5) * 86400.0)"}
    #: Appended to a SELECT that reads a row it is about to replace.
    for_update = ""

    @property
    def errors(self) -> tuple:
        """The DB-API exceptions meaning "the database failed"."""
        return (sqlite3.Error,)

    def sql(self, statement: str) -> str:
        """``statement`` with this database's type names and placeholders."""
        return statement.format(**self.types)

    def table_exists(self, cursor, table: str) -> bool:
        cursor.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,))
        return cursor.fetchone() is not None

    def legacy_version(self, cursor) -> int:
        """The schema version of a database made before the schema_version table (0: empty)."""
        # perc-kd before schema 2 kept its version in SQLite's user_version.
        cursor.execute("PRAGMA user_version")
        return cursor.fetchone()[0]

    def lock_for_upgrade(self, cursor) -> None:
        """Keep other Key Distributors out of the schema upgrade until commit."""
        # SQLite: one Key Distributor per file; nothing to do.

    def upgraded(self, cursor, version: int) -> None:
        """Record ``version`` where older programs look for it too."""
        # An older perc-kd reads user_version and refuses a newer schema.
        cursor.execute("PRAGMA user_version = {:d}".format(version))

    def notify(self, cursor, channel: str, payload: str) -> None:
        """Tell the other Key Distributors, on commit; SQLite has no others."""


class PostgreSQLDialect(Dialect):
    name = "postgresql"
    module = "psycopg"
    types = {"blob": "BYTEA", "real": "DOUBLE PRECISION",
             "now": "(extract(epoch from clock_timestamp())::double precision)"}
    for_update = " FOR UPDATE"
    #: pg_advisory_xact_lock key of the schema upgrade ("perc" in ASCII).
    UPGRADE_LOCK = 0x70657263

    @property
    def errors(self) -> tuple:
        import psycopg

        return (psycopg.Error,)

    def sql(self, statement: str) -> str:
        # psycopg's placeholder is %s; the store's statements hold no literal % or ?.
        return super().sql(statement).replace("?", "%s")

    def table_exists(self, cursor, table: str) -> bool:
        cursor.execute("SELECT to_regclass(%s)", (table,))
        return cursor.fetchone()[0] is not None

    def legacy_version(self, cursor) -> int:
        return 1 if self.table_exists(cursor, "registrations") else 0

    def lock_for_upgrade(self, cursor) -> None:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (self.UPGRADE_LOCK,))

    def upgraded(self, cursor, version: int) -> None:
        pass

    def notify(self, cursor, channel: str, payload: str) -> None:
        cursor.execute("SELECT pg_notify(%s, %s)", (channel, payload))


SQLITE = Dialect()
POSTGRESQL = PostgreSQLDialect()
