"""
perc.hello's parsers as they were before the single-pass rewrite (field by
field through a reader object, records walked by a generator), kept only
as the oracle of tests.test_hello.EquivalenceTests: the rewrite must give
the same result, and refuse the same input with the same reason.  Only the
parsing is the old code; the result classes, the error and the constants
are perc.hello's own, which the rewrite did not change.  Not used by perc.
"""

from __future__ import annotations

import struct
from typing import Optional

from perc.dtls import ExtensionError, decode_external_session_id
from perc.hello import (
    EXT_EXTERNAL_SESSION_ID,
    EXT_SUPPORTED_EKT_CIPHERS,
    EXT_USE_SRTP,
    MAX_MESSAGES,
    MAX_RECORDS,
    ClientHelloInfo,
    HelloError,
    ServerHelloInfo,
)

__all__ = ["parse_client_hello", "parse_server_hello", "_client_hello_fragments"]

_RECORD_HEADER = 13
_HANDSHAKE_HEADER = 12
_CONTENT_HANDSHAKE = 22
_CLIENT_HELLO = 1
_SERVER_HELLO = 2
_RANDOM = 32
_MAX_SESSION_ID = 32


def parse_client_hello(datagram) -> Optional[ClientHelloInfo]:
    """The first whole ClientHello in ``datagram``, or None; see the module contract."""
    found = _find_message(datagram, _CLIENT_HELLO)
    if found is None:
        return None
    body, message_seq = found
    return _client_hello(body, message_seq)


def parse_server_hello(datagram) -> Optional[ServerHelloInfo]:
    """The first whole ServerHello in ``datagram``, or None; see the module contract."""
    found = _find_message(datagram, _SERVER_HELLO)
    if found is None:
        return None
    body, message_seq = found
    return _server_hello(body, message_seq)


# --------------------------------------------------------------------------
# Records and handshake messages


def _handshake_fragments(data: bytes):
    """
    Every handshake message fragment in ``data``'s epoch-0 handshake records,
    as ``(record header, msg_type, msg_length, message_seq, fragment_offset,
    body start, body end)``; at most MAX_RECORDS records and MAX_MESSAGES
    fragments are walked.  Records of other types or epochs cost only their
    header.  HelloError for anything that does not parse.
    """
    total = len(data)
    offset = 0
    records = 0
    messages = 0
    while offset < total and records < MAX_RECORDS:
        records += 1
        if total - offset < _RECORD_HEADER:
            raise HelloError("truncated DTLS record header")
        length = (data[offset + 11] << 8) | data[offset + 12]
        start = offset + _RECORD_HEADER
        end = start + length
        if end > total:
            raise HelloError("DTLS record of {} octets overruns the datagram".format(length))
        header_at = offset
        offset = end
        if data[header_at] != _CONTENT_HANDSHAKE or data[header_at + 3] or data[header_at + 4]:
            continue
        position = start
        while position < end and messages < MAX_MESSAGES:
            messages += 1
            if end - position < _HANDSHAKE_HEADER:
                raise HelloError("truncated handshake header")
            msg_length = int.from_bytes(data[position + 1:position + 4], "big")
            fragment_offset = int.from_bytes(data[position + 6:position + 9], "big")
            fragment_length = int.from_bytes(data[position + 9:position + 12], "big")
            body = position + _HANDSHAKE_HEADER
            if body + fragment_length > end:
                raise HelloError("handshake fragment overruns its record")
            if fragment_offset + fragment_length > msg_length:
                raise HelloError("handshake fragment lies beyond its message length")
            yield (data[header_at:start], data[position], msg_length,
                   (data[position + 4] << 8) | data[position + 5], fragment_offset,
                   body, body + fragment_length)
            position = body + fragment_length


