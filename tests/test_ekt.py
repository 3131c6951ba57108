"""
Tests for perc.ekt (RFC 8870) and for extension 39 (supported_ekt_ciphers)
in perc.dtls.
"""

from __future__ import annotations

import gc

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding
from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from perc import dtls, ekt, hello
from perc.dtls import callbacks
from perc.ekt import (
    EktCipher,
    EktError,
    EktFieldRejected,
    EktKey,
    EktPlaintext,
    EktReceiver,
    EktSender,
    SenderKey,
)
from perc.rtp import (
    EktFieldError,
    SHORT_EKT_FIELD,
    full_ekt_field,
    join_ekt_field,
    parse_full_ekt_field,
    split_ekt_field,
)
from tests import test_dtls as td

KEY128 = bytes(range(16))
KEY256 = bytes(range(32, 64))
SALT = bytes.fromhex("a0a1a2a3a4a5a6a7a8a9aaab")
MASTER = bytes.fromhex("00112233445566778899aabbccddeeff")
OTHER_MASTER = bytes.fromhex("ffeeddccbbaa99887766554433221100")
SSRC = 0xDEADBEEF
SSRC2 = 0x01020304


def ekt_key(spi=0x1234, key=KEY128, salt=SALT, ttl=3600):
    return EktKey(key, salt, spi, ttl)


def kwp_reference(kek: bytes, plaintext: bytes) -> bytes:
    """
    AES key wrap with padding written out from RFC 5649 section 4.1 (and
    the RFC 3394 wrapping it uses) on top of raw AES, independently of
    cryptography's keywrap module.
    """
    aes = Cipher(algorithms.AES(kek), modes.ECB()).encryptor()
    a = bytes.fromhex("A65959A6") + len(plaintext).to_bytes(4, "big")
    padded = plaintext + b"\x00" * (-len(plaintext) % 8)
    if len(padded) == 8:
        return aes.update(a + padded)
    r = [padded[i:i + 8] for i in range(0, len(padded), 8)]
    n = len(r)
    for j in range(6):
        for i in range(n):
            b = aes.update(a + r[i])
            a = (int.from_bytes(b[:8], "big") ^ (n * j + i + 1)).to_bytes(8, "big")
            r[i] = b[8:]
    return a + b"".join(r)


class Roc:
    """A settable ROC source."""

    def __init__(self, value=0):
        self.value = value
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.value


# --------------------------------------------------------------------------
# Ciphers


class CipherTests(SynchronousTestCase):

    def test_numbering(self):
        """RFC 8870 section 5.2.1: reserved(0), aeskw_128(1), aeskw_256(2)."""
        self.assertEqual(int(EktCipher.AESKW_128), 1)
        self.assertEqual(int(EktCipher.AESKW_256), 2)
        self.assertEqual(EktCipher.AESKW_128.key_length, 16)
        self.assertEqual(EktCipher.AESKW_256.key_length, 32)
        self.assertIs(ekt.ekt_cipher(1), EktCipher.AESKW_128)
        for bad in (0, 3, 255, -1, True, "1", None):
            self.assertRaises(EktError, ekt.ekt_cipher, bad)

    def test_rfc5649_vectors(self):
        """RFC 5649 section 6 (192-bit KEK): the primitive and the reference agree with them."""
        kek = bytes.fromhex("5840df6e29b02af1ab493b705bf16ea1ae8338f4dcc176a8")
        vectors = [
            ("c37b7e6492584340bed12207808941155068f738",
             "138bdeaa9b8fa7fc61f97742e72248ee5ae6ae5360d1ae6a5f54f373fa543b6a"),
            ("466f7250617369", "afbeb0f07dfbf5419200f2ccb50bb24f"),
        ]
        for key, wrapped in vectors:
            self.assertEqual(aes_key_wrap_with_padding(kek, bytes.fromhex(key)).hex(), wrapped)
            self.assertEqual(kwp_reference(kek, bytes.fromhex(key)).hex(), wrapped)

    def test_against_reference(self):
        """ekt_encrypt is RFC 5649 under 128- and 256-bit EKTKeys, for every plaintext size."""
        for cipher, key in ((1, KEY128), (2, KEY256)):
            for size in list(range(1, 40)) + [251]:
                plaintext = bytes((7 * i + size) & 0xFF for i in range(size))
                wrapped = ekt.ekt_encrypt(cipher, key, plaintext)
                self.assertEqual(wrapped, kwp_reference(key, plaintext))
                self.assertEqual(len(wrapped), ekt.wrapped_length(size))
                self.assertEqual(ekt.ekt_decrypt(cipher, key, wrapped), plaintext)

    def test_single_block_by_hand(self):
        """An 8-octet plaintext is one AES block: ENC(K, A65959A6 00000008 || P)."""
        plaintext = b"ABCDEFGH"
        aes = Cipher(algorithms.AES(KEY128), modes.ECB()).encryptor()
        expected = aes.update(bytes.fromhex("A65959A600000008") + plaintext)
        self.assertEqual(ekt.ekt_encrypt(1, KEY128, plaintext), expected)

    def test_wrapped_lengths(self):
        """N = 8 * ceil(M / 8) + 8 (RFC 8870's M + (M mod 8) + 8 is wrong for most M)."""
        self.assertEqual(ekt.wrapped_length(1), 16)
        self.assertEqual(ekt.wrapped_length(8), 16)
        self.assertEqual(ekt.wrapped_length(9), 24)
        # The EKTPlaintext of a 16-octet master key is 25 octets.
        self.assertEqual(ekt.wrapped_length(25), 40)
        self.assertEqual(ekt.wrapped_length(41), 56)
        self.assertEqual(ekt.wrapped_length(251), 264)

    def test_decrypt_failures(self):
        wrapped = ekt.ekt_encrypt(1, KEY128, b"x" * 25)
        tampered = bytearray(wrapped)
        tampered[5] ^= 1
        for cipher, key, data in [
            (1, KEY128, bytes(tampered)),
            (1, bytes(16), wrapped),
            (1, KEY128, wrapped[:-8]),
            (1, KEY128, wrapped + bytes(8)),
            (1, KEY128, wrapped[:-1]),
            (1, KEY128, b""),
            (1, KEY128, bytes(8)),
        ]:
            with self.assertRaises(EktError) as caught:
                ekt.ekt_decrypt(cipher, key, data)
            self.assertNotIn(KEY128.hex(), str(caught.exception))
        self.assertRaises(EktError, ekt.ekt_decrypt, 2, KEY128, wrapped)
        self.assertRaises(EktError, ekt.ekt_encrypt, 1, KEY256, b"x")
        self.assertRaises(EktError, ekt.ekt_encrypt, 1, KEY128, b"")


