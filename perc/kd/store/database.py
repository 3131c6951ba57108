"""
:class:`Store`: the Key Distributor's tables behind Deferreds.  Every query
runs in the connection pool's threads (adbapi), never on the reactor thread;
sealing and opening happen there too.  The schema and the NOTIFY channels
are described in :mod:`perc.kd.store`.
"""

from __future__ import annotations

import dataclasses
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from twisted.internet import defer
from twisted.logger import Logger

from perc.errors import ConfigError
from perc.kd.sealing import SealingError, SealingKey
from perc.kd.store import schema
from perc.kd.store.batch import GroupCommit
from perc.kd.store.dialects import POSTGRESQL, SQLITE, Dialect

__all__ = [
    "NOTIFY_CHANNELS",
    "AssociationRecord",
    "Store",
    "StoredConferenceKey",
    "describe_database",
]

log = Logger()

REGISTRATIONS_CHANNEL = "perc_registrations"
CONFERENCE_KEYS_CHANNEL = "perc_conference_keys"
NODES_CHANNEL = "perc_nodes"
NOTIFY_CHANNELS = (REGISTRATIONS_CHANNEL, CONFERENCE_KEYS_CHANNEL, NODES_CHANNEL)

#: What the sealing_check row holds, sealed.
_SEALING_CHECK = b"perc-kd sealing check"


def is_postgresql(db: str) -> bool:
    return db.startswith(("postgresql://", "postgres://"))


def describe_database(db: str) -> str:
    """``db`` fit for a log line or an error: a PostgreSQL URL without its password."""
    if not is_postgresql(db):
        return db
    parts = urlsplit(db)
    if parts.password is None:
        return db
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc="{}:***@{}".format(user, netloc[1])))


@dataclasses.dataclass(frozen=True)
class StoredConferenceKey:
    """A conference_keys row; ``material`` is the opened secret, None if it did not open."""

    conference: str
    spi: int
    generation: int
    ttl: int
    issued_at: float
    material: bytes | None = dataclasses.field(repr=False, default=None)

    def binding(self) -> tuple:
        return (self.conference, self.spi, self.generation, self.ttl, float(self.issued_at))


@dataclasses.dataclass(frozen=True)
class AssociationRecord:
    """An associations row with its state opened."""

    association_id: str
    owner_node: str
    md_identity: str
    state: bytes = dataclasses.field(repr=False)
    sequence_reserved: int

    def binding(self) -> tuple:
        return (self.association_id, self.md_identity)


class _NoNotifications:
    """SQLite: one Key Distributor, nobody to hear from."""

    def add(self, channel, callback) -> None:
        if channel not in NOTIFY_CHANNELS:
            raise ValueError("not a notification channel of this store: {!r}".format(channel))

    def add_connected(self, callback) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self):
        return defer.succeed(None)


