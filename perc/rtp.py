"""
Packet cores for the Media Distributor's endpoint port: demultiplexing
(RFC 7983, RFC 5761), RTP/RTCP header parsing (RFC 3550), compound RTCP
packets and the media SSRCs feedback names (RFC 4585, RFC 5104), the EKT field at
the tail of SRTP packets (RFC 8870 section 4.1) and the Original Header
Block of double encryption (RFC 8723 section 4).

Sans-I/O and Twisted-free: bytes in, values out.  Every parser raises only
its own ``ValueError`` subclass (:class:`RtpError`, :class:`EktFieldError`,
:class:`OhbError`), never IndexError or struct.error.  Parsers accept
``bytes``, ``bytearray`` or ``memoryview``; the slices they return are of
the same type as their input, so pass ``bytes`` to get ``bytes`` back.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import NamedTuple, Optional

__all__ = [
    "Kind",
    "classify",
    "RTP_HEADER_LENGTH",
    "RTCP_MIN_LENGTH",
    "RtpError",
    "RtpHeader",
    "parse_rtp_header",
    "rtcp_ssrc",
    "RTCP_SR",
    "RTCP_RR",
    "RTCP_SDES",
    "RTCP_BYE",
    "RTCP_APP",
    "RTCP_RTPFB",
    "RTCP_PSFB",
    "RtcpPacket",
    "parse_rtcp_compound",
    "EktFieldError",
    "EKT_MSG_TYPE_SHORT",
    "EKT_MSG_TYPE_FULL",
    "SHORT_EKT_FIELD",
    "FULL_EKT_FIXED_LENGTH",
    "FullEktField",
    "split_ekt_field",
    "join_ekt_field",
    "full_ekt_field",
    "parse_full_ekt_field",
    "OhbError",
    "Ohb",
    "EMPTY_OHB",
    "parse_ohb",
    "split_ohb",
]

#: Fixed part of an RTP header (RFC 3550 section 5.1), before CSRCs.
RTP_HEADER_LENGTH = 12
#: RTCP common header (4) plus the sender's SSRC (4).
RTCP_MIN_LENGTH = 8


# --------------------------------------------------------------------------
# Demultiplexing


class Kind(enum.Enum):
    """What :func:`classify` found.  Members are singletons: compare with ``is``."""

    STUN = "stun"
    ZRTP = "zrtp"
    DTLS = "dtls"
    TURN_CHANNEL = "turn-channel"
    RTP = "rtp"
    RTCP = "rtcp"
    #: In the RTP/RTCP range but too short to be a protected packet.
    MALFORMED = "malformed"
    #: Nothing RFC 7983 assigns to this port (including empty datagrams).
    OTHER = "other"


# Module globals are looked up faster than enum attributes.
_STUN = Kind.STUN
_ZRTP = Kind.ZRTP
_DTLS = Kind.DTLS
_TURN = Kind.TURN_CHANNEL
_RTP = Kind.RTP
_RTCP = Kind.RTCP
_MALFORMED = Kind.MALFORMED
_OTHER = Kind.OTHER


def classify(datagram) -> Kind:
    """
    Classify one UDP payload by its first octet (RFC 7983 section 7):
    0-3 STUN, 16-19 ZRTP, 20-63 DTLS, 64-79 TURN channel, 128-191 RTP or
    RTCP (RFC 5761: second octet 192-223 is RTCP), anything else OTHER.

    RTP/RTCP that cannot be a protected packet is MALFORMED: RTCP shorter
    than 8 octets; RTP shorter than 12 + 4*CC octets, plus the extension
    header and its data when X is set, plus at least one octet of payload
    (an SRTP packet always has at least its tag).  RTP version 2 is implied
    by the 128-191 range.  Never raises for bytes-like input.
    """
    n = len(datagram)
    if n == 0:
        return _OTHER
    first = datagram[0]
    if first >= 128:
        if first > 191:
            return _OTHER
        if n < 2:
            return _MALFORMED
        if 192 <= datagram[1] <= 223:
            return _RTCP if n >= 8 else _MALFORMED
        header = 12 + ((first & 0x0F) << 2)
        if first & 0x10:
            # Extension header: 16-bit profile, 16-bit length in 32-bit words.
            if n < header + 4:
                return _MALFORMED
            header += 4 + (((datagram[header + 2] << 8) | datagram[header + 3]) << 2)
        return _RTP if n > header else _MALFORMED
    if first < 4:
        return _STUN
    if first < 16:
        return _OTHER
    if first < 20:
        return _ZRTP
    if first < 64:
        return _DTLS
    if first < 80:
        return _TURN
    return _OTHER


# --------------------------------------------------------------------------
# RTP and RTCP headers


class RtpError(ValueError):
    """An RTP or RTCP packet whose header is malformed; ``reason`` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RtpHeader(NamedTuple):
    """
    The header of an RTP packet.  ``header_length`` counts the fixed
    header, the CSRCs and, when ``extension`` is set, the extension header
    and its data: the payload starts there.  ``extension_profile`` is the
    extension's 16-bit profile (0xBEDE and 0x100x for RFC 8285), None
    without extension.  A NamedTuple because it is built per packet and a
    frozen dataclass costs several times more to construct.
    """

    version: int
    padding: bool
    extension: bool
    csrc_count: int
    marker: bool
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    header_length: int
    csrcs: tuple = ()
    extension_profile: Optional[int] = None