# --------------------------------------------------------------------------
# EKTKey and EKTPlaintext


class EktKeyTests(SynchronousTestCase):

    def test_encoding(self):
        """Both opaque<1..256> vectors take a 2-octet length; SPI 2 octets; TTL 3."""
        key = EktKey(KEY128, SALT, 0x1234, 0x0E10)
        expected = (b"\x00\x10" + KEY128 + b"\x00\x0c" + SALT
                    + b"\x12\x34" + b"\x00\x0e\x10")
        self.assertEqual(key.encode(), expected)
        self.assertEqual(len(expected), 2 + 16 + 2 + 12 + 5)
        self.assertEqual(EktKey.decode(expected), key)
        self.assertEqual(EktKey.decode(bytearray(expected), cipher=1), key)

    def test_round_trip_extremes(self):
        for key in (EktKey(KEY256, b"\x01", 0, 0),
                    EktKey(KEY128, b"s" * 256, 0xFFFF, ekt.MAX_TTL)):
            encoded = key.encode()
            self.assertEqual(EktKey.decode(encoded), key)
        self.assertEqual(EktKey(KEY128, b"s" * 256, 1, 1).encode()[18:20], b"\x01\x00")

    def test_strict_decoding(self):
        good = ekt_key().encode()
        for n in range(len(good)):
            self.assertRaises(EktError, EktKey.decode, good[:n])
        self.assertRaises(EktError, EktKey.decode, good + b"\x00")
        bad = [
            b"\x00\x00" + b"\x00\x0c" + SALT + b"\x00\x01\x00\x00\x01",  # empty key
            b"\x00\x10" + KEY128 + b"\x00\x00" + b"\x00\x01\x00\x00\x01",  # empty salt
            b"\x00\x10" + KEY128 + b"\x01\x01" + b"s" * 257 + b"\x00\x01\x00\x00\x01",
            b"\x00\x18" + bytes(24) + b"\x00\x0c" + SALT + b"\x00\x01\x00\x00\x01",
            b"\x00\x11" + KEY128 + b"\x00\x0c" + SALT + b"\x00\x01\x00\x00\x01",
        ]
        for data in bad:
            self.assertRaises(EktError, EktKey.decode, data)
        self.assertRaises(EktError, EktKey.decode, good, cipher=2)
        self.assertRaises(EktError, EktKey.decode, good, cipher=7)
        self.assertRaises(EktError, EktKey.decode, "text")

    def test_validation(self):
        self.assertRaises(EktError, EktKey, bytes(15), SALT, 1, 1)
        self.assertRaises(EktError, EktKey, KEY128, b"", 1, 1)
        self.assertRaises(EktError, EktKey, KEY128, SALT, 0x10000, 1)
        self.assertRaises(EktError, EktKey, KEY128, SALT, 1, 0x1000000)
        self.assertRaises(EktError, EktKey, KEY128, SALT, -1, 1)
        self.assertRaises(EktError, EktKey, "k" * 16, SALT, 1, 1)
        self.assertIsInstance(EktKey(bytearray(KEY128), SALT, 1, 1).ekt_key_value, bytes)

    def test_repr_hides_secrets(self):
        text = repr(ekt_key())
        self.assertNotIn(KEY128.hex(), text)
        self.assertNotIn(SALT.hex(), text)
        self.assertNotIn(repr(KEY128), text)
        self.assertNotIn(repr(SALT), text)
        self.assertIn("4660", text)  # the SPI is fine to show


