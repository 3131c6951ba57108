"""
Read the cleartext DTLS 1.2 ClientHello and ServerHello (RFC 6347 section
4.2/4.3, RFC 5246 section 7.4.1) as they pass through the Media
Distributor, which is not a DTLS party: the endpoint's tls-id (extension
56, RFC 8844), the SRTP profiles (use_srtp, extension 14, RFC 5764 section
4.1.1) and whether EKT was negotiated (supported_ekt_ciphers, extension 39,
RFC 8870 section 5.2.1).

Sans-I/O and Twisted-free.  Contract of both parsers:

- ``None``: the datagram holds no whole, unfragmented hello of that kind in
  an epoch-0 handshake record.  A hello split into fragments also gives
  None: a fragment cannot say who the endpoint is.  Put a
  :class:`ClientHelloReassembler` in front to read fragmented ClientHellos.
- :class:`HelloError` (a ValueError): the DTLS record framing is broken, or
  a hello is there but its fields do not add up (every length is checked),
  or its use_srtp / supported_ekt_ciphers data is malformed.  A malformed
  extension 56 is *not* an error: it is reported by ``tls_id_malformed``,
  so the Key Distributor can refuse it with an alert.
- Nothing else is ever raised, and at most :data:`MAX_RECORDS` records and
  :data:`MAX_MESSAGES` handshake messages are examined.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Optional

from perc.dtls import ExtensionError, decode_external_session_id

__all__ = [
    "HelloError",
    "ClientHelloInfo",
    "ServerHelloInfo",
    "parse_client_hello",
    "parse_server_hello",
    "ClientHelloReassembler",
    "MAX_RECORDS",
    "MAX_MESSAGES",
    "EXT_USE_SRTP",
    "EXT_SUPPORTED_EKT_CIPHERS",
    "EXT_EXTERNAL_SESSION_ID",
]

#: Records examined per datagram; a 1500-octet datagram holds at most 115
#: empty records, and a real flight far fewer.
MAX_RECORDS = 32
#: Handshake messages examined per datagram (DTLS allows several per record).
MAX_MESSAGES = 32

EXT_USE_SRTP = 14
EXT_SUPPORTED_EKT_CIPHERS = 39
EXT_EXTERNAL_SESSION_ID = 56

_RECORD_HEADER = 13
_HANDSHAKE_HEADER = 12
_CONTENT_HANDSHAKE = 22
_CLIENT_HELLO = 1
_SERVER_HELLO = 2
_RANDOM = 32
_MAX_SESSION_ID = 32


class HelloError(ValueError):
    """A datagram whose DTLS framing or hello contents are malformed."""


@dataclass(frozen=True)
class ClientHelloInfo:
    """
    A parsed ClientHello.  ``extensions`` is every ``(type, data)`` in
    order.  ``tls_id`` is the tls-id from extension 56 (None if absent or
    malformed; ``tls_id_malformed`` tells which).  ``cookie_empty`` is True
    for the first ClientHello of a cookie exchange.  ``srtp_profiles`` are
    the offered profile ids in order (empty without use_srtp);
    ``ekt_ciphers`` the offered EKT ciphers, None without extension 39.
    """

    client_version: int
    random: bytes
    session_id: bytes
    cookie: bytes
    cipher_suites: tuple
    compression_methods: bytes
    extensions: tuple
    message_seq: int
    tls_id: Optional[bytes]
    tls_id_malformed: bool
    srtp_profiles: tuple
    srtp_mki: bytes
    ekt_ciphers: Optional[tuple]

    @property
    def cookie_empty(self) -> bool:
        return not self.cookie

    @property
    def ekt_offered(self) -> bool:
        """Extension 39 (supported_ekt_ciphers) is present."""
        return self.ekt_ciphers is not None


@dataclass(frozen=True)
class ServerHelloInfo:
    """
    A parsed ServerHello.  ``srtp_profile`` is the profile the server
    selected (None without use_srtp); ``ekt_cipher`` the EKT cipher it
    selected in extension 39 (None without it: no EKT fields will follow
    SRTP packets); ``tls_id`` as in :class:`ClientHelloInfo`.
    """

    server_version: int
    random: bytes
    session_id: bytes
    cipher_suite: int
    compression_method: int
    extensions: tuple
    message_seq: int
    tls_id: Optional[bytes]
    tls_id_malformed: bool
    srtp_profile: Optional[int]
    srtp_mki: bytes
    ekt_cipher: Optional[int]

    @property
    def ekt_negotiated(self) -> bool:
        """Extension 39 (supported_ekt_ciphers) is present."""
        return self.ekt_cipher is not None


def parse_client_hello(datagram) -> Optional[ClientHelloInfo]:
    """The first whole ClientHello in ``datagram``, or None; see the module contract."""
    # bytes(bytes) is the same object: no copy in the common case.
    data = bytes(datagram)
    whole, _ = _scan(data, _CLIENT_HELLO)
    if whole is None:
        return None
    return _client_hello(data, *whole)


def parse_server_hello(datagram) -> Optional[ServerHelloInfo]:
    """The first whole ServerHello in ``datagram``, or None; see the module contract."""
    data = bytes(datagram)
    whole, _ = _scan(data, _SERVER_HELLO)
    if whole is None:
        return None
    return _server_hello(data, *whole)


# --------------------------------------------------------------------------
# Records and handshake messages
#
# Both parsers are on the Key Distributor's per-join path (and the Media
# Distributor's): they read the datagram in place, field by field with
# local offsets, in one pass each, and build their result without the
# dataclass __init__ (whose frozen setattr per field costs as much as the
# parse).  Every length is still checked before it is used.


def _scan(data: bytes, wanted: int):
    """
    Walk ``data``'s DTLS records up to the first whole (unfragmented)
    handshake message of type ``wanted`` in an epoch-0 handshake record:
    ``(whole, partial)``.  ``whole`` is ``(body start, body end,
    message_seq)`` of that message, or None; ``partial`` the non-empty
    fragments of type ``wanted`` met before it, as ``(record header
    offset, msg_length, message_seq, fragment_offset, body start, body
    end)``, or None.  At most MAX_RECORDS records and MAX_MESSAGES
    fragments are walked; records of other types or epochs cost only their
    header.  HelloError for anything on the way that does not parse.
    """
    total = len(data)
    offset = 0
    records = 0
    messages = 0
    partial = None
    while offset < total and records < MAX_RECORDS:
        records += 1
        if total - offset < _RECORD_HEADER:
            raise HelloError("truncated DTLS record header")
        header_at = offset
        position = offset + _RECORD_HEADER
        offset = position + ((data[header_at + 11] << 8) | data[header_at + 12])
        if offset > total:
            raise HelloError("DTLS record of {} octets overruns the datagram".format(
                offset - position))
        if data[header_at] != _CONTENT_HANDSHAKE or data[header_at + 3] or data[header_at + 4]:
            continue
        end = offset
        while position < end and messages < MAX_MESSAGES:
            messages += 1
            if end - position < _HANDSHAKE_HEADER:
                raise HelloError("truncated handshake header")
            msg_length = (data[position + 1] << 16) | (data[position + 2] << 8) | data[position + 3]
            fragment_offset = ((data[position + 6] << 16) | (data[position + 7] << 8)
                               | data[position + 8])
            body = position + _HANDSHAKE_HEADER
            position = body + ((data[position + 9] << 16) | (data[position + 10] << 8)
                               | data[position + 11])
            if position > end:
                raise HelloError("handshake fragment overruns its record")
            if fragment_offset + position - body > msg_length:
                raise HelloError("handshake fragment lies beyond its message length")
            if data[body - _HANDSHAKE_HEADER] != wanted:
                continue
            message_seq = (data[body - 8] << 8) | data[body - 7]
            if fragment_offset == 0 and position - body == msg_length:
                return (body, position, message_seq), partial
            if position > body:
                if partial is None:
                    partial = []
                partial.append((header_at, msg_length, message_seq, fragment_offset, body,
                                position))
    return None, partial


def _vector(data: bytes, offset: int, end: int, length_size: int, low: int, high: int,
            what: str, field: str):
    """``(value, offset after it)`` of the vector at ``offset``, which must end by ``end``."""
    start = offset + length_size
    if start > end:
        raise HelloError("{}: {} length truncated".format(what, field))
    length = data[offset] if length_size == 1 else (data[offset] << 8) | data[offset + 1]
    if not low <= length <= high:
        raise HelloError("{}: {} length {} outside {}..{}".format(what, field, length, low, high))
    offset = start + length
    if offset > end:
        raise HelloError("{}: {} truncated".format(what, field))
    return data[start:offset], offset


def _fixed(data: bytes, offset: int, end: int, size: int, what: str, field: str) -> int:
    """The offset after ``size`` octets of ``field`` at ``offset``, which must end by ``end``."""
    offset += size
    if offset > end:
        raise HelloError("{}: {} truncated".format(what, field))
    return offset


def _extensions(data: bytes, offset: int, end: int, what: str) -> dict:
    """
    ``Extension extensions<0..2^16-1>`` from ``offset`` to ``end`` if
    present (it is optional, and must be the last field), as a dict of
    type to data in their order.
    """
    extensions: dict = {}
    if offset == end:
        return extensions
    block, offset = _vector(data, offset, end, 2, 0, 0xFFFF, what, "extensions")
    if offset != end:
        raise HelloError("{}: {} octets after the last field".format(what, end - offset))
    offset, total = 0, len(block)
    while offset < total:
        if offset + 2 > total:
            raise HelloError("{}: extension type truncated".format(what))
        ext_type = (block[offset] << 8) | block[offset + 1]
        if ext_type in extensions:
            # RFC 5246 section 7.4.1.4: at most one of each type.
            raise HelloError("{}: extension {} appears twice".format(what, ext_type))
        if offset + 4 > total:
            raise HelloError("{}: extension data length truncated".format(what))
        start = offset + 4
        offset = start + ((block[offset + 2] << 8) | block[offset + 3])
        if offset > total:
            raise HelloError("{}: extension data truncated".format(what))
        extensions[ext_type] = block[start:offset]
    return extensions


def _tls_id(extensions: dict):
    """``(tls_id, malformed)`` from extension 56."""
    data = extensions.get(EXT_EXTERNAL_SESSION_ID)
    if data is None:
        return None, False
    try:
        return decode_external_session_id(data), False
    except ExtensionError:
        return None, True


def _use_srtp(data: bytes, what: str):
    """``(profile ids, mki)`` from use_srtp extension data (RFC 5764 section 4.1.1)."""
    what += " use_srtp"
    end = len(data)
    profiles, offset = _vector(data, 0, end, 2, 2, 0xFFFF, what, "SRTPProtectionProfiles")
    if len(profiles) % 2:
        raise HelloError("{}: SRTPProtectionProfiles has an odd length".format(what))
    mki, offset = _vector(data, offset, end, 1, 0, 255, what, "srtp_mki")
    if offset != end:
        raise HelloError("{}: {} octets after the last field".format(what, end - offset))
    return struct.unpack("!{}H".format(len(profiles) // 2), profiles), mki


_new = object.__new__


def _client_hello(data: bytes, body: int, end: int, message_seq: int) -> ClientHelloInfo:
    """The ClientHello whose body is ``data[body:end]``."""
    what = "ClientHello"
    offset = _fixed(data, body, end, 2, what, "client_version")
    client_version = (data[body] << 8) | data[body + 1]
    random_at, offset = offset, _fixed(data, offset, end, _RANDOM, what, "random")
    session_id, offset = _vector(data, offset, end, 1, 0, _MAX_SESSION_ID, what, "session_id")
    cookie, offset = _vector(data, offset, end, 1, 0, 255, what, "cookie")
    suites, offset = _vector(data, offset, end, 2, 2, 0xFFFE, what, "cipher_suites")
    if len(suites) % 2:
        raise HelloError("ClientHello: cipher_suites has an odd length")
    compression, offset = _vector(data, offset, end, 1, 1, 255, what, "compression_methods")
    by_type = _extensions(data, offset, end, what)
    tls_id, tls_id_malformed = _tls_id(by_type)
    profiles, mki = (), b""
    if EXT_USE_SRTP in by_type:
        profiles, mki = _use_srtp(by_type[EXT_USE_SRTP], what)
    ekt_ciphers = None
    ekt = by_type.get(EXT_SUPPORTED_EKT_CIPHERS)
    if ekt is not None:
        # EKTCipherType supported_ciphers<1..255> (RFC 8870 section 5.2.1).
        what = "ClientHello supported_ekt_ciphers"
        ciphers, offset = _vector(ekt, 0, len(ekt), 1, 1, 255, what, "supported_ciphers")
        if offset != len(ekt):
            raise HelloError("{}: {} octets after the last field".format(
                what, len(ekt) - offset))
        ekt_ciphers = tuple(ciphers)
    info = _new(ClientHelloInfo)
    info.__dict__.update(
        client_version=client_version,
        random=data[random_at:random_at + _RANDOM],
        session_id=session_id,
        cookie=cookie,
        cipher_suites=struct.unpack("!{}H".format(len(suites) // 2), suites),
        compression_methods=compression,
        extensions=tuple(by_type.items()),
        message_seq=message_seq,
        tls_id=tls_id,
        tls_id_malformed=tls_id_malformed,
        srtp_profiles=profiles,
        srtp_mki=mki,
        ekt_ciphers=ekt_ciphers,
    )
    return info


def _server_hello(data: bytes, body: int, end: int, message_seq: int) -> ServerHelloInfo:
    """The ServerHello whose body is ``data[body:end]``."""
    what = "ServerHello"
    offset = _fixed(data, body, end, 2, what, "server_version")
    server_version = (data[body] << 8) | data[body + 1]
    random_at, offset = offset, _fixed(data, offset, end, _RANDOM, what, "random")
    session_id, offset = _vector(data, offset, end, 1, 0, _MAX_SESSION_ID, what, "session_id")
    cipher_suite_at, offset = offset, _fixed(data, offset, end, 2, what, "cipher_suite")
    compression_at, offset = offset, _fixed(data, offset, end, 1, what, "compression_method")
    by_type = _extensions(data, offset, end, what)
    tls_id, tls_id_malformed = _tls_id(by_type)
    profile, mki = None, b""
    if EXT_USE_SRTP in by_type:
        profiles, mki = _use_srtp(by_type[EXT_USE_SRTP], what)
        if len(profiles) != 1:
            # RFC 5764 section 4.1.1: the server selects exactly one.
            raise HelloError("ServerHello: use_srtp lists {} profiles, not one".format(
                len(profiles)))
        profile = profiles[0]
    ekt_cipher = None
    if EXT_SUPPORTED_EKT_CIPHERS in by_type:
        # EKTCipherType selected_cipher: exactly one octet.
        ekt = by_type[EXT_SUPPORTED_EKT_CIPHERS]
        if len(ekt) != 1:
            raise HelloError("ServerHello: supported_ekt_ciphers holds {} octets, not 1".format(
                len(ekt)))
        ekt_cipher = ekt[0]
    info = _new(ServerHelloInfo)
    info.__dict__.update(
        server_version=server_version,
        random=data[random_at:random_at + _RANDOM],
        session_id=session_id,
        cipher_suite=(data[cipher_suite_at] << 8) | data[cipher_suite_at + 1],
        compression_method=data[compression_at],
        extensions=tuple(by_type.items()),
        message_seq=message_seq,
        tls_id=tls_id,
        tls_id_malformed=tls_id_malformed,
        srtp_profile=profile,
        srtp_mki=mki,
        ekt_cipher=ekt_cipher,
    )
    return info


# --------------------------------------------------------------------------
# Fragmented ClientHellos (RFC 6347 section 4.2.3)


class _Partial:
    """One ClientHello being put together from its fragments."""

    __slots__ = ("started", "message_seq", "length", "version", "record_seq",
                 "body", "ranges", "fragments")

    def __init__(self, started: float, message_seq: int, length: int, version: bytes) -> None:
        self.started = started
        self.message_seq = message_seq
        self.length = length
        self.version = version
        self.record_seq: Optional[bytes] = None
        self.body = bytearray(length)
        self.ranges: list = []  # (start, end) received, possibly overlapping
        self.fragments = 0

    def covered(self) -> bool:
        reached = 0
        for start, end in sorted(self.ranges):
            if start > reached:
                return False
            reached = max(reached, end)
        return reached >= self.length


class ClientHelloReassembler:
    """
    Puts a ClientHello split across records and datagrams back together,
    within bounds, so that who sent it can be read (the Media Distributor)
    and OpenSSL's cookie exchange, which needs the whole message in one
    record, can answer it (the Key Distributor).  Sans-I/O: ``now`` is the
    caller's clock.

    :meth:`feed` returns the datagram itself when it holds no partial
    ClientHello fragment, None while one is incomplete or once it was
    refused, and, when the last piece arrives, a new datagram of one
    epoch-0 record holding the whole ClientHello as if it had never been
    fragmented (which is how the handshake transcript hashes it, so feeding
    it to a DTLS stack is transparent).

    Bounds: a message of at most ``max_octets``, at most ``max_fragments``
    fragments, ``timeout`` seconds from the first fragment, and at most
    ``max_pending`` messages in progress (the oldest is dropped for a new
    one).  Refusals (too big, too many fragments, a fragment that
    contradicts an earlier one, timeout, eviction) drop what was gathered
    and are counted through ``count(reason)``.
    """

    def __init__(self, *, max_octets: int = 4096, max_fragments: int = 8,
                 timeout: float = 5.0, max_pending: int = 64,
                 count: Optional[Callable[[str], None]] = None) -> None:
        self.max_octets = max_octets
        self.max_fragments = max_fragments
        self.timeout = timeout
        self.max_pending = max_pending
        self.counters: dict = {}
        self._count = count if count is not None else self._own_count
        # Insertion order is age order: a restarted message moves to the end.
        self._pending: dict = {}

    def __len__(self) -> int:
        return len(self._pending)

    def _own_count(self, reason: str) -> None:
        self.counters[reason] = self.counters.get(reason, 0) + 1

    def feed(self, key, datagram, now: float):
        """See the class docstring; ``key`` says whose message it is (an address, an id)."""
        self._expire(now)
        try:
            fragments = _client_hello_fragments(datagram)
        except HelloError:
            return datagram  # broken framing: the caller's parser counts it
        if fragments is None:
            return datagram
        for fragment in fragments:
            result = self._add(key, fragment, now)
            if result is not None:
                return result
        return None

    def _expire(self, now: float) -> None:
        while self._pending:
            key, partial = next(iter(self._pending.items()))
            if now - partial.started < self.timeout:
                return
            del self._pending[key]
            self._count("hello-fragments-timed-out")

    def _refuse(self, key, reason: str) -> None:
        self._pending.pop(key, None)
        self._count("hello-fragments-" + reason)

    def _add(self, key, fragment, now: float):
        version, record_seq, length, message_seq, offset, data = fragment
        if length > self.max_octets:
            self._refuse(key, "too-big")
            return None
        partial = self._pending.get(key)
        if partial is not None and partial.message_seq != message_seq:
            # A new ClientHello (the one returning the cookie, or a restart).
            del self._pending[key]
            partial = None
        if partial is None:
            if len(self._pending) >= self.max_pending:
                del self._pending[next(iter(self._pending))]
                self._count("hello-fragments-evicted")
            partial = self._pending[key] = _Partial(now, message_seq, length, version)
        elif partial.length != length:
            self._refuse(key, "inconsistent")
            return None
        partial.fragments += 1
        if partial.fragments > self.max_fragments:
            self._refuse(key, "too-many")
            return None
        end = offset + len(data)
        for start, stop in partial.ranges:
            low, high = max(start, offset), min(stop, end)
            if low < high and partial.body[low:high] != data[low - offset:high - offset]:
                self._refuse(key, "inconsistent")
                return None
        partial.body[offset:end] = data
        partial.ranges.append((offset, end))
        if partial.record_seq is None or record_seq < partial.record_seq:
            # The first record's number: OpenSSL answers a ClientHello
            # with a HelloVerifyRequest under the ClientHello's number and
            # starts its own flight at 1, which a client drops as a replay
            # if the HelloVerifyRequest already used 1.
            partial.record_seq = record_seq
        if not partial.covered():
            return None
        del self._pending[key]
        self._count("hello-reassembled")
        message = (bytes([_CLIENT_HELLO]) + length.to_bytes(3, "big")
                   + message_seq.to_bytes(2, "big") + b"\x00\x00\x00"
                   + length.to_bytes(3, "big") + bytes(partial.body))
        return (bytes([_CONTENT_HANDSHAKE]) + partial.version + b"\x00\x00"
                + partial.record_seq + len(message).to_bytes(2, "big") + message)


def _client_hello_fragments(datagram):
    """
    The partial ClientHello fragments of ``datagram``'s epoch-0 handshake
    records as ``(version, record_seq, msg_length, message_seq, offset,
    data)``, or None when it holds none or holds a whole ClientHello.
    """
    data = bytes(datagram)
    whole, partial = _scan(data, _CLIENT_HELLO)
    if whole is not None or partial is None:
        return None
    return [(data[header + 1:header + 3], data[header + 5:header + 11], msg_length, message_seq,
             fragment_offset, data[body:body_end])
            for header, msg_length, message_seq, fragment_offset, body, body_end in partial]
