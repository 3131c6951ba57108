"""
Encrypted Key Transport (RFC 8870) as PERC endpoints use it.

Sans-I/O and Twisted-free: bytes and times (seconds on the caller's
monotonic clock) in, bytes and values out.

- :class:`EktCipher`: the EKT ciphers, AES key wrap with padding (RFC 5649)
  under a 128-bit (1) or 256-bit (2) EKTKey; :func:`ekt_encrypt` /
  :func:`ekt_decrypt`.
- :class:`EktKey`: the EKTKey structure (key, conference-wide SRTP master
  salt, SPI, TTL) the Key Distributor hands every endpoint in RFC 8870's
  ``ekt_key`` handshake message (:mod:`perc.dtls.post_handshake`).
- :class:`EktPlaintext`: what a FullEKTField's ciphertext wraps.
- :class:`EktSender`: an SSRC's FullEKTField / ShortEKTField, and when to
  send which.
- :class:`EktReceiver`: opens FullEKTFields under the current or previous
  EKTKey and applies the SSRC and epoch rules.
- The ``supported_ekt_ciphers`` extension (type 39) data:
  :func:`encode_client_ekt_ciphers` and friends.

The EKTField framing itself (split off the packet, FullEKTField layout)
lives in :mod:`perc.rtp`.  Every error here is an :class:`EktError` (a
ValueError) whose message never contains key or salt bytes; reprs hide
them too.
"""

from __future__ import annotations

import enum
import hmac
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)

from perc.rtp import (
    EKT_MSG_TYPE_SHORT,
    EktFieldError,
    SHORT_EKT_FIELD,
    full_ekt_field,
    parse_full_ekt_field,
)

__all__ = [
    "EXT_SUPPORTED_EKT_CIPHERS",
    "DEFAULT_FULL_INTERVAL",
    "DEFAULT_FULL_REPEAT",
    "MAX_MASTER_KEY_LENGTH",
    "MAX_TTL",
    "EktError",
    "EktFieldRejected",
    "EktCipher",
    "ekt_cipher",
    "ekt_encrypt",
    "ekt_decrypt",
    "wrapped_length",
    "EktKey",
    "EktPlaintext",
    "SenderKey",
    "EktSender",
    "EktReceiver",
    "encode_client_ekt_ciphers",
    "decode_client_ekt_ciphers",
    "encode_server_ekt_cipher",
    "decode_server_ekt_cipher",
]

#: TLS extension type of supported_ekt_ciphers.
EXT_SUPPORTED_EKT_CIPHERS = 39
#: Seconds between FullEKTFields once the first ones went out (RFC 8870
#: section 4.7 recommends 100 ms for audio).
DEFAULT_FULL_INTERVAL = 0.1
#: Consecutive packets that carry a FullEKTField for a new sender or a new
#: key (RFC 8870 section 4.7 recommends three).
DEFAULT_FULL_REPEAT = 3
#: ``SRTPMasterKey = 1*242BYTE`` (RFC 8870 section 4.1 ABNF).
MAX_MASTER_KEY_LENGTH = 242
#: ``uint24 ekt_ttl``.
MAX_TTL = 0xFFFFFF

_MAX_EPOCH = 0xFFFF
_MAX_SPI = 0xFFFF
_MAX_U32 = 0xFFFFFFFF
#: ``opaque ekt_key_value<1..256>`` and ``srtp_master_salt<1..256>``: a
#: ceiling above 255 means a 2-octet length prefix (RFC 8446 section 3.4).
_MAX_OPAQUE = 256


