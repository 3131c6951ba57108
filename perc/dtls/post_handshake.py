"""
Codecs of what the own record layer carries after the handshake besides
application data: DTLS handshake messages (RFC 6347 section 4.2.2), such as
RFC 8870's ``ekt_key``, and the ACK of RFC 9147 section 7 that acknowledges
them (RFC 8870 section 5.2.2 uses it under DTLS 1.2 too).
"""

from __future__ import annotations

import struct
from typing import Optional

__all__ = ["HandshakeMessage", "decode_ack", "decode_handshake", "encode_ack",
           "encode_handshake"]

# msg_type, length (24 bits), message_seq, fragment_offset (24), fragment_length (24)
_HANDSHAKE_HEADER = struct.Struct("!B3sH3s3s")
_RECORD_NUMBER = struct.Struct("!QQ")  # epoch, sequence_number
_MAX_LENGTH = (1 << 24) - 1


class HandshakeMessage:
    """One whole (unfragmented) handshake message: type, message_seq, body."""

    __slots__ = ("msg_type", "message_seq", "body")

    def __init__(self, msg_type: int, message_seq: int, body: bytes) -> None:
        self.msg_type = msg_type
        self.message_seq = message_seq
        self.body = body

    def __repr__(self) -> str:  # the body may be key material
        return "<HandshakeMessage type {} seq {} ({} octets)>".format(
            self.msg_type, self.message_seq, len(self.body))


def encode_handshake(msg_type: int, message_seq: int, body: bytes) -> bytes:
    """The 12-octet DTLS handshake header (one fragment holding it all), then ``body``."""
    if not 0 <= message_seq <= 0xFFFF or len(body) > _MAX_LENGTH:
        raise ValueError("message_seq or length out of range")
    length = len(body).to_bytes(3, "big")
    return _HANDSHAKE_HEADER.pack(msg_type, length, message_seq, bytes(3), length) + body


def decode_handshake(plaintext: bytes) -> Optional[tuple]:
    """
    ``(msg_type, message_seq, whole)``: whole is a :class:`HandshakeMessage`
    when the record holds exactly one unfragmented message, else None
    (a fragment, or trailing octets).  None for fewer than 12 octets.
    """
    if len(plaintext) < _HANDSHAKE_HEADER.size:
        return None
    msg_type, length, message_seq, offset, fragment_length = \
        _HANDSHAKE_HEADER.unpack_from(plaintext)
    body = plaintext[_HANDSHAKE_HEADER.size:]
    whole = None
    if offset == bytes(3) and length == fragment_length and \
            int.from_bytes(length, "big") == len(body):
        whole = HandshakeMessage(msg_type, message_seq, bytes(body))
    return msg_type, message_seq, whole


def encode_ack(record_numbers) -> bytes:
    """``struct { RecordNumber record_numbers<0..2^16-1>; }`` of (epoch, sequence) pairs."""
    body = b"".join(_RECORD_NUMBER.pack(epoch, sequence) for epoch, sequence in record_numbers)
    return len(body).to_bytes(2, "big") + body


def decode_ack(data: bytes) -> Optional[list]:
    """The (epoch, sequence) pairs of an ACK, or None if it is malformed."""
    if len(data) < 2:
        return None
    length = int.from_bytes(data[:2], "big")
    if length != len(data) - 2 or length % _RECORD_NUMBER.size:
        return None
    return [_RECORD_NUMBER.unpack_from(data, offset)
            for offset in range(2, len(data), _RECORD_NUMBER.size)]