class PlaintextTests(SynchronousTestCase):

    def test_encoding(self):
        plaintext = EktPlaintext(MASTER, SSRC, 0x00000102)
        expected = b"\x10" + MASTER + b"\xde\xad\xbe\xef" + b"\x00\x00\x01\x02"
        self.assertEqual(plaintext.encode(), expected)
        self.assertEqual(EktPlaintext.decode(expected), plaintext)
        self.assertNotIn(MASTER.hex(), repr(plaintext))

    def test_strict_decoding(self):
        good = EktPlaintext(MASTER, SSRC, 5).encode()
        for n in range(len(good)):
            self.assertRaises(EktError, EktPlaintext.decode, good[:n])
        self.assertRaises(EktError, EktPlaintext.decode, good + b"\x00")
        self.assertRaises(EktError, EktPlaintext.decode, b"\x00" + bytes(8))
        self.assertRaises(EktError, EktPlaintext.decode, b"\xf3" + bytes(243 + 8))

    def test_validation(self):
        self.assertRaises(EktError, EktPlaintext, b"", SSRC, 0)
        self.assertRaises(EktError, EktPlaintext, bytes(243), SSRC, 0)
        self.assertRaises(EktError, EktPlaintext, MASTER, 1 << 32, 0)
        self.assertRaises(EktError, EktPlaintext, MASTER, SSRC, -1)
        EktPlaintext(bytes(242), 0, 0xFFFFFFFF)


# --------------------------------------------------------------------------
# Sender and receiver


def sender(key=None, cipher=1, ssrc=SSRC, master=MASTER, roc=None, **kwargs):
    return EktSender(key or ekt_key(), cipher, ssrc, master, roc or Roc(), **kwargs)


def receiver(*keys, cipher=1, **kwargs):
    result = EktReceiver(cipher, **kwargs)
    for key in keys or (ekt_key(),):
        result.add_key(key)
    return result


