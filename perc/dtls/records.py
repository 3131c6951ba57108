"""
DTLS 1.2 record protection for an established association, without OpenSSL.

Why this exists: once its handshake is over, a Key Distributor association
only exchanges a handful of small records (the EKTKey, an occasional request
for it, close_notify), yet an OpenSSL DTLS connection keeps about 80 KiB for
its whole life (record buffers and the state of both epochs), which the
bindings we have give no way to shrink.  The server role therefore hands an
established association over to this module and frees the OpenSSL
connection (see :mod:`perc.dtls.association`).  Only the AEAD cipher suites are handled
(AES-GCM, RFC 5288/5289, and ChaCha20-Poly1305, RFC 7905), which is what
DTLS-SRTP endpoints negotiate (RFC 8827 requires
TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256); for any other suite the caller
keeps OpenSSL.

Key derivation is RFC 5246 section 6.3 (the key block from the master
secret with the suite's PRF hash); records are RFC 6347 section 4.1 with
the nonce and additional data of RFC 5288 section 3 / RFC 7905 section 2,
and replay detection is the sliding window of RFC 6347 section 4.1.2.6.

Write-sequence reservation: a record is sealed only below the protection's
``write_limit``; the sequence numbers ``[next, write_limit)`` are the block
reserved for this holder (see :meth:`RecordProtection.reserve`).  A
protection built without a limit may use the whole 2^48 space.  Whoever
takes an association over from exported state starts at the exporter's
*limit*, never at its next sequence number, so a (key, nonce) pair is never
used twice even if the exporter sealed up to its limit after its last
export (see :mod:`perc.dtls.state`).

Sans-I/O and free of key material in any repr.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Callable, Optional

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from perc.dtls.constants import (
    CONTENT_ALERT,
    CONTENT_APPLICATION_DATA,
    CONTENT_CHANGE_CIPHER_SPEC,
    CONTENT_HANDSHAKE,
)
from perc.dtls.mac import KeyedHmac

__all__ = [
    "CONTENT_ALERT",
    "CONTENT_APPLICATION_DATA",
    "CONTENT_CHANGE_CIPHER_SPEC",
    "CONTENT_HANDSHAKE",
    "MAX_PLAINTEXT",
    "Prf",
    "RecordProtection",
    "ReservationNeeded",
    "SEQUENCE_LIMIT",
    "Suite",
    "record_epoch_and_sequence",
    "suite_for",
    "tls12_prf",
]


_DTLS_1_2 = b"\xfe\xfd"
_HEADER = struct.Struct("!B2sH6sH")  # type, version, epoch, sequence (48 bits), length
_HEADER_LENGTH = _HEADER.size
_SEQUENCE_LIMIT = SEQUENCE_LIMIT = 1 << 48
_TAG_LENGTH = 16
_REPLAY_WINDOW = 64
_WINDOW_MASK = (1 << _REPLAY_WINDOW) - 1
#: RFC 5246 section 6.2.1/6.2.3: a record's plaintext is at most 2^14
#: octets and its protected fragment at most 2^14 + 2048, whatever the MTU.
MAX_PLAINTEXT = 1 << 14
_MAX_FRAGMENT = MAX_PLAINTEXT + 2048


@dataclass(frozen=True)
class Suite:
    """What record protection needs to know about one AEAD cipher suite."""

    name: str
    aead: Callable  # AESGCM or ChaCha20Poly1305
    key_length: int
    iv_length: int  # the key block's "fixed IV": GCM salt (4) or ChaCha IV (12)
    explicit_nonce_length: int  # carried in each record: GCM 8, ChaCha 0
    prf_hash: Callable

    @property
    def overhead(self) -> int:
        """Octets a record adds to its plaintext."""
        return _HEADER_LENGTH + self.explicit_nonce_length + _TAG_LENGTH


def _suites() -> dict:
    table = {}
    for key_exchange in ("ECDHE-ECDSA", "ECDHE-RSA", "DHE-RSA"):
        table[key_exchange + "-AES128-GCM-SHA256"] = (AESGCM, 16, 4, 8, hashlib.sha256)
        table[key_exchange + "-AES256-GCM-SHA384"] = (AESGCM, 32, 4, 8, hashlib.sha384)
        table[key_exchange + "-CHACHA20-POLY1305"] = (ChaCha20Poly1305, 32, 12, 0,
                                                      hashlib.sha256)
    return {name: Suite(name, *values) for name, values in table.items()}


#: OpenSSL cipher name -> Suite, for the suites this module can protect.
_SUITES = _suites()


def suite_for(openssl_name: Optional[str]) -> Optional[Suite]:
    """The Suite for an OpenSSL cipher name, or None if it is not handled here."""
    return _SUITES.get(openssl_name) if openssl_name else None


class Prf:
    """
    The TLS 1.2 PRF (RFC 5246 section 5) under one secret: keyed once (see
    perc.dtls.mac) for all it derives, as the exporter and the key block
    of one handshake are.  Secret: no repr shows the key.
    """

    __slots__ = ("_mac",)

    def __init__(self, hash_function: Callable, secret: bytes) -> None:
        self._mac = KeyedHmac(hash_function, secret).digest

    def __call__(self, label: bytes, seed: bytes, length: int) -> bytes:
        """P_hash(secret, label + seed), ``length`` octets of it."""
        mac = self._mac
        seed = label + seed
        output = b""
        a = seed
        while len(output) < length:
            a = mac(a)
            output += mac(a + seed)
        return output[:length]


def tls12_prf(hash_function: Callable, secret: bytes, label: bytes, seed: bytes,
              length: int) -> bytes:
    """The TLS 1.2 PRF (RFC 5246 section 5): P_hash(secret, label + seed)."""
    return Prf(hash_function, secret)(label, seed, length)


def record_epoch_and_sequence(record: bytes) -> Optional[tuple]:
    """(epoch, sequence number) of a DTLS record's header, or None if too short."""
    if len(record) < _HEADER_LENGTH:
        return None
    return (int.from_bytes(record[3:5], "big"), int.from_bytes(record[5:11], "big"))


