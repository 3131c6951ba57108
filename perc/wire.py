"""
Tunnel messages (draft-ietf-perc-dtls-tunnel-05 section 7, RFC 9185 section 7):
immutable message classes, their encoding, and one strict decoder.

Sans-I/O.  Every message on the wire is ``msg_type (1) · length (uint16) ·
body``; :func:`decode` takes the type and the body (as the framing layer
delivers them), :func:`decode_message` a whole message with its header.

Every way a peer's bytes can be wrong raises :class:`WireError` and nothing
else; its ``reason`` says precisely what was wrong.  Constructing a message
whose fields cannot be represented raises the same error, so ``encode()``
can never produce something the decoder would refuse.
"""

from __future__ import annotations

import enum
import struct
import uuid
from dataclasses import dataclass
from typing import Any, Callable

__all__ = [
    "PROTOCOL_VERSION",
    "HEADER_LENGTH",
    "MAX_BODY_LENGTH",
    "MAX_DTLS_MESSAGE_LENGTH",
    "MessageType",
    "WireError",
    "SupportedProfiles",
    "NewerSupportedProfiles",
    "UnsupportedVersion",
    "MediaKeys",
    "TunneledDtls",
    "EndpointDisconnect",
    "decode",
    "decode_message",
]

#: The tunnel protocol version this implementation speaks.
PROTOCOL_VERSION = 0

_HEADER = struct.Struct("!BH")
HEADER_LENGTH = _HEADER.size
MAX_BODY_LENGTH = 0xFFFF
_UUID_LENGTH = 16
#: A TunneledDtls body is id (16) + length (2) + message, and at most 65535.
MAX_DTLS_MESSAGE_LENGTH = MAX_BODY_LENGTH - _UUID_LENGTH - 2
#: A SupportedProfiles body is version (1) + length (2) + profiles.
_MAX_PROFILES_LENGTH = MAX_BODY_LENGTH - 1 - 2


class MessageType(enum.IntEnum):
    SUPPORTED_PROFILES = 0x01
    UNSUPPORTED_VERSION = 0x02
    MEDIA_KEYS = 0x03
    TUNNELED_DTLS = 0x04
    ENDPOINT_DISCONNECT = 0x05


