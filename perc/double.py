"""
The endpoint transform of RFC 8723 ("double" encryption) for the two PERC
profiles DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM (0x0009) and
DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM (0x000A), plus the header rewrite
a Media Distributor may apply between the two layers.

Sans-I/O and Twisted-free: bytes in, bytes (or a result object) out.

Layers
------
*Inner* (end-to-end) layer, implemented here with ``cryptography``'s AESGCM,
exactly as RFC 7714 specifies SRTP AEAD, applied to a *synthetic* packet:

- session keys come from the inner master key and salt through the SRTP KDF
  (RFC 3711 section 4.3 with key derivation rate 0): AES_CM PRF for the
  128-bit profile, AES_256_CM_PRF (RFC 6188) for the 256-bit one.  Label
  0x00 gives the session encryption key (16 or 32 octets), label 0x02 the
  12-octet session salt; AEAD needs no authentication key (label 0x01).
  The KDF input block is ``(master_salt * 2^16 XOR label * 2^48) * 2^16``:
  the 96-bit master salt is padded with 16 zero bits on the right to the
  112 bits RFC 3711 expects (RFC 7714 erratum 4938, what libsrtp does), the
  label sits in its eighth octet, and the last two octets are the counter
  (:func:`srtp_kdf`).
- IV (RFC 7714 section 8.1): ``00 00 || SSRC(4) || ROC(4) || SEQ(2)`` XOR
  the 12-octet session salt, i.e. the salt XOR ``SSRC * 2^48 + index``
  where ``index = ROC * 2^16 + SEQ`` (RFC 3711 section 3.3.1).
- AAD (RFC 7714 section 8.2): the RTP header.  For the inner layer it is
  the synthetic header of RFC 8723 section 5.1 step 3: the first
  ``12 + 4*CC`` octets of the original header with X cleared.
- Plaintext: the RTP payload, padding included; output ciphertext followed
  by the 16-octet tag.
- The inner ROC and SEQ are tracked on their own (RFC 8723 section 3): the
  receiver estimates the inner index from the *original* SEQ (restored from
  the OHB) per RFC 3711 appendix A and checks it against a per-SSRC sliding
  replay window (128 packets by default) after the inner tag verified.

*Outer* (hop-by-hop) layer: plain AEAD_AES_128_GCM / AEAD_AES_256_GCM with
the hop-by-hop halves of key and salt, done by a pylibsrtp session (the
same code the Media Distributor uses; the tests check it against the same
RFC 7714 construction written out by hand).  RTCP is protected by this
layer only (RFC 8723 section 6).

Repair mode (RFC 8723 sections 5.1 step 2, 5.3 step 2 and 7)
------------------------------------------------------------
Repair packets -- RTX retransmissions (RFC 4588) and Flex FEC packets
(RFC 8627) -- carry payloads that are already double-encrypted packets (or
FEC over them).  They are protected with the outer layer only: no synthetic
packet, no inner layer and no OHB.  Nothing on the wire says that a packet
is a repair packet; sender and receiver know it from signalling (the RTX or
FEC payload type, negotiated in SDP).  So both classes take a set of
``repair_payload_types``: a packet whose (outer) payload type is in it is
handled in repair mode.  ``DoubleSender.protect(..., repair=True)`` forces
it for one packet.  The receiver returns the outer-decrypted repair packet
as is (``result.repair`` is true); the application runs the repair
algorithm (undo RTX, or FEC recovery) and passes the recovered packet --
a double-encrypted packet as the sender emitted it -- to ``unprotect``
again, which then goes through the normal steps.  (For RTX the recovered
packet's outer SEQ was never seen by the receiver because the original was
lost, so the outer replay check lets it through.)

Errors
------
Every packet-level failure is a :class:`DoubleError` (a ``ValueError``)
with a ``reason`` string; subclasses name the cases.  Messages never
contain key material.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass, field
from typing import Iterable, Optional

import pylibsrtp
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from perc.profiles import Profile, by_id
from perc.rtp import (
    EMPTY_OHB,
    SHORT_EKT_FIELD,
    EktFieldError,
    Ohb,
    OhbError,
    RtpError,
    RtpHeader,
    parse_full_ekt_field,
    parse_rtp_header,
    split_ekt_field,
    split_ohb,
)

__all__ = [
    "TAG_LENGTH",
    "SALT_LENGTH",
    "DEFAULT_REPLAY_WINDOW",
    "LABEL_ENCRYPTION",
    "LABEL_SALT",
    "DoubleError",
    "OuterAuthenticationError",
    "UnknownSenderError",
    "InnerAuthenticationError",
    "ReplayError",
    "SequenceReuseError",
    "MalformedOhbError",
    "MalformedPacketError",
    "OuterProtectError",
    "srtp_kdf",
    "RtpPacketResult",
    "DoubleSender",
    "DoubleReceiver",
    "relay_rewrite",
]

#: AES-GCM tag length of each layer (RFC 7714 section 14, RFC 8723 section 8).
TAG_LENGTH = 16
#: Master and session salt length of each layer (RFC 7714).
SALT_LENGTH = 12
#: Packets a replay window remembers below the highest index seen.
DEFAULT_REPLAY_WINDOW = 128
#: SRTP KDF labels (RFC 3711 section 4.3.1) that an AEAD SRTP context uses.
LABEL_ENCRYPTION = 0x00
LABEL_SALT = 0x02

_MAX_INDEX = (1 << 48) - 1
_RFC8285_ONE_BYTE = 0xBEDE


# --------------------------------------------------------------------------
# Errors


class DoubleError(ValueError):
    """
    A packet the double transform refused.  ``reason`` is one of the
    ``REASON`` values of the subclasses; ``ssrc`` is the packet's SSRC when
    it was readable.  Messages never include keys.
    """

    REASON = "double transform failed"

    def __init__(self, detail: Optional[str] = None, *, ssrc: Optional[int] = None) -> None:
        message = self.REASON if not detail else "{}: {}".format(self.REASON, detail)
        super().__init__(message)
        self.reason = self.REASON
        self.ssrc = ssrc


class OuterAuthenticationError(DoubleError):
    """The hop-by-hop layer did not verify (RFC 8723 section 5.3 step 1)."""

    REASON = "outer authentication failed"


class UnknownSenderError(DoubleError):
    """
    No inner key for the packet's SSRC yet.  Raised before any
    cryptographic processing, so nothing changed: once the key is known
    (e.g. from the FullEKTField in ``ekt_field``), the same packet can be
    passed to ``unprotect`` again.
    """

    REASON = "unknown sender SSRC"

    def __init__(self, detail=None, *, ssrc=None, ekt_field: Optional[bytes] = None) -> None:
        super().__init__(detail, ssrc=ssrc)
        self.ekt_field = ekt_field


class InnerAuthenticationError(DoubleError):
    """The end-to-end layer did not verify (RFC 8723 section 5.3 step 5)."""

    REASON = "inner authentication failed"


class ReplayError(DoubleError):
    """
    A replayed or too old packet.  ``layer`` is ``"outer"`` (the hop-by-hop
    SEQ, checked by libsrtp) or ``"inner"`` (the original SEQ, from the OHB).
    """

    REASON = "replay"

    def __init__(self, detail=None, *, ssrc=None, layer: str = "inner") -> None:
        super().__init__(detail, ssrc=ssrc)
        self.layer = layer


class SequenceReuseError(DoubleError):
    """
    The sender was asked to protect a packet whose SSRC and packet index it
    has already used (or that is too far behind): protecting it would reuse
    an AES-GCM nonce under the inner key.
    """

    REASON = "sequence number already used"


class MalformedOhbError(DoubleError):
    """The Original Header Block is malformed (RFC 8723 section 4)."""

    REASON = "malformed OHB"


class MalformedPacketError(DoubleError):
    """Not a usable RTP packet: bad header, too short, bad EKT field, ..."""

    REASON = "malformed packet"


class OuterProtectError(DoubleError):
    """The hop-by-hop layer refused to protect a packet (libsrtp said why)."""

    REASON = "outer protection failed"


# --------------------------------------------------------------------------
# RFC 7714 building blocks


def srtp_kdf(master_key: bytes, master_salt: bytes, label: int, length: int) -> bytes:
    """
    The SRTP key derivation function with key derivation rate 0: AES_CM PRF
    (RFC 3711 section 4.3.3) for a 16-octet master key, AES_256_CM_PRF
    (RFC 6188) for a 32-octet one.

    ``x = key_id XOR master_salt`` with ``key_id = label || r`` and r = 0,
    the two right-aligned in 112 bits; a 12-octet (RFC 7714) master salt is
    first multiplied by 2^16 (padded with two zero octets on the right, RFC
    7714 erratum 4938).  The output is the first ``length`` octets of the
    AES counter-mode key stream under the master key starting at ``x * 2^16``.
    """
    if len(master_key) not in (16, 32):
        raise ValueError("SRTP master key must be 16 or 32 octets")
    if len(master_salt) not in (12, 14):
        raise ValueError("SRTP master salt must be 12 or 14 octets")
    if not 0 <= label <= 0xFF:
        raise ValueError("SRTP KDF label must be one octet")
    x = bytearray(master_salt.ljust(14, b"\x00"))
    x[7] ^= label
    encryptor = Cipher(algorithms.AES(bytes(master_key)), modes.CTR(bytes(x) + b"\x00\x00")).encryptor()
    return encryptor.update(b"\x00" * length) + encryptor.finalize()


class _InnerCipher:
    """One inner (end-to-end) SRTP AEAD context's session key and salt."""

    __slots__ = ("_aead", "_salt")

    def __init__(self, master_key: bytes, master_salt: bytes) -> None:
        session_key = srtp_kdf(master_key, master_salt, LABEL_ENCRYPTION, len(master_key))
        self._aead = AESGCM(session_key)
        self._salt = int.from_bytes(srtp_kdf(master_key, master_salt, LABEL_SALT, SALT_LENGTH), "big")

    def _nonce(self, ssrc: int, index: int) -> bytes:
        # 00 00 || SSRC || ROC || SEQ, XOR the session salt (RFC 7714 section 8.1).
        return (((ssrc << 48) | index) ^ self._salt).to_bytes(12, "big")

    def seal(self, ssrc: int, index: int, plaintext: bytes, aad: bytes) -> bytes:
        return self._aead.encrypt(self._nonce(ssrc, index), plaintext, aad)

    def open(self, ssrc: int, index: int, ciphertext: bytes, aad: bytes) -> bytes:
        return self._aead.decrypt(self._nonce(ssrc, index), ciphertext, aad)

    def __repr__(self) -> str:
        return "<_InnerCipher (key hidden)>"


