"""
The end-to-end key-encryption keys of the Key Distributor's conferences
(RFC 8870, RFC 8871): one EKTKey per conference, shared by every endpoint in
it, replaced on demand (rekey) and before it expires (rollover, driven by
:class:`perc.kd.associations.KeyDistributor`).  Only the Key Distributor
holds these; the Media Distributor never sees them.  Times are ``now``
arguments on the caller's clock.

With a store (:mod:`perc.kd.store`), every key is written, sealed, to the
database before it is used, and loaded on start, so a restart keeps the
conference keys.  In a cluster (PostgreSQL) the keys are cluster-wide: a key
written by any Key Distributor reaches every other one's memory by NOTIFY
(:meth:`ConferenceKeys.watch`), newer generations only, and its observers
(the KeyDistributor) send it to their own members.  Reads stay synchronous, from memory (they run inside the
handshake path); a conference that has no usable key in memory gets one
through :meth:`ConferenceKeys.ensure`, and a new key whose write fails is
not used.
"""

from __future__ import annotations

import dataclasses
import math
import os
import secrets

from twisted.internet import defer
from twisted.logger import Logger

from perc.ekt import MAX_TTL, EktCipher, EktKey
from perc.kd.store import StoredConferenceKey
from perc.kd.store.database import CONFERENCE_KEYS_CHANNEL

__all__ = ["ConferenceKeys", "CONFERENCE_SALT_LENGTH", "DEFAULT_EKT_TTL",
           "DEFAULT_ROLLOVER", "check_ttl", "check_rollover"]

log = Logger()

#: The double AEAD profiles' end-to-end master salt is 12 octets.
CONFERENCE_SALT_LENGTH = 12
#: Seconds an EKTKey stays valid for an endpoint; a rekey replaces it sooner.
DEFAULT_EKT_TTL = 24 * 3600
#: The fraction of its TTL after which a conference's EKTKey is replaced.
DEFAULT_ROLLOVER = 0.75
#: The TTL handed out with a key already in use is rounded down to a
#: multiple of TTL // TTL_LEFT_STEPS seconds (at least 1): a resend within
#: the same step is then the very same ekt_key message (same message_seq),
#: so an association's liveness probes cannot run through the DTLS
#: message_seq space over days.
TTL_LEFT_STEPS = 64


def check_ttl(ttl) -> int:
    """``ttl`` if it is an EKTKey TTL this Key Distributor may use (1 to 2^24 - 1), else ValueError."""
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= MAX_TTL:
        raise ValueError("EKTKey TTL must be 1 to {} seconds (uint24; 0 is expired on "
                         "arrival), not {!r}".format(MAX_TTL, ttl))
    return ttl


