"""
The PostgreSQL backend (psycopg 3, the optional extra ``postgresql``): a
small adbapi pool for queries and one dedicated connection, in a thread of
its own, that LISTENs and hands notifications to the reactor thread.  Both
outlive a restart of the server or a network cut: the pool drops a
connection the server ended and connects again, the listening thread
connects again (README, "Key Distributor cluster").
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from twisted.enterprise import adbapi
from twisted.internet import threads
from twisted.logger import Logger

from perc.errors import ConfigError
from perc.kd.store.database import describe_database, error_line

__all__ = ["Notifications", "connection_pool"]

log = Logger()

#: Seconds the listening thread waits for a notification before it looks
#: whether it should stop; and before it connects again after a failure.
_POLL = 0.5
_RECONNECT_DELAY = 1.0


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise ConfigError('--db postgresql:// needs psycopg: pip install "perc[postgresql]" '
                          '(or "psycopg[binary]")') from None
    return psycopg


def create_scratch_database(server: str, prefix: str) -> str:
    """
    Create a new empty database named ``prefix`` and random hex on the
    PostgreSQL server of URL ``server`` (blocking); return its URL.
    ConfigError, in one line, when the server cannot be reached or refuses.
    """
    import secrets
    from urllib.parse import urlsplit, urlunsplit

    psycopg = _psycopg()
    from psycopg import sql

    name = "{}_{}".format(prefix, secrets.token_hex(6))
    try:
        with psycopg.connect(server, autocommit=True, connect_timeout=10) as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.Error as error:
        raise ConfigError("cannot create a database on {}: {}".format(
            describe_database(server), error_line(error))) from None
    return urlunsplit(urlsplit(server)._replace(path="/" + name))


def drop_database(url: str, server: str | None = None) -> None:
    """
    Drop the database of ``url`` (blocking), connected through ``server``
    (a URL of another database on the same server; default: its
    ``postgres`` database).
    """
    from urllib.parse import urlsplit, urlunsplit

    psycopg = _psycopg()
    from psycopg import sql

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    maintenance = server or urlunsplit(parts._replace(path="/postgres"))
    try:
        with psycopg.connect(maintenance, autocommit=True, connect_timeout=10) as connection:
            connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
    except psycopg.Error as error:
        raise ConfigError("cannot drop database {} on {}: {}".format(
            name, describe_database(maintenance), error_line(error))) from None


def connection_pool(dsn: str) -> adbapi.ConnectionPool:
    _psycopg()
    return _ConnectionPool("psycopg", dsn, connect_timeout=10, cp_min=1, cp_max=4,
                           cp_noisy=False, cp_reconnect=True)


class _Connection(adbapi.Connection):
    """
    adbapi's connection, whose ``rollback`` drops a connection the server
    ended (a restart, a network cut) from the pool and raises
    ConnectionLost, without adbapi's two logged tracebacks.
    """

    def rollback(self):
        try:
            self._connection.rollback()
        except Exception:
            self._pool.disconnect(self._connection)
            raise adbapi.ConnectionLost() from None


class _ConnectionPool(adbapi.ConnectionPool):
    """
    adbapi's pool, for a server that restarts: a pooled connection does not
    know that the server ended it until it is used, so after a restart the
    first interaction on each would fail although the server is back.  An
    interaction that failed on a connection found lost, before its commit,
    runs once more on a new connection: nothing of it was committed, so
    nothing is applied twice.  A failed commit is never retried.  Each lost
    connection is one log line.
    """

    connectionFactory = _Connection

    def _runInteraction(self, interaction, *args, **kw):
        for last in (False, True):
            connection = self.connectionFactory(self)
            transaction = self.transactionFactory(self, connection)
            try:
                result = interaction(transaction, *args, **kw)
                transaction.close()
            except Exception as error:
                if not self._lost(connection, error, retry=not last):
                    raise
                if last:
                    raise
                continue
            try:
                connection.commit()
            except Exception as error:
                self._lost(connection, error, retry=False)
                raise
            return result

    def _lost(self, connection: _Connection, error: Exception, retry: bool) -> bool:
        """Roll back; True if the connection was lost instead (dropped, and logged)."""
        try:
            connection.rollback()
        except adbapi.ConnectionLost:
            self._reactor.callFromThread(
                log.info, "Database connection lost ({error}): {then}",
                error=error_line(error),
                then="trying once more on a new connection" if retry else
                "the next query opens a new one")
            return True
        return False


class Notifications:
    """
    ``add(channel, callback)``: ``callback(payload)`` on the reactor thread
    for each NOTIFY on ``channel`` (one of the channels given at
    construction).  ``add_connected(callback)``: ``callback()`` each time
    the listening connection is (re)established; notifications sent while
    it was down are lost, so listeners reload.
    """

    def __init__(self, dsn: str, channels: tuple, reactor):
        self._dsn = dsn
        self._channels = tuple(channels)
        self._reactor = reactor
        self._callbacks: dict[str, list[Callable[[str], object]]] = {
            channel: [] for channel in self._channels}
        self._connected: list[Callable[[], object]] = []
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, channel: str, callback: Callable[[str], object]) -> None:
        if channel not in self._callbacks:
            raise ValueError("not a notification channel of this store: {!r}".format(channel))
        self._callbacks[channel].append(callback)

    def add_connected(self, callback: Callable[[], object]) -> None:
        self._connected.append(callback)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="perc-kd LISTEN", daemon=True)
        self._thread.start()

    def stop(self):
        """Stop listening; a Deferred that fires once the thread has ended."""
        self._stopping.set()
        if self._thread is None:
            return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                                             lambda: None)
        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                                         self._thread.join)

    # -- the listening thread ------------------------------------------------

    def _run(self) -> None:
        psycopg = _psycopg()
        from psycopg import sql

        interrupted = False
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self._dsn, autocommit=True, connect_timeout=10) as connection:
                    for channel in self._channels:
                        connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    if interrupted:
                        interrupted = False
                        self._reactor.callFromThread(
                            log.info, "Database notifications listening again (what may have "
                            "been missed is read again)")
                    self._reactor.callFromThread(self._deliverConnected)
                    while not self._stopping.is_set():
                        for notify in connection.notifies(timeout=_POLL):
                            self._reactor.callFromThread(self._deliver, notify.channel,
                                                         notify.payload)
            except psycopg.Error as error:
                if not interrupted:
                    # Once per interruption, not once per attempt.
                    interrupted = True
                    self._reactor.callFromThread(
                        log.warn, "Database notifications interrupted, reconnecting: {error}",
                        error=error_line(error))
                self._stopping.wait(_RECONNECT_DELAY)

    # -- on the reactor thread -----------------------------------------------

    def _deliver(self, channel: str, payload: str) -> None:
        for callback in list(self._callbacks.get(channel, ())):
            try:
                callback(payload)
            except Exception:
                log.failure("notification callback {callback!r} failed on {channel}",
                            callback=callback, channel=channel)

    def _deliverConnected(self) -> None:
        for callback in list(self._connected):
            try:
                callback()
            except Exception:
                log.failure("notification connected callback {callback!r} failed",
                            callback=callback)