class SenderReceiverTests(SynchronousTestCase):

    def test_round_trip(self):
        roc = Roc(7)
        source = sender(roc=roc)
        field = source.field(0.0)
        parts = parse_full_ekt_field(field)
        self.assertEqual(parts.spi, 0x1234)
        self.assertEqual(parts.epoch, 0)
        self.assertEqual(len(parts.ciphertext), 40)
        self.assertEqual(len(field), 47)
        # The ciphertext is the EKTPlaintext wrapped under the EKTKey.
        self.assertEqual(ekt.ekt_decrypt(1, KEY128, parts.ciphertext),
                         b"\x10" + MASTER + SSRC.to_bytes(4, "big") + b"\x00\x00\x00\x07")
        # Through a packet and perc.rtp's splitter, as on the wire.
        packet = join_ekt_field(b"\x80\x60" + bytes(10) + b"payload+tag", field)
        _, split = split_ekt_field(packet)
        got = receiver().process(split, SSRC)
        self.assertEqual(got, SenderKey(SSRC, MASTER, 7, 0x1234, 0, SALT))
        self.assertNotIn(MASTER.hex(), repr(got))
        self.assertNotIn(SALT.hex(), repr(got))

    def test_round_trip_256(self):
        key = ekt_key(key=KEY256)
        master = bytes(range(100, 132))
        field = sender(key, cipher=EktCipher.AESKW_256, master=master).field(0.0)
        got = receiver(key, cipher=2).process(field, SSRC)
        self.assertEqual(got.master_key, master)

    def test_short_field(self):
        source = sender(repeat=1)
        source.field(0.0)
        self.assertEqual(source.field(0.01), SHORT_EKT_FIELD)
        self.assertEqual(source.short_field, b"\x00")
        self.assertIsNone(receiver().process(b"\x00", SSRC))
        self.assertIsNone(receiver().process(bytearray(b"\x00"), SSRC))

    def test_ssrc_mismatch_rejected(self):
        field = sender().field(0.0)
        rx = receiver()
        with self.assertRaises(EktError) as caught:
            rx.process(field, SSRC2)
        self.assertIn("SSRC", str(caught.exception))
        # Nothing was learnt from it: the real packet is still accepted.
        self.assertIsNotNone(rx.process(field, SSRC))

    def test_unknown_spi_rejected(self):
        field = sender(ekt_key(spi=9)).field(0.0)
        with self.assertRaises(EktError) as caught:
            receiver(ekt_key(spi=8)).process(field, SSRC)
        self.assertIn("unknown SPI 9", str(caught.exception))

    def test_forged_field_rejected(self):
        field = bytearray(sender().field(0.0))
        field[3] ^= 0x40
        with self.assertRaises(EktError) as caught:
            receiver().process(bytes(field), SSRC)
        self.assertNotIn(KEY128.hex(), str(caught.exception))
        # A field wrapped under another key with the right SPI.
        other = sender(ekt_key(key=bytes(16))).field(0.0)
        self.assertRaises(EktError, receiver().process, other, SSRC)

    def test_malformed_fields_rejected(self):
        rx = receiver()
        field = sender().field(0.0)
        for bad in (b"", b"\x01", b"\x03", field[1:], field + b"\x02", b"\x00\x00",
                    full_ekt_field(b"abc", 0x1234, 0)):
            self.assertRaises(EktError, rx.process, bad, SSRC)
        self.assertRaises(EktError, rx.process, "text", SSRC)
        self.assertRaises(EktError, rx.process, field, -1)

    def test_master_key_length_enforced(self):
        field = sender(master=bytes(range(32))).field(0.0)
        self.assertRaises(EktError, receiver(master_key_length=16).process, field, SSRC)
        self.assertIsNotNone(receiver(master_key_length=32).process(field, SSRC))

    def test_repeats_return_same_key(self):
        roc = Roc(1)
        source = sender(roc=roc)
        rx = receiver()
        first = rx.process(source.field(0.0), SSRC)
        again = rx.process(source.field(0.001), SSRC)
        self.assertIs(again, first)
        # Same epoch, same key, new ROC: accepted, with the new ROC.
        roc.value = 2
        later = rx.process(source.field(0.002), SSRC)
        self.assertEqual((later.master_key, later.epoch, later.roc), (MASTER, 0, 2))

    def test_new_master_key_increments_epoch(self):
        source = sender()
        rx = receiver()
        old_field = source.field(0.0)
        self.assertEqual(rx.process(old_field, SSRC).epoch, 0)
        source.change_master_key(OTHER_MASTER, 0.5)
        self.assertEqual(source.epoch, 1)
        self.assertTrue(source.needs_full_field(0.5))
        new_field = source.field(0.5)
        self.assertEqual(parse_full_ekt_field(new_field).epoch, 1)
        got = rx.process(new_field, SSRC)
        self.assertEqual((got.master_key, got.epoch), (OTHER_MASTER, 1))
        # The old epoch is ignored from now on (a delayed or replayed packet).
        self.assertIsNone(rx.process(old_field, SSRC))
        self.assertEqual(rx.ignored, 1)
        self.assertEqual(rx.process(new_field, SSRC).master_key, OTHER_MASTER)
        self.assertRaises(EktError, source.change_master_key, OTHER_MASTER)

    def test_same_epoch_other_key_ignored(self):
        rx = receiver()
        rx.process(sender().field(0.0), SSRC)
        impostor = sender(master=OTHER_MASTER).field(0.0)
        self.assertIsNone(rx.process(impostor, SSRC))
        self.assertEqual(rx.ignored, 1)

    def test_epochs_per_ssrc(self):
        rx = receiver()
        first = sender()
        first.change_master_key(OTHER_MASTER)
        rx.process(first.field(0.0), SSRC)
        # Another sender starts at epoch 0: unaffected by SSRC's epoch.
        got = rx.process(sender(ssrc=SSRC2).field(0.0), SSRC2)
        self.assertEqual((got.ssrc, got.epoch), (SSRC2, 0))
        rx.forget(SSRC)
        self.assertIsNotNone(rx.process(sender().field(0.0), SSRC))

    def test_epoch_exhausted(self):
        source = sender()
        source._epoch = 0xFFFF
        self.assertRaises(EktError, source.change_master_key, OTHER_MASTER)

    def test_rekey(self):
        """The receiver opens fields under the current and the previous EKTKey."""
        old_key, new_key = ekt_key(spi=1), ekt_key(spi=2, key=bytes(range(50, 66)))
        rx = receiver(old_key)
        source = sender(old_key)
        other = sender(old_key, ssrc=SSRC2)
        self.assertEqual(rx.process(source.field(0.0), SSRC).spi, 1)
        rx.add_key(new_key)
        self.assertEqual(rx.spis, (2, 1))
        # A sender that has not switched yet still opens.
        self.assertEqual(rx.process(other.field(0.0), SSRC2).spi, 1)
        source.rekey(new_key, OTHER_MASTER, 1.0)
        self.assertEqual((source.spi, source.epoch), (2, 0))
        old_field = sender(old_key).field(0.0)
        got = rx.process(source.field(1.0), SSRC)
        self.assertEqual((got.spi, got.epoch, got.master_key), (2, 0, OTHER_MASTER))
        # A late field under the old SPI cannot roll the sender back.
        self.assertIsNone(rx.process(old_field, SSRC))
        # A third key drops the first.
        rx.add_key(ekt_key(spi=3, key=bytes(range(80, 96))))
        self.assertEqual(rx.spis, (3, 2))
        self.assertRaises(EktError, rx.process, other.field(5.0), SSRC2)

    def test_rekey_rules(self):
        source = sender(ekt_key(spi=1))
        self.assertRaises(EktError, source.rekey, ekt_key(spi=1, key=bytes(16)), OTHER_MASTER)
        self.assertRaises(EktError, source.rekey, ekt_key(spi=2), MASTER)
        self.assertRaises(EktError, source.rekey, ekt_key(spi=2, key=KEY256), OTHER_MASTER)
        self.assertRaises(EktError, source.rekey, ekt_key(spi=2), b"")
        self.assertEqual(source.spi, 1)

    def test_receiver_key_rules(self):
        rx = receiver(ekt_key(spi=1))
        rx.add_key(ekt_key(spi=1))  # again: nothing changes
        self.assertEqual(rx.spis, (1,))
        self.assertRaises(EktError, rx.add_key, ekt_key(spi=1, key=bytes(16)))
        self.assertRaises(EktError, rx.add_key, ekt_key(spi=2, key=KEY256))
        rx.add_key(ekt_key(spi=2))
        self.assertRaises(EktError, rx.add_key, ekt_key(spi=1))
        self.assertRaises(EktError, EktReceiver, 3)

    def test_ttl(self):
        key = ekt_key(ttl=10)
        source = sender(key, received_at=100.0)
        self.assertFalse(source.expired(109.9))
        field = source.field(100.0)
        self.assertTrue(source.expired(110.0))
        self.assertRaises(EktError, source.field, 110.0)
        rx = EktReceiver(1)
        rx.add_key(key, now=100.0)
        self.assertIsNotNone(rx.process(field, SSRC, now=109.0))
        with self.assertRaises(EktError) as caught:
            rx.process(field, SSRC, now=110.0)
        self.assertIn("expired", str(caught.exception))
        # Without a clock the TTL is not enforced.
        self.assertIsNotNone(receiver(key).process(field, SSRC, now=1e9))

    def test_receiver_drops_keys_past_their_ttl(self):
        old, new = ekt_key(spi=1, ttl=4), ekt_key(spi=2, key=bytes(16), ttl=4)
        rx = EktReceiver(1)
        rx.add_key(old, now=0.0)
        rx.add_key(new, now=3.0)
        self.assertEqual(rx.spis, (2, 1))  # both readable around a rollover
        field = sender(old, received_at=0.0).field(0.0)
        self.assertIsNotNone(rx.process(field, SSRC, now=3.9))
        # Past its TTL the old key is dropped the first time a field names it.
        self.assertRejected(rx, field, SSRC, "expired-spi", now=4.0)
        self.assertEqual(rx.spis, (2,))
        self.assertRejected(rx, field, SSRC, "unknown-spi", now=4.1)
        # add_key drops what has expired too.
        rx = EktReceiver(1)
        rx.add_key(old, now=0.0)
        rx.add_key(new, now=5.0)
        self.assertEqual(rx.spis, (2,))

    def test_same_key_with_the_ttl_left(self):
        # A resent EKTKey carries the TTL it has left: the same key.
        key = ekt_key(spi=7, ttl=10)
        self.assertTrue(key.same_key(ekt_key(spi=7, ttl=3)))
        self.assertFalse(key.same_key(ekt_key(spi=8, ttl=10)))
        self.assertFalse(key.same_key(ekt_key(spi=7, key=bytes(16), ttl=10)))
        self.assertFalse(key.same_key(ekt_key(spi=7, salt=bytes(12), ttl=10)))
        rx = EktReceiver(1)
        rx.add_key(key, now=0.0)
        rx.add_key(ekt_key(spi=7, ttl=3), now=7.0)  # nothing changes
        self.assertEqual(rx.spis, (7,))
        self.assertRaises(EktError, rx.add_key, ekt_key(spi=7, key=bytes(16)), 7.0)

    def test_ttl_zero_is_expired_on_arrival(self):
        # RFC 8870: never used after its TTL; Linphone means "no limit".
        expired = ekt_key(spi=2, ttl=0)
        self.assertEqual(EktKey.decode(expired.encode()), expired)
        with self.assertRaises(EktError) as caught:
            sender(expired)
        self.assertIn("expired on arrival", caught.exception.reason)
        source = sender(ekt_key(spi=1))
        self.assertRaises(EktError, source.rekey, expired, OTHER_MASTER)
        self.assertEqual(source.spi, 1)
        rx = receiver(ekt_key(spi=1))
        self.assertRaises(EktError, rx.add_key, expired, 0.0)
        self.assertEqual(rx.spis, (1,))

    def assertRejected(self, rx, field, ssrc, kind, discard_packet=True, now=None):
        with self.assertRaises(EktFieldRejected) as caught:
            rx.process(field, ssrc, now)
        self.assertEqual((caught.exception.kind, caught.exception.discard_packet),
                         (kind, discard_packet))

    def test_rejections_say_what_happens_to_the_packet(self):
        """RFC 8870 section 4.3.2: which failures abort EKT and discard the packet."""
        key = ekt_key(spi=1)
        rx = receiver(key, master_key_length=16)
        good = sender(key).field(0.0)
        # Step 2: no parameter set for the SPI, or an expired one.
        self.assertRejected(rx, sender(ekt_key(spi=9)).field(0.0), SSRC, "unknown-spi")
        timed = EktReceiver(1)
        timed.add_key(ekt_key(spi=1, ttl=5), now=0.0)
        self.assertRejected(timed, good, SSRC, "expired-spi", now=5.0)
        # Step 3: the ciphertext does not authenticate.
        forged = bytearray(good)
        forged[0] ^= 1
        self.assertRejected(rx, bytes(forged), SSRC, "unwrap-failed")
        # Step 4: authenticates, but is no EKTPlaintext.
        garbage = full_ekt_field(aes_key_wrap_with_padding(KEY128, b"\x05abc"), 1, 0)
        self.assertRejected(rx, garbage, SSRC, "bad-plaintext")
        # Step 5: another stream's field: only the field goes.
        self.assertRejected(rx, good, SSRC2, "ssrc-mismatch", discard_packet=False)
        # Step 6: a 32-octet key where the transform takes 16.
        self.assertRejected(rx, sender(key, master=bytes(32)).field(0.0), SSRC,
                            "wrong-key-length")
        # Malformed framing.
        self.assertRejected(rx, b"\x00\x01\x02", SSRC, "malformed")
        self.assertEqual(rx.process(good, SSRC).master_key, MASTER)

    def test_ciphertext_cached(self):
        roc = Roc(0)
        source = sender(roc=roc)
        first = source.full_field()
        self.assertIs(source.full_field(), first)
        roc.value = 1
        self.assertNotEqual(source.full_field(), first)

    def test_validation(self):
        self.assertRaises(EktError, sender, cipher=2)
        self.assertRaises(EktError, sender, ssrc=1 << 32)
        self.assertRaises(EktError, sender, master=b"")
        self.assertRaises(TypeError, sender, roc=5)
        self.assertRaises(ValueError, sender, repeat=0)
        self.assertRaises(ValueError, sender, interval=0)
        self.assertRaises(TypeError, EktSender, "key", 1, SSRC, MASTER, Roc())
        source = sender(roc=lambda: -1)
        self.assertRaises(EktError, source.field, 0.0)