def check_rollover(fraction) -> float:
    """``fraction`` if it is a rollover point strictly between 0 and 1, else ValueError."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
            or not 0 < fraction < 1:
        raise ValueError("EKTKey rollover must be a fraction of the TTL between 0 and 1 "
                         "(exclusive), not {!r}".format(fraction))
    return float(fraction)


@dataclasses.dataclass
class _Issued:
    key: EktKey  # with the full TTL
    at: float  # when it was made, on the caller's clock
    generation: int = 0  # its row's generation in the store (0: not stored)
    #: The key with the TTL key_for last counted down to (every joiner
    #: until the next step gets the same one: no copy per join).
    counted_down: EktKey | None = dataclasses.field(default=None, compare=False)


class ConferenceKeys:
    """
    conference -> its current EKTKey and when it was made, bounded by
    ``max_conferences``.  ``ttl`` (seconds) is 1 to 2^24 - 1: RFC 8870
    forbids using an EKTKey after its TTL, so a TTL of 0 would be expired on
    arrival (ValueError).  A key is due for replacement once ``rollover``
    (a fraction of its TTL) has passed.

    Without a ``store`` the keys live in memory only and :meth:`key_for`
    makes a conference's first key on the spot; with one, call :meth:`load`
    first, and :meth:`key_for` answers None until :meth:`ensure` has stored
    the conference's key.
    """

    def __init__(self, cipher: EktCipher = EktCipher.AESKW_128, ttl: int = DEFAULT_EKT_TTL,
                 rollover: float = DEFAULT_ROLLOVER, max_conferences: int = 100000,
                 store=None):
        self.cipher = EktCipher(cipher)
        self.ttl = check_ttl(ttl)
        self.rollover = check_rollover(rollover)
        self.max_conferences = max_conferences
        self.store = store
        self._keys: dict[str, _Issued] = {}
        self._lock = defer.DeferredLock()
        #: ``callback(conference)`` when another Key Distributor's key replaced ours.
        self._observers: list = []

    def add_observer(self, callback) -> None:
        """``callback(conference)`` each time a newer key written elsewhere is taken in."""
        self._observers.append(callback)

    def watch(self, notifications) -> None:
        """Take in the keys other Key Distributors write (the store's ``notifications``)."""
        notifications.add(CONFERENCE_KEYS_CHANNEL, self.refresh)
        notifications.add_connected(self.refresh_all)

    def refresh(self, conference: str) -> defer.Deferred:
        """Read ``conference``'s stored key; take it in if newer than ours."""
        d = self.store.get_conference_key(conference)

        def takeIn(row) -> None:
            if row is not None:
                self._takeIn(row)
        d.addCallback(takeIn)
        d.addErrback(self._refreshFailed, conference)
        return d

    def refresh_all(self) -> defer.Deferred:
        """Read every stored key (after missed notifications); take in the newer ones."""
        d = self.store.load_conference_keys()

        def takeIn(rows) -> None:
            for row in rows:
                self._takeIn(row)
        d.addCallback(takeIn)
        d.addErrback(self._refreshFailed, None)
        return d

    def _refreshFailed(self, failure, conference) -> None:
        log.warn("Could not read the stored EKTKey of {conference}: {error} (the next "
                      "notification or reconnection reads it again)",
                      conference=conference or "every conference",
                      error=failure.getErrorMessage())

    def _takeIn(self, row: StoredConferenceKey) -> None:
        current = self._keys.get(row.conference)
        if current is not None and row.generation <= current.generation:
            return  # ours, or older than ours (notifications may arrive late)
        issued = self._unpack(row)
        if issued is None:
            return
        self._keep(row.conference, issued)
        for observer in list(self._observers):
            observer(row.conference)

    def load(self) -> defer.Deferred:
        """Read the stored keys into memory (a key of another EKT cipher is left to be replaced)."""
        if self.store is None:
            return defer.succeed(None)

        def loaded(rows):
            for row in rows:
                issued = self._unpack(row)
                if issued is not None and len(self._keys) < self.max_conferences:
                    self._keys[row.conference] = issued
            return len(self._keys)

        return self.store.load_conference_keys().addCallback(loaded)

    def _unpack(self, row: StoredConferenceKey) -> _Issued | None:
        material = row.material
        length = self.cipher.key_length
        if (material is None or len(material) != 1 + length + CONFERENCE_SALT_LENGTH
                or material[0] != int(self.cipher)):
            return None
        return _Issued(EktKey(material[1:1 + length], material[1 + length:], row.spi, row.ttl),
                       row.issued_at, row.generation)

    def _pack(self, conference: str, issued: _Issued) -> StoredConferenceKey:
        key = issued.key
        return StoredConferenceKey(
            conference, key.ekt_spi, issued.generation, key.ekt_ttl, issued.at,
            bytes([int(self.cipher)]) + key.ekt_key_value + key.srtp_master_salt)

    def _new(self, spi: int) -> EktKey:
        return EktKey(os.urandom(self.cipher.key_length), os.urandom(CONFERENCE_SALT_LENGTH),
                      spi, self.ttl)

    def _keep(self, conference: str, issued: _Issued) -> None:
        if conference not in self._keys and len(self._keys) >= self.max_conferences:
            # Forget the oldest conference's key: endpoints still in it
            # keep the copy they have; a rekey gives it a new one.
            self._keys.pop(next(iter(self._keys)))
        self._keys[conference] = issued

    def _issued(self, conference: str, now: float) -> _Issued:
        issued = self._keys.get(conference)
        if issued is None:
            issued = _Issued(self._new(secrets.randbelow(0x10000)), now)
            self._keep(conference, issued)
        return issued

    def key_for(self, conference: str, now: float) -> EktKey | None:
        """
        The conference's EKTKey with the TTL it has left at ``now``: rounded
        down (to the step, see TTL_LEFT_STEPS), at least 1.  Without a store
        it is created on first use; with one, None when there is no key in
        memory or its TTL has run out (see :meth:`ensure`).
        """
        issued: _Issued | None
        if self.store is None:
            issued = self._issued(conference, now)
        else:
            issued = self._keys.get(conference)
            if issued is None or now >= issued.at + issued.key.ekt_ttl:
                return None
        key = issued.key
        if key.ekt_ttl == 0:
            return key  # never made here; nothing to count down
        step = max(1, key.ekt_ttl // TTL_LEFT_STEPS)
        left = key.ekt_ttl - max(0.0, now - issued.at)
        left = math.floor(left / step) * step if left < key.ekt_ttl else key.ekt_ttl
        if left == key.ekt_ttl:
            return key
        left = max(1, left)
        counted_down = issued.counted_down
        if counted_down is None or counted_down.ekt_ttl != left:
            counted_down = issued.counted_down = dataclasses.replace(key, ekt_ttl=left)
        return counted_down

    def rollover_at(self, conference: str) -> float | None:
        """When the conference's key is due for replacement; None if it has none (or TTL 0)."""
        issued = self._keys.get(conference)
        if issued is None or issued.key.ekt_ttl == 0:
            return None
        return issued.at + issued.key.ekt_ttl * self.rollover

    #: Compare-and-swaps an explicit rekey tries.  The first may lose to a
    #: key this node had not heard of (older than the request); the second
    #: starts from a generation read during the request, so a key that
    #: beats it was made after the request: the rekey settles for it.
    REKEY_ATTEMPTS = 2

    def rekey(self, conference: str, now: float, rollover: bool = False) -> defer.Deferred:
        """
        A new EKTKey for the conference, made at ``now``: new key, new salt,
        the next SPI.  Receivers keep one previous key, so the only SPIs in
        use in the conference are the current one and the one before it;
        the next one is neither.  Fires with the key once stored (at once
        without a store).  When another Key Distributor replaced the key
        first: a ``rollover`` takes that one (so a cluster's nodes rolling
        over at once end with one key); a rekey writes its own after it, or
        takes one made after it was asked for (see REKEY_ATTEMPTS).  Fails with the
        store's error, nothing changed.
        """
        return self._lock.run(self._replace, conference, now, False,
                              0 if rollover else self.REKEY_ATTEMPTS - 1)

    def ensure(self, conference: str, now: float) -> defer.Deferred:
        """
        Fires with the conference's current key, first storing a new one if
        it has none usable at ``now`` (none, or its TTL ran out).
        """
        return self._lock.run(self._replace, conference, now, True)

    def _replace(self, conference: str, now: float, keep_usable: bool, again: int = 0):
        if self.store is None:
            if keep_usable and conference in self._keys:
                return self._keys[conference].key
            previous = self._issued(conference, now).key
            self._keep(conference, _Issued(self._new((previous.ekt_spi + 1) & 0xFFFF), now))
            return self._keys[conference].key
        current = self._keys.get(conference)
        if keep_usable and current is not None and now < current.at + current.key.ekt_ttl:
            return current.key
        if current is None:
            issued = _Issued(self._new(secrets.randbelow(0x10000)), now, 1)
            d = self.store.create_conference_key(self._pack(conference, issued))
        else:
            issued = _Issued(self._new((current.key.ekt_spi + 1) & 0xFFFF), now,
                             current.generation + 1)
            d = self.store.replace_conference_key(self._pack(conference, issued),
                                                  current.generation)
        d.addCallback(self._stored, conference, now, retry=True)

        def written(key):
            if again > 0 and key.ekt_key_value != issued.key.ekt_key_value:
                return self._replace(conference, now, False, again - 1)
            return key

        return d.addCallback(written)

    def _stored(self, row: StoredConferenceKey, conference: str, now: float, retry: bool):
        issued = self._unpack(row)
        if issued is None:
            # Another Key Distributor's row that this one cannot use (it does
            # not open, or another EKT cipher): replace it, once.
            if not retry:
                raise ValueError("the stored EKTKey of {} is unusable".format(conference))
            replacement = _Issued(self._new((row.spi + 1) & 0xFFFF), now, row.generation + 1)
            return self.store.replace_conference_key(
                self._pack(conference, replacement), row.generation).addCallback(
                    self._stored, conference, now, retry=False)
        current = self._keys.get(conference)
        if current is not None and current.generation > issued.generation:
            return current.key  # a newer one arrived by notification meanwhile
        self._keep(conference, issued)
        return issued.key

    def forget(self, conference: str) -> None:
        self._keys.pop(conference, None)
