"""
The Key Distributor's registration store: which endpoint (tls-id and
certificate fingerprint) belongs to which conference.

Signalling registers an endpoint through the control API (:mod:`perc.kd.api`)
before the endpoint starts DTLS.  When the endpoint's ClientHello arrives, the
Key Distributor looks its tls-id up (RFC 8842 / RFC 8844 extension 56) and
checks the certificate against the registered fingerprint (RFC 8122).  That
check runs synchronously inside an OpenSSL callback, so :class:`Roster` keeps
the whole roster in memory and writes every change through to SQLite first:
memory changes only once the database has committed, so a failed write leaves
nothing half-stored, and the roster survives restarts.

Identifier rules (shared with the Media Distributor's API through
:func:`validate_tls_id` and :func:`validate_conference`):

- tls-id: 20 to 255 characters of ``A-Za-z0-9+/-_`` (RFC 8842).  A tls-id is
  registered in at most one conference.
- conference: 1 to 255 characters of ``A-Za-z0-9._-``, the first one a letter
  or digit (so that a conference is never ``.`` or ``..`` in a URL path, nor
  mistaken for a command-line option).
- fingerprint: RFC 8122 ``hash HEX:HEX:...``, stored in the canonical spelling
  of :func:`perc.pki.normalise_fingerprint` (lower-case hash name, upper-case
  hex).
- kd_tls_id: the tls-id the Key Distributor itself presents to that endpoint
  (ServerHello extension 56, and in SDP); 32 random characters of the tls-id
  alphabet, chosen at first registration and kept when the registration is
  replaced.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

from twisted.internet import defer
from twisted.logger import Logger

from perc.errors import ConfigError
from perc.kd.store import Store
from perc.kd.store.database import REGISTRATIONS_CHANNEL
from perc.pki import FINGERPRINT_HASHES, FingerprintError, fingerprint, normalise_fingerprint

__all__ = [
    "DEFAULT_MAX_REGISTRATIONS",
    "KD_TLS_ID_LENGTH",
    "REASON_DELETED",
    "REASON_FINGERPRINT_CHANGED",
    "Registration",
    "Roster",
    "RosterError",
    "InvalidRegistration",
    "RegistrationConflict",
    "RosterFull",
    "StorageError",
    "validate_tls_id",
    "validate_conference",
    "validate_fingerprint",
    "new_kd_tls_id",
]

log = Logger()

#: Default bound on the number of registrations one Key Distributor keeps.
DEFAULT_MAX_REGISTRATIONS = 100000

#: Length of the tls-ids the Key Distributor makes up for itself.
KD_TLS_ID_LENGTH = 32

#: Removal observer reasons.
REASON_DELETED = "deleted"
REASON_FINGERPRINT_CHANGED = "fingerprint-changed"

_TLS_ID = re.compile(r"\A[A-Za-z0-9+/_-]{20,255}\Z")
_CONFERENCE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,254}\Z")


# -- errors ------------------------------------------------------------------


class RosterError(Exception):
    """Base of the roster's errors; the message is one line for a user."""


class InvalidRegistration(RosterError, ValueError):
    """A conference, tls-id or fingerprint that breaks the rules above."""


class RegistrationConflict(RosterError):
    """The tls-id is already registered in another conference."""


class RosterFull(RosterError):
    """Storing one more registration would exceed the roster's bound."""


class StorageError(RosterError):
    """The database failed (or the roster is closed); nothing was changed."""


# -- validation --------------------------------------------------------------


def _describe(text) -> str:
    shown = repr(text)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def validate_tls_id(text) -> str:
    """
    ``text`` if it is a valid tls-id (20-255 characters of ``A-Za-z0-9+/-_``),
    else raise :class:`InvalidRegistration`.
    """
    if not isinstance(text, str) or not _TLS_ID.match(text):
        raise InvalidRegistration(
            "invalid tls-id {}: 20 to 255 characters of A-Z a-z 0-9 + / - _ "
            "expected".format(_describe(text))
        )
    return text


def validate_conference(text) -> str:
    """
    ``text`` if it is a valid conference name (1-255 characters of
    ``A-Za-z0-9._-`` starting with a letter or digit), else raise
    :class:`InvalidRegistration`.
    """
    if not isinstance(text, str) or not _CONFERENCE.match(text):
        raise InvalidRegistration(
            "invalid conference {}: 1 to 255 characters of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit, expected".format(_describe(text))
        )
    return text


def validate_fingerprint(text) -> str:
    """
    The canonical form of an RFC 8122 fingerprint, or raise
    :class:`InvalidRegistration`.
    """
    try:
        return normalise_fingerprint(text)
    except FingerprintError as error:
        raise InvalidRegistration("invalid fingerprint: {}".format(error)) from None