class Store:
    """
    One database.  Build with :meth:`open`.  Methods return Deferreds and
    fail with the database's DB-API errors (:attr:`errors`) or, for a
    sealed value that does not open, :class:`perc.kd.sealing.SealingError`.
    """

    def __init__(self, pool, dialect, description: str, sealing_key: SealingKey | None,
                 notifications, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self._pool = pool
        self.dialect = dialect
        #: The database for messages (no password).
        self.description = description
        self._sealing_key = sealing_key
        #: ``add(channel, callback)``, ``add_connected(callback)``; see the package docstring.
        self.notifications = notifications
        self._closed = False
        #: The association writes (rows, reservations), committed in batches.
        self.writes = GroupCommit(
            lambda interaction, *args: pool.runInteraction(interaction, dialect, *args),
            reactor, dialect.errors[0])

    @property
    def errors(self) -> tuple:
        """The exceptions meaning "the database failed"."""
        return self.dialect.errors

    @classmethod
    def open(cls, db: str, sealing_key: SealingKey | None = None, reactor=None) -> defer.Deferred:
        """
        Open ``db`` (an SQLite path or a ``postgresql://`` URL), upgrade its
        schema and check the sealing key against it (when given).  Fires with
        a :class:`Store`; fails with :class:`ConfigError` (one line) for what
        a user must fix.
        """
        if reactor is None:
            from twisted.internet import reactor
        description = describe_database(db)
        dialect: Dialect
        notifications: Any  # postgresql.Notifications or _NoNotifications: start(), stop()
        if is_postgresql(db):
            from perc.kd.store import postgresql

            pool = postgresql.connection_pool(db)
            dialect = POSTGRESQL
            notifications = postgresql.Notifications(db, NOTIFY_CHANNELS, reactor)
        else:
            from perc.kd.store import sqlite

            pool = sqlite.connection_pool(db)
            dialect = SQLITE
            notifications = _NoNotifications()

        def prepared(_):
            notifications.start()
            return cls(pool, dialect, description, sealing_key, notifications, reactor)

        def failed(failure):
            pool.close()
            if failure.check(ConfigError):
                raise ConfigError("database {}: {}".format(description, failure.value))
            if failure.check(*dialect.errors):
                raise ConfigError("cannot use database {}: {}".format(
                    description, error_line(failure.value)))
            return failure

        d = pool.runInteraction(_prepare, dialect, sealing_key)
        d.addCallbacks(prepared, failed)
        return d

    def _run(self, function, *args) -> defer.Deferred:
        if self._closed:
            return defer.fail(self.errors[0]("the database is closed"))
        return self._pool.runInteraction(function, self.dialect, *args)

    def _sealing(self) -> SealingKey:
        if self._sealing_key is None:
            raise SealingError("this store was opened without a sealing key")
        return self._sealing_key

    # -- registrations -------------------------------------------------------

    def load_registrations(self) -> defer.Deferred:
        """All rows as ``(conference, tls_id, fingerprint, kd_tls_id)``."""
        return self._run(_select, "SELECT conference, tls_id, fingerprint, kd_tls_id"
                         " FROM registrations", ())

    def get_registration(self, tls_id: str) -> defer.Deferred:
        """The row of ``tls_id`` as above, or None."""
        return self._run(_selectOne, "SELECT conference, tls_id, fingerprint, kd_tls_id"
                         " FROM registrations WHERE tls_id = ?", (tls_id,))

    def insert_registration(self, registration) -> defer.Deferred:
        return self._run(_writeRegistration,
                         "INSERT INTO registrations (tls_id, conference, fingerprint, kd_tls_id)"
                         " VALUES (?, ?, ?, ?)",
                         (registration.tls_id, registration.conference,
                          registration.fingerprint, registration.kd_tls_id),
                         registration.tls_id, False)

    def update_registration(self, registration) -> defer.Deferred:
        return self._run(_writeRegistration,
                         "UPDATE registrations SET fingerprint = ?"
                         " WHERE tls_id = ? AND conference = ? AND kd_tls_id = ?",
                         (registration.fingerprint, registration.tls_id,
                          registration.conference, registration.kd_tls_id),
                         registration.tls_id, True)

    def delete_registration(self, registration) -> defer.Deferred:
        return self._run(_writeRegistration,
                         "DELETE FROM registrations WHERE tls_id = ? AND conference = ?",
                         (registration.tls_id, registration.conference),
                         registration.tls_id, True)

    # -- conference keys -----------------------------------------------------

    def load_conference_keys(self) -> defer.Deferred:
        """Every conference_keys row (material None for a row that does not open)."""
        return self._run(_loadConferenceKeys, self._sealing(), None)

    def get_conference_key(self, conference: str) -> defer.Deferred:
        """The conference's row, or None."""
        return self._run(_loadConferenceKeys, self._sealing(), conference).addCallback(
            lambda rows: rows[0] if rows else None)

    def create_conference_key(self, key: StoredConferenceKey) -> defer.Deferred:
        """
        Store the conference's first key (generation 1).  Fires with the row
        now stored: ``key``, or the one another Key Distributor stored first.
        """
        return self._run(_createConferenceKey, self._sealing(), key)

    def replace_conference_key(self, key: StoredConferenceKey, generation: int) -> defer.Deferred:
        """
        Replace the conference's key if the stored one is still at
        ``generation`` (``key.generation`` is the next one).  Fires with the row
        now stored: ``key``, or the one another Key Distributor stored first.
        """
        return self._run(_replaceConferenceKey, self._sealing(), key, generation)

    # -- association state ---------------------------------------------------

    # The four writes below are group-committed (:attr:`writes`): each
    # fires once the transaction holding it, and the writes submitted
    # around it, has committed.

    def _write(self, function, *args) -> defer.Deferred:
        if self._closed:
            return defer.fail(self.errors[0]("the database is closed"))
        return self.writes.submit(function, *args)

    def put_association(self, record: AssociationRecord) -> defer.Deferred:
        """Insert or replace the association's row, its state sealed."""
        return self._write(_putAssociation, self._sealing(), record)

    def get_association(self, association_id: str) -> defer.Deferred:
        """The :class:`AssociationRecord`, or None; fails with SealingError if it does not open."""
        return self._run(_getAssociation, self._sealing(), association_id)

    def delete_association(self, association_id: str) -> defer.Deferred:
        """Fires with whether there was a row."""
        return self._write(_deleteAssociation, association_id)

    def update_association(self, record: AssociationRecord) -> defer.Deferred:
        """
        Replace the row's state and reserved limit if ``record.owner_node``
        still owns it; fires with whether it did (False: adopted by another
        node, or gone).
        """
        return self._write(_updateAssociation, self._sealing(), record)

    def reserve_block(self, association_id: str, size: int, owner_node: str) -> defer.Deferred:
        """
        Move the row's reserved write-sequence limit ``size`` further, in one
        statement, if ``owner_node`` owns it; fires with the block ``(start,
        limit)`` now reserved, or None (not this node's, or gone).
        """
        if not isinstance(size, int) or size <= 0:
            raise ValueError("a sequence block has a positive size, not {!r}".format(size))
        return self._write(_reserveBlock, association_id, size, owner_node)

    def owned_associations(self, owner_node: str) -> defer.Deferred:
        """The ids of the rows ``owner_node`` owns."""
        return self._run(_select, "SELECT association_id FROM associations"
                         " WHERE owner_node = ? ORDER BY association_id",
                         (owner_node,)).addCallback(lambda rows: [row[0] for row in rows])

    def owned_records(self, owner_node: str, association_ids: list) -> defer.Deferred:
        """The :class:`AssociationRecord` of each of ``association_ids`` ``owner_node`` still owns."""
        return self._run(_ownedRecords, self._sealing(), owner_node, list(association_ids))

    def claim_orphans(self, node_id: str) -> defer.Deferred:
        """
        Make ``node_id`` the owner of every row whose owner's lease has
        expired (on the database's clock), row by row with a
        compare-and-swap on the old owner: of two nodes claiming at once,
        each row goes to exactly one.  Fires with the
        :class:`AssociationRecord` of each row claimed (one that does not
        open is claimed, logged and left out).
        """
        return self._run(_claimOrphans, self._sealing(), node_id)

    # -- node leases ---------------------------------------------------------

    def renew_lease(self, node_id: str, seconds: float, listen_address: str | None = None,
                    api_address: str | None = None) -> defer.Deferred:
        """Insert or renew ``node_id``'s lease: it expires ``seconds`` from now on the database's clock."""
        return self._run(_renewLease, node_id, float(seconds), listen_address, api_address)

    def release_lease(self, node_id: str) -> defer.Deferred:
        """Expire ``node_id``'s lease now (a clean stop: its rows may be adopted at once)."""
        return self._run(_releaseLease, node_id)

    def nodes(self) -> defer.Deferred:
        """``[(node_id, seconds its lease has left (negative: expired))]``."""
        return self._run(_select, "SELECT node_id, lease_expires_at - {now} FROM nodes"
                         " ORDER BY node_id", ())

    # -- upkeep --------------------------------------------------------------

    def ping(self) -> defer.Deferred:
        """A cheap query (readiness)."""
        return self._run(_selectOne, "SELECT 1", ())

    @defer.inlineCallbacks
    def close(self):
        if self._closed:
            return
        self._closed = True
        self.writes.close()
        yield self.notifications.stop()
        self._pool.close()


def error_line(error) -> str:
    """The first line of a driver error's message (psycopg's run over several)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# -- in the pool's threads ---------------------------------------------------


def _prepare(cursor, dialect, sealing_key: SealingKey | None) -> None:
    schema.upgrade(cursor, dialect)
    if sealing_key is None:
        return
    cursor.execute(dialect.sql("SELECT sealed FROM sealing_check WHERE id = 1"))
    row = cursor.fetchone()
    if row is None:
        cursor.execute(dialect.sql("INSERT INTO sealing_check (id, sealed) VALUES (1, ?)"
                                   " ON CONFLICT (id) DO NOTHING"),
                       (sealing_key.seal(_SEALING_CHECK, "sealing_check", (1,)),))
        cursor.execute(dialect.sql("SELECT sealed FROM sealing_check WHERE id = 1"))
        row = cursor.fetchone()
    try:
        if sealing_key.open(row[0], "sealing_check", (1,)) != _SEALING_CHECK:
            raise SealingError("unexpected check value")
    except SealingError:
        raise ConfigError("the sealing key {} is not the one this database's secrets are "
                          "sealed with".format(sealing_key.path or "given")) from None


def _select(cursor, dialect, statement: str, arguments: tuple) -> list:
    cursor.execute(dialect.sql(statement), arguments)
    return [tuple(row) for row in cursor.fetchall()]


def _selectOne(cursor, dialect, statement: str, arguments: tuple):
    cursor.execute(dialect.sql(statement), arguments)
    row = cursor.fetchone()
    return None if row is None else tuple(row)


def _writeRegistration(cursor, dialect, statement: str, arguments: tuple, tls_id: str,
                       must_match: bool) -> None:
    cursor.execute(dialect.sql(statement), arguments)
    if must_match and cursor.rowcount != 1:
        raise dialect.errors[0]("registration of {} vanished from the database".format(tls_id))
    dialect.notify(cursor, REGISTRATIONS_CHANNEL, tls_id)


_CONFERENCE_KEY_COLUMNS = "conference, spi, generation, ttl, issued_at, sealed"


def _loadConferenceKeys(cursor, dialect, sealing_key: SealingKey, conference) -> list:
    statement = "SELECT {} FROM conference_keys".format(_CONFERENCE_KEY_COLUMNS)
    arguments: tuple = ()
    if conference is not None:
        statement += " WHERE conference = ?"
        arguments = (conference,)
    cursor.execute(dialect.sql(statement), arguments)
    found = []
    for name, spi, generation, ttl, issued_at, sealed in cursor.fetchall():
        row = StoredConferenceKey(name, spi, generation, ttl, float(issued_at))
        try:
            material = sealing_key.open(sealed, "conference_keys", row.binding())
        except SealingError:
            log.error("The stored EKTKey of conference {conference} does not open (moved or "
                      "altered): it will be replaced", conference=name)
            material = None
        found.append(dataclasses.replace(row, material=material))
    return found


def _conferenceKeyArguments(sealing_key: SealingKey, key: StoredConferenceKey) -> tuple:
    if key.material is None:
        raise ValueError("no key material to store")
    return (key.spi, key.generation, key.ttl, float(key.issued_at),
            sealing_key.seal(key.material, "conference_keys", key.binding()), key.conference)


def _createConferenceKey(cursor, dialect, sealing_key: SealingKey, key: StoredConferenceKey):
    spi, generation, ttl, issued_at, sealed, conference = _conferenceKeyArguments(sealing_key, key)
    cursor.execute(dialect.sql(
        "INSERT INTO conference_keys ({}) VALUES (?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (conference) DO NOTHING".format(_CONFERENCE_KEY_COLUMNS)),
        (conference, spi, generation, ttl, issued_at, sealed))
    if cursor.rowcount == 1:
        dialect.notify(cursor, CONFERENCE_KEYS_CHANNEL, conference)
        return key
    return _loadConferenceKeys(cursor, dialect, sealing_key, conference)[0]


def _replaceConferenceKey(cursor, dialect, sealing_key: SealingKey, key: StoredConferenceKey,
                          generation: int):
    arguments = _conferenceKeyArguments(sealing_key, key)
    cursor.execute(dialect.sql(
        "UPDATE conference_keys SET spi = ?, generation = ?, ttl = ?, issued_at = ?, sealed = ?"
        " WHERE conference = ? AND generation = ?"), arguments + (generation,))
    if cursor.rowcount == 1:
        dialect.notify(cursor, CONFERENCE_KEYS_CHANNEL, key.conference)
        return key
    current = _loadConferenceKeys(cursor, dialect, sealing_key, key.conference)
    if current:
        return current[0]
    return _createConferenceKey(cursor, dialect, sealing_key, key)


def _putAssociation(cursor, dialect, sealing_key: SealingKey, record: AssociationRecord) -> None:
    sealed = sealing_key.seal(record.state, "associations", record.binding())
    cursor.execute(dialect.sql(
        "INSERT INTO associations (association_id, owner_node, md_identity, sealed_state,"
        " sequence_reserved) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (association_id) DO UPDATE SET owner_node = excluded.owner_node,"
        " md_identity = excluded.md_identity, sealed_state = excluded.sealed_state,"
        " sequence_reserved = excluded.sequence_reserved"),
        (record.association_id, record.owner_node, record.md_identity, sealed,
         record.sequence_reserved))


def _getAssociation(cursor, dialect, sealing_key: SealingKey, association_id: str):
    cursor.execute(dialect.sql(
        "SELECT association_id, owner_node, md_identity, sealed_state, sequence_reserved"
        " FROM associations WHERE association_id = ?"), (association_id,))
    row = cursor.fetchone()
    if row is None:
        return None
    record = AssociationRecord(row[0], row[1], row[2], b"", row[4])
    return dataclasses.replace(record, state=sealing_key.open(row[3], "associations",
                                                              record.binding()))


def _deleteAssociation(cursor, dialect, association_id: str) -> bool:
    cursor.execute(dialect.sql("DELETE FROM associations WHERE association_id = ?"),
                   (association_id,))
    return bool(cursor.rowcount)


def _updateAssociation(cursor, dialect, sealing_key: SealingKey, record: AssociationRecord) -> bool:
    sealed = sealing_key.seal(record.state, "associations", record.binding())
    # Never lowered: a block reserved after the state was exported may be in use.
    cursor.execute(dialect.sql(
        "UPDATE associations SET sealed_state = ?, sequence_reserved = CASE WHEN"
        " sequence_reserved > ? THEN sequence_reserved ELSE ? END"
        " WHERE association_id = ? AND owner_node = ? AND md_identity = ?"),
        (sealed, record.sequence_reserved, record.sequence_reserved, record.association_id,
         record.owner_node, record.md_identity))
    return cursor.rowcount == 1


def _reserveBlock(cursor, dialect, association_id: str, size: int, owner_node: str):
    # The UPDATE locks the row until commit: a concurrent reservation waits
    # and then adds to the limit this one wrote.
    cursor.execute(dialect.sql(
        "UPDATE associations SET sequence_reserved = sequence_reserved + ?"
        " WHERE association_id = ? AND owner_node = ? RETURNING sequence_reserved"),
        (size, association_id, owner_node))
    row = cursor.fetchone()
    if row is None:
        return None
    return (row[0] - size, row[0])


def _claimOrphans(cursor, dialect, sealing_key: SealingKey, node_id: str) -> list:
    cursor.execute(dialect.sql(
        "SELECT association_id, owner_node FROM associations WHERE owner_node IN"
        " (SELECT node_id FROM nodes WHERE lease_expires_at < {now} AND node_id <> ?)"
        " ORDER BY association_id"), (node_id,))
    claimed = []
    for association_id, dead in cursor.fetchall():
        # Compare-and-swap on the old owner (and its lease, checked again):
        # a row another survivor claimed meanwhile matches nothing.
        cursor.execute(dialect.sql(
            "UPDATE associations SET owner_node = ? WHERE association_id = ? AND owner_node = ?"
            " AND EXISTS (SELECT 1 FROM nodes WHERE node_id = ? AND lease_expires_at < {now})"),
            (node_id, association_id, dead, dead))
        if cursor.rowcount != 1:
            continue
        record = _openedOrLogged(cursor, dialect, sealing_key, association_id, dead)
        if record is not None:
            claimed.append(record)
    return claimed


def _openedOrLogged(cursor, dialect, sealing_key: SealingKey, association_id: str,
                    previous_owner: str):
    try:
        return _getAssociation(cursor, dialect, sealing_key, association_id)
    except SealingError:
        log.error("The state of association {association_id}, claimed from node {dead}, "
                  "does not open (moved or altered): it cannot be adopted",
                  association_id=association_id, dead=previous_owner)
        return None


def _ownedRecords(cursor, dialect, sealing_key: SealingKey, owner_node: str, ids: list) -> list:
    found = []
    for association_id in ids:
        record = _openedOrLogged(cursor, dialect, sealing_key, association_id, owner_node)
        if record is not None and record.owner_node == owner_node:
            found.append(record)
    return found


def _renewLease(cursor, dialect, node_id: str, seconds: float, listen_address, api_address):
    cursor.execute(dialect.sql(
        "INSERT INTO nodes (node_id, lease_expires_at, listen_address, api_address)"
        " VALUES (?, {now} + ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET"
        " lease_expires_at = excluded.lease_expires_at, listen_address ="
        " excluded.listen_address, api_address = excluded.api_address"),
        (node_id, seconds, listen_address, api_address))


def _releaseLease(cursor, dialect, node_id: str) -> None:
    cursor.execute(dialect.sql("UPDATE nodes SET lease_expires_at = {now} - 1 WHERE node_id = ?"),
                   (node_id,))
    dialect.notify(cursor, NODES_CHANNEL, node_id)