class ScheduleTests(SynchronousTestCase):

    def kinds(self, source, times):
        return ["full" if source.field(t) != SHORT_EKT_FIELD else "short" for t in times]

    def test_full_first_then_short_then_periodic(self):
        source = sender()
        self.assertTrue(source.needs_full_field(0.0))
        kinds = self.kinds(source, [0.0, 0.02, 0.04, 0.06, 0.08, 0.10, 0.13, 0.139, 0.14])
        # Three full (RFC 8870 section 4.7), then short until 100 ms after
        # the last full one, then full again.
        self.assertEqual(kinds, ["full"] * 3 + ["short"] * 3 + ["short", "short", "full"])

    def test_single_full_and_interval(self):
        source = sender(repeat=1, interval=0.05)
        self.assertEqual(self.kinds(source, [0.0, 0.01, 0.049, 0.05, 0.06]),
                         ["full", "short", "short", "full", "short"])

    def test_needs_full_field_is_pure(self):
        source = sender(repeat=1)
        for _ in range(3):
            self.assertTrue(source.needs_full_field(0.0))
        source.field(0.0)
        self.assertFalse(source.needs_full_field(0.01))

    def test_full_after_rekey_and_new_master_key(self):
        source = sender(ekt_key(spi=1))
        self.kinds(source, [0.0, 0.01, 0.02])
        self.assertEqual(self.kinds(source, [0.03]), ["short"])
        source.rekey(ekt_key(spi=2), OTHER_MASTER, 0.04)
        self.assertEqual(self.kinds(source, [0.04, 0.05, 0.06, 0.07]),
                         ["full", "full", "full", "short"])
        self.assertEqual(parse_full_ekt_field(source.full_field()).spi, 2)
        source.change_master_key(MASTER, 0.08)
        self.assertEqual(self.kinds(source, [0.08, 0.09, 0.10, 0.11]),
                         ["full", "full", "full", "short"])