_FIXED = struct.Struct("!BBHII")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


def parse_rtp_header(packet) -> RtpHeader:
    """
    Parse the RTP header at the start of ``packet`` (RTP or SRTP: the header
    is cleartext).  Raises :class:`RtpError` if the packet is shorter than
    its header says or its version is not 2.  An empty payload is allowed.
    """
    n = len(packet)
    if n < RTP_HEADER_LENGTH:
        raise RtpError("RTP packet of {} octets is shorter than the 12-octet header".format(n))
    first, second, sequence, timestamp, ssrc = _FIXED.unpack_from(packet, 0)
    version = first >> 6
    if version != 2:
        raise RtpError("RTP version {} is not 2".format(version))
    csrc_count = first & 0x0F
    header_length = RTP_HEADER_LENGTH + 4 * csrc_count
    if n < header_length:
        raise RtpError("RTP packet of {} octets is shorter than its {} CSRCs".format(
            n, csrc_count))
    csrcs = (struct.unpack_from("!{}I".format(csrc_count), packet, RTP_HEADER_LENGTH)
             if csrc_count else ())
    extension = bool(first & 0x10)
    extension_profile = None
    if extension:
        if n < header_length + 4:
            raise RtpError("RTP packet too short for its extension header")
        extension_profile, words = struct.unpack_from("!HH", packet, header_length)
        header_length += 4 + 4 * words
        if n < header_length:
            raise RtpError("RTP extension of {} words does not fit in {} octets".format(
                words, n))
    return RtpHeader(
        version=version,
        padding=bool(first & 0x20),
        extension=extension,
        csrc_count=csrc_count,
        marker=bool(second & 0x80),
        payload_type=second & 0x7F,
        sequence=sequence,
        timestamp=timestamp,
        ssrc=ssrc,
        header_length=header_length,
        csrcs=csrcs,
        extension_profile=extension_profile,
    )


def rtcp_ssrc(packet) -> int:
    """
    The sender's SSRC of an RTCP (or SRTCP) packet: octets 4-7 of its first
    packet, which every RTCP packet type puts there.  Raises
    :class:`RtpError` unless the packet is at least 8 octets, version 2,
    with a packet type in 192-223 (RFC 5761).
    """
    if len(packet) < RTCP_MIN_LENGTH:
        raise RtpError("RTCP packet of {} octets is shorter than 8".format(len(packet)))
    if packet[0] >> 6 != 2:
        raise RtpError("RTCP version {} is not 2".format(packet[0] >> 6))
    if not 192 <= packet[1] <= 223:
        raise RtpError("packet type {} is not RTCP".format(packet[1]))
    return _U32.unpack_from(packet, 4)[0]


