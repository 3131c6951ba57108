"""
Databases for the store tests: an SQLite file, or a PostgreSQL database of
its own (random name, dropped at cleanup) on the server PERC_TEST_POSTGRES
names.
"""

from __future__ import annotations

import os
import sqlite3

from twisted.trial.unittest import SkipTest

HOW_TO_RUN = ("set PERC_TEST_POSTGRES=postgresql://postgres@127.0.0.1:5432/postgres (a "
              "server where that user may create databases), or run .ci/run, to run the "
              "PostgreSQL tests")


def postgres_server() -> str:
    """The server URL PERC_TEST_POSTGRES names; SkipTest, saying how to run, when unset."""
    server = os.environ.get("PERC_TEST_POSTGRES")
    if not server:
        raise SkipTest("PERC_TEST_POSTGRES is not set: " + HOW_TO_RUN)
    return server


def postgres_database(testcase) -> str:
    """A ``postgresql://`` URL of a new, empty database, dropped at ``testcase``'s cleanup."""
    server = postgres_server()
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise SkipTest('psycopg is not installed (pip install ".[postgresql]"): ' + HOW_TO_RUN)
    from perc.errors import ConfigError
    from perc.kd.store.postgresql import create_scratch_database, drop_database

    try:
        url = create_scratch_database(server, "perc_test")
    except ConfigError as error:
        raise SkipTest("PostgreSQL at PERC_TEST_POSTGRES does not answer ({}): {}".format(
            error, HOW_TO_RUN))
    testcase.addCleanup(drop_database, url, server)
    return url


class SqliteDatabase:
    """The SQLite side of a test mixin: ``database`` and raw statements beside the store."""

    def makeDatabase(self) -> str:
        directory = self.mktemp()
        os.makedirs(directory)
        return os.path.join(directory, "kd.sqlite3")

    def execute(self, statement: str, arguments: tuple = ()) -> list:
        connection = sqlite3.connect(self.database)
        try:
            rows = connection.execute(statement, arguments).fetchall()
            connection.commit()
            return rows
        finally:
            connection.close()

    def refuseWrites(self, table: str) -> None:
        for event in ("INSERT", "UPDATE"):
            self.execute("CREATE TRIGGER refuse_{0}_{1} BEFORE {1} ON {0} BEGIN "
                         "SELECT RAISE(ABORT, 'refused by the test'); END".format(table, event))

    def tables(self) -> list:
        return [name for (name,) in self.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")]

    def allowWrites(self, table: str) -> None:
        """Undo :meth:`refuseWrites`."""
        for event in ("INSERT", "UPDATE"):
            self.execute("DROP TRIGGER refuse_{}_{}".format(table, event))


class PostgresDatabase:
    """The PostgreSQL side of a test mixin."""

    def makeDatabase(self) -> str:
        return postgres_database(self)

    def execute(self, statement: str, arguments: tuple = ()) -> list:
        import psycopg

        with psycopg.connect(self.database, autocommit=True) as connection:
            cursor = connection.execute(statement.replace("?", "%s"), arguments)
            return cursor.fetchall() if cursor.description else []

    def refuseWrites(self, table: str) -> None:
        self.execute("CREATE OR REPLACE FUNCTION refuse() RETURNS trigger AS $$ BEGIN "
                     "RAISE EXCEPTION 'refused by the test'; END $$ LANGUAGE plpgsql")
        self.execute("CREATE TRIGGER refuse_{0} BEFORE INSERT OR UPDATE ON {0} FOR EACH ROW "
                     "EXECUTE FUNCTION refuse()".format(table))

    def tables(self) -> list:
        return [name for (name,) in self.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]

    def allowWrites(self, table: str) -> None:
        """Undo :meth:`refuseWrites`."""
        self.execute("DROP TRIGGER refuse_{0} ON {0}".format(table))