class _Stream:
    """
    Inner index state of one SSRC: the highest packet index authenticated
    (or sent) and a sliding window below it (RFC 3711 sections 3.3.1, 3.3.2
    and appendix A).
    """

    __slots__ = ("initial_roc", "highest", "mask", "window")

    def __init__(self, initial_roc: int, window: int) -> None:
        self.initial_roc = initial_roc
        self.highest: Optional[int] = None
        self.mask = 0
        self.window = window

    @property
    def roc(self) -> int:
        return self.initial_roc if self.highest is None else self.highest >> 16

    def estimate(self, seq: int) -> Optional[int]:
        """The packet index for ``seq`` (RFC 3711 appendix A), None if impossible."""
        if self.highest is None:
            return (self.initial_roc << 16) | seq
        roc = self.highest >> 16
        s_l = self.highest & 0xFFFF
        if s_l < 0x8000:
            v = roc - 1 if seq - s_l > 0x8000 else roc
        else:
            v = roc + 1 if s_l - 0x8000 > seq else roc
        if v < 0 or v > 0xFFFFFFFF:
            return None
        return (v << 16) | seq

    def seen(self, index: int) -> bool:
        """True if ``index`` was already used or is below the window."""
        if self.highest is None or index > self.highest:
            return False
        delta = self.highest - index
        return delta >= self.window or bool((self.mask >> delta) & 1)

    def commit(self, index: int) -> None:
        if self.highest is None:
            self.highest, self.mask = index, 1
        elif index > self.highest:
            shift = index - self.highest
            self.mask = ((self.mask << shift) | 1) & ((1 << self.window) - 1) if shift < self.window else 1
            self.highest = index
        else:
            self.mask |= 1 << (self.highest - index)