def new_kd_tls_id() -> str:
    """A fresh random tls-id for the Key Distributor's side of one endpoint."""
    # 24 random octets in URL-safe base64: exactly 32 characters of
    # A-Za-z0-9-_, a subset of the tls-id alphabet; 192 bits of entropy.
    value = secrets.token_urlsafe(KD_TLS_ID_LENGTH * 3 // 4)
    assert len(value) == KD_TLS_ID_LENGTH
    return value


# -- the registration --------------------------------------------------------


@dataclass(frozen=True)
class Registration:
    """One endpoint allowed into one conference."""

    conference: str
    tls_id: str
    fingerprint: str
    kd_tls_id: str

    @property
    def hash_name(self) -> str:
        """The fingerprint's hash function name, e.g. ``sha-256``."""
        return self.fingerprint.split(" ", 1)[0]

    def matches_certificate(self, certificate) -> bool:
        """
        Whether a ``cryptography`` certificate has the registered fingerprint
        (computed with the registered hash function).
        """
        return fingerprint(certificate, self.hash_name) == self.fingerprint

    def to_json(self) -> dict:
        """The JSON object the control API returns for this registration."""
        return asdict(self)


RemovalObserver = Callable[[Registration, str], object]


# -- the roster --------------------------------------------------------------


class Roster:
    """
    The registrations, in memory for synchronous lookups and in SQLite for
    persistence.  Build one with :meth:`open`.

    Changes (:meth:`put`, :meth:`delete`) are serialised: each one checks the
    in-memory state, writes to the database, and only then updates memory
    and tells the removal observers.
    """

    def __init__(self, store: Store | None, rows: Iterable = (),
                 max_registrations: int = DEFAULT_MAX_REGISTRATIONS, owns_store: bool = False):
        """
        Use :meth:`open` or :meth:`load`; this takes an open
        :class:`perc.kd.store.Store` and the rows already stored, as
        ``(conference, tls_id, fingerprint, kd_tls_id)``.
        """
        self._store = store
        self._owns_store = owns_store
        self._max = max_registrations
        self._lock = defer.DeferredLock()
        self._closed = False
        self._observers: list[RemovalObserver] = []
        self._by_tls_id: dict[str, Registration] = {}
        self._by_conference: dict[str, dict[str, Registration]] = {}
        self._by_fingerprint: dict[str, dict[str, Registration]] = {}
        self._hashes_in_use: dict[str, int] = {}
        for row in rows:
            self._remember(_registration(row))
        if store is not None:  # None: a roster that is never written (perc.testing.fuzz)
            store.notifications.add(REGISTRATIONS_CHANNEL, self._changedElsewhere)
            store.notifications.add_connected(self._reloadAll)

    @classmethod
    def open(
        cls,
        path: str,
        max_registrations: int = DEFAULT_MAX_REGISTRATIONS,
    ) -> defer.Deferred:
        """
        Open (creating if needed) the database at ``path`` (an SQLite file or
        a ``postgresql://`` URL) and load it; the roster closes it.  Fires
        with a :class:`Roster`, or fails with :class:`ConfigError` when the
        database cannot be used.
        """
        d = Store.open(path)
        d.addCallback(lambda store: cls.load(store, max_registrations, owns_store=True))
        return d

    @classmethod
    def load(cls, store: Store, max_registrations: int = DEFAULT_MAX_REGISTRATIONS,
             owns_store: bool = False) -> defer.Deferred:
        """Load the roster from an open store; fails with :class:`ConfigError`."""

        def loaded(rows):
            return cls(store, rows, max_registrations=max_registrations, owns_store=owns_store)

        def failed(failure):
            if owns_store:
                store.close()
            if failure.check(*store.errors):
                raise ConfigError("cannot read registrations from {}: {}".format(
                    store.description, failure.getErrorMessage()))
            return failure

        d = store.load_registrations()
        d.addCallback(loaded)
        d.addErrback(failed)
        return d

    # -- synchronous reads ---------------------------------------------------

    def __len__(self) -> int:
        return len(self._by_tls_id)

    @property
    def max_registrations(self) -> int:
        return self._max

    def lookup(self, tls_id: str) -> Registration | None:
        """The registration of ``tls_id`` in whatever conference, or None."""
        return self._by_tls_id.get(tls_id)

    def get(self, conference: str, tls_id: str) -> Registration | None:
        """The registration of ``tls_id`` if it is in ``conference``, else None."""
        registration = self._by_tls_id.get(tls_id)
        if registration is None or registration.conference != conference:
            return None
        return registration

    def list(self, conference: str) -> tuple:
        """The registrations of ``conference``, ordered by tls-id."""
        members = self._by_conference.get(conference, {})
        return tuple(members[tls_id] for tls_id in sorted(members))

    def lookup_by_fingerprint(self, fingerprint_text: str) -> tuple:
        """
        The registrations whose fingerprint equals ``fingerprint_text`` (in any
        spelling; compared in canonical form), ordered by conference and
        tls-id.  Raises :class:`InvalidRegistration` for a malformed
        fingerprint.  Used when an endpoint sends no tls-id.
        """
        members = self._by_fingerprint.get(validate_fingerprint(fingerprint_text), {})
        return tuple(
            sorted(members.values(), key=lambda r: (r.conference, r.tls_id))
        )

    def lookup_by_certificate(self, certificate) -> tuple:
        """
        The registrations whose fingerprint matches a ``cryptography``
        certificate, whichever hash function each was registered with.
        """
        found: list[Registration] = []
        for hash_name in sorted(self._hashes_in_use):
            if hash_name in FINGERPRINT_HASHES:
                found.extend(self.lookup_by_fingerprint(fingerprint(certificate, hash_name)))
        return tuple(sorted(found, key=lambda r: (r.conference, r.tls_id)))

    # -- observers -----------------------------------------------------------

    def add_removal_observer(self, observer: RemovalObserver) -> None:
        """
        Call ``observer(registration, reason)`` whenever a registration stops
        being valid: ``reason`` is :data:`REASON_DELETED` or
        :data:`REASON_FINGERPRINT_CHANGED`, and ``registration`` is the old
        one.  Called after the change is stored; exceptions are logged and
        ignored.
        """
        self._observers.append(observer)

    def remove_removal_observer(self, observer: RemovalObserver) -> None:
        self._observers.remove(observer)

    def _notify(self, registration: Registration, reason: str) -> None:
        for observer in list(self._observers):
            try:
                observer(registration, reason)
            except Exception:
                log.failure(
                    "removal observer {observer!r} failed for tls_id={tls_id}",
                    observer=observer,
                    tls_id=registration.tls_id,
                    conference=registration.conference,
                )

    # -- changes -------------------------------------------------------------

    def put(self, conference: str, tls_id: str, fingerprint_text: str) -> defer.Deferred:
        """
        Register (or re-register) ``tls_id`` with ``fingerprint_text`` in
        ``conference``.  Fires with ``(registration, created)``; fails with
        :class:`InvalidRegistration`, :class:`RegistrationConflict` (the
        tls-id is in another conference), :class:`RosterFull` or
        :class:`StorageError`, having changed nothing.
        """
        try:
            conference = validate_conference(conference)
            tls_id = validate_tls_id(tls_id)
            fingerprint_text = validate_fingerprint(fingerprint_text)
        except InvalidRegistration:
            return defer.fail()
        return self._lock.run(self._put, conference, tls_id, fingerprint_text)

    def _put(self, conference: str, tls_id: str, fingerprint_text: str) -> defer.Deferred:
        if self._closed:
            return defer.fail(StorageError("the registration store is closed"))
        old = self._by_tls_id.get(tls_id)
        if old is not None and old.conference != conference:
            return defer.fail(
                RegistrationConflict(
                    "tls-id {} is already registered in conference {}".format(
                        tls_id, old.conference
                    )
                )
            )
        if old is None:
            if len(self._by_tls_id) >= self._max:
                return defer.fail(
                    RosterFull(
                        "the Key Distributor holds its maximum of {} "
                        "registrations".format(self._max)
                    )
                )
            new = Registration(conference, tls_id, fingerprint_text, new_kd_tls_id())
            write = self._store.insert_registration
        elif old.fingerprint == fingerprint_text:
            # Nothing to change; the same registration again.
            return defer.succeed((old, False))
        else:
            new = Registration(conference, tls_id, fingerprint_text, old.kd_tls_id)
            write = self._store.update_registration

        def stored(_):
            if old is not None:
                self._forget(old)
            self._remember(new)
            if old is not None and old.fingerprint != new.fingerprint:
                self._notify(old, REASON_FINGERPRINT_CHANGED)
            return (new, old is None)

        d = write(new)
        d.addCallbacks(stored, self._storage_failed)
        return d

    def delete(self, conference: str, tls_id: str) -> defer.Deferred:
        """
        Remove the registration of ``tls_id`` from ``conference``.  Fires with
        True if there was one, False if not (also when the tls-id is in
        another conference, which stays untouched); fails with
        :class:`StorageError`, having changed nothing.
        """
        return self._lock.run(self._delete, conference, tls_id)

    def _delete(self, conference: str, tls_id: str) -> defer.Deferred:
        if self._closed:
            return defer.fail(StorageError("the registration store is closed"))
        old = self.get(conference, tls_id)
        if old is None:
            return defer.succeed(False)

        def deleted(_):
            self._forget(old)
            self._notify(old, REASON_DELETED)
            return True

        d = self._store.delete_registration(old)
        d.addCallbacks(deleted, self._storage_failed)
        return d

    def _storage_failed(self, failure):
        if failure.check(*self._store.errors):
            log.failure("registration database write failed", failure=failure)
            raise StorageError(
                "the registration database failed: {}".format(failure.value)
            )
        return failure

    def ping(self) -> defer.Deferred:
        """
        A cheap query on the database (readiness): fires with None when it
        answers, fails with StorageError when it does not or is closed.
        """
        if self._closed:
            return defer.fail(StorageError("the registration database is closed"))
        d = self._store.ping()
        d.addCallbacks(lambda _: None, self._ping_failed)
        return d

    def _ping_failed(self, failure):
        failure.trap(*self._store.errors)
        raise StorageError("the registration database failed: {}".format(failure.value))

    def close(self) -> defer.Deferred:
        """
        Let changes under way finish, then close the database.  Lookups keep
        answering from memory; later changes fail with :class:`StorageError`.
        """

        def close():
            if not self._closed:
                self._closed = True
                if self._owns_store:
                    return self._store.close()

        return self._lock.run(close)

    # -- changes made by other Key Distributors ------------------------------

    def _changedElsewhere(self, tls_id: str) -> defer.Deferred:
        """NOTIFY perc_registrations: bring ``tls_id``'s registration in memory up to date."""
        return self._lock.run(self._reload, tls_id)

    def _reloadAll(self) -> defer.Deferred:
        """The notification connection (re)connected: whatever changed meanwhile, reload."""
        return self._lock.run(self._reload, None)

    def _reload(self, tls_id: str | None) -> defer.Deferred:
        if self._closed:
            return defer.succeed(None)
        if tls_id is None:
            d = self._store.load_registrations()
        else:
            d = self._store.get_registration(tls_id).addCallback(
                lambda row: [] if row is None else [row])

        def apply(rows):
            stored = {}
            for row in rows:
                try:
                    registration = _registration(row)
                except ConfigError as error:
                    log.error("Ignoring a stored registration: {error}", error=str(error))
                    continue
                stored[registration.tls_id] = registration
            known = set(self._by_tls_id) if tls_id is None else {tls_id}
            for gone in known - set(stored):
                old = self._by_tls_id.get(gone)
                if old is not None:
                    self._forget(old)
                    self._notify(old, REASON_DELETED)
            for registration in stored.values():
                old = self._by_tls_id.get(registration.tls_id)
                if old == registration:
                    continue
                if old is not None:
                    self._forget(old)
                self._remember(registration)
                if old is not None and (old.fingerprint != registration.fingerprint
                                        or old.conference != registration.conference):
                    self._notify(old, REASON_FINGERPRINT_CHANGED if old.conference
                                 == registration.conference else REASON_DELETED)

        def failed(failure):
            failure.trap(*self._store.errors)
            log.warn("Could not reload registrations after a change elsewhere: {error}",
                     error=failure.getErrorMessage())

        d.addCallbacks(apply, failed)
        return d

    # -- in-memory indexes ---------------------------------------------------

    def _remember(self, registration: Registration) -> None:
        self._by_tls_id[registration.tls_id] = registration
        self._by_conference.setdefault(registration.conference, {})[
            registration.tls_id
        ] = registration
        self._by_fingerprint.setdefault(registration.fingerprint, {})[
            registration.tls_id
        ] = registration
        hash_name = registration.hash_name
        self._hashes_in_use[hash_name] = self._hashes_in_use.get(hash_name, 0) + 1

    def _forget(self, registration: Registration) -> None:
        del self._by_tls_id[registration.tls_id]
        members = self._by_conference[registration.conference]
        del members[registration.tls_id]
        if not members:
            del self._by_conference[registration.conference]
        same = self._by_fingerprint[registration.fingerprint]
        del same[registration.tls_id]
        if not same:
            del self._by_fingerprint[registration.fingerprint]
        hash_name = registration.hash_name
        self._hashes_in_use[hash_name] -= 1
        if not self._hashes_in_use[hash_name]:
            del self._hashes_in_use[hash_name]


def _registration(row) -> Registration:
    """A stored ``(conference, tls_id, fingerprint, kd_tls_id)`` row; ConfigError if unusable."""
    conference, tls_id, fingerprint_text, kd_tls_id = row
    try:
        return Registration(
            validate_conference(conference),
            validate_tls_id(tls_id),
            validate_fingerprint(fingerprint_text),
            validate_tls_id(kd_tls_id),
        )
    except InvalidRegistration as error:
        raise ConfigError(
            "the registration database holds an unusable row: {}".format(error)
        ) from None