class WireError(ValueError):
    """
    A tunnel message that cannot be decoded or encoded.  ``reason`` is a
    short, precise description fit for a log line; it never contains key
    material.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _check_uint(name: str, value: int, bits: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < (1 << bits):
        raise WireError("{} must be an integer in 0..{}, got {!r}".format(name, (1 << bits) - 1, value))


def _check_vector(name: str, value: bytes, low: int, high: int) -> None:
    if not isinstance(value, bytes):
        raise WireError("{} must be bytes, got {}".format(name, type(value).__name__))
    if not low <= len(value) <= high:
        raise WireError("{} length {} outside {}..{}".format(name, len(value), low, high))


def _check_association_id(value: uuid.UUID) -> None:
    if not isinstance(value, uuid.UUID):
        raise WireError("association_id must be a uuid.UUID, got {}".format(type(value).__name__))


def _frame(msg_type: MessageType, body: bytes) -> bytes:
    return _HEADER.pack(msg_type, len(body)) + body


# Precompiled layouts for the common encodings and the decoder's fast paths.
# They change no result: a fast path only accepts input whose every field
# is valid, and anything else goes through the strict field-by-field
# decoder, which gives the precise reason.
_TUNNELED_DTLS_HEAD = struct.Struct("!BH16sH")
_ENDPOINT_DISCONNECT_HEAD = struct.Struct("!BH16s")
_MEDIA_KEYS_HEAD = struct.Struct("!BH16sHB")
_UINT16 = struct.Struct("!H")
#: Bounded caches of ``struct.Struct`` objects by profile count.
_STRUCT_CACHE_LIMIT = 64
_profile_structs: dict = {}


def _profiles_struct(count: int) -> struct.Struct:
    layout = _profile_structs.get(count)
    if layout is None:
        layout = struct.Struct("!{}H".format(count))
        if len(_profile_structs) < _STRUCT_CACHE_LIMIT:
            _profile_structs[count] = layout
    return layout


_object_new = object.__new__
_object_setattr = object.__setattr__
_UUID = uuid.UUID
_SAFE_UNKNOWN = uuid.SafeUUID.unknown
_from_bytes = int.from_bytes


def _uuid_from_bytes(value: bytes) -> uuid.UUID:
    """``uuid.UUID(bytes=value)`` for exactly 16 octets, without its argument checks."""
    result = _object_new(_UUID)
    _object_setattr(result, "int", _from_bytes(value, "big"))
    _object_setattr(result, "is_safe", _SAFE_UNKNOWN)
    return result


@dataclass(frozen=True)
class SupportedProfiles:
    """
    The Media Distributor's first message on every tunnel connection, in
    the one version this codec speaks (``version`` is PROTOCOL_VERSION).
    """

    version: int
    profiles: tuple[int, ...]

    msg_type = MessageType.SUPPORTED_PROFILES

    def __post_init__(self) -> None:
        # A version-0 body under another number would lie to the peer.
        if self.version != PROTOCOL_VERSION:
            raise WireError("SupportedProfiles version {!r}: this codec only speaks "
                            "version {}".format(self.version, PROTOCOL_VERSION))
        if not isinstance(self.profiles, tuple):
            raise WireError("profiles must be a tuple of profile ids")
        for profile in self.profiles:
            _check_uint("protection profile", profile, 16)
        length = 2 * len(self.profiles)
        if not 2 <= length <= _MAX_PROFILES_LENGTH:
            raise WireError(
                "protection_profiles length {} outside 2..{}".format(length, _MAX_PROFILES_LENGTH)
            )

    def encode(self) -> bytes:
        count = len(self.profiles)
        return (_HEADER.pack(self.msg_type, 3 + 2 * count)
                + bytes((self.version, (2 * count) >> 8, (2 * count) & 0xFF))
                + _profiles_struct(count).pack(*self.profiles))


@dataclass(frozen=True)
class NewerSupportedProfiles:
    """
    A SupportedProfiles of a version this codec does not speak (any but
    PROTOCOL_VERSION, so a newer one).  Only its version octet is decoded:
    ``rest`` is the remainder of the body, in that version's format, never
    interpreted (RFC 9185 section 5.3: the answer is UnsupportedVersion
    whatever follows).
    """

    version: int
    rest: bytes = b""

    msg_type = MessageType.SUPPORTED_PROFILES

    def __post_init__(self) -> None:
        _check_uint("version", self.version, 8)
        if self.version == PROTOCOL_VERSION:
            raise WireError("version {} is SupportedProfiles itself".format(PROTOCOL_VERSION))
        _check_vector("rest", self.rest, 0, MAX_BODY_LENGTH - 1)

    def __repr__(self) -> str:
        return "NewerSupportedProfiles(version={}, {} more octets)".format(
            self.version, len(self.rest))

    def encode(self) -> bytes:
        return _frame(self.msg_type, bytes((self.version,)) + self.rest)


@dataclass(frozen=True)
class UnsupportedVersion:
    """A Key Distributor's answer to a SupportedProfiles of another version."""

    highest_version: int

    msg_type = MessageType.UNSUPPORTED_VERSION

    def __post_init__(self) -> None:
        _check_uint("highest_version", self.highest_version, 8)

    def encode(self) -> bytes:
        return bytes((MessageType.UNSUPPORTED_VERSION, 0, 1, self.highest_version))


@dataclass(frozen=True)
class MediaKeys:
    """
    The hop-by-hop SRTP keys of one association, Key Distributor to Media
    Distributor.  ``repr`` hides the key values.
    """

    association_id: uuid.UUID
    profile: int
    mki: bytes
    client_key: bytes
    server_key: bytes
    client_salt: bytes
    server_salt: bytes

    msg_type = MessageType.MEDIA_KEYS

    def __post_init__(self) -> None:
        _check_association_id(self.association_id)
        _check_uint("profile", self.profile, 16)
        _check_vector("mki", self.mki, 0, 255)
        for name in ("client_key", "server_key", "client_salt", "server_salt"):
            _check_vector(name, getattr(self, name), 1, 255)

    def __repr__(self) -> str:
        return (
            "MediaKeys(association_id={}, profile=0x{:04X}, mki_length={}, "
            "key_length={}, salt_length={}, values hidden)".format(
                self.association_id, self.profile, len(self.mki),
                len(self.client_key), len(self.client_salt),
            )
        )

    def encode(self) -> bytes:
        mki, client_key, server_key = self.mki, self.client_key, self.server_key
        client_salt, server_salt = self.client_salt, self.server_salt
        body_length = (16 + 2 + 5 + len(mki) + len(client_key) + len(server_key)
                       + len(client_salt) + len(server_salt))
        return b"".join((
            _MEDIA_KEYS_HEAD.pack(MessageType.MEDIA_KEYS, body_length,
                                  self.association_id.bytes, self.profile, len(mki)),
            mki, bytes((len(client_key),)), client_key, bytes((len(server_key),)), server_key,
            bytes((len(client_salt),)), client_salt, bytes((len(server_salt),)), server_salt))