def _find_message(datagram, wanted: int):
    """
    ``(body, message_seq)`` of the first unfragmented handshake message of
    type ``wanted`` in an epoch-0 handshake record, or None.
    """
    # bytes(bytes) is the same object: no copy in the common case.
    data = bytes(datagram)
    for _, msg_type, msg_length, message_seq, fragment_offset, body, body_end in \
            _handshake_fragments(data):
        if msg_type == wanted and fragment_offset == 0 and body_end - body == msg_length:
            return data[body:body_end], message_seq
    return None


class _Reader:
    """Bounds-checked reads over one handshake body; every miss is a HelloError."""

    __slots__ = ("data", "offset", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.offset = 0
        self.what = what

    def remaining(self) -> int:
        return len(self.data) - self.offset

    # take, uint and vector are on the Key Distributor's per-join path (two
    # ClientHellos per association): each reads in place, without calling
    # the others.

    def take(self, count: int, field: str) -> bytes:
        start = self.offset
        end = start + count
        if end > len(self.data):
            raise HelloError("{}: {} truncated".format(self.what, field))
        self.offset = end
        return self.data[start:end]

    def uint(self, size: int, field: str) -> int:
        start = self.offset
        end = start + size
        if end > len(self.data):
            raise HelloError("{}: {} truncated".format(self.what, field))
        self.offset = end
        return int.from_bytes(self.data[start:end], "big")

    def vector(self, length_size: int, low: int, high: int, field: str) -> bytes:
        data = self.data
        start = self.offset
        end = start + length_size
        if end > len(data):
            raise HelloError("{}: {} length truncated".format(self.what, field))
        length = int.from_bytes(data[start:end], "big")
        if not low <= length <= high:
            raise HelloError("{}: {} length {} outside {}..{}".format(
                self.what, field, length, low, high))
        start, end = end, end + length
        if end > len(data):
            raise HelloError("{}: {} truncated".format(self.what, field))
        self.offset = end
        return data[start:end]

    def end(self) -> None:
        if self.remaining():
            raise HelloError("{}: {} octets after the last field".format(
                self.what, self.remaining()))


def _extensions(reader: _Reader) -> tuple:
    """``Extension extensions<0..2^16-1>`` if present (it is optional), as (type, data) pairs."""
    if not reader.remaining():
        return ()
    data = reader.vector(2, 0, 0xFFFF, "extensions")
    reader.end()
    seen = set()
    extensions = []
    # Read in place (the _Reader checks, inlined): a ClientHello has a
    # dozen extensions or more.
    offset, total = 0, len(data)
    while offset < total:
        if offset + 2 > total:
            raise HelloError("{}: extension type truncated".format(reader.what))
        ext_type = (data[offset] << 8) | data[offset + 1]
        if ext_type in seen:
            # RFC 5246 section 7.4.1.4: at most one of each type.
            raise HelloError("{}: extension {} appears twice".format(reader.what, ext_type))
        seen.add(ext_type)
        if offset + 4 > total:
            raise HelloError("{}: extension data length truncated".format(reader.what))
        start = offset + 4
        offset = start + ((data[offset + 2] << 8) | data[offset + 3])
        if offset > total:
            raise HelloError("{}: extension data truncated".format(reader.what))
        extensions.append((ext_type, data[start:offset]))
    return tuple(extensions)


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
    reader = _Reader(data, what + " use_srtp")
    profiles = reader.vector(2, 2, 0xFFFF, "SRTPProtectionProfiles")
    if len(profiles) % 2:
        raise HelloError("{}: SRTPProtectionProfiles has an odd length".format(reader.what))
    mki = reader.vector(1, 0, 255, "srtp_mki")
    reader.end()
    ids = tuple(int.from_bytes(profiles[i:i + 2], "big") for i in range(0, len(profiles), 2))
    return ids, mki


def _client_hello(body: bytes, message_seq: int) -> ClientHelloInfo:
    reader = _Reader(body, "ClientHello")
    client_version = reader.uint(2, "client_version")
    random = reader.take(_RANDOM, "random")
    session_id = reader.vector(1, 0, _MAX_SESSION_ID, "session_id")
    cookie = reader.vector(1, 0, 255, "cookie")
    suites = reader.vector(2, 2, 0xFFFE, "cipher_suites")
    if len(suites) % 2:
        raise HelloError("ClientHello: cipher_suites has an odd length")
    compression = reader.vector(1, 1, 255, "compression_methods")
    extensions = _extensions(reader)
    by_type = dict(extensions)
    tls_id, tls_id_malformed = _tls_id(by_type)
    profiles, mki = (), b""
    if EXT_USE_SRTP in by_type:
        profiles, mki = _use_srtp(by_type[EXT_USE_SRTP], "ClientHello")
    ekt_ciphers = None
    if EXT_SUPPORTED_EKT_CIPHERS in by_type:
        # EKTCipherType supported_ciphers<1..255> (RFC 8870 section 5.2.1).
        ekt = _Reader(by_type[EXT_SUPPORTED_EKT_CIPHERS], "ClientHello supported_ekt_ciphers")
        ekt_ciphers = tuple(ekt.vector(1, 1, 255, "supported_ciphers"))
        ekt.end()
    return ClientHelloInfo(
        client_version=client_version,
        random=random,
        session_id=session_id,
        cookie=cookie,
        cipher_suites=struct.unpack("!{}H".format(len(suites) // 2), suites),
        compression_methods=compression,
        extensions=extensions,
        message_seq=message_seq,
        tls_id=tls_id,
        tls_id_malformed=tls_id_malformed,
        srtp_profiles=profiles,
        srtp_mki=mki,
        ekt_ciphers=ekt_ciphers,
    )


def _server_hello(body: bytes, message_seq: int) -> ServerHelloInfo:
    reader = _Reader(body, "ServerHello")
    server_version = reader.uint(2, "server_version")
    random = reader.take(_RANDOM, "random")
    session_id = reader.vector(1, 0, _MAX_SESSION_ID, "session_id")
    cipher_suite = reader.uint(2, "cipher_suite")
    compression_method = reader.uint(1, "compression_method")
    extensions = _extensions(reader)
    by_type = dict(extensions)
    tls_id, tls_id_malformed = _tls_id(by_type)
    profile, mki = None, b""
    if EXT_USE_SRTP in by_type:
        profiles, mki = _use_srtp(by_type[EXT_USE_SRTP], "ServerHello")
        if len(profiles) != 1:
            # RFC 5764 section 4.1.1: the server selects exactly one.
            raise HelloError("ServerHello: use_srtp lists {} profiles, not one".format(
                len(profiles)))
        profile = profiles[0]
    ekt_cipher = None
    if EXT_SUPPORTED_EKT_CIPHERS in by_type:
        # EKTCipherType selected_cipher: exactly one octet.
        data = by_type[EXT_SUPPORTED_EKT_CIPHERS]
        if len(data) != 1:
            raise HelloError("ServerHello: supported_ekt_ciphers holds {} octets, not 1".format(
                len(data)))
        ekt_cipher = data[0]
    return ServerHelloInfo(
        server_version=server_version,
        random=random,
        session_id=session_id,
        cipher_suite=cipher_suite,
        compression_method=compression_method,
        extensions=extensions,
        message_seq=message_seq,
        tls_id=tls_id,
        tls_id_malformed=tls_id_malformed,
        srtp_profile=profile,
        srtp_mki=mki,
        ekt_cipher=ekt_cipher,
    )


def _client_hello_fragments(datagram):
    """
    The partial ClientHello fragments of ``datagram``'s epoch-0 handshake
    records as ``(version, record_seq, msg_length, message_seq, offset,
    data)``, or None when it holds none or holds a whole ClientHello.
    """
    data = bytes(datagram)
    found = []
    for header, msg_type, msg_length, message_seq, fragment_offset, body, body_end in \
            _handshake_fragments(data):
        if msg_type != _CLIENT_HELLO:
            continue
        if fragment_offset == 0 and body_end - body == msg_length:
            return None
        if body_end > body:
            found.append((header[1:3], header[5:11], msg_length, message_seq,
                          fragment_offset, data[body:body_end]))
    return found or None