class ReservationNeeded(Exception):
    """:meth:`RecordProtection.seal` reached the reserved limit: reserve more first."""


class _ReplayWindow:
    """RFC 6347 section 4.1.2.6: the highest sequence number seen and a bitmap below it."""

    __slots__ = ("highest", "bitmap")

    def __init__(self) -> None:
        self.highest = -1
        self.bitmap = 0  # bit i set: highest - i was received

    def seen(self, sequence: int) -> bool:
        if sequence > self.highest:
            return False
        offset = self.highest - sequence
        return offset >= _REPLAY_WINDOW or bool(self.bitmap >> offset & 1)

    def mark(self, sequence: int) -> None:
        if sequence > self.highest:
            shift = sequence - self.highest
            # The peer chooses the jump (up to 2^48): shifting by it would
            # build an integer that large before the mask cuts it down.
            if shift >= _REPLAY_WINDOW:
                self.bitmap = 1
            else:
                self.bitmap = ((self.bitmap << shift) | 1) & _WINDOW_MASK
            self.highest = sequence
        elif self.highest - sequence < _REPLAY_WINDOW:
            self.bitmap |= 1 << (self.highest - sequence)

    def mark_through(self, sequence: int) -> None:
        """Mark every sequence number up to ``sequence`` as received."""
        if sequence > self.highest:
            self.highest = sequence
        self.bitmap = _WINDOW_MASK