class EktError(ValueError):
    """Malformed EKT data, or an EKT rule refused it; ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class EktFieldRejected(EktError):
    """
    A FullEKTField that RFC 8870 section 4.3.2 refuses.  ``kind`` names why,
    for counters: ``malformed``, ``unknown-spi``, ``expired-spi`` (step 2:
    no usable parameter set), ``unwrap-failed`` (step 3), ``bad-plaintext``
    (step 4), ``ssrc-mismatch`` (step 5), ``wrong-key-length`` (step 6).
    ``discard_packet`` is True where EKT processing is aborted and the whole
    packet is to be discarded as an authentication failure (every kind but
    ``ssrc-mismatch``, after which the rest of the packet may be processed).
    """

    def __init__(self, reason: str, kind: str, discard_packet: bool = True) -> None:
        super().__init__(reason)
        self.kind = kind
        self.discard_packet = discard_packet


def _check_usable(ekt_key: "EktKey") -> None:
    # RFC 8870 section 5.2.2: the key must not be used after its TTL, so a
    # TTL of 0 is expired on arrival (Linphone sends 0 for "no limit").
    if ekt_key.ekt_ttl == 0:
        raise EktError("EKTKey SPI {} has TTL 0: expired on arrival".format(ekt_key.ekt_spi))


# --------------------------------------------------------------------------
# Ciphers (RFC 8870 section 4.4)


class EktCipher(enum.IntEnum):
    """
    EKTCipherType values as RFC 8870 section 5.2.1 encodes them in
    supported_ekt_ciphers: ``reserved(0), aeskw_128(1), aeskw_256(2)``.
    """

    AESKW_128 = 1
    AESKW_256 = 2

    @property
    def key_length(self) -> int:
        """L: the EKTKey length in octets."""
        return 16 if self is EktCipher.AESKW_128 else 32


def ekt_cipher(value) -> EktCipher:
    """The :class:`EktCipher` for ``value`` (an int or an EktCipher); EktError if unknown."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise EktError("EKT cipher must be an int, not {}".format(type(value).__name__))
    try:
        return EktCipher(value)
    except ValueError:
        raise EktError("unknown EKT cipher {}".format(value)) from None


def _check_key(cipher: EktCipher, key: bytes) -> None:
    if len(key) != cipher.key_length:
        raise EktError("{} needs a {}-octet EKTKey, not {} octets".format(
            cipher.name, cipher.key_length, len(key)))


