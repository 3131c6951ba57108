"""
Sealing: AEAD encryption of the secrets the Key Distributor stores (conference
EKTKeys, association record state) under one 32-octet key kept in a file.

Every Key Distributor of a cluster reads the same sealing-key file.  A sealed
value is ``version (1 octet) || nonce (12 random octets) || AES-256-GCM
ciphertext and tag``; its associated data names the row it belongs to (the
format version, the table, the row's primary key and whichever clear columns
the caller binds), so a ciphertext copied into another row, or a row whose
bound columns were edited, fails to open.  Random 96-bit nonces: at most 2^32
seals per key keeps the nonce-collision probability negligible (NIST SP
800-38D); a Key Distributor seals once per key change, far below that.
"""

from __future__ import annotations

import os
import stat

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from perc.errors import ConfigError

__all__ = ["SEALING_KEY_LENGTH", "SealingError", "SealingKey"]

#: Octets in a sealing key (AES-256).
SEALING_KEY_LENGTH = 32
#: The sealed-value format; part of the associated data too.
_VERSION = 1
_NONCE_LENGTH = 12


class SealingError(Exception):
    """A sealed value does not open: another key, another row, or tampered with."""


def _field(value) -> bytes:
    if isinstance(value, bool) or not isinstance(value, (str, int, float, bytes)):
        raise TypeError("cannot bind {!r} into associated data".format(type(value)))
    if isinstance(value, str):
        data = b"s" + value.encode("utf-8")
    elif isinstance(value, bytes):
        data = b"b" + value
    elif isinstance(value, int):
        data = b"i" + str(value).encode("ascii")
    else:
        data = b"f" + value.hex().encode("ascii")
    return len(data).to_bytes(4, "big") + data


def associated_data(table: str, row: tuple) -> bytes:
    """The associated data binding a sealed value to ``table`` and ``row`` (length-prefixed)."""
    return b"perc-kd sealed" + bytes([_VERSION]) + _field(table) + b"".join(
        _field(value) for value in row)


class SealingKey:
    """A 32-octet AES-256-GCM key; repr never shows it."""

    def __init__(self, key: bytes, path: str | None = None):
        if len(key) != SEALING_KEY_LENGTH:
            raise ValueError("a sealing key is {} octets".format(SEALING_KEY_LENGTH))
        self._aead = AESGCM(key)
        self.path = path

    def __repr__(self) -> str:
        return "<SealingKey from {}>".format(self.path or "memory")

    @classmethod
    def generate(cls) -> SealingKey:
        return cls(os.urandom(SEALING_KEY_LENGTH))

    @classmethod
    def load_or_create(cls, path: str) -> SealingKey:
        """
        The key in the file at ``path``, created (32 random octets, mode 0600)
        if it does not exist.  Raises :class:`ConfigError` (one line) when
        the file is not 32 octets or group or others may access it.
        """
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        except OSError as error:
            raise ConfigError("cannot create sealing key {}: {}".format(
                path, error.strerror or error)) from None
        else:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(os.urandom(SEALING_KEY_LENGTH))
        try:
            with open(path, "rb") as handle:
                mode = os.fstat(handle.fileno()).st_mode
                data = handle.read(SEALING_KEY_LENGTH + 1)
        except OSError as error:
            raise ConfigError("cannot read sealing key {}: {}".format(
                path, error.strerror or error)) from None
        if mode & 0o077:
            raise ConfigError(
                "sealing key {} may be accessed by group or others (mode {:04o}): "
                "chmod 600 it".format(path, stat.S_IMODE(mode)))
        if len(data) != SEALING_KEY_LENGTH:
            raise ConfigError("sealing key {} is not {} octets".format(
                path, SEALING_KEY_LENGTH))
        return cls(data, path)

    def seal(self, plaintext: bytes, table: str, row: tuple) -> bytes:
        """``plaintext`` sealed for ``row`` of ``table`` (a fresh random nonce)."""
        nonce = os.urandom(_NONCE_LENGTH)
        return bytes([_VERSION]) + nonce + self._aead.encrypt(
            nonce, plaintext, associated_data(table, row))

    def open(self, sealed: bytes, table: str, row: tuple) -> bytes:
        """The plaintext of ``sealed`` if it was sealed for ``row`` of ``table`` with this key."""
        sealed = bytes(sealed)
        if len(sealed) < 1 + _NONCE_LENGTH + 16 or sealed[0] != _VERSION:
            raise SealingError("not a sealed value of version {}".format(_VERSION))
        try:
            return self._aead.decrypt(sealed[1:1 + _NONCE_LENGTH], sealed[1 + _NONCE_LENGTH:],
                                      associated_data(table, row))
        except InvalidTag:
            raise SealingError("sealed value of {} does not open (another sealing key, "
                               "another row, or altered)".format(table)) from None