# --------------------------------------------------------------------------
# Helpers shared by both ends


def _profile(profile) -> Profile:
    resolved = by_id(profile) if isinstance(profile, int) else profile
    if not isinstance(resolved, Profile):
        raise ValueError("unknown SRTP protection profile {!r}".format(profile))
    if not resolved.double:
        raise ValueError("{} is not an RFC 8723 double profile".format(resolved.name))
    return resolved


def _check_lengths(profile: Profile, key: bytes, salt: bytes, what: str) -> None:
    if not isinstance(key, (bytes, bytearray)) or not isinstance(salt, (bytes, bytearray)):
        raise TypeError("{} key and salt must be bytes".format(what))
    if len(key) != profile.key_length // 2 or len(salt) != profile.salt_length // 2:
        raise ValueError("{} key and salt must be {} and {} octets for {}, not {} and {}".format(
            what, profile.key_length // 2, profile.salt_length // 2, profile.name,
            len(key), len(salt)))


def _outer_session(profile: Profile, key: bytes, salt: bytes, direction: int) -> pylibsrtp.Session:
    policy = pylibsrtp.Policy(key=bytes(key) + bytes(salt), ssrc_type=direction,
                              srtp_profile=profile.hbh_libsrtp_profile)
    return pylibsrtp.Session(policy)