def wrapped_length(plaintext_length: int) -> int:
    """
    N for a plaintext of M octets under AES key wrap with padding: M
    rounded up to a multiple of 8, plus the 8-octet integrity block.
    (RFC 8870 section 4.4.1 writes ``M + (M mod 8) + 8``, which is only
    right when M mod 8 is 0 or 4; RFC 5649 is the reference.)
    """
    return -(-plaintext_length // 8) * 8 + 8


def ekt_encrypt(cipher, key: bytes, plaintext: bytes) -> bytes:
    """E(K, P): AES key wrap with padding of ``plaintext`` under ``key``."""
    cipher = ekt_cipher(cipher)
    key = bytes(key)
    _check_key(cipher, key)
    plaintext = bytes(plaintext)
    if not plaintext:
        raise EktError("EKT plaintext must not be empty")
    return aes_key_wrap_with_padding(key, plaintext)


def ekt_decrypt(cipher, key: bytes, ciphertext) -> bytes:
    """D(K, C); EktError if ``ciphertext`` does not authenticate under ``key``."""
    cipher = ekt_cipher(cipher)
    key = bytes(key)
    _check_key(cipher, key)
    ciphertext = bytes(ciphertext)
    if len(ciphertext) < 16 or len(ciphertext) % 8:
        raise EktError("EKTCiphertext of {} octets cannot be AES key wrap output".format(
            len(ciphertext)))
    try:
        return aes_key_unwrap_with_padding(key, ciphertext)
    except (InvalidUnwrap, ValueError):
        raise EktError("EKTCiphertext failed authentication") from None


# --------------------------------------------------------------------------
# EKTKey (RFC 8870 section 5.2.2)


def _opaque(value: bytes) -> bytes:
    return len(value).to_bytes(2, "big") + value


def _bytes(value, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise EktError("{} must be bytes, not {}".format(what, type(value).__name__))
    return bytes(value)


def _uint(value, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise EktError("{} must be an integer from 0 to {}".format(what, high))
    return value


def _master_key(value) -> bytes:
    key = _bytes(value, "SRTP master key")
    if not 1 <= len(key) <= MAX_MASTER_KEY_LENGTH:
        raise EktError("SRTP master key must be 1 to {} octets, not {}".format(
            MAX_MASTER_KEY_LENGTH, len(key)))
    return key


@dataclass(frozen=True, repr=False)
class EktKey:
    """
    An EKTKey::

        struct {
          opaque ekt_key_value<1..256>;
          opaque srtp_master_salt<1..256>;
          uint16 ekt_spi;
          uint24 ekt_ttl;
        } EKTKey;

    ``ekt_key_value`` must be 16 or 32 octets (the ciphers this module
    knows; which one must match the negotiated cipher, see
    :meth:`check_cipher`).  ``srtp_master_salt`` is the conference-wide
    end-to-end salt (12 octets for the double AEAD profiles; a longer one
    is truncated by its user, RFC 8870 section 4.3.2 step 4).  ``ekt_ttl``
    is in seconds; 0 decodes, but means expired on arrival (RFC 8870), so
    :class:`EktSender` and :class:`EktReceiver` refuse such a key.  repr
    hides the key and the salt.
    """

    ekt_key_value: bytes
    srtp_master_salt: bytes
    ekt_spi: int
    ekt_ttl: int

    def __post_init__(self) -> None:
        key = _bytes(self.ekt_key_value, "ekt_key_value")
        salt = _bytes(self.srtp_master_salt, "srtp_master_salt")
        if len(key) not in (16, 32):
            raise EktError("ekt_key_value must be 16 or 32 octets, not {}".format(len(key)))
        if not 1 <= len(salt) <= _MAX_OPAQUE:
            raise EktError("srtp_master_salt must be 1 to 256 octets, not {}".format(len(salt)))
        _uint(self.ekt_spi, _MAX_SPI, "ekt_spi")
        _uint(self.ekt_ttl, MAX_TTL, "ekt_ttl")
        object.__setattr__(self, "ekt_key_value", key)
        object.__setattr__(self, "srtp_master_salt", salt)

    def __repr__(self) -> str:
        return "EktKey(spi={}, ttl={}, <{}-octet key>, <{}-octet salt>)".format(
            self.ekt_spi, self.ekt_ttl, len(self.ekt_key_value), len(self.srtp_master_salt))

    def same_key(self, other: "EktKey") -> bool:
        """
        True if ``other`` is this key under this SPI, whatever its TTL (a
        resent EKTKey carries the TTL it has left).
        """
        return (self.ekt_spi == other.ekt_spi
                and hmac.compare_digest(self.ekt_key_value, other.ekt_key_value)
                and hmac.compare_digest(self.srtp_master_salt, other.srtp_master_salt))

    def check_cipher(self, cipher) -> EktCipher:
        """The cipher as an :class:`EktCipher`; EktError if the key length does not fit it."""
        cipher = ekt_cipher(cipher)
        _check_key(cipher, self.ekt_key_value)
        return cipher

    def encode(self) -> bytes:
        return (_opaque(self.ekt_key_value) + _opaque(self.srtp_master_salt)
                + self.ekt_spi.to_bytes(2, "big") + self.ekt_ttl.to_bytes(3, "big"))

    @classmethod
    def decode(cls, data, cipher=None) -> "EktKey":
        """
        Strict inverse of :meth:`encode`: every length checked, nothing
        after ``ekt_ttl``.  With ``cipher``, the key length must match it.
        """
        data = _bytes(data, "EKTKey")
        offset = 0
        fields = []
        for name in ("ekt_key_value", "srtp_master_salt"):
            if len(data) - offset < 2:
                raise EktError("EKTKey: {} length truncated".format(name))
            length = int.from_bytes(data[offset:offset + 2], "big")
            offset += 2
            if not 1 <= length <= _MAX_OPAQUE:
                raise EktError("EKTKey: {} length {} outside 1..256".format(name, length))
            if len(data) - offset < length:
                raise EktError("EKTKey: {} truncated".format(name))
            fields.append(data[offset:offset + length])
            offset += length
        if len(data) - offset < 5:
            raise EktError("EKTKey: ekt_spi/ekt_ttl truncated")
        if len(data) - offset > 5:
            raise EktError("EKTKey: {} octets after ekt_ttl".format(len(data) - offset - 5))
        spi = int.from_bytes(data[offset:offset + 2], "big")
        ttl = int.from_bytes(data[offset + 2:offset + 5], "big")
        key = cls(fields[0], fields[1], spi, ttl)
        if cipher is not None:
            key.check_cipher(cipher)
        return key


# --------------------------------------------------------------------------
# EKTPlaintext (RFC 8870 section 4.1)


@dataclass(frozen=True, repr=False)
class EktPlaintext:
    """
    ``SRTPMasterKeyLength(1) · SRTPMasterKey · SSRC(4) · ROC(4)``; the
    master key is 1 to 242 octets.  repr hides the key.
    """

    master_key: bytes
    ssrc: int
    roc: int

    def __post_init__(self) -> None:
        key = _master_key(self.master_key)
        _uint(self.ssrc, _MAX_U32, "SSRC")
        _uint(self.roc, _MAX_U32, "ROC")
        object.__setattr__(self, "master_key", key)

    def __repr__(self) -> str:
        return "EktPlaintext(ssrc=0x{:08X}, roc={}, <{}-octet key>)".format(
            self.ssrc, self.roc, len(self.master_key))

    def encode(self) -> bytes:
        return (bytes([len(self.master_key)]) + self.master_key
                + self.ssrc.to_bytes(4, "big") + self.roc.to_bytes(4, "big"))

    @classmethod
    def decode(cls, data) -> "EktPlaintext":
        data = _bytes(data, "EKTPlaintext")
        if not data:
            raise EktError("EKTPlaintext is empty")
        length = data[0]
        if length == 0:
            raise EktError("EKTPlaintext: SRTPMasterKeyLength is 0")
        if len(data) != 1 + length + 8:
            raise EktError("EKTPlaintext of {} octets does not match SRTPMasterKeyLength {}".format(
                len(data), length))
        return cls(data[1:1 + length],
                   int.from_bytes(data[1 + length:5 + length], "big"),
                   int.from_bytes(data[5 + length:9 + length], "big"))


@dataclass(frozen=True, repr=False)
class SenderKey:
    """
    What a FullEKTField told a receiver about one sender: its SSRC, SRTP
    master key and ROC, under which SPI and epoch, and the SRTP master salt
    of that SPI's EKTKey (whole; truncate it to the profile's salt length).
    repr hides the key and the salt.
    """

    ssrc: int
    master_key: bytes
    roc: int
    spi: int
    epoch: int
    master_salt: bytes

    def __repr__(self) -> str:
        return "SenderKey(ssrc=0x{:08X}, roc={}, spi={}, epoch={}, <{}-octet key>)".format(
            self.ssrc, self.roc, self.spi, self.epoch, len(self.master_key))


# --------------------------------------------------------------------------
# Sender


class EktSender:
    """
    The EKT side of one outgoing SRTP stream (one SSRC).

    Call :meth:`field` once per SRTP packet and append what it returns: a
    FullEKTField on the first ``repeat`` packets, again on ``repeat``
    packets after every new master key or EKTKey, and at least every
    ``interval`` seconds; a ShortEKTField otherwise.  ``roc_source()``
    returns the stream's current rollover counter (read each time a
    FullEKTField is built; the ciphertext is cached per ROC, RFC 8870
    section 4.3.1).

    Epoch (RFC 8870 section 4.1): 0 for the first master key under an
    EKTKey, +1 per new master key (:meth:`change_master_key`), back to 0
    under a new EKTKey (:meth:`rekey`, which also needs a new master key,
    section 4.5).

    ``received_at`` (when the EKTKey arrived, caller's clock) makes the
    EKTKey's TTL count: after ``received_at + ekt_ttl`` :meth:`field`
    raises EktError, as the key must no longer be used.  An EKTKey with TTL
    0 is refused (EktError): it is expired on arrival.

    Which master key the SRTP layer protects with, and when it switches
    after announcing a new one (RFC 8870 section 4.3.1 suggests 250 ms),
    is the caller's business.
    """

    _cache: Optional[tuple[int, int, bytes]]  # (roc, epoch, FullEKTField)

    def __init__(self, ekt_key: EktKey, cipher, ssrc: int, srtp_master_key: bytes,
                 roc_source: Callable[[], int], *,
                 received_at: Optional[float] = None,
                 interval: float = DEFAULT_FULL_INTERVAL,
                 repeat: int = DEFAULT_FULL_REPEAT) -> None:
        if not isinstance(ekt_key, EktKey):
            raise TypeError("ekt_key must be an EktKey")
        self._cipher = ekt_key.check_cipher(cipher)
        _check_usable(ekt_key)
        self._ssrc = _uint(ssrc, _MAX_U32, "SSRC")
        if not callable(roc_source):
            raise TypeError("roc_source must be callable")
        if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
            raise ValueError("repeat must be an integer >= 1")
        if not interval > 0:
            raise ValueError("interval must be positive")
        self._roc_source = roc_source
        self._interval = float(interval)
        self._repeat = repeat
        self._set_key(ekt_key, received_at)
        self._set_master_key(srtp_master_key)
        self._epoch = 0
        self._last_full: Optional[float] = None

    def __repr__(self) -> str:
        return "<EktSender ssrc=0x{:08X} spi={} epoch={}>".format(
            self._ssrc, self._ekt_key.ekt_spi, self._epoch)

    # -- state ---------------------------------------------------------------

    @property
    def cipher(self) -> EktCipher:
        return self._cipher

    @property
    def ssrc(self) -> int:
        return self._ssrc

    @property
    def spi(self) -> int:
        return self._ekt_key.ekt_spi

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def ekt_key(self) -> EktKey:
        return self._ekt_key

    @property
    def short_field(self) -> bytes:
        """The ShortEKTField, ``0x00``."""
        return SHORT_EKT_FIELD

    @property
    def expires_at(self) -> Optional[float]:
        """When the EKTKey's TTL runs out (caller's clock); None without ``received_at``."""
        return self._expires_at

    def expired(self, now: float) -> bool:
        """True once the EKTKey's TTL has run out (never without ``received_at``)."""
        return self._expires_at is not None and now >= self._expires_at

    # -- changes ---------------------------------------------------------------

    def change_master_key(self, srtp_master_key: bytes, now: Optional[float] = None) -> None:
        """
        A new master key under the same EKTKey: epoch + 1 and FullEKTFields
        on the next ``repeat`` packets.  EktError when the epoch would pass
        65535 (a new EKTKey is needed) or the key is the current one.
        """
        if self._epoch >= _MAX_EPOCH:
            raise EktError("epoch exhausted under SPI {}: a new EKTKey is needed".format(
                self.spi))
        key = _master_key(srtp_master_key)
        if hmac.compare_digest(key, self._master_key):
            raise EktError("the new SRTP master key is the current one")
        self._set_master_key(key)
        self._epoch += 1

    def rekey(self, ekt_key: EktKey, srtp_master_key: bytes, now: Optional[float] = None) -> None:
        """
        A new EKTKey (new SPI) and, as RFC 8870 section 4.5 requires, a new
        master key: epoch 0 and FullEKTFields on the next ``repeat``
        packets.  ``now`` (caller's clock) starts the new key's TTL.
        """
        if not isinstance(ekt_key, EktKey):
            raise TypeError("ekt_key must be an EktKey")
        ekt_key.check_cipher(self._cipher)
        _check_usable(ekt_key)
        if ekt_key.ekt_spi == self._ekt_key.ekt_spi:
            raise EktError("a new EKTKey needs a new SPI (SPI {} is in use)".format(
                ekt_key.ekt_spi))
        key = _master_key(srtp_master_key)
        if hmac.compare_digest(key, self._master_key):
            raise EktError("a new EKTKey needs a new SRTP master key too")
        self._set_key(ekt_key, now)
        self._set_master_key(key)
        self._epoch = 0

    # -- per packet ------------------------------------------------------------

    def needs_full_field(self, now: float) -> bool:
        """Whether the packet sent at ``now`` should carry a FullEKTField (changes nothing)."""
        return (self._pending > 0 or self._last_full is None
                or now - self._last_full >= self._interval)

    def field(self, now: float) -> bytes:
        """
        The EKT field for the packet sent at ``now`` (Full or Short, as
        :meth:`needs_full_field` says), recording that it was sent.
        EktError once the EKTKey's TTL has run out.
        """
        if self.expired(now):
            raise EktError("EKTKey SPI {} expired: its TTL of {} s ran out".format(
                self.spi, self._ekt_key.ekt_ttl))
        if not self.needs_full_field(now):
            return SHORT_EKT_FIELD
        result = self.full_field()
        if self._pending > 0:
            self._pending -= 1
        self._last_full = now
        return result

    def full_field(self) -> bytes:
        """
        The FullEKTField for the current master key and ROC, without
        touching the schedule or the TTL (use :meth:`field` per packet).
        """
        roc = _uint(self._roc_source(), _MAX_U32, "ROC")
        cached = self._cache
        if cached is not None and cached[0] == roc and cached[1] == self._epoch:
            return cached[2]
        plaintext = EktPlaintext(self._master_key, self._ssrc, roc).encode()
        ciphertext = ekt_encrypt(self._cipher, self._ekt_key.ekt_key_value, plaintext)
        result = full_ekt_field(ciphertext, self._ekt_key.ekt_spi, self._epoch)
        self._cache = (roc, self._epoch, result)
        return result

    # -- internals ---------------------------------------------------------------

    def _set_key(self, ekt_key: EktKey, received_at: Optional[float]) -> None:
        self._ekt_key = ekt_key
        self._expires_at = None if received_at is None else received_at + ekt_key.ekt_ttl
        self._cache = None
        self._pending = self._repeat

    def _set_master_key(self, srtp_master_key) -> None:
        self._master_key = _master_key(srtp_master_key)
        self._cache = None
        self._pending = self._repeat


# --------------------------------------------------------------------------
# Receiver


class _Parameters:
    """One EKT parameter set the receiver holds."""

    __slots__ = ("key", "generation", "expires_at")

    def __init__(self, key: EktKey, generation: int, expires_at: Optional[float]) -> None:
        self.key = key
        self.generation = generation
        self.expires_at = expires_at


class _Source:
    """What the receiver last accepted for one SSRC."""

    __slots__ = ("generation", "epoch", "ciphertext", "sender_key")

    def __init__(self, generation: int, epoch: int, ciphertext: bytes,
                 sender_key: SenderKey) -> None:
        self.generation = generation
        self.epoch = epoch
        self.ciphertext = ciphertext
        self.sender_key = sender_key


class EktReceiver:
    """
    Opens the FullEKTFields of every sender in a conference.

    It holds the current EKTKey and the previous one (so packets sent just
    before a rekey still open); :meth:`add_key` makes a new one current and
    drops the one before the previous.  A key past its TTL (given ``now``)
    is dropped: by :meth:`add_key`, and by :meth:`process` when a field
    names it.  ``master_key_length``, if given, is
    the only master key length accepted (RFC 8870 section 4.3.2 step 6;
    for the double profiles it is the end-to-end half: 16 for 0x0009, 32
    for 0x000A).

    :meth:`process` returns a :class:`SenderKey` for a FullEKTField that
    carries the sender's current key (again on repeats of it, with the
    ROC it carries), None for a ShortEKTField or a field the epoch rules
    ignore, and raises EktError for one that must be discarded.
    """

    def __init__(self, cipher, *, master_key_length: Optional[int] = None) -> None:
        self._cipher = ekt_cipher(cipher)
        if master_key_length is not None:
            _uint(master_key_length, MAX_MASTER_KEY_LENGTH, "master_key_length")
            if master_key_length < 1:
                raise EktError("master_key_length must be at least 1")
        self._master_key_length = master_key_length
        self._keys: dict = {}  # SPI -> _Parameters (at most two)
        self._generation = 0
        self._sources: dict = {}  # SSRC -> _Source
        #: FullEKTFields ignored by the epoch rules so far (diagnostics).
        self.ignored = 0

    def __repr__(self) -> str:
        return "<EktReceiver {} spis={} sources={}>".format(
            self._cipher.name, list(self.spis), len(self._sources))

    @property
    def cipher(self) -> EktCipher:
        return self._cipher

    @property
    def spis(self) -> tuple:
        """SPIs of the EKTKeys held, current first."""
        return tuple(sorted(self._keys, key=lambda spi: -self._keys[spi].generation))

    def add_key(self, ekt_key: EktKey, now: Optional[float] = None) -> None:
        """
        Make ``ekt_key`` current; the previous current one stays usable
        until its TTL runs out.  ``now`` (caller's clock) starts its TTL and
        drops held keys already past theirs.  Adding the current key again
        (whatever TTL it carries) changes nothing; reusing a held SPI for
        another key is an EktError (each parameter set has its own SPI, RFC
        8870 section 4.2), and so is a key with TTL 0 (expired on arrival).
        """
        if not isinstance(ekt_key, EktKey):
            raise TypeError("ekt_key must be an EktKey")
        ekt_key.check_cipher(self._cipher)
        _check_usable(ekt_key)
        if now is not None:
            for expired in [s for s, p in self._keys.items()
                            if p.expires_at is not None and now >= p.expires_at]:
                del self._keys[expired]
        spi = ekt_key.ekt_spi
        held = self._keys.get(spi)
        if held is not None:
            if not held.key.same_key(ekt_key):
                raise EktError("SPI {} already names another EKTKey".format(spi))
            if held.generation == self._generation:
                return
            raise EktError("SPI {} is the previous EKTKey; it cannot become current again".format(
                spi))
        self._generation += 1
        expires_at = None if now is None else now + ekt_key.ekt_ttl
        self._keys[spi] = _Parameters(ekt_key, self._generation, expires_at)
        for old in [s for s, p in self._keys.items() if p.generation < self._generation - 1]:
            del self._keys[old]

    def forget(self, ssrc: int) -> None:
        """Drop what is known about ``ssrc`` (the sender left)."""
        self._sources.pop(ssrc, None)

    def process(self, ekt_field, packet_ssrc: int, now: Optional[float] = None
                ) -> Optional[SenderKey]:
        """
        Process the EKT field split off an SRTP packet whose header has
        ``packet_ssrc`` (RFC 8870 section 4.3.2):

        - ShortEKTField: None.
        - Every refusal is an :class:`EktFieldRejected` whose
          ``discard_packet`` says what to do with the packet.  A malformed
          field, an SPI not held, or one whose key's TTL ran out (with
          ``now``), ciphertext that does not authenticate, a malformed
          plaintext, or a master key of the wrong length: EKT processing is
          aborted and the packet discarded (steps 2, 3, 4, 6).  An SSRC in
          the plaintext other than ``packet_ssrc``: the field is discarded,
          the rest of the packet may be processed (step 5).
        - Older than what was accepted for this SSRC -- a lower epoch
          under the same SPI, any epoch under an older SPI, or the same
          epoch with another master key (an epoch may carry one key only):
          ignored, None.  These checks use the cleartext SPI and epoch, so
          a forged field can only make itself ignored.
        - Otherwise the :class:`SenderKey`.  A field identical to the one
          last accepted for this SSRC returns that SenderKey without
          decrypting again.
        """
        _uint(packet_ssrc, _MAX_U32, "packet SSRC")
        if isinstance(ekt_field, (bytearray, memoryview)):
            ekt_field = bytes(ekt_field)
        elif not isinstance(ekt_field, bytes):
            raise EktError("EKT field must be bytes")
        if len(ekt_field) == 1 and ekt_field[0] == EKT_MSG_TYPE_SHORT:
            return None
        try:
            full = parse_full_ekt_field(ekt_field)
        except EktFieldError as e:
            raise EktFieldRejected("malformed EKT field: {}".format(e), "malformed") from None
        parameters = self._keys.get(full.spi)
        if parameters is None:
            raise EktFieldRejected("unknown SPI {}".format(full.spi), "unknown-spi")
        if now is not None and parameters.expires_at is not None \
                and now >= parameters.expires_at:
            del self._keys[full.spi]  # never usable again (RFC 8870 section 5.2.2)
            raise EktFieldRejected("EKTKey SPI {} expired: its TTL of {} s ran out".format(
                full.spi, parameters.key.ekt_ttl), "expired-spi")
        source = self._sources.get(packet_ssrc)
        if source is not None:
            if source.generation > parameters.generation or (
                    source.generation == parameters.generation
                    and full.epoch < source.epoch):
                self.ignored += 1
                return None
            if (source.generation == parameters.generation and full.epoch == source.epoch
                    and source.ciphertext == full.ciphertext):
                return source.sender_key
        try:
            unwrapped = ekt_decrypt(self._cipher, parameters.key.ekt_key_value, full.ciphertext)
        except EktError as e:
            raise EktFieldRejected(e.reason, "unwrap-failed") from None
        try:
            plaintext = EktPlaintext.decode(unwrapped)
        except EktError as e:
            raise EktFieldRejected(e.reason, "bad-plaintext") from None
        if plaintext.ssrc != packet_ssrc:
            raise EktFieldRejected(
                "SSRC 0x{:08X} in the EKTPlaintext is not the packet's 0x{:08X}".format(
                    plaintext.ssrc, packet_ssrc), "ssrc-mismatch", discard_packet=False)
        if self._master_key_length is not None \
                and len(plaintext.master_key) != self._master_key_length:
            raise EktFieldRejected("SRTP master key of {} octets, {} expected".format(
                len(plaintext.master_key), self._master_key_length), "wrong-key-length")
        if (source is not None and source.generation == parameters.generation
                and full.epoch == source.epoch
                and not hmac.compare_digest(plaintext.master_key,
                                            source.sender_key.master_key)):
            # Same epoch, another key: RFC 8870 section 4.1 says reject.
            self.ignored += 1
            return None
        sender_key = SenderKey(
            ssrc=packet_ssrc,
            master_key=plaintext.master_key,
            roc=plaintext.roc,
            spi=full.spi,
            epoch=full.epoch,
            master_salt=parameters.key.srtp_master_salt,
        )
        self._sources[packet_ssrc] = _Source(
            parameters.generation, full.epoch, full.ciphertext, sender_key)
        return sender_key


# --------------------------------------------------------------------------
# supported_ekt_ciphers (extension 39, RFC 8870 section 5.2.1)
#
#   struct {
#       select (Handshake.msg_type) {
#           case client_hello: EKTCipherType supported_ciphers<1..255>;
#           case server_hello: EKTCipherType selected_cipher;
#       };
#   } EKTCipher;
#
# EKTCipherType is a one-octet enum, so the ClientHello data is a length
# octet followed by one octet per cipher, and the ServerHello data is the
# one octet.  Encoders refuse the reserved values 0 and 255; decoders
# return whatever octets are there (a peer may offer ciphers we do not
# know: choose among those we do).


def _cipher_value(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 254:
        raise EktError("EKT cipher value must be 1 to 254, not {!r}".format(value))
    return int(value)


def encode_client_ekt_ciphers(ciphers: Iterable[int]) -> bytes:
    """ClientHello extension_data: ``supported_ciphers<1..255>``, most preferred first."""
    values = [_cipher_value(c) for c in ciphers]
    if not 1 <= len(values) <= 255:
        raise EktError("supported_ciphers must list 1 to 255 ciphers, not {}".format(
            len(values)))
    return bytes([len(values)] + values)


def decode_client_ekt_ciphers(data) -> tuple:
    """The ciphers a ClientHello offers, in order, as ints; EktError if malformed."""
    data = _bytes(data, "supported_ekt_ciphers")
    if len(data) < 2:
        raise EktError("supported_ekt_ciphers of {} octets lists no cipher".format(len(data)))
    if data[0] != len(data) - 1:
        raise EktError("supported_ekt_ciphers length {} does not match its {} octets".format(
            data[0], len(data) - 1))
    return tuple(data[1:])


def encode_server_ekt_cipher(cipher: int) -> bytes:
    """ServerHello extension_data: the one ``selected_cipher`` octet."""
    return bytes([_cipher_value(cipher)])


def decode_server_ekt_cipher(data) -> int:
    """The cipher a ServerHello selected; EktError unless exactly one octet."""
    data = _bytes(data, "supported_ekt_ciphers")
    if len(data) != 1:
        raise EktError("ServerHello supported_ekt_ciphers holds {} octets, not 1".format(
            len(data)))
    return data[0]