# --------------------------------------------------------------------------
# Compound RTCP (RFC 3550 section 6.1) and feedback (RFC 4585, RFC 5104)

RTCP_SR = 200
RTCP_RR = 201
RTCP_SDES = 202
RTCP_BYE = 203
RTCP_APP = 204
#: Transport layer feedback (RFC 4585 section 6.2): NACK is FMT 1.
RTCP_RTPFB = 205
#: Payload-specific feedback (RFC 4585 section 6.3): PLI is FMT 1, FIR 4.
RTCP_PSFB = 206

#: Feedback messages (packet type, FMT) whose media source SSRC is 0 and
#: whose FCI entries each start with the SSRC they are about (RFC 5104
#: section 4): TMMBR and TMMBN (8-octet entries); FIR, TSTR and TSTN
#: (8-octet entries).  VBCM (PSFB 7) has entries of their own length.
_FIXED_ENTRY_FEEDBACK = frozenset({(RTCP_RTPFB, 3), (RTCP_RTPFB, 4),
                                   (RTCP_PSFB, 4), (RTCP_PSFB, 5), (RTCP_PSFB, 6)})
_VBCM = 7
#: Application layer feedback (RFC 4585 section 6.4), which REMB uses.
_AFB = 15
_REMB = b"REMB"


class RtcpPacket(NamedTuple):
    """
    One packet of a compound RTCP packet: octets ``start:end`` of it
    (padding included).  ``count`` is the 5-bit field after the padding
    bit (RC, SC or FMT).  ``media_ssrcs`` names, for feedback (RTPFB,
    PSFB), the SSRCs of the media the feedback is about; it is empty for
    every other type.
    """

    packet_type: int
    count: int  # type: ignore[assignment]  # RTCP's field name; shadows tuple.count
    start: int
    end: int
    media_ssrcs: tuple = ()


def parse_rtcp_compound(packet) -> list:
    """
    Walk a compound RTCP packet (an SRTCP packet once unprotected) into
    its :class:`RtcpPacket` parts, in order.  Raises :class:`RtpError`
    unless every part is version 2 with a type in 192-223, its length
    fits, the parts fill the packet exactly, only the last has padding
    (RFC 3550 section 6.4.1: a padding count of 1 up to its body), and
    every feedback part has its media source SSRC and well-formed FCI
    entries where the SSRCs are named there.

    ``media_ssrcs`` of feedback: the SSRCs in the FCI entries for TMMBR,
    TMMBN, FIR, TSTR, TSTN and VBCM (RFC 5104 section 4, whose media source
    SSRC is 0) and for REMB (PSFB 15 whose FCI starts with "REMB"); the
    media source SSRC (RFC 4585 section 6.1: octets 8-11) for the others.
    """
    n = len(packet)
    if n < 4:
        raise RtpError("RTCP packet of {} octets is shorter than a header".format(n))
    parts = []
    offset = 0
    while offset < n:
        if n - offset < 4:
            raise RtpError("{} octets after the last RTCP packet".format(n - offset))
        first = packet[offset]
        if first >> 6 != 2:
            raise RtpError("RTCP version {} is not 2".format(first >> 6))
        packet_type = packet[offset + 1]
        if not 192 <= packet_type <= 223:
            raise RtpError("packet type {} is not RTCP".format(packet_type))
        end = offset + 4 * (((packet[offset + 2] << 8) | packet[offset + 3]) + 1)
        if end > n:
            raise RtpError("RTCP packet of type {} is longer than what is left".format(
                packet_type))
        body_end = end
        if first & 0x20:
            if end != n:
                raise RtpError("padding on an RTCP packet that is not the last")
            padding = packet[end - 1]
            if not 1 <= padding <= end - offset - 4:
                raise RtpError("RTCP padding count {} does not fit".format(padding))
            body_end = end - padding
        count = first & 0x1F
        media_ssrcs = ()
        if packet_type == RTCP_RTPFB or packet_type == RTCP_PSFB:
            media_ssrcs = _feedback_media_ssrcs(packet, packet_type, count, offset, body_end)
        parts.append(RtcpPacket(packet_type, count, offset, end, media_ssrcs))
        offset = end
    return parts