def _header(packet: bytes) -> RtpHeader:
    try:
        return parse_rtp_header(packet)
    except RtpError as e:
        raise MalformedPacketError(e.reason) from None


def _synthetic_header(header_octets, csrc_count: int) -> bytes:
    """RFC 8723 section 5.1 step 3: X cleared, extensions cut off."""
    return bytes((header_octets[0] & 0xEF,)) + bytes(header_octets[1:12 + 4 * csrc_count])


def _with_fields(header_octets: bytes, payload_type: int, sequence: int, marker: bool) -> bytearray:
    out = bytearray(header_octets)
    out[1] = (0x80 if marker else 0) | payload_type
    struct.pack_into("!H", out, 2, sequence)
    return out


def _replay_text(message: str) -> bool:
    return message.startswith("replay check failed") or "too old" in message


# --------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class RtpPacketResult:
    """
    What :meth:`DoubleReceiver.unprotect` returns.

    ``packet`` is the RTP packet as the sender built it: its header with the
    original (end-to-end verified) PT, SEQ and M, the header extensions as
    received (they are not protected end to end), and the decrypted payload
    including any padding.  ``payload_type``, ``sequence`` and ``marker`` are
    those original values; ``outer_*`` are the values in the received header,
    which RFC 8723 section 5.3 says to use for SDP/codec matching (PT) and
    for ordering (SEQ).  ``index`` is the inner 48-bit packet index
    (``roc * 2^16 + sequence``).

    In repair mode (``repair`` true) ``packet`` is the outer-decrypted repair
    packet, ``ohb`` and ``index`` are None and the original values equal the
    outer ones.  ``ekt_field`` is the EKT field split off the packet (only
    when the receiver expects EKT), else None.
    """

    packet: bytes = field(repr=False)
    header: RtpHeader = field(repr=False)
    ssrc: int
    payload_type: int
    sequence: int
    marker: bool
    outer_payload_type: int
    outer_sequence: int
    outer_marker: bool
    index: Optional[int] = None
    ohb: Optional[Ohb] = None
    repair: bool = False
    ekt_field: Optional[bytes] = field(default=None, repr=False)

    @property
    def payload(self) -> bytes:
        """The RTP payload, padding included."""
        return self.packet[self.header.header_length:]

    @property
    def roc(self) -> Optional[int]:
        return None if self.index is None else self.index >> 16

    @property
    def media(self) -> bytes:
        """
        The payload without RTP padding (RFC 3550 section 5.1).  Raises
        :class:`MalformedPacketError` if the P bit is set and the last octet
        is not a usable padding count.
        """
        payload = self.payload
        if not self.header.padding:
            return payload
        count = payload[-1] if payload else 0
        if count == 0 or count > len(payload):
            raise MalformedPacketError("bad RTP padding count", ssrc=self.ssrc)
        return payload[:-count]