# --------------------------------------------------------------------------
# supported_ekt_ciphers data


class ExtensionDataTests(SynchronousTestCase):

    def test_client(self):
        self.assertEqual(ekt.encode_client_ekt_ciphers([1]), b"\x01\x01")
        self.assertEqual(ekt.encode_client_ekt_ciphers([2, 1]), b"\x02\x02\x01")
        self.assertEqual(ekt.decode_client_ekt_ciphers(b"\x02\x02\x01"), (2, 1))
        self.assertEqual(ekt.decode_client_ekt_ciphers(b"\x02\x09\x01"), (9, 1))
        many = list(range(1, 255)) + [1]
        self.assertEqual(ekt.decode_client_ekt_ciphers(ekt.encode_client_ekt_ciphers(many)),
                         tuple(many))
        for bad in ([], [0], [255], [1] * 256, ["1"], [True]):
            self.assertRaises(EktError, ekt.encode_client_ekt_ciphers, bad)
        for bad in (b"", b"\x00", b"\x01", b"\x02\x01", b"\x01\x01\x02", b"\x00\x01"):
            self.assertRaises(EktError, ekt.decode_client_ekt_ciphers, bad)

    def test_server(self):
        self.assertEqual(ekt.encode_server_ekt_cipher(EktCipher.AESKW_256), b"\x02")
        self.assertEqual(ekt.decode_server_ekt_cipher(b"\x01"), 1)
        for bad in (0, 255, 256, None):
            self.assertRaises(EktError, ekt.encode_server_ekt_cipher, bad)
        for bad in (b"", b"\x01\x01", b"\x01\x01\x01"):
            self.assertRaises(EktError, ekt.decode_server_ekt_cipher, bad)