def _feedback_media_ssrcs(packet, packet_type: int, fmt: int, start: int, end: int) -> tuple:
    """The SSRCs feedback at ``start:end`` (padding excluded) is about."""
    fci = start + 12
    if end < fci:
        raise RtpError("feedback of {} octets has no media source SSRC".format(end - start))
    if (packet_type, fmt) in _FIXED_ENTRY_FEEDBACK:
        if (end - fci) % 8 or end == fci:
            raise RtpError("feedback FMT {} needs 8-octet FCI entries".format(fmt))
        return tuple(_U32.unpack_from(packet, at)[0] for at in range(fci, end, 8))
    if packet_type == RTCP_PSFB and fmt == _VBCM:
        ssrcs = []
        at = fci
        while at < end:
            if end - at < 8:
                raise RtpError("VBCM entry shorter than its header")
            ssrcs.append(_U32.unpack_from(packet, at)[0])
            at += 8 + (-(-_U16.unpack_from(packet, at + 6)[0] // 4) * 4)
        if at != end or not ssrcs:
            raise RtpError("VBCM entries do not fill the FCI")
        return tuple(ssrcs)
    if packet_type == RTCP_PSFB and fmt == _AFB and bytes(packet[fci:fci + 4]) == _REMB:
        if end - fci < 8:
            raise RtpError("REMB shorter than its fixed part")
        listed = packet[fci + 4]
        if end - fci - 8 < 4 * listed:
            raise RtpError("REMB lists {} SSRCs it has no room for".format(listed))
        return tuple(_U32.unpack_from(packet, fci + 8 + 4 * i)[0] for i in range(listed))
    return (_U32.unpack_from(packet, start + 8)[0],)


# --------------------------------------------------------------------------
# EKT field (RFC 8870 section 4.1)


class EktFieldError(ValueError):
    """The tail of an SRTP packet is not a well-formed EKT field."""


EKT_MSG_TYPE_SHORT = 0x00
EKT_MSG_TYPE_FULL = 0x02
#: A ShortEKTField: the message type alone.
SHORT_EKT_FIELD = b"\x00"
#: SPI (2) + Epoch (2) + EKTMsgLength (2) + message type (1).
FULL_EKT_FIXED_LENGTH = 7
#: EKTMsgLength is 16 bits and counts the whole field.
_MAX_CIPHERTEXT = 0xFFFF - FULL_EKT_FIXED_LENGTH


@dataclass(frozen=True)
class FullEktField:
    """The parts of a FullEKTField; ``encode()`` gives its wire form."""

    ciphertext: bytes
    spi: int
    epoch: int

    def encode(self) -> bytes:
        return full_ekt_field(self.ciphertext, self.spi, self.epoch)


def split_ekt_field(packet):
    """
    Split an SRTP packet with an EKT field appended into
    ``(srtp_packet, ekt_field)``; :func:`join_ekt_field` undoes it.

    The last octet is the message type: 0x00 is a ShortEKTField (that octet
    alone); 0x02 a FullEKTField, whose EKTMsgLength (the two octets before
    the type) is the length of the *whole* field, EKTCiphertext, SPI, Epoch,
    EKTMsgLength and type included (RFC 8870 section 4.1).  Anything else
    raises :class:`EktFieldError`: the reserved type 0x01, extension types
    0x03-0xFF, a length below 8 (the 7 fixed octets plus at least one octet
    of ciphertext, as the ABNF requires) or a field that would leave less
    than a 12-octet RTP header in front of it.
    """
    n = len(packet)
    if n == 0:
        raise EktFieldError("empty packet has no EKT field")
    message_type = packet[-1]
    if message_type == EKT_MSG_TYPE_SHORT:
        length = 1
    elif message_type == EKT_MSG_TYPE_FULL:
        if n < 3:
            raise EktFieldError("packet too short for a FullEKTField length")
        length = (packet[-3] << 8) | packet[-2]
        if length < FULL_EKT_FIXED_LENGTH + 1:
            raise EktFieldError(
                "EKTMsgLength {} is shorter than a FullEKTField can be".format(length))
    else:
        raise EktFieldError("unsupported EKT message type 0x{:02X}".format(message_type))
    if length > n - RTP_HEADER_LENGTH:
        raise EktFieldError("EKT field of {} octets leaves no RTP header in {} octets".format(
            length, n))
    return packet[:n - length], packet[n - length:]


def join_ekt_field(srtp_packet, ekt_field) -> bytes:
    """Append ``ekt_field`` to ``srtp_packet`` unchanged (the inverse of the split)."""
    return bytes(srtp_packet) + bytes(ekt_field)


def full_ekt_field(ciphertext: bytes, spi: int, epoch: int) -> bytes:
    """
    Build a FullEKTField: ``EKTCiphertext · SPI · Epoch · EKTMsgLength ·
    0x02``, EKTMsgLength counting all of it.  Raises :class:`EktFieldError`
    for an empty or over-long ciphertext or an SPI/epoch outside uint16.

    RFC 8870's ABNF caps EKTCiphertext at 251 octets, but AES key wrap with
    padding of its own longest EKTPlaintext (251 octets) gives 264; only the
    16-bit length is enforced here.
    """
    ciphertext = bytes(ciphertext)
    if not 1 <= len(ciphertext) <= _MAX_CIPHERTEXT:
        raise EktFieldError("EKTCiphertext must be 1 to {} octets, not {}".format(
            _MAX_CIPHERTEXT, len(ciphertext)))
    if not (0 <= spi <= 0xFFFF and 0 <= epoch <= 0xFFFF):
        raise EktFieldError("SPI and epoch must be 16-bit values")
    return ciphertext + struct.pack(
        "!HHHB", spi, epoch, len(ciphertext) + FULL_EKT_FIXED_LENGTH, EKT_MSG_TYPE_FULL)


def parse_full_ekt_field(ekt_field) -> FullEktField:
    """
    Parse exactly one FullEKTField (as :func:`split_ekt_field` returns it).
    Raises :class:`EktFieldError` if it is not one or its EKTMsgLength is
    not its length.
    """
    n = len(ekt_field)
    if n < FULL_EKT_FIXED_LENGTH + 1 or ekt_field[-1] != EKT_MSG_TYPE_FULL:
        raise EktFieldError("not a FullEKTField")
    spi, epoch, length = struct.unpack_from("!HHH", ekt_field, n - FULL_EKT_FIXED_LENGTH)
    if length != n:
        raise EktFieldError("EKTMsgLength {} does not match the field's {} octets".format(
            length, n))
    return FullEktField(bytes(ekt_field[:n - FULL_EKT_FIXED_LENGTH]), spi, epoch)


# --------------------------------------------------------------------------
# Original Header Block (RFC 8723 section 4)


class OhbError(ValueError):
    """An Original Header Block that is malformed or cannot be represented."""


# Config octet: R R R R B M P Q (most significant bit first).
_OHB_B = 0x08  # original marker value
_OHB_M = 0x04  # marker present
_OHB_P = 0x02  # PT present
_OHB_Q = 0x01  # SEQ present
_OHB_RESERVED = 0xF0


@dataclass(frozen=True)
class Ohb:
    """
    Original values of the header fields a Media Distributor changed:
    ``payload_type`` (0-127), ``sequence`` (0-65535), ``marker`` (bool);
    None means "not changed".  Wire form (RFC 8723 section 4):
    ``[PT] [SEQ] Config``, in that order, Config = ``0000 B M P Q``.
    ``Ohb()`` is the empty OHB, ``0x00``.
    """

    payload_type: Optional[int] = None
    sequence: Optional[int] = None
    marker: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.payload_type is not None and not (
                isinstance(self.payload_type, int) and 0 <= self.payload_type <= 127):
            raise OhbError("OHB payload type must be 0 to 127")
        if self.sequence is not None and not (
                isinstance(self.sequence, int) and 0 <= self.sequence <= 0xFFFF):
            raise OhbError("OHB sequence number must be 0 to 65535")
        if self.marker is not None and not isinstance(self.marker, bool):
            raise OhbError("OHB marker must be a bool or None")

    @property
    def config(self) -> int:
        """The Config octet."""
        config = 0
        if self.marker is not None:
            config |= _OHB_M | (_OHB_B if self.marker else 0)
        if self.payload_type is not None:
            config |= _OHB_P
        if self.sequence is not None:
            config |= _OHB_Q
        return config

    @property
    def size(self) -> int:
        """Encoded length in octets (1 to 4)."""
        return (1 + (self.payload_type is not None)
                + 2 * (self.sequence is not None))

    def encode(self) -> bytes:
        out = bytearray()
        if self.payload_type is not None:
            out.append(self.payload_type)
        if self.sequence is not None:
            out += _U16.pack(self.sequence)
        out.append(self.config)
        return bytes(out)

    def restore(self, payload_type: int, sequence: int, marker: bool) -> tuple:
        """
        The original ``(payload_type, sequence, marker)`` given the values of
        the received header (RFC 8723 section 5.3 step 4): the OHB's value
        where it has one, the header's otherwise.
        """
        return (
            payload_type if self.payload_type is None else self.payload_type,
            sequence if self.sequence is None else self.sequence,
            marker if self.marker is None else self.marker,
        )

    def reflect(self, received: tuple, sent: tuple) -> "Ohb":
        """
        The OHB to send after a Media Distributor changed the header from
        ``received`` to ``sent`` (both ``(payload_type, sequence, marker)``),
        per RFC 8723 section 5.2 step 3: a changed field not yet in the OHB
        gets its received value; a field back at its original value leaves
        the OHB; a field already recorded keeps its original value.
        """
        original = self.restore(*received)
        values = [None if new == old else old for old, new in zip(original, sent)]
        return Ohb(payload_type=values[0], sequence=values[1],
                   marker=None if values[2] is None else bool(values[2]))


#: The empty OHB an endpoint appends (RFC 8723 section 5.1 step 5).
EMPTY_OHB = b"\x00"


def parse_ohb(payload) -> Ohb:
    """
    Parse the OHB at the *end* of ``payload`` (an outer-decrypted RTP
    payload: inner ciphertext, inner tag, then the OHB).  Raises
    :class:`OhbError` for an empty payload, reserved bits set, B set
    without M, a PT octet above 127 (it holds a 7-bit payload type), or
    fields longer than the payload.  Use ``.size`` to strip it.
    """
    n = len(payload)
    if n == 0:
        raise OhbError("no room for an OHB config octet")
    config = payload[-1]
    if config & _OHB_RESERVED:
        raise OhbError("OHB config 0x{:02X} has reserved bits set".format(config))
    # RFC 8723 writes this rule as "C & 0x0C MUST NOT be 0x80", which no
    # value can be; its prose (B must be zero when M is zero) is what is meant.
    if config & (_OHB_B | _OHB_M) == _OHB_B:
        raise OhbError("OHB config 0x{:02X} has B set without M".format(config))
    size = 1 + (config & _OHB_P and 1) + (config & _OHB_Q and 2)
    if n < size:
        raise OhbError("OHB of {} octets does not fit in {} octets".format(size, n))
    offset = n - size
    payload_type = None
    if config & _OHB_P:
        payload_type = payload[offset]
        if payload_type > 127:
            raise OhbError("OHB payload type octet 0x{:02X} is above 127".format(payload_type))
        offset += 1
    sequence = None
    if config & _OHB_Q:
        sequence = (payload[offset] << 8) | payload[offset + 1]
    marker = bool(config & _OHB_B) if config & _OHB_M else None
    return Ohb(payload_type, sequence, marker)


def split_ohb(payload):
    """``(rest, ohb)``: ``payload`` without its trailing OHB, and the OHB."""
    ohb = parse_ohb(payload)
    return payload[:len(payload) - ohb.size], ohb