# --------------------------------------------------------------------------
# Sender


class DoubleSender:
    """
    Protects one endpoint's outgoing RTP (inner + outer) and RTCP (outer)
    with a double profile.

    ``inner_master_key``/``inner_master_salt`` are the end-to-end halves
    (16 or 32 octets, and 12), ``hbh_key``/``hbh_salt`` the hop-by-hop
    halves.  Every SSRC the endpoint sends gets its own inner ROC (starting
    at 0, or as :meth:`set_roc` says).  Packets whose payload type is in
    ``repair_payload_types`` are sent in repair mode (outer layer only).
    """

    def __init__(self, profile, inner_master_key: bytes, inner_master_salt: bytes,
                 hbh_key: bytes, hbh_salt: bytes, *,
                 repair_payload_types: Iterable[int] = ()) -> None:
        self.profile = _profile(profile)
        _check_lengths(self.profile, inner_master_key, inner_master_salt, "inner")
        _check_lengths(self.profile, hbh_key, hbh_salt, "hop-by-hop")
        self.repair_payload_types = frozenset(repair_payload_types)
        self._inner = _InnerCipher(bytes(inner_master_key), bytes(inner_master_salt))
        self._outer = _outer_session(self.profile, hbh_key, hbh_salt,
                                     pylibsrtp.Policy.SSRC_ANY_OUTBOUND)
        self._streams: dict[int, _Stream] = {}

    @classmethod
    def from_master(cls, profile, master_key: bytes, master_salt: bytes, **kwargs) -> "DoubleSender":
        """Build from a whole double master key and salt (inner half first)."""
        profile = _profile(profile)
        if len(master_key) != profile.key_length or len(master_salt) != profile.salt_length:
            raise ValueError("{} needs a {}-octet master key and {}-octet master salt".format(
                profile.name, profile.key_length, profile.salt_length))
        k, s = profile.key_length // 2, profile.salt_length // 2
        return cls(profile, master_key[:k], master_salt[:s], master_key[k:], master_salt[s:],
                   **kwargs)

    def __repr__(self) -> str:
        return "<DoubleSender {} ssrcs={} (keys hidden)>".format(
            self.profile.name, sorted(self._streams))

    def set_hop_by_hop(self, hbh_key: bytes, hbh_salt: bytes) -> None:
        """
        Protect the outer layer with new hop-by-hop keys from now on (a new
        DTLS association with the Key Distributor); the inner key and every
        SSRC's inner sequence state stay as they are.
        """
        _check_lengths(self.profile, hbh_key, hbh_salt, "hop-by-hop")
        self._outer = _outer_session(self.profile, hbh_key, hbh_salt,
                                     pylibsrtp.Policy.SSRC_ANY_OUTBOUND)

    def roc(self, ssrc: int) -> int:
        """The inner ROC of ``ssrc`` now (what a FullEKTField announces)."""
        stream = self._streams.get(ssrc)
        return 0 if stream is None else stream.roc

    def set_roc(self, ssrc: int, roc: int) -> None:
        """Start ``ssrc``'s inner ROC at ``roc``; only before its first packet."""
        if not 0 <= roc <= 0xFFFFFFFF:
            raise ValueError("ROC must be a 32-bit value")
        stream = self._streams.get(ssrc)
        if stream is not None and stream.highest is not None:
            raise ValueError("SSRC {:#010x} has already sent packets".format(ssrc))
        self._streams[ssrc] = _Stream(roc, DEFAULT_REPLAY_WINDOW)

    def protect(self, packet: bytes, *, repair: Optional[bool] = None,
                ekt_field: bytes = b"") -> bytes:
        """
        RFC 8723 section 5.1: synthetic packet, inner AEAD, original header
        back, empty OHB appended, outer AEAD.  ``repair`` forces repair mode
        (outer only) on or off; None decides by ``repair_payload_types``.
        ``ekt_field`` (a ShortEKTField or FullEKTField) is appended after the
        SRTP packet.
        """
        packet = bytes(packet)
        header = _header(packet)
        ekt_field = bytes(ekt_field)
        if ekt_field and ekt_field != SHORT_EKT_FIELD:
            try:
                parse_full_ekt_field(ekt_field)
            except EktFieldError as e:
                raise MalformedPacketError("bad EKT field: {}".format(e), ssrc=header.ssrc) from None
        # extension_profile is an int whenever header.extension is set.
        if header.extension and not (header.extension_profile == _RFC8285_ONE_BYTE
                                     or header.extension_profile & 0xFFF0 == 0x1000):  # type: ignore[operator]
            # RFC 8723 section 5.1 step 1.
            raise MalformedPacketError(
                "header extension profile {:#06x} is not RFC 8285".format(header.extension_profile),  # type: ignore[str-format]
                ssrc=header.ssrc)
        if repair is None:
            repair = header.payload_type in self.repair_payload_types
        if repair:
            return self._outer_protect(packet, header.ssrc) + ekt_field

        length = header.header_length
        payload = packet[length:]
        if header.padding and (not payload or payload[-1] == 0 or payload[-1] > len(payload)):
            raise MalformedPacketError("bad RTP padding count", ssrc=header.ssrc)
        stream = self._streams.get(header.ssrc)
        if stream is None:
            stream = self._streams[header.ssrc] = _Stream(0, DEFAULT_REPLAY_WINDOW)
        index = stream.estimate(header.sequence)
        if index is None or stream.seen(index):
            raise SequenceReuseError("SEQ {}".format(header.sequence), ssrc=header.ssrc)
        inner = self._inner.seal(header.ssrc, index, payload,
                                 _synthetic_header(packet, header.csrc_count))
        out = self._outer_protect(packet[:length] + inner + EMPTY_OHB, header.ssrc)
        stream.commit(index)
        return out + ekt_field

    def protect_rtcp(self, packet: bytes) -> bytes:
        """SRTCP with the hop-by-hop key only (RFC 8723 section 6)."""
        try:
            return self._outer.protect_rtcp(bytes(packet))
        except pylibsrtp.Error as e:
            raise OuterProtectError(str(e)) from None
        except ValueError as e:
            raise OuterProtectError(str(e)) from None

    def _outer_protect(self, packet: bytes, ssrc: int) -> bytes:
        try:
            return self._outer.protect(packet)
        except pylibsrtp.Error as e:
            if _replay_text(str(e)):
                raise SequenceReuseError("outer layer: {}".format(e), ssrc=ssrc) from None
            raise OuterProtectError(str(e), ssrc=ssrc) from None
        except ValueError as e:  # pylibsrtp: "packet is too long"
            raise OuterProtectError(str(e), ssrc=ssrc) from None