class FuzzTests(SynchronousTestCase):

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=600))
    def test_decoders_raise_only_their_errors(self, data):
        for decode in (EktKey.decode, EktPlaintext.decode, ekt.decode_client_ekt_ciphers,
                       ekt.decode_server_ekt_cipher,
                       lambda d: ekt.ekt_decrypt(1, KEY128, d),
                       lambda d: ekt.ekt_decrypt(2, KEY256, d)):
            try:
                decode(data)
            except (EktError, EktFieldError):
                pass

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=120), st.integers(0, 0xFFFFFFFF))
    def test_receiver_raises_only_ekt_error(self, data, ssrc):
        rx = receiver()
        for field in (data, data + b"\x02", full_ekt_field(data or b"x", 0x1234, 0)):
            try:
                rx.process(field, ssrc)
            except EktError:
                pass

    @settings(max_examples=200, deadline=None)
    @given(st.binary(min_size=1, max_size=64), st.integers(0, 0xFFFFFFFF),
           st.integers(0, 0xFFFFFFFF), st.binary(min_size=1, max_size=256),
           st.integers(0, 0xFFFF), st.integers(1, ekt.MAX_TTL))
    def test_round_trips(self, master, ssrc, roc, salt, spi, ttl):
        plaintext = EktPlaintext(master, ssrc, roc)
        self.assertEqual(EktPlaintext.decode(plaintext.encode()), plaintext)
        key = EktKey(KEY256, salt, spi, ttl)
        self.assertEqual(EktKey.decode(key.encode(), cipher=2), key)
        got = receiver(key, cipher=2).process(
            EktSender(key, 2, ssrc, master, lambda: roc).field(0.0), ssrc)
        self.assertEqual((got.master_key, got.roc, got.ssrc), (master, roc, ssrc))


# --------------------------------------------------------------------------
# Extension 39 in the DTLS engine


def ekt_handshake(client=None, server=None, **listen_kwargs):
    return td.handshake(client_kwargs=dict(ekt_ciphers=client) if client is not None else {},
                        listener_kwargs=dict(ekt_ciphers=server) if server is not None else {},
                        **listen_kwargs)


def completions(harness):
    return (harness.event("client", dtls.HandshakeComplete),
            harness.event("server", dtls.HandshakeComplete))


def server_hello(harness):
    infos = [hello.parse_server_hello(d) for o in harness.server_outputs for d in o.datagrams]
    infos = [i for i in infos if i is not None]
    return infos[0] if infos else None