@dataclass(frozen=True)
class TunneledDtls:
    """One or more whole DTLS records of one association, either direction."""

    association_id: uuid.UUID
    dtls_message: bytes

    msg_type = MessageType.TUNNELED_DTLS

    def __post_init__(self) -> None:
        message = self.dtls_message
        if not (isinstance(self.association_id, uuid.UUID) and isinstance(message, bytes)
                and 0 < len(message) <= MAX_DTLS_MESSAGE_LENGTH):
            _check_association_id(self.association_id)
            _check_vector("dtls_message", message, 1, MAX_DTLS_MESSAGE_LENGTH)

    def __repr__(self) -> str:
        return "TunneledDtls(association_id={}, {} octets)".format(
            self.association_id, len(self.dtls_message))

    def encode(self) -> bytes:
        message = self.dtls_message
        length = len(message)
        return _TUNNELED_DTLS_HEAD.pack(MessageType.TUNNELED_DTLS, length + 18,
                                        self.association_id.bytes, length) + message


@dataclass(frozen=True)
class EndpointDisconnect:
    """Either side: the association has ended; forget it."""

    association_id: uuid.UUID

    msg_type = MessageType.ENDPOINT_DISCONNECT

    def __post_init__(self) -> None:
        _check_association_id(self.association_id)

    def encode(self) -> bytes:
        return _ENDPOINT_DISCONNECT_HEAD.pack(MessageType.ENDPOINT_DISCONNECT, 16,
                                              self.association_id.bytes)


Message = SupportedProfiles | NewerSupportedProfiles | UnsupportedVersion | MediaKeys | TunneledDtls | EndpointDisconnect


class _Reader:
    """Consumes a body field by field; every shortfall is a WireError."""

    __slots__ = ("_body", "_offset")

    def __init__(self, body: bytes):
        self._body = body
        self._offset = 0

    def take(self, count: int, field: str) -> bytes:
        end = self._offset + count
        if end > len(self._body):
            raise WireError("body ends inside {} (needs {} octets, has {})".format(
                field, count, len(self._body) - self._offset))
        value = self._body[self._offset:end]
        self._offset = end
        return value

    def uint8(self, field: str) -> int:
        return self.take(1, field)[0]

    def uint16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "big")

    def vector8(self, field: str, low: int) -> bytes:
        length = self.uint8(field + " length")
        if length < low:
            raise WireError("{} length {} below minimum {}".format(field, length, low))
        return self.take(length, field)

    def uuid(self) -> uuid.UUID:
        return uuid.UUID(bytes=self.take(_UUID_LENGTH, "association_id"))

    def rest(self) -> bytes:
        """Every octet not consumed yet."""
        value = self._body[self._offset:]
        self._offset = len(self._body)
        return value

    def finish(self) -> None:
        extra = len(self._body) - self._offset
        if extra:
            raise WireError("{} trailing octets after the last field".format(extra))


