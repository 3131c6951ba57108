"""
The end-to-end key-encryption keys of the Key Distributor's conferences
(RFC 8870, RFC 8871): one EKTKey per conference, shared by every endpoint in
it, replaced on demand (rekey).  Only the Key Distributor holds these; the
Media Distributor never sees them.
"""

from __future__ import annotations

import os
import secrets

from perc.ekt import MAX_TTL, EktCipher, EktKey

__all__ = ["ConferenceKeys", "CONFERENCE_SALT_LENGTH", "DEFAULT_EKT_TTL"]

#: The double AEAD profiles' end-to-end master salt is 12 octets.
CONFERENCE_SALT_LENGTH = 12
#: Seconds an EKTKey stays valid for an endpoint; a rekey replaces it sooner.
DEFAULT_EKT_TTL = 24 * 3600


class ConferenceKeys:
    """
    conference -> its current EKTKey, bounded by ``max_conferences``.
    ``ttl`` (seconds) is 1 to 2^24 - 1: RFC 8870 forbids using an EKTKey
    after its TTL, so a TTL of 0 would be expired on arrival (ValueError).
    """

    def __init__(self, cipher: EktCipher = EktCipher.AESKW_128, ttl: int = DEFAULT_EKT_TTL,
                 max_conferences: int = 100000):
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= MAX_TTL:
            raise ValueError("EKTKey TTL must be 1 to {} seconds, not {!r} (a TTL of 0 is "
                             "expired on arrival)".format(MAX_TTL, ttl))
        self.cipher = EktCipher(cipher)
        self.ttl = ttl
        self.max_conferences = max_conferences
        self._keys: dict[str, EktKey] = {}

    def _new(self, spi: int) -> EktKey:
        return EktKey(os.urandom(self.cipher.key_length), os.urandom(CONFERENCE_SALT_LENGTH),
                      spi, self.ttl)

    def key_for(self, conference: str) -> EktKey:
        """The conference's EKTKey, created on first use."""
        key = self._keys.get(conference)
        if key is None:
            if len(self._keys) >= self.max_conferences:
                # Forget the oldest conference's key: endpoints still in it
                # keep the copy they have; a rekey gives it a new one.
                self._keys.pop(next(iter(self._keys)))
            key = self._keys[conference] = self._new(secrets.randbelow(0x10000))
        return key

    def rekey(self, conference: str) -> EktKey:
        """
        A new EKTKey for the conference: new key, new salt, the next SPI (so
        receivers tell old and new apart while both are in flight).
        """
        previous = self.key_for(conference)
        key = self._keys[conference] = self._new((previous.ekt_spi + 1) & 0xFFFF)
        return key

    def forget(self, conference: str) -> None:
        self._keys.pop(conference, None)