class Extension39Tests(SynchronousTestCase):

    def assertNegotiated(self, harness, expected):
        client, server = completions(harness)
        self.assertIsNotNone(client)
        self.assertIsNotNone(server)
        self.assertEqual(client.ekt_cipher, expected)
        self.assertEqual(server.ekt_cipher, expected)
        self.assertEqual(harness.client.ekt_cipher, expected)
        self.assertEqual(harness.server.ekt_cipher, expected)
        if expected is not None:
            self.assertIsInstance(client.ekt_cipher, EktCipher)

    def test_negotiate_128(self):
        harness = ekt_handshake(client=(1, 2), server=(1, 2))
        self.assertNegotiated(harness, EktCipher.AESKW_128)

    def test_negotiate_256_when_both_prefer_it(self):
        self.assertNegotiated(ekt_handshake(client=(2, 1), server=(2, 1)), 2)
        # The server's preference decides among what the client offered.
        self.assertNegotiated(ekt_handshake(client=(1, 2), server=(2, 1)), 2)
        self.assertNegotiated(ekt_handshake(client=(1,), server=(2, 1)), 1)

    def test_client_without_ext_39(self):
        harness = ekt_handshake(server=(1, 2))
        self.assertNegotiated(harness, None)
        self.assertIsNone(server_hello(harness).ekt_cipher)

    def test_server_without_support(self):
        self.assertNegotiated(ekt_handshake(client=(1, 2)), None)
        self.assertNegotiated(ekt_handshake(client=(1, 2), server=()), None)
        # No cipher in common.
        self.assertNegotiated(ekt_handshake(client=(2, 9), server=(1,)), None)

    def test_per_listen_override(self):
        harness = ekt_handshake(client=(1, 2), server=(1,), ekt_ciphers=(2,))
        self.assertNegotiated(harness, 2)
        harness = ekt_handshake(client=(1, 2), server=(1,), ekt_ciphers=())
        self.assertNegotiated(harness, None)

    def test_hello_parser_reads_the_real_flights(self):
        harness = ekt_handshake(client=(2, 1), server=(1, 2))
        self.assertNegotiated(harness, 1)
        info = server_hello(harness)
        self.assertEqual(info.ekt_cipher, 1)
        self.assertTrue(info.ekt_negotiated)
        client_infos = [hello.parse_client_hello(d) for d in harness.client_sent]
        offers = {i.ekt_ciphers for i in client_infos if i is not None}
        self.assertEqual(offers, {(2, 1)})
        # perc.hello and perc.ekt read the extension data the same way.
        for info in client_infos:
            if info is not None:
                data = dict(info.extensions)[39]
                self.assertEqual(data, b"\x02\x02\x01")
                self.assertEqual(ekt.decode_client_ekt_ciphers(data), info.ekt_ciphers)
        self.assertEqual(dict(server_hello(harness).extensions)[39], b"\x01")

    def test_on_the_wire(self):
        client = dtls.ClientAssociation(td._CLIENT, [td.P9], ekt_ciphers=(1, 2))
        (first,) = client.start(0.0).datagrams
        self.assertIn(b"\x00\x27\x00\x03\x02\x01\x02", first)
        plain = dtls.ClientAssociation(td._CLIENT, [td.P9])
        (first,) = plain.start(0.0).datagrams
        self.assertIsNone(hello.parse_client_hello(first).ekt_ciphers)

    def test_with_tls_ids(self):
        harness = td.handshake(
            client_kwargs=dict(ekt_ciphers=(1,), tls_id=td.CLIENT_TLS_ID),
            listener_kwargs=dict(ekt_ciphers=(1,), tls_id=td.SERVER_TLS_ID))
        client, server = completions(harness)
        self.assertEqual((client.peer_tls_id, client.ekt_cipher), (td.SERVER_TLS_ID, 1))
        self.assertEqual((server.peer_tls_id, server.ekt_cipher), (td.CLIENT_TLS_ID, 1))

    def _patch_server_parser(self, handler):
        key = ("server", 39)
        original = callbacks._PARSERS[key]
        callbacks._PARSERS[key] = handler
        self.addCleanup(callbacks._PARSERS.__setitem__, key, original)

    def test_client_rejects_unoffered_selection(self):
        def select_two(ssl, state, data):
            state.ekt_cipher = 2
            state.send[39] = b"\x02"

        self._patch_server_parser(select_two)
        harness = ekt_handshake(client=(1,), server=(1,))
        closed = harness.event("client", dtls.Closed)
        self.assertIsNotNone(closed)
        self.assertTrue(closed.rejected)
        self.assertIn("EKT cipher 2", closed.reason)
        self.assertIsNone(harness.event("client", dtls.HandshakeComplete))
        self.assertIn((2, 47), td.alerts(harness.client_sent))

    def test_client_refuses_malformed_selection(self):
        def two_octets(ssl, state, data):
            state.send[39] = b"\x01\x01"

        self._patch_server_parser(two_octets)
        harness = ekt_handshake(client=(1,), server=(1,))
        closed = harness.event("client", dtls.Closed)
        self.assertIsNotNone(closed)
        self.assertFalse(closed.rejected)
        self.assertIn("malformed supported_ekt_ciphers", closed.reason)

    def test_server_refuses_malformed_offer(self):
        harness = td.make(client_kwargs=dict(ekt_ciphers=(1,)),
                          listener_kwargs=dict(ekt_ciphers=(1,)))
        harness.client._state.send[39] = b"\x05\x01"
        harness.start()
        harness.run()
        closed = harness.event("server", dtls.Closed)
        self.assertIsNotNone(closed)
        self.assertIn("malformed supported_ekt_ciphers", closed.reason)
        self.assertIsNone(harness.event("client", dtls.HandshakeComplete))

    def test_parameter_validation(self):
        for bad in ((), (0,), (255,), ("1",), b"\x01"):
            self.assertRaises((ValueError, TypeError), dtls.ClientAssociation,
                              td._CLIENT, [td.P9], ekt_ciphers=bad)
        for bad in ((0,), (1, 300), "12"):
            self.assertRaises((ValueError, TypeError), dtls.ServerListener,
                              td._SERVER, [td.P9], ekt_ciphers=bad)
        listener = dtls.ServerListener(td._SERVER, [td.P9], ekt_ciphers=[2, 1, 2])
        self.assertEqual(listener.ekt_ciphers, (2, 1))
        self.assertIsNone(dtls.ServerListener(td._SERVER, [td.P9], ekt_ciphers=[]).ekt_ciphers)

    def test_no_leaks(self):
        gc.collect()
        baseline = dtls.callback_registry_size()
        listener = dtls.ServerListener(td._SERVER, [td.P9], ekt_ciphers=(1, 2))
        for i in range(20):
            client = dtls.ClientAssociation(td._CLIENT, [td.P9], ekt_ciphers=(2,))
            harness = td.Harness(client, listener, association_id=i.to_bytes(16, "big"))
            del client
            harness.start()
            harness.run()
            self.assertEqual(harness.event("server", dtls.HandshakeComplete).ekt_cipher, 2)
            del harness
        gc.collect()
        self.assertEqual(dtls.callback_registry_size(), baseline)

    def test_ekt_key_delivery_end_to_end(self):
        """
        As this project runs it: the server sends the EKTKey in RFC 8870's
        ekt_key handshake message; each client builds its sender from it, and
        one client's FullEKTField gives another its master key.
        """
        key = ekt_key(spi=77)
        senders = {}
        for index, ssrc in enumerate((SSRC, SSRC2)):
            harness = ekt_handshake(client=(1,), server=(1,),
                                    association_id=bytes([index + 1]) * 16)
            client, server = completions(harness)
            for datagram in harness.server.send_ekt_key(key, 0.0).datagrams:
                harness.deliver_to_client(datagram)
            (received,) = [e.key for e in harness.client_events
                           if isinstance(e, dtls.EktKeyReceived)]
            self.assertEqual(received, key)
            master = client.keys.client_key[:16]  # any fresh key will do here
            senders[ssrc] = EktSender(received, client.ekt_cipher, ssrc, master, Roc())
        rx = EktReceiver(EktCipher.AESKW_128, master_key_length=16)
        rx.add_key(key)
        got = rx.process(senders[SSRC].field(0.0), SSRC)
        self.assertEqual(got.master_key, senders[SSRC]._master_key)
        self.assertEqual(got.master_salt, SALT)