def _decode_supported_profiles(reader: _Reader) -> SupportedProfiles | NewerSupportedProfiles:
    # The version first: the rest of the body is laid out as that version says.
    version = reader.uint8("version")
    if version != PROTOCOL_VERSION:
        return NewerSupportedProfiles(version, reader.rest())
    length = reader.uint16("protection_profiles length")
    if length < 2 or length % 2:
        raise WireError("protection_profiles length {} is not an even number "
                        "of at least 2".format(length))
    data = reader.take(length, "protection_profiles")
    return SupportedProfiles(version, struct.unpack("!{}H".format(length // 2), data))


def _decode_unsupported_version(reader: _Reader) -> UnsupportedVersion:
    return UnsupportedVersion(reader.uint8("highest_version"))


def _decode_media_keys(reader: _Reader) -> MediaKeys:
    association_id = reader.uuid()
    profile = reader.uint16("profile")
    mki = reader.vector8("mki", 0)
    client_key = reader.vector8("client_key", 1)
    server_key = reader.vector8("server_key", 1)
    client_salt = reader.vector8("client_salt", 1)
    server_salt = reader.vector8("server_salt", 1)
    return MediaKeys(association_id, profile, mki, client_key, server_key, client_salt, server_salt)


def _decode_tunneled_dtls(reader: _Reader) -> TunneledDtls:
    association_id = reader.uuid()
    length = reader.uint16("dtls_message length")
    if length < 1:
        raise WireError("dtls_message length 0 below minimum 1")
    return TunneledDtls(association_id, reader.take(length, "dtls_message"))


def _decode_endpoint_disconnect(reader: _Reader) -> EndpointDisconnect:
    return EndpointDisconnect(reader.uuid())


# Fast paths: each returns the message for a body whose fields are all
# valid, else None (the strict decoder then says what is wrong).  The
# objects are built like their dataclass __init__ does, minus checks the
# parse has already made.


def _fast_supported_profiles(body: bytes):
    length = len(body) - 3
    if length < 2 or length & 1 or body[0] or (body[1] << 8 | body[2]) != length:
        return None
    message = _object_new(SupportedProfiles)
    _object_setattr(message, "version", body[0])
    _object_setattr(message, "profiles", _profiles_struct(length >> 1).unpack_from(body, 3))
    return message


def _fast_unsupported_version(body: bytes):
    if len(body) != 1:
        return None
    message = _object_new(UnsupportedVersion)
    _object_setattr(message, "highest_version", body[0])
    return message


def _fast_media_keys(body: bytes):
    end = len(body)
    offset = 18
    if end < 23:
        return None
    values = []
    for minimum in (0, 1, 1, 1, 1):
        if offset >= end:
            return None
        length = body[offset]
        offset += 1
        if length < minimum or offset + length > end:
            return None
        values.append(body[offset:offset + length])
        offset += length
    if offset != end:
        return None
    message = _object_new(MediaKeys)
    _object_setattr(message, "association_id", _uuid_from_bytes(body[:16]))
    _object_setattr(message, "profile", body[16] << 8 | body[17])
    _object_setattr(message, "mki", values[0])
    _object_setattr(message, "client_key", values[1])
    _object_setattr(message, "server_key", values[2])
    _object_setattr(message, "client_salt", values[3])
    _object_setattr(message, "server_salt", values[4])
    return message


def _fast_tunneled_dtls(body: bytes):
    length = len(body) - 18
    if length < 1 or (body[16] << 8 | body[17]) != length:
        return None
    message = _object_new(TunneledDtls)
    _object_setattr(message, "association_id", _uuid_from_bytes(body[:16]))
    _object_setattr(message, "dtls_message", body[18:])
    return message


def _fast_endpoint_disconnect(body: bytes):
    if len(body) != 16:
        return None
    message = _object_new(EndpointDisconnect)
    _object_setattr(message, "association_id", _uuid_from_bytes(body))
    return message


_FAST_DECODERS: dict[int, Callable[[bytes], Any]] = {
    MessageType.SUPPORTED_PROFILES: _fast_supported_profiles,
    MessageType.UNSUPPORTED_VERSION: _fast_unsupported_version,
    MessageType.MEDIA_KEYS: _fast_media_keys,
    MessageType.TUNNELED_DTLS: _fast_tunneled_dtls,
    MessageType.ENDPOINT_DISCONNECT: _fast_endpoint_disconnect,
}

_DECODERS: dict[int, tuple] = {
    MessageType.SUPPORTED_PROFILES: ("SupportedProfiles", _decode_supported_profiles),
    MessageType.UNSUPPORTED_VERSION: ("UnsupportedVersion", _decode_unsupported_version),
    MessageType.MEDIA_KEYS: ("MediaKeys", _decode_media_keys),
    MessageType.TUNNELED_DTLS: ("TunneledDtls", _decode_tunneled_dtls),
    MessageType.ENDPOINT_DISCONNECT: ("EndpointDisconnect", _decode_endpoint_disconnect),
}


def decode(msg_type: int, body: bytes) -> Message:
    """
    Decode one message from its type octet and its body (without the
    3-octet header).  Raises WireError for a reserved or unknown type, a
    body that is too long to have been framed, and any field that is out of
    range, short, or followed by trailing octets.
    """
    if type(body) is bytes and len(body) <= MAX_BODY_LENGTH:
        fast = _FAST_DECODERS.get(msg_type)
        if fast is not None:
            message = fast(body)
            if message is not None:
                return message
    entry = _DECODERS.get(msg_type)
    if entry is None:
        raise WireError("unknown or reserved message type 0x{:02X}".format(msg_type)
                        if isinstance(msg_type, int) else "message type must be an integer")
    if len(body) > MAX_BODY_LENGTH:
        raise WireError("body of {} octets exceeds the 16-bit length".format(len(body)))
    name, decoder = entry
    reader = _Reader(bytes(body))
    try:
        message = decoder(reader)
        reader.finish()
    except WireError as error:
        raise WireError("{}: {}".format(name, error.reason)) from None
    return message


def decode_message(data: bytes) -> Message:
    """Decode one whole message, header included; nothing may follow it."""
    if len(data) < HEADER_LENGTH:
        raise WireError("message of {} octets is shorter than the 3-octet header".format(len(data)))
    msg_type, length = _HEADER.unpack_from(data)
    if len(data) - HEADER_LENGTH != length:
        raise WireError("header says {} body octets, message has {}".format(
            length, len(data) - HEADER_LENGTH))
    return decode(msg_type, data[HEADER_LENGTH:])
