"""
The Key Distributor's schema, its versions and the upgrade run on start (see
the package docstring for what each table holds).  One set of statements for
both databases; :mod:`perc.kd.store.dialects` spells them.
"""

from __future__ import annotations

from perc.errors import ConfigError

__all__ = ["SCHEMA_VERSION", "upgrade"]

#: The schema this program writes.  1: registrations only (PRAGMA
#: user_version, before this package).  2: schema_version, conference_keys,
#: sealing_check, nodes, associations.  3: associations.sequence_reserved
#: holds a DTLS record sequence number (48 bits): 64-bit on PostgreSQL too.
SCHEMA_VERSION = 3

_MIGRATIONS: dict[int, list] = {
    1: [
        "CREATE TABLE IF NOT EXISTS registrations ("
        " tls_id TEXT PRIMARY KEY NOT NULL,"
        " conference TEXT NOT NULL,"
        " fingerprint TEXT NOT NULL,"
        " kd_tls_id TEXT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS registrations_by_conference"
        " ON registrations (conference)",
    ],
    2: [
        "CREATE TABLE IF NOT EXISTS schema_version ("
        " id INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),"
        " version INTEGER NOT NULL)",
        "CREATE TABLE IF NOT EXISTS conference_keys ("
        " conference TEXT PRIMARY KEY NOT NULL,"
        " spi INTEGER NOT NULL CHECK (spi BETWEEN 0 AND 65535),"
        " generation INTEGER NOT NULL,"
        " ttl INTEGER NOT NULL,"
        " issued_at {real} NOT NULL,"
        " sealed {blob} NOT NULL,"
        " UNIQUE (conference, spi))",
        "CREATE TABLE IF NOT EXISTS sealing_check ("
        " id INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),"
        " sealed {blob} NOT NULL)",
        "CREATE TABLE IF NOT EXISTS nodes ("
        " node_id TEXT PRIMARY KEY NOT NULL,"
        " lease_expires_at {real} NOT NULL,"
        " listen_address TEXT,"
        " api_address TEXT)",
        "CREATE TABLE IF NOT EXISTS associations ("
        " association_id TEXT PRIMARY KEY NOT NULL,"
        " owner_node TEXT NOT NULL,"
        " md_identity TEXT NOT NULL,"
        " sealed_state {blob} NOT NULL,"
        " sequence_reserved INTEGER NOT NULL)",
        "CREATE INDEX IF NOT EXISTS associations_by_owner ON associations (owner_node)",
    ],
    # A step may name its statement per dialect (None: nothing to do there).
    3: [
        # SQLite's INTEGER already holds 64 bits; PostgreSQL's holds 32, and
        # a reservation past 2^31 would fail there.
        {"sqlite": None,
         "postgresql": "ALTER TABLE associations ALTER COLUMN sequence_reserved TYPE BIGINT"},
    ],
}
assert sorted(_MIGRATIONS) == list(range(1, SCHEMA_VERSION + 1))


def stored_version(cursor, dialect) -> int:
    """The schema version of the database ``cursor`` is on (0: empty)."""
    if dialect.table_exists(cursor, "schema_version"):
        cursor.execute("SELECT version FROM schema_version WHERE id = 1")
        row = cursor.fetchone()
        if row is not None:
            return row[0]
    return dialect.legacy_version(cursor)


def upgrade(cursor, dialect) -> int:
    """
    Bring the database to :data:`SCHEMA_VERSION` (in the caller's
    transaction); returns the version it was on.  A newer version than this
    program knows raises :class:`ConfigError` and changes nothing.
    """
    dialect.lock_for_upgrade(cursor)
    version = stored_version(cursor, dialect)
    if version > SCHEMA_VERSION:
        raise ConfigError(
            "database schema version {} is newer than this perc-kd knows ({}): run a "
            "newer perc-kd".format(version, SCHEMA_VERSION))
    for step in range(version + 1, SCHEMA_VERSION + 1):
        for statement in _MIGRATIONS[step]:
            if isinstance(statement, dict):
                statement = statement[dialect.name]
            if statement is not None:
                cursor.execute(dialect.sql(statement))
    if version != SCHEMA_VERSION:
        cursor.execute(dialect.sql("DELETE FROM schema_version"))
        cursor.execute(dialect.sql("INSERT INTO schema_version (id, version) VALUES (1, ?)"),
                       (SCHEMA_VERSION,))
        dialect.upgraded(cursor, SCHEMA_VERSION)
    return version
