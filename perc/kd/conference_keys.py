"""
The end-to-end key-encryption keys of the Key Distributor's conferences
(RFC 8870, RFC 8871): one EKTKey per conference, shared by every endpoint in
it, replaced on demand (rekey) and before it expires (rollover, driven by
:class:`perc.kd.associations.KeyDistributor`).  Only the Key Distributor
holds these; the Media Distributor never sees them.  Sans-I/O: times are
``now`` arguments on the caller's clock.
"""

from __future__ import annotations

import dataclasses
import math
import os
import secrets

from perc.ekt import MAX_TTL, EktCipher, EktKey

__all__ = ["ConferenceKeys", "CONFERENCE_SALT_LENGTH", "DEFAULT_EKT_TTL",
           "DEFAULT_ROLLOVER", "check_ttl", "check_rollover"]

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


class ConferenceKeys:
    """
    conference -> its current EKTKey and when it was made, bounded by
    ``max_conferences``.  ``ttl`` (seconds) is 1 to 2^24 - 1: RFC 8870
    forbids using an EKTKey after its TTL, so a TTL of 0 would be expired on
    arrival (ValueError).  A key is due for replacement once ``rollover``
    (a fraction of its TTL) has passed.
    """

    def __init__(self, cipher: EktCipher = EktCipher.AESKW_128, ttl: int = DEFAULT_EKT_TTL,
                 rollover: float = DEFAULT_ROLLOVER, max_conferences: int = 100000):
        self.cipher = EktCipher(cipher)
        self.ttl = check_ttl(ttl)
        self.rollover = check_rollover(rollover)
        self.max_conferences = max_conferences
        self._keys: dict[str, _Issued] = {}

    def _new(self, spi: int) -> EktKey:
        return EktKey(os.urandom(self.cipher.key_length), os.urandom(CONFERENCE_SALT_LENGTH),
                      spi, self.ttl)

    def _issued(self, conference: str, now: float) -> _Issued:
        issued = self._keys.get(conference)
        if issued is None:
            if len(self._keys) >= self.max_conferences:
                # Forget the oldest conference's key: endpoints still in it
                # keep the copy they have; a rekey gives it a new one.
                self._keys.pop(next(iter(self._keys)))
            issued = self._keys[conference] = _Issued(
                self._new(secrets.randbelow(0x10000)), now)
        return issued

    def key_for(self, conference: str, now: float) -> EktKey:
        """
        The conference's EKTKey (created on first use) with the TTL it has
        left at ``now``: rounded down (to the step, see TTL_LEFT_STEPS), at
        least 1.
        """
        issued = self._issued(conference, now)
        key = issued.key
        if key.ekt_ttl == 0:
            return key  # never made here; nothing to count down
        step = max(1, key.ekt_ttl // TTL_LEFT_STEPS)
        left = key.ekt_ttl - max(0.0, now - issued.at)
        left = math.floor(left / step) * step if left < key.ekt_ttl else key.ekt_ttl
        return key if left == key.ekt_ttl else dataclasses.replace(key, ekt_ttl=max(1, left))

    def rollover_at(self, conference: str) -> float | None:
        """When the conference's key is due for replacement; None if it has none (or TTL 0)."""
        issued = self._keys.get(conference)
        if issued is None or issued.key.ekt_ttl == 0:
            return None
        return issued.at + issued.key.ekt_ttl * self.rollover

    def rekey(self, conference: str, now: float) -> EktKey:
        """
        A new EKTKey for the conference, made at ``now``: new key, new salt,
        the next SPI.  Receivers keep one previous key, so the only SPIs in
        use in the conference are the current one and the one before it;
        the next one is neither.
        """
        previous = self._issued(conference, now).key
        key = self._new((previous.ekt_spi + 1) & 0xFFFF)
        self._keys[conference] = _Issued(key, now)
        return key

    def forget(self, conference: str) -> None:
        self._keys.pop(conference, None)
