"""
The ClientHello/ServerHello extensions the project handles itself:
external_session_id (type 56, RFC 8844: the tls-id) and
supported_ekt_ciphers (type 39, RFC 8870).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

from perc.ekt import EktCipher, encode_client_ekt_ciphers


class ExtensionError(ValueError):
    """A TLS extension value that is malformed or out of range."""


# fullmatch, not match with "$": "$" also matches before a trailing newline.
_TLS_ID = re.compile(rb"[A-Za-z0-9+/\-_]{20,255}")


def validate_tls_id(tls_id: bytes) -> bytes:
    """Return ``tls_id`` if it is 20..255 characters of ``A-Za-z0-9+/-_``; else raise ExtensionError."""
    if not isinstance(tls_id, bytes):
        raise ExtensionError("tls-id must be bytes")
    if not _TLS_ID.fullmatch(tls_id):
        raise ExtensionError(
            "tls-id must be 20 to 255 characters from A-Za-z0-9+/-_ (got {} octets)".format(
                len(tls_id)
            )
        )
    return tls_id


def encode_external_session_id(tls_id: bytes) -> bytes:
    """
    extension_data of ``external_session_id``: RFC 8844 defines it as
    ``opaque session_id<20..255>``, i.e. one length octet, then the tls-id.
    """
    validate_tls_id(tls_id)
    return bytes([len(tls_id)]) + tls_id


def decode_external_session_id(data: bytes) -> bytes:
    """Inverse of :func:`encode_external_session_id`; raises ExtensionError."""
    if len(data) < 1 or data[0] != len(data) - 1:
        raise ExtensionError("external_session_id length prefix does not match its data")
    return validate_tls_id(bytes(data[1:]))


@dataclass(frozen=True)
class ExtensionSpec:
    """
    A ClientHello/ServerHello extension handled through OpenSSL's custom
    extension API.  Every spec in the registry is registered on every
    context; per association, ``SslState.send[ext_type]`` holds the encoded
    value to send (absent = do not send) and ``_PARSERS[(role, ext_type)]``
    handles what the peer sent.
    """

    ext_type: int
    name: str


EXTERNAL_SESSION_ID = ExtensionSpec(56, "external_session_id")
SUPPORTED_EKT_CIPHERS = ExtensionSpec(39, "supported_ekt_ciphers")

EXTENSIONS: tuple = (EXTERNAL_SESSION_ID, SUPPORTED_EKT_CIPHERS)


def normalise_ekt_ciphers(ciphers) -> Optional[tuple]:
    """
    ``ekt_ciphers`` as given to the client or server role: None, or a
    non-empty sequence of cipher values 1..254 (order = preference),
    returned as a tuple of ints without duplicates.  EktError (a
    ValueError) otherwise.
    """
    if ciphers is None:
        return None
    if isinstance(ciphers, (str, bytes, bytearray)) or not isinstance(ciphers, Iterable):
        raise TypeError("ekt_ciphers must be a sequence of cipher values")
    given = list(ciphers)
    # Validates every value and the count.
    encode_client_ekt_ciphers(given)
    values = []
    for value in given:
        if value not in values:
            values.append(int(value))
    return tuple(values)


def ekt_cipher_value(value: int):
    try:
        return EktCipher(value)
    except ValueError:
        return value


def server_ekt_ciphers(ciphers) -> Optional[tuple]:
    """The server's supported EKT ciphers: None for None or an empty sequence."""
    if ciphers is not None and not isinstance(ciphers, (str, bytes, bytearray)) \
            and isinstance(ciphers, Iterable):
        ciphers = tuple(ciphers)
        if not ciphers:
            return None
    return normalise_ekt_ciphers(ciphers)