# --------------------------------------------------------------------------
# Receiver


class _Sender:
    __slots__ = ("cipher", "stream", "fingerprint")

    def __init__(self, cipher: _InnerCipher, stream: _Stream, fingerprint: bytes) -> None:
        self.cipher = cipher
        self.stream = stream
        self.fingerprint = fingerprint


class DoubleReceiver:
    """
    Verifies and decrypts RTP (outer then inner) and RTCP (outer) arriving
    from a Media Distributor, with the hop-by-hop key and salt of that hop.

    Inner keys are per sender SSRC and arrive later (EKT), through
    :meth:`add_sender_key`.  With ``ekt=True`` every SRTP packet must end
    with an EKT field (RFC 8870), which is split off first and reported.
    ``repair_payload_types`` are the payload types received in repair mode.
    ``replay_window`` is the size of each inner replay window.
    """

    def __init__(self, profile, hbh_key: bytes, hbh_salt: bytes, *,
                 repair_payload_types: Iterable[int] = (), ekt: bool = False,
                 replay_window: int = DEFAULT_REPLAY_WINDOW) -> None:
        self.profile = _profile(profile)
        _check_lengths(self.profile, hbh_key, hbh_salt, "hop-by-hop")
        if replay_window < 1:
            raise ValueError("replay window must hold at least one packet")
        self.repair_payload_types = frozenset(repair_payload_types)
        self.ekt = ekt
        self.replay_window = replay_window
        self._outer = _outer_session(self.profile, hbh_key, hbh_salt,
                                     pylibsrtp.Policy.SSRC_ANY_INBOUND)
        self._senders: dict[int, _Sender] = {}
        self._pepper = os.urandom(16)

    def __repr__(self) -> str:
        return "<DoubleReceiver {} senders={} (keys hidden)>".format(
            self.profile.name, sorted(self._senders))

    @property
    def known_ssrcs(self) -> frozenset:
        return frozenset(self._senders)

    def add_sender_key(self, ssrc: int, inner_master_key: bytes, inner_master_salt: bytes,
                       roc: int = 0) -> None:
        """
        Learn the inner master key and salt of ``ssrc`` (for example from a
        FullEKTField, whose ROC goes in ``roc``: the inner ROC the first
        packet of ``ssrc`` is decrypted with).  Announcing the key the
        receiver already has for ``ssrc`` again changes nothing (EKT repeats
        it), so replay state survives; a different key starts afresh.
        """
        if not 0 <= ssrc <= 0xFFFFFFFF:
            raise ValueError("SSRC must be a 32-bit value")
        if not 0 <= roc <= 0xFFFFFFFF:
            raise ValueError("ROC must be a 32-bit value")
        _check_lengths(self.profile, inner_master_key, inner_master_salt, "inner")
        fingerprint = hashlib.sha256(self._pepper + bytes(inner_master_key) + b"\x00"
                                     + bytes(inner_master_salt)).digest()
        current = self._senders.get(ssrc)
        if current is not None and hmac.compare_digest(current.fingerprint, fingerprint):
            return
        self._senders[ssrc] = _Sender(
            _InnerCipher(bytes(inner_master_key), bytes(inner_master_salt)),
            _Stream(roc, self.replay_window), fingerprint)

    def set_hop_by_hop(self, hbh_key: bytes, hbh_salt: bytes) -> None:
        """
        Check the outer layer with new hop-by-hop keys from now on; the
        senders' inner keys and replay state stay as they are.
        """
        _check_lengths(self.profile, hbh_key, hbh_salt, "hop-by-hop")
        self._outer = _outer_session(self.profile, hbh_key, hbh_salt,
                                     pylibsrtp.Policy.SSRC_ANY_INBOUND)

    def remove_sender(self, ssrc: int) -> None:
        """Forget ``ssrc``'s inner key and state (no error if unknown)."""
        self._senders.pop(ssrc, None)

    def unprotect(self, packet: bytes) -> RtpPacketResult:
        """RFC 8723 section 5.3.  Raises a :class:`DoubleError` subclass."""
        packet = bytes(packet)
        ekt_field = None
        if self.ekt:
            try:
                packet, ekt_field = split_ekt_field(packet)
            except EktFieldError as e:
                raise MalformedPacketError("bad EKT field: {}".format(e)) from None
        header = _header(packet)
        ssrc = header.ssrc
        repair = header.payload_type in self.repair_payload_types
        sender = None
        if not repair:
            sender = self._senders.get(ssrc)
            if sender is None:
                # Before any cryptography: no state changes, retry possible.
                raise UnknownSenderError("{:#010x}".format(ssrc), ssrc=ssrc, ekt_field=ekt_field)

        # Step 1: outer layer.
        try:
            outer = self._outer.unprotect(packet)
        except pylibsrtp.Error as e:
            if _replay_text(str(e)):
                raise ReplayError("outer layer: {}".format(e), ssrc=ssrc, layer="outer") from None
            raise OuterAuthenticationError(str(e), ssrc=ssrc) from None
        except ValueError as e:
            raise OuterAuthenticationError(str(e), ssrc=ssrc) from None
        length = header.header_length
        if len(outer) < length:
            raise MalformedPacketError("outer plaintext shorter than its header", ssrc=ssrc)

        # Step 2: repair mode stops here.
        if repair:
            return RtpPacketResult(
                packet=outer, header=header, ssrc=ssrc,
                payload_type=header.payload_type, sequence=header.sequence, marker=header.marker,
                outer_payload_type=header.payload_type, outer_sequence=header.sequence,
                outer_marker=header.marker, repair=True, ekt_field=ekt_field)

        # Step 3: strip OHB and inner tag.
        try:
            inner, ohb = split_ohb(outer[length:])
        except OhbError as e:
            raise MalformedOhbError(str(e), ssrc=ssrc) from None
        if len(inner) < TAG_LENGTH:
            raise MalformedPacketError("no room for the inner tag", ssrc=ssrc)

        # Step 4: original header fields and synthetic header.
        payload_type, sequence, marker = ohb.restore(
            header.payload_type, header.sequence, header.marker)
        original_header = _with_fields(outer[:length], payload_type, sequence, marker)
        stream = sender.stream
        index = stream.estimate(sequence)
        if index is None or stream.seen(index):
            raise ReplayError("original SEQ {}".format(sequence), ssrc=ssrc, layer="inner")

        # Step 5: inner layer.
        try:
            plaintext = sender.cipher.open(
                ssrc, index, inner, _synthetic_header(original_header, header.csrc_count))
        except InvalidTag:
            raise InnerAuthenticationError(ssrc=ssrc) from None
        stream.commit(index)
        original = bytes(original_header) + plaintext
        return RtpPacketResult(
            packet=original, header=header._replace(
                payload_type=payload_type, sequence=sequence, marker=marker),
            ssrc=ssrc, payload_type=payload_type, sequence=sequence, marker=marker,
            outer_payload_type=header.payload_type, outer_sequence=header.sequence,
            outer_marker=header.marker, index=index, ohb=ohb, ekt_field=ekt_field)

    def unprotect_rtcp(self, packet: bytes) -> bytes:
        """SRTCP with the hop-by-hop key only (RFC 8723 section 6)."""
        try:
            return self._outer.unprotect_rtcp(bytes(packet))
        except pylibsrtp.Error as e:
            if _replay_text(str(e)):
                raise ReplayError("outer layer: {}".format(e), layer="outer") from None
            raise OuterAuthenticationError(str(e)) from None
        except ValueError as e:
            raise OuterAuthenticationError(str(e)) from None