class RecordProtection:
    """
    One direction pair of an epoch's record protection: :meth:`seal` makes
    records from plaintext, :meth:`open` checks and decrypts the peer's.

    Build it with :meth:`from_master_secret`; ``next_write_sequence`` is the
    sequence number of the next record this side sends in ``epoch`` (the
    records OpenSSL already sent there, such as Finished, used the ones
    before it).
    """

    __slots__ = ("suite", "epoch", "_read", "_read_iv", "_write", "_write_iv",
                 "_write_sequence", "_write_limit", "_window", "_keys")

    def __init__(self, suite: Suite, *, read_key: bytes, read_iv: bytes, write_key: bytes,
                 write_iv: bytes, epoch: int, next_write_sequence: int,
                 write_limit: Optional[int] = None) -> None:
        """``write_limit`` None: no reservation (the whole sequence space)."""
        if not 0 <= next_write_sequence < _SEQUENCE_LIMIT:
            raise ValueError("sequence number out of range")
        if write_limit is not None and not next_write_sequence <= write_limit <= \
                _SEQUENCE_LIMIT:
            raise ValueError("write limit out of range")
        self.suite = suite
        self.epoch = epoch
        self._read = suite.aead(read_key)
        self._read_iv = read_iv
        self._write = suite.aead(write_key)
        self._write_iv = write_iv
        self._keys = (bytes(read_key), bytes(write_key))  # for export_secrets only
        self._write_sequence = next_write_sequence
        self._write_limit = _SEQUENCE_LIMIT if write_limit is None else write_limit
        self._window = _ReplayWindow()

    @property
    def next_write_sequence(self) -> int:
        """The sequence number the next sealed record takes."""
        return self._write_sequence

    @property
    def write_limit(self) -> int:
        """Records are sealed only below this sequence number (the reserved block's end)."""
        return self._write_limit

    @property
    def needs_reservation(self) -> bool:
        """True when the reserved block is used up: :meth:`seal` refuses until :meth:`reserve`."""
        return self._write_sequence >= self._write_limit

    def reserve(self, limit: int) -> None:
        """
        Sequence numbers up to (not including) ``limit`` may now be used; a
        limit never moves back (ValueError), nor past 2^48.
        """
        if not self._write_limit <= limit <= _SEQUENCE_LIMIT:
            raise ValueError("a reservation only moves the limit forward")
        self._write_limit = limit

    def export_secrets(self) -> dict:
        """
        Everything needed to rebuild this protection elsewhere (keys
        included: the caller seals it), with the *limit* as where the
        rebuilt one must continue.  See :meth:`from_secrets`.
        """
        return {"suite": self.suite.name, "epoch": self.epoch,
                "read_key": self._keys[0], "read_iv": bytes(self._read_iv),
                "write_key": self._keys[1], "write_iv": bytes(self._write_iv),
                "write_limit": self._write_limit, "replay_highest": self._window.highest,
                "replay_bitmap": self._window.bitmap}

    @classmethod
    def from_secrets(cls, secrets: dict) -> "RecordProtection":
        """
        The protection :meth:`export_secrets` described, continuing at its
        write limit with nothing reserved yet (the first seal needs a
        :meth:`reserve`), and with its replay window.  ValueError if the
        description is unusable.
        """
        suite = suite_for(secrets["suite"])
        if suite is None:
            raise ValueError("cipher suite not handled by the own record layer")
        keys = [bytes(secrets[name]) for name in ("read_key", "read_iv", "write_key",
                                                  "write_iv")]
        if len(keys[0]) != suite.key_length or len(keys[2]) != suite.key_length or \
                len(keys[1]) != suite.iv_length or len(keys[3]) != suite.iv_length:
            raise ValueError("key or IV length does not fit the cipher suite")
        limit = int(secrets["write_limit"])
        epoch = int(secrets["epoch"])
        highest, bitmap = int(secrets["replay_highest"]), int(secrets["replay_bitmap"])
        if not 0 < epoch <= 0xFFFF or not 0 <= limit < _SEQUENCE_LIMIT or \
                not -1 <= highest < _SEQUENCE_LIMIT or not 0 <= bitmap <= _WINDOW_MASK:
            raise ValueError("epoch, write limit or replay window out of range")
        protection = cls(suite, read_key=keys[0], read_iv=keys[1], write_key=keys[2],
                         write_iv=keys[3], epoch=epoch,
                         next_write_sequence=limit, write_limit=limit)
        protection._window.highest = highest
        protection._window.bitmap = bitmap
        return protection

    @classmethod
    def from_master_secret(cls, suite: Suite, *, server: bool, master_secret: bytes,
                           client_random: bytes, server_random: bytes, epoch: int,
                           next_write_sequence: int,
                           write_limit: Optional[int] = None,
                           prf: Optional[Prf] = None) -> "RecordProtection":
        """
        RFC 5246 section 6.3: the key block, split for the server or the
        client side.  ``prf``, if given, is the suite's PRF already keyed
        with ``master_secret``.
        """
        k, i = suite.key_length, suite.iv_length
        if prf is None:
            prf = Prf(suite.prf_hash, master_secret)
        block = prf(b"key expansion", server_random + client_random, 2 * (k + i))
        # AEAD suites have no MAC keys: client key, server key, client IV, server IV.
        client_key, server_key = block[:k], block[k:2 * k]
        client_iv, server_iv = block[2 * k:2 * k + i], block[2 * k + i:]
        if server:
            return cls(suite, read_key=client_key, read_iv=client_iv, write_key=server_key,
                       write_iv=server_iv, epoch=epoch, next_write_sequence=next_write_sequence,
                       write_limit=write_limit)
        return cls(suite, read_key=server_key, read_iv=server_iv, write_key=client_key,
                   write_iv=client_iv, epoch=epoch, next_write_sequence=next_write_sequence,
                   write_limit=write_limit)

    def __repr__(self) -> str:
        return "<RecordProtection {} epoch {}>".format(self.suite.name, self.epoch)

    def max_plaintext(self, mtu: int) -> int:
        """The largest plaintext whose record fits ``mtu`` octets (2^14 at most)."""
        return max(0, min(MAX_PLAINTEXT, mtu - self.suite.overhead))

    def prime(self, peer_records, authenticated: bool = False) -> None:
        """
        Enter the peer's records that arrived before this layer took over
        (OpenSSL read them, or dropped them) into the replay window:
        every sequence number up to the highest authentic one counts as
        received, so none of them can be replayed here.  Forged records
        do not count, so they cannot push the window ahead.
        ``authenticated``: the caller knows the records of this epoch to be
        authentic (OpenSSL accepted them), so they are not opened again.
        """
        highest = -1
        for record in peer_records:
            header = record_epoch_and_sequence(record)
            if header is None:
                continue
            if (authenticated and header[0] == self.epoch) or self.open(record) is not None:
                highest = max(highest, header[1])
        if highest >= 0:
            self._window.mark_through(highest)

    def _nonce(self, iv: bytes, epoch_and_sequence: bytes) -> bytes:
        if self.suite.explicit_nonce_length:
            return iv + epoch_and_sequence  # GCM: salt + the explicit part
        padded = bytes(4) + epoch_and_sequence  # ChaCha20: IV xor the sequence number
        return bytes(a ^ b for a, b in zip(iv, padded))

    def seal(self, content_type: int, plaintext: bytes) -> bytes:
        """
        One record carrying ``plaintext``; raises ValueError above
        MAX_PLAINTEXT octets, OverflowError when the sequence runs out and
        :class:`ReservationNeeded` at the reserved limit (nothing sealed).
        """
        if len(plaintext) > MAX_PLAINTEXT:
            raise ValueError("a record carries at most {} octets, not {}".format(
                MAX_PLAINTEXT, len(plaintext)))
        sequence = self._write_sequence
        if sequence >= _SEQUENCE_LIMIT:
            raise OverflowError("record sequence numbers exhausted in this epoch")
        if sequence >= self._write_limit:
            raise ReservationNeeded(sequence)
        self._write_sequence = sequence + 1
        epoch_and_sequence = self.epoch.to_bytes(2, "big") + sequence.to_bytes(6, "big")
        additional = epoch_and_sequence + bytes((content_type,)) + _DTLS_1_2 + \
            len(plaintext).to_bytes(2, "big")
        sealed = self._write.encrypt(self._nonce(self._write_iv, epoch_and_sequence),
                                     bytes(plaintext), additional)
        explicit = epoch_and_sequence if self.suite.explicit_nonce_length else b""
        body = explicit + sealed
        return _HEADER.pack(content_type, _DTLS_1_2, self.epoch, sequence.to_bytes(6, "big"),
                            len(body)) + body

    def open(self, record: bytes) -> Optional[tuple]:
        """
        ``(content_type, plaintext)`` for an authentic, fresh record of this
        epoch; None for anything else (other epoch, malformed, forged,
        replayed, larger than RFC 5246 allows), which DTLS discards silently.
        """
        if not self.suite.overhead <= len(record) <= _HEADER_LENGTH + _MAX_FRAGMENT or \
                len(record) - self.suite.overhead > MAX_PLAINTEXT:
            return None
        content_type, version, epoch, sequence_octets, length = _HEADER.unpack_from(record)
        if version != _DTLS_1_2 or epoch != self.epoch or \
                length != len(record) - _HEADER_LENGTH:
            return None
        sequence = int.from_bytes(sequence_octets, "big")
        if self._window.seen(sequence):
            return None
        epoch_and_sequence = record[3:11]
        start = _HEADER_LENGTH + self.suite.explicit_nonce_length
        if self.suite.explicit_nonce_length:
            nonce = self._read_iv + record[_HEADER_LENGTH:start]
        else:
            nonce = self._nonce(self._read_iv, epoch_and_sequence)
        additional = epoch_and_sequence + bytes((content_type,)) + _DTLS_1_2 + \
            (len(record) - start - _TAG_LENGTH).to_bytes(2, "big")
        try:
            plaintext = self._read.decrypt(nonce, bytes(record[start:]), additional)
        except InvalidTag:
            return None
        self._window.mark(sequence)
        return content_type, plaintext