# --------------------------------------------------------------------------
# Media Distributor


def relay_rewrite(packet: bytes, new_pt: Optional[int] = None, new_seq: Optional[int] = None,
                  new_marker: Optional[bool] = None, *, repair: bool = False) -> bytes:
    """
    RFC 8723 section 5.2 steps 2 and 3, for a Media Distributor holding only
    hop-by-hop keys: ``packet`` is an outer-decrypted RTP packet (header,
    inner ciphertext and tag, OHB); set PT, SEQ and/or M (None leaves a
    field alone) and update the OHB with :meth:`Ohb.reflect` (a changed
    field not yet in the OHB gets its received value, one set back to its
    original value leaves the OHB, one already recorded keeps its original).
    Outer-encrypt the result with the *receiver's* hop-by-hop key, never the
    sender's.

    ``repair=True`` is for repair packets, which have no OHB: the header is
    changed and nothing is recorded.
    """
    packet = bytes(packet)
    header = _header(packet)
    received = (header.payload_type, header.sequence, header.marker)
    if new_pt is not None and not (isinstance(new_pt, int) and 0 <= new_pt <= 127):
        raise ValueError("payload type must be 0 to 127")
    if new_seq is not None and not (isinstance(new_seq, int) and 0 <= new_seq <= 0xFFFF):
        raise ValueError("sequence number must be 0 to 65535")
    sent = (
        received[0] if new_pt is None else new_pt,
        received[1] if new_seq is None else new_seq,
        received[2] if new_marker is None else bool(new_marker),
    )
    length = header.header_length
    new_header = bytes(_with_fields(packet[:length], *sent))
    if repair:
        return new_header + packet[length:]
    try:
        inner, ohb = split_ohb(packet[length:])
    except OhbError as e:
        raise MalformedOhbError(str(e), ssrc=header.ssrc) from None
    if len(inner) < TAG_LENGTH:
        raise MalformedPacketError("no room for the inner tag", ssrc=header.ssrc)
    return new_header + inner + ohb.reflect(received, sent).encode()
