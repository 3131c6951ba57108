"""
Tests for perc.double: the RFC 8723 double transform at the endpoints and
the Media Distributor's header rewrite.

The known-answer tests compute each layer independently, step by step, with
``cryptography`` primitives (the SRTP KDF from AES-ECB blocks, the RFC 7714
IV by hand, the AAD as literal octets), and check the hop-by-hop layer
against libsrtp (pylibsrtp) byte for byte.
"""

from __future__ import annotations

import struct

import pylibsrtp
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from perc import double
from perc.double import (
    DoubleError,
    DoubleReceiver,
    DoubleSender,
    InnerAuthenticationError,
    MalformedOhbError,
    MalformedPacketError,
    OuterAuthenticationError,
    OuterProtectError,
    ReplayError,
    SequenceReuseError,
    UnknownSenderError,
    relay_rewrite,
)
from perc.profiles import by_id
from perc.rtp import SHORT_EKT_FIELD, Ohb, full_ekt_field, parse_ohb, parse_rtp_header

P128 = by_id(0x0009)
P256 = by_id(0x000A)
PROFILES = (P128, P256)
_Policy = pylibsrtp.Policy


def rtp_packet(*, payload_type=96, sequence=1, timestamp=0x01020304, ssrc=0x11223344,
               marker=False, padding=b"", csrcs=(), extension=None, payload=b"\xEE" * 20):
    """
    An RTP packet.  ``extension`` is ``(profile, data)`` with len(data) % 4
    == 0; ``padding`` is the padding octets (the last one is the count).
    """
    first = 0x80 | (0x20 if padding else 0) | (0x10 if extension else 0) | len(csrcs)
    header = struct.pack("!BBHII", first, (0x80 if marker else 0) | payload_type,
                         sequence, timestamp, ssrc)
    header += b"".join(struct.pack("!I", c) for c in csrcs)
    if extension is not None:
        profile, data = extension
        header += struct.pack("!HH", profile, len(data) // 4) + data
    return header + payload + padding


def pad(count):
    """RFC 3550 padding of ``count`` octets: zeros then the count."""
    return b"\x00" * (count - 1) + bytes([count])


class Keys:
    """Deterministic inner and hop-by-hop halves for one profile."""

    def __init__(self, profile, seed=0):
        n = profile.key_length // 2
        self.profile = profile
        self.inner_key = bytes((seed + i) & 0xFF for i in range(n))
        self.inner_salt = bytes((seed + 0x40 + i) & 0xFF for i in range(12))
        self.hbh_key = bytes((seed + 0x80 + i) & 0xFF for i in range(n))
        self.hbh_salt = bytes((seed + 0xC0 + i) & 0xFF for i in range(12))

    def sender(self, **kwargs):
        return DoubleSender(self.profile, self.inner_key, self.inner_salt,
                            self.hbh_key, self.hbh_salt, **kwargs)

    def receiver(self, hbh=None, **kwargs):
        """A receiver that knows this sender's inner key for ``ssrcs``."""
        ssrcs = kwargs.pop("ssrcs", ())
        key, salt = hbh if hbh is not None else (self.hbh_key, self.hbh_salt)
        receiver = DoubleReceiver(self.profile, key, salt, **kwargs)
        for ssrc in ssrcs:
            receiver.add_sender_key(ssrc, self.inner_key, self.inner_salt)
        return receiver

    def secrets(self):
        return (self.inner_key, self.inner_salt, self.hbh_key, self.hbh_salt)


def libsrtp_session(profile, key, salt, direction, allow_repeat_tx=False):
    policy = _Policy(key=key + salt, ssrc_type=direction, srtp_profile=profile.hbh_libsrtp_profile)
    policy.allow_repeat_tx = allow_repeat_tx
    return pylibsrtp.Session(policy)


class MediaDistributor:
    """
    RFC 8723 section 5.2 with libsrtp: outer-decrypt with the sender's
    hop-by-hop key, optionally rewrite, outer-encrypt with the receiver's.
    """

    def __init__(self, profile, sender_hbh, receiver_hbh, allow_repeat_tx=False):
        self.inbound = libsrtp_session(profile, *sender_hbh, _Policy.SSRC_ANY_INBOUND)
        self.outbound = libsrtp_session(profile, *receiver_hbh, _Policy.SSRC_ANY_OUTBOUND,
                                        allow_repeat_tx)

    def open(self, packet):
        return self.inbound.unprotect(packet)

    def seal(self, plaintext):
        return self.outbound.protect(plaintext)

    def forward(self, packet, **rewrite):
        plain = self.open(packet)
        if rewrite:
            plain = relay_rewrite(plain, **rewrite)
        return self.seal(plain)


# --------------------------------------------------------------------------
# Independent, step-by-step RFC 3711 / RFC 7714 computations


def hand_kdf(master_key, master_salt, label, length):
    """
    RFC 3711 section 4.3 with kdr = 0, AES_CM PRF (RFC 6188 AES_256_CM_PRF
    for 32-octet keys), built from raw AES-ECB blocks.
    """
    # RFC 7714 erratum 4938: the 96-bit master salt times 2^16 is the 112-bit salt.
    salt112 = master_salt + b"\x00\x00"
    # key_id = label (8 bits) || r (48 bits, 0 because kdr = 0), right-aligned in 112 bits.
    key_id = bytes(7) + bytes([label]) + bytes(6)
    x = bytes(a ^ b for a, b in zip(key_id, salt112))
    self_check = bytearray(salt112)
    self_check[7] ^= label
    assert x == bytes(self_check)
    ecb = Cipher(algorithms.AES(master_key), modes.ECB()).encryptor()
    stream = b""
    counter = 0
    while len(stream) < length:
        # x * 2^16 + counter: the AES-CM input blocks.
        stream += ecb.update(x + struct.pack("!H", counter))
        counter += 1
    return stream[:length]


def hand_iv(session_salt, ssrc, roc, seq):
    """RFC 7714 section 8.1: (0x0000 || SSRC || ROC || SEQ) XOR salt."""
    block = b"\x00\x00" + struct.pack("!I", ssrc) + struct.pack("!I", roc) + struct.pack("!H", seq)
    assert len(block) == 12
    return bytes(a ^ b for a, b in zip(block, session_salt))


def hand_aead(master_key, master_salt, ssrc, roc, seq, plaintext, aad):
    session_key = hand_kdf(master_key, master_salt, 0x00, len(master_key))
    session_salt = hand_kdf(master_key, master_salt, 0x02, 12)
    return AESGCM(session_key).encrypt(hand_iv(session_salt, ssrc, roc, seq), plaintext, aad)


# The known-answer packet: V=2 P=0 X=1 CC=1, M=1 PT=96, SEQ 0x1234,
# TS 0xDECAFBAD, SSRC 0xCAFEBABE, CSRC 0x0000BEEF, one RFC 8285 one-byte
# extension element (ID 2, 3 octets 12 34 56), then the payload.
KAT_HEADER = bytes.fromhex("91E01234" "DECAFBAD" "CAFEBABE" "0000BEEF" "BEDE0001" "22123456")
KAT_PAYLOAD = b"Gallia est omnis divisa in partes tres"
KAT_PACKET = KAT_HEADER + KAT_PAYLOAD
# The synthetic header of RFC 8723 section 5.1 step 3: X cleared, extension gone.
KAT_SYNTHETIC_HEADER = bytes.fromhex("81E01234" "DECAFBAD" "CAFEBABE" "0000BEEF")
KAT_SSRC, KAT_SEQ = 0xCAFEBABE, 0x1234


class KdfTests(SynchronousTestCase):
    """srtp_kdf is the SRTP KDF as RFC 7714 (with erratum 4938) uses it."""

    def test_matches_hand_computation(self):
        for key_length in (16, 32):
            key = bytes(range(0x60, 0x60 + key_length))
            salt = bytes(range(0xA0, 0xAC))
            for label in (0x00, 0x01, 0x02, 0x03, 0x05):
                for length in (12, 14, 16, 32, 33):
                    self.assertEqual(double.srtp_kdf(key, salt, label, length),
                                     hand_kdf(key, salt, label, length))

    def test_rejects_bad_lengths(self):
        self.assertRaises(ValueError, double.srtp_kdf, b"k" * 24, b"s" * 12, 0, 16)
        self.assertRaises(ValueError, double.srtp_kdf, b"k" * 16, b"s" * 13, 0, 16)


class KnownAnswerTests(SynchronousTestCase):
    """One packet per double profile, every layer computed by hand."""

    def check_profile(self, profile):
        keys = Keys(profile, seed=0x11)
        wire = keys.sender().protect(KAT_PACKET)

        # Inner layer: AES-GCM over the payload, AAD = synthetic header,
        # IV from SSRC, ROC 0 and SEQ.
        expected_inner = hand_aead(keys.inner_key, keys.inner_salt, KAT_SSRC, 0, KAT_SEQ,
                                   KAT_PAYLOAD, KAT_SYNTHETIC_HEADER)
        self.assertEqual(len(expected_inner), len(KAT_PAYLOAD) + 16)

        # Outer-decrypt with libsrtp: original header, inner part, empty OHB.
        rx = libsrtp_session(profile, keys.hbh_key, keys.hbh_salt, _Policy.SSRC_ANY_INBOUND)
        outer_plain = rx.unprotect(wire)
        self.assertEqual(outer_plain, KAT_HEADER + expected_inner + b"\x00")

        # Outer layer: exactly libsrtp's AEAD protect of that packet ...
        tx = libsrtp_session(profile, keys.hbh_key, keys.hbh_salt, _Policy.SSRC_ANY_OUTBOUND)
        self.assertEqual(wire, tx.protect(KAT_HEADER + expected_inner + b"\x00"))

        # ... which is the same RFC 7714 construction by hand, with the whole
        # original header (extension included) as AAD: this pins the KDF,
        # IV and AAD reading above to libsrtp's.
        expected_outer = hand_aead(keys.hbh_key, keys.hbh_salt, KAT_SSRC, 0, KAT_SEQ,
                                   expected_inner + b"\x00", KAT_HEADER)
        self.assertEqual(wire, KAT_HEADER + expected_outer)
        self.assertEqual(len(wire), len(KAT_PACKET) + 16 + 1 + 16)

        # And the receiver gets the packet back.
        result = keys.receiver(ssrcs=[KAT_SSRC]).unprotect(wire)
        self.assertEqual(result.packet, KAT_PACKET)
        self.assertEqual(result.payload, KAT_PAYLOAD)
        self.assertEqual((result.payload_type, result.sequence, result.marker), (96, KAT_SEQ, True))
        self.assertEqual(result.index, KAT_SEQ)
        self.assertEqual(result.ohb, Ohb())

    def test_profile_0x0009(self):
        self.check_profile(P128)

    def test_profile_0x000A(self):
        self.check_profile(P256)

    def test_inner_layer_equals_libsrtp_on_synthetic_packets(self):
        """
        libsrtp with the inner key, fed the synthetic packets, produces the
        same inner ciphertext and tag, across a SEQ wrap (ROC 0 -> 1).
        """
        for profile in PROFILES:
            keys = Keys(profile, seed=0x22)
            sender = keys.sender()
            reference = libsrtp_session(profile, keys.inner_key, keys.inner_salt,
                                        _Policy.SSRC_ANY_OUTBOUND)
            rx = libsrtp_session(profile, keys.hbh_key, keys.hbh_salt, _Policy.SSRC_ANY_INBOUND)
            for seq in (65533, 65534, 65535, 0, 1, 2):
                packet = rtp_packet(sequence=seq, csrcs=(7, 8), marker=seq % 2 == 0,
                                    extension=(0x1000, b"\x05\x02\xAA\xBB"),
                                    payload=bytes([seq & 0xFF]) * 50)
                header = parse_rtp_header(packet)
                synthetic = (bytes([packet[0] & 0xEF]) + packet[1:12 + 8] + packet[header.header_length:])
                expected = reference.protect(synthetic)[20:]
                outer_plain = rx.unprotect(sender.protect(packet))
                self.assertEqual(outer_plain[header.header_length:-1], expected)
            self.assertEqual(sender.roc(0x11223344), 1)


# --------------------------------------------------------------------------
# Round trips


class RoundTripTests(SynchronousTestCase):
    """Sender to receiver (same hop-by-hop key, no Media Distributor)."""

    def round_trip(self, profile, packets, **receiver_kwargs):
        keys = Keys(profile, seed=0x33)
        sender = keys.sender()
        ssrcs = {parse_rtp_header(p).ssrc for p in packets}
        receiver = keys.receiver(ssrcs=ssrcs, **receiver_kwargs)
        results = []
        for packet in packets:
            result = receiver.unprotect(sender.protect(packet))
            self.assertEqual(result.packet, packet)
            results.append(result)
        return results

    def test_csrcs(self):
        for profile in PROFILES:
            for count in (0, 1, 5, 15):
                packet = rtp_packet(csrcs=tuple(range(1000, 1000 + count)))
                [result] = self.round_trip(profile, [packet])
                self.assertEqual(result.header.csrcs, tuple(range(1000, 1000 + count)))

    def test_one_byte_header_extensions(self):
        for profile in PROFILES:
            packet = rtp_packet(csrcs=(9,), extension=(0xBEDE, b"\x10\xFF\x21\x01\x02\x00\x00\x00"))
            [result] = self.round_trip(profile, [packet])
            self.assertEqual(result.header.extension_profile, 0xBEDE)

    def test_two_byte_header_extensions(self):
        for profile in PROFILES:
            for appbits in (0x0, 0x7, 0xF):
                packet = rtp_packet(extension=(0x1000 | appbits, b"\x01\x03abc\x02\x00\x00"))
                [result] = self.round_trip(profile, [packet])
                self.assertEqual(result.header.extension_profile, 0x1000 | appbits)

    def test_padding(self):
        for profile in PROFILES:
            for count in (1, 2, 7, 255):
                packet = rtp_packet(payload=b"media", padding=pad(count),
                                    extension=(0xBEDE, b"\x10\x01\x00\x00"))
                [result] = self.round_trip(profile, [packet])
                self.assertTrue(result.header.padding)
                self.assertEqual(result.payload, b"media" + pad(count))
                self.assertEqual(result.media, b"media")

    def test_empty_payload(self):
        for profile in PROFILES:
            [result] = self.round_trip(profile, [rtp_packet(payload=b"")])
            self.assertEqual(result.payload, b"")

    def test_several_ssrcs_interleaved(self):
        for profile in PROFILES:
            packets = []
            for n in range(20):
                for ssrc, start in ((0x1, 100), (0x2, 65530), (0xFFFFFFFF, 0)):
                    packets.append(rtp_packet(ssrc=ssrc, sequence=(start + n) & 0xFFFF,
                                              payload=struct.pack("!IH", ssrc, n)))
            results = self.round_trip(profile, packets)
            by_ssrc = {}
            for result in results:
                by_ssrc.setdefault(result.ssrc, []).append(result.index)
            self.assertEqual(by_ssrc[0x1], list(range(100, 120)))
            self.assertEqual(by_ssrc[0x2], list(range(65530, 65550)))
            self.assertEqual(by_ssrc[0xFFFFFFFF], list(range(0, 20)))

    def test_sequence_wrap_increments_roc(self):
        for profile in PROFILES:
            seqs = [65530 + n for n in range(6)] + list(range(6))
            # A little reordering across the wrap, too.
            seqs[5], seqs[6] = seqs[6], seqs[5]
            packets = [rtp_packet(sequence=s, payload=struct.pack("!H", s)) for s in seqs]
            results = self.round_trip(profile, packets)
            expected = [s if s >= 65530 else 65536 + s for s in seqs]
            self.assertEqual([r.index for r in results], expected)
            self.assertEqual(results[-1].roc, 1)

    def test_two_wraps(self):
        keys = Keys(P128, seed=0x34)
        sender = keys.sender()
        receiver = keys.receiver(ssrcs=[0x11223344])
        index = 65000
        for _ in range(2 * 65536 // 997 + 2):
            packet = rtp_packet(sequence=index & 0xFFFF)
            result = receiver.unprotect(sender.protect(packet))
            self.assertEqual(result.index, index)
            last = index
            index += 997  # big steps, still below half the SEQ space
        self.assertEqual(last >> 16, 2)
        self.assertEqual(sender.roc(0x11223344), 2)
        self.assertEqual(result.roc, 2)

    def test_initial_roc_from_ekt(self):
        """The ROC announced in EKT reaches the IV: a wrong one fails the inner tag."""
        for profile in PROFILES:
            keys = Keys(profile, seed=0x35)
            sender = keys.sender()
            sender.set_roc(0xABCD, 7)
            wire = sender.protect(rtp_packet(ssrc=0xABCD, sequence=10))
            self.assertEqual(sender.roc(0xABCD), 7)
            wrong = keys.receiver()
            wrong.add_sender_key(0xABCD, keys.inner_key, keys.inner_salt, roc=0)
            self.assertRaises(InnerAuthenticationError, wrong.unprotect, wire)
            right = keys.receiver()
            right.add_sender_key(0xABCD, keys.inner_key, keys.inner_salt, roc=7)
            self.assertEqual(right.unprotect(wire).index, (7 << 16) | 10)

    def test_set_roc_only_before_first_packet(self):
        sender = Keys(P128).sender()
        sender.protect(rtp_packet(ssrc=5))
        self.assertRaises(ValueError, sender.set_roc, 5, 1)
        self.assertRaises(ValueError, sender.set_roc, 6, 1 << 32)

    def test_from_master(self):
        for profile in PROFILES:
            keys = Keys(profile, seed=0x36)
            sender = DoubleSender.from_master(profile, keys.inner_key + keys.hbh_key,
                                              keys.inner_salt + keys.hbh_salt)
            packet = rtp_packet()
            self.assertEqual(sender.protect(packet), keys.sender().protect(packet))
            self.assertRaises(ValueError, DoubleSender.from_master, profile, keys.inner_key,
                              keys.inner_salt)

    def test_rtcp_is_outer_only(self):
        for profile in PROFILES:
            keys = Keys(profile, seed=0x37)
            sender = keys.sender()
            rtcp = struct.pack("!BBHI", 0x80, 200, 6, 0x11223344) + b"\x01" * 20
            srtcp = sender.protect_rtcp(rtcp)
            reference = libsrtp_session(profile, keys.hbh_key, keys.hbh_salt,
                                        _Policy.SSRC_ANY_INBOUND)
            self.assertEqual(reference.unprotect_rtcp(srtcp), rtcp)
            self.assertEqual(keys.receiver().unprotect_rtcp(srtcp), rtcp)
            tampered = bytearray(sender.protect_rtcp(rtcp))
            tampered[10] ^= 1
            self.assertRaises(OuterAuthenticationError, keys.receiver().unprotect_rtcp,
                              bytes(tampered))

    @settings(max_examples=200, deadline=None)
    @given(
        profile=st.sampled_from(PROFILES),
        csrcs=st.lists(st.integers(0, 0xFFFFFFFF), max_size=15),
        extension=st.one_of(
            st.none(),
            st.tuples(st.sampled_from([0xBEDE, 0x1000, 0x1003]),
                      st.integers(0, 20).map(lambda words: b"\x00" * (4 * words)))),
        payload=st.binary(max_size=300),
        padding=st.integers(0, 32),
        marker=st.booleans(),
        payload_type=st.integers(0, 127),
        sequence=st.integers(0, 0xFFFF),
        rewrite=st.fixed_dictionaries({}, optional={
            "new_pt": st.integers(0, 127),
            "new_seq": st.integers(0, 0xFFFF),
            "new_marker": st.booleans()}),
    )
    def test_round_trip_through_relay_property(self, profile, csrcs, extension, payload,
                                               padding, marker, payload_type, sequence, rewrite):
        keys = Keys(profile, seed=0x38)
        packet = rtp_packet(csrcs=tuple(csrcs), extension=extension, payload=payload,
                            padding=pad(padding) if padding else b"", marker=marker,
                            payload_type=payload_type, sequence=sequence)
        receiver_hbh = (keys.inner_key[::-1], keys.inner_salt[::-1])
        md = MediaDistributor(profile, (keys.hbh_key, keys.hbh_salt), receiver_hbh)
        receiver = keys.receiver(hbh=receiver_hbh, ssrcs=[0x11223344])
        result = receiver.unprotect(md.forward(keys.sender().protect(packet), **rewrite))
        self.assertEqual(result.packet, packet)
        self.assertEqual((result.payload_type, result.sequence, result.marker),
                         (payload_type, sequence, marker))
        self.assertEqual(result.outer_payload_type, rewrite.get("new_pt", payload_type))
        self.assertEqual(result.outer_sequence, rewrite.get("new_seq", sequence))
        self.assertEqual(result.outer_marker, rewrite.get("new_marker", marker))


# --------------------------------------------------------------------------
# A Media Distributor in between


class RelayTests(SynchronousTestCase):
    """Section 5.2: a relay edits PT/SEQ/M; the receiver still verifies end to end."""

    def setUp(self):
        self.keys = Keys(P128, seed=0x44)
        self.receiver_hbh = (bytes(range(0xE0, 0xF0)), bytes(range(0xF0, 0xFC)))

    def parts(self, profile=P128, **receiver_kwargs):
        keys = Keys(profile, seed=0x44)
        n = profile.key_length // 2
        receiver_hbh = (bytes(range(0x10, 0x10 + n)), bytes(range(0xF0, 0xFC)))
        md = MediaDistributor(profile, (keys.hbh_key, keys.hbh_salt), receiver_hbh)
        receiver = keys.receiver(hbh=receiver_hbh, ssrcs=[0x11223344], **receiver_kwargs)
        return keys, keys.sender(), md, receiver

    def test_original_values_restored(self):
        for profile in PROFILES:
            keys, sender, md, receiver = self.parts(profile)
            packet = rtp_packet(payload_type=111, sequence=4000, marker=True, csrcs=(1, 2),
                                extension=(0xBEDE, b"\x10\x7F\x00\x00"))
            wire = md.forward(sender.protect(packet), new_pt=96, new_seq=17, new_marker=False)
            outer_header = parse_rtp_header(wire)
            self.assertEqual((outer_header.payload_type, outer_header.sequence,
                              outer_header.marker), (96, 17, False))
            result = receiver.unprotect(wire)
            self.assertEqual(result.packet, packet)
            self.assertEqual((result.payload_type, result.sequence, result.marker),
                             (111, 4000, True))
            self.assertEqual((result.outer_payload_type, result.outer_sequence,
                              result.outer_marker), (96, 17, False))
            self.assertEqual(result.ohb, Ohb(payload_type=111, sequence=4000, marker=True))

    def test_unchanged_relay_keeps_empty_ohb(self):
        keys, sender, md, receiver = self.parts()
        result = receiver.unprotect(md.forward(sender.protect(rtp_packet())))
        self.assertEqual(result.ohb, Ohb())
        self.assertEqual(result.packet, rtp_packet())

    def test_each_field_alone(self):
        keys, sender, md, receiver = self.parts()
        for seq, rewrite in enumerate([{"new_pt": 0}, {"new_seq": 9}, {"new_marker": True}], 50):
            packet = rtp_packet(sequence=seq)
            result = receiver.unprotect(md.forward(sender.protect(packet), **rewrite))
            self.assertEqual(result.packet, packet)

    def test_renumbering_stream_keeps_inner_index(self):
        """The relay renumbers across an outer wrap; the inner index follows the original SEQ."""
        keys, sender, md, receiver = self.parts()
        for n in range(10):
            packet = rtp_packet(sequence=100 + n)
            result = receiver.unprotect(md.forward(sender.protect(packet),
                                                   new_seq=(65531 + n) & 0xFFFF))
            self.assertEqual(result.packet, packet)
            self.assertEqual(result.index, 100 + n)

    def test_two_relays(self):
        """Only the first relay to change a field records it; a reset drops it."""
        keys = self.keys
        hop2 = (bytes(range(0x50, 0x60)), bytes(range(0x60, 0x6C)))
        hop3 = (bytes(range(0x70, 0x80)), bytes(range(0x80, 0x8C)))
        md1 = MediaDistributor(P128, (keys.hbh_key, keys.hbh_salt), hop2)
        md2 = MediaDistributor(P128, hop2, hop3)
        receiver = keys.receiver(hbh=hop3, ssrcs=[0x11223344])
        packet = rtp_packet(payload_type=100, sequence=7, marker=False)
        wire = md1.forward(keys.sender().protect(packet), new_pt=101, new_seq=8)
        wire = md2.forward(wire, new_pt=100, new_seq=9, new_marker=True)
        result = receiver.unprotect(wire)
        self.assertEqual(result.packet, packet)
        self.assertEqual(result.ohb, Ohb(sequence=7, marker=False))
        self.assertEqual((result.outer_payload_type, result.outer_sequence, result.outer_marker),
                         (100, 9, True))

    def test_relay_may_change_header_extensions(self):
        """Extensions are outside the inner AAD (RFC 8723 section 5.2 step 2)."""
        keys, sender, md, receiver = self.parts()
        packet = rtp_packet(extension=(0xBEDE, b"\x10\x01\x00\x00"))
        plain = md.open(sender.protect(packet))
        header_length = parse_rtp_header(plain).header_length
        # Replace the extension block with a longer one.
        new_ext = struct.pack("!HH", 0xBEDE, 2) + b"\x10\x02\x21\xAA\xBB\x00\x00\x00"
        edited = plain[:12] + new_ext + plain[header_length:]
        result = receiver.unprotect(md.seal(edited))
        self.assertEqual(result.packet, packet[:12] + new_ext + packet[header_length:])
        # And removing the extension altogether (X cleared) works too.
        packet = rtp_packet(sequence=2, extension=(0xBEDE, b"\x10\x01\x00\x00"))
        plain = md.open(sender.protect(packet))
        stripped = bytes([plain[0] & 0xEF]) + plain[1:12] + plain[header_length:]
        result = receiver.unprotect(md.seal(relay_rewrite(stripped, new_seq=3)))
        self.assertEqual(result.packet, bytes([packet[0] & 0xEF]) + packet[1:12]
                         + packet[header_length:])
        self.assertEqual(result.ohb, Ohb(sequence=2))

    def test_ekt_fields_pass_through(self):
        keys, sender, md, receiver = self.parts(ekt=True)
        full = full_ekt_field(b"\x5A" * 24, spi=3, epoch=0)
        for seq, ekt in ((1, SHORT_EKT_FIELD), (2, full)):
            wire = sender.protect(rtp_packet(sequence=seq), ekt_field=ekt)
            self.assertTrue(wire.endswith(ekt))
            srtp = wire[:-len(ekt)]
            forwarded = md.forward(srtp, new_seq=seq + 10) + ekt
            result = receiver.unprotect(forwarded)
            self.assertEqual(result.ekt_field, ekt)
            self.assertEqual(result.packet, rtp_packet(sequence=seq))
        self.assertRaises(MalformedPacketError, receiver.unprotect,
                          md.forward(sender.protect(rtp_packet(sequence=3))) + b"\x07")
        self.assertRaises(MalformedPacketError, sender.protect, rtp_packet(sequence=4),
                          ekt_field=b"\x01\x02")


class RelayRewriteTests(SynchronousTestCase):
    """relay_rewrite on outer plaintext: exact OHB octets (RFC 8723 section 4)."""

    INNER = b"\xC7" * 30  # stands for inner ciphertext + tag

    def plain(self, ohb=b"\x00", **fields):
        return rtp_packet(payload=self.INNER + ohb, **fields)

    def test_no_change_keeps_packet(self):
        plain = self.plain(payload_type=96, sequence=5)
        self.assertEqual(relay_rewrite(plain), plain)
        self.assertEqual(relay_rewrite(plain, new_pt=96, new_seq=5, new_marker=False), plain)

    def test_ohb_encodings(self):
        plain = self.plain(payload_type=96, sequence=0x0102, marker=False)
        cases = [
            ({"new_pt": 97}, b"\x60\x02"),
            ({"new_seq": 9}, b"\x01\x02\x01"),
            ({"new_marker": True}, b"\x04"),
            ({"new_pt": 97, "new_seq": 9}, b"\x60\x01\x02\x03"),
            ({"new_pt": 97, "new_seq": 9, "new_marker": True}, b"\x60\x01\x02\x07"),
        ]
        for rewrite, ohb in cases:
            out = relay_rewrite(plain, **rewrite)
            header = parse_rtp_header(out)
            self.assertEqual(out[header.header_length:], self.INNER + ohb, rewrite)
            self.assertEqual(header.payload_type, rewrite.get("new_pt", 96))
            self.assertEqual(header.sequence, rewrite.get("new_seq", 0x0102))
            self.assertEqual(header.marker, rewrite.get("new_marker", False))
        marked = self.plain(marker=True)
        self.assertTrue(relay_rewrite(marked, new_marker=False).endswith(b"\x0C"))

    def test_reset_drops_field(self):
        plain = self.plain(payload_type=96, sequence=5)
        once = relay_rewrite(plain, new_pt=97, new_seq=6)
        back = relay_rewrite(once, new_pt=96)
        self.assertTrue(back.endswith(self.INNER + b"\x00\x05\x01"))
        self.assertEqual(relay_rewrite(back, new_seq=5), plain)

    def test_repair_mode_has_no_ohb(self):
        plain = rtp_packet(payload=b"repair data")
        out = relay_rewrite(plain, new_seq=77, repair=True)
        self.assertEqual(out[12:], b"repair data")
        self.assertEqual(parse_rtp_header(out).sequence, 77)

    def test_malformed(self):
        self.assertRaises(MalformedOhbError, relay_rewrite, self.plain(ohb=b"\x10"), new_pt=1)
        self.assertRaises(MalformedOhbError, relay_rewrite, self.plain(ohb=b"\x08"))
        self.assertRaises(MalformedPacketError, relay_rewrite, rtp_packet(payload=b"\x00"))
        self.assertRaises(MalformedPacketError, relay_rewrite, b"\x80\x60")
        self.assertRaises(ValueError, relay_rewrite, self.plain(), new_pt=128)
        self.assertRaises(ValueError, relay_rewrite, self.plain(), new_seq=65536)

    @settings(max_examples=500)
    @given(
        original=st.tuples(st.integers(0, 127), st.integers(0, 0xFFFF), st.booleans()),
        hops=st.lists(st.tuples(st.one_of(st.none(), st.integers(0, 127)),
                                st.one_of(st.none(), st.integers(0, 0xFFFF)),
                                st.one_of(st.none(), st.booleans())), max_size=5),
    )
    def test_chain_restores_original(self, original, hops):
        pt, seq, marker = original
        plain = self.plain(payload_type=pt, sequence=seq, marker=marker)
        for new_pt, new_seq, new_marker in hops:
            plain = relay_rewrite(plain, new_pt, new_seq, new_marker)
        header = parse_rtp_header(plain)
        ohb = parse_ohb(plain[header.header_length:])
        self.assertEqual(ohb.restore(header.payload_type, header.sequence, header.marker),
                         original)
        self.assertEqual(plain[header.header_length:len(plain) - ohb.size], self.INNER)


# --------------------------------------------------------------------------
# Tampering


class TamperTests(SynchronousTestCase):
    """A relay holding only outer keys cannot change what the inner tag covers."""

    def setUp(self):
        self.keys = Keys(P128, seed=0x55)
        self.receiver_hbh = (bytes(range(0x90, 0xA0)), bytes(range(0xA0, 0xAC)))
        self.packet = rtp_packet(payload_type=100, sequence=300, csrcs=(0xAB,),
                                 extension=(0xBEDE, b"\x10\x01\x00\x00"), payload=b"x" * 24,
                                 padding=pad(3))
        # The relay re-encrypts the same SEQ again and again: allow it.
        self.md = MediaDistributor(P128, (self.keys.hbh_key, self.keys.hbh_salt),
                                   self.receiver_hbh, allow_repeat_tx=True)
        self.plain = self.md.open(self.keys.sender().protect(self.packet))
        self.header_length = parse_rtp_header(self.plain).header_length

    def fresh_receiver(self):
        return self.keys.receiver(hbh=self.receiver_hbh, ssrcs=[0x11223344])

    def test_untampered_control(self):
        self.assertEqual(self.fresh_receiver().unprotect(self.md.seal(self.plain)).packet,
                         self.packet)

    def test_every_inner_byte(self):
        inner_start, inner_end = self.header_length, len(self.plain) - 1  # before the OHB
        self.assertEqual(inner_end - inner_start, len(self.packet) - self.header_length + 16)
        for position in range(inner_start, inner_end):
            for bit in (0x01, 0x80):
                tampered = bytearray(self.plain)
                tampered[position] ^= bit
                wire = self.md.seal(bytes(tampered))
                with self.assertRaises(InnerAuthenticationError) as caught:
                    self.fresh_receiver().unprotect(wire)
                self.assertEqual(caught.exception.reason, "inner authentication failed")
                self.assertEqual(caught.exception.ssrc, 0x11223344)

    def test_fixed_header_fields_are_covered(self):
        """Timestamp, CSRC, CC-covered octets, P bit: not expressible in the OHB."""
        for position, bit in ((0, 0x20), (4, 0x01), (7, 0x80), (12, 0x01), (15, 0x80)):
            tampered = bytearray(self.plain)
            tampered[position] ^= bit
            self.assertRaises(InnerAuthenticationError, self.fresh_receiver().unprotect,
                              self.md.seal(bytes(tampered)))

    def test_unrecorded_pt_seq_marker_changes_fail(self):
        for position, bit in ((1, 0x01), (1, 0x80), (3, 0x01)):
            tampered = bytearray(self.plain)
            tampered[position] ^= bit
            self.assertRaises(InnerAuthenticationError, self.fresh_receiver().unprotect,
                              self.md.seal(bytes(tampered)))

    def test_lying_ohb_fails(self):
        forged = self.plain[:-1] + Ohb(payload_type=101).encode()
        self.assertRaises(InnerAuthenticationError, self.fresh_receiver().unprotect,
                          self.md.seal(forged))

    def test_malformed_ohb_and_short_inner(self):
        receiver = self.fresh_receiver()
        header = self.plain[:self.header_length]

        def outer_seq(plain, seq):
            # A new outer SEQ without touching the (malformed) OHB.
            return plain[:2] + struct.pack("!H", seq) + plain[4:]

        self.assertRaises(MalformedOhbError, receiver.unprotect,
                          self.md.seal(outer_seq(self.plain[:-1] + b"\xF0", 301)))
        self.assertRaises(MalformedPacketError, receiver.unprotect,
                          self.md.seal(outer_seq(header + b"\x01" * 15 + b"\x00", 302)))
        with self.assertRaises(MalformedOhbError) as caught:
            receiver.unprotect(self.md.seal(outer_seq(header, 303)))
        self.assertEqual(caught.exception.reason, "malformed OHB")
        # None of that used up the packet's index.
        self.assertEqual(receiver.unprotect(self.md.seal(relay_rewrite(self.plain, new_seq=304)))
                         .packet, self.packet)

    def test_failure_does_not_advance_state(self):
        receiver = self.fresh_receiver()
        tampered = bytearray(self.plain)
        tampered[-2] ^= 1
        self.assertRaises(InnerAuthenticationError, receiver.unprotect,
                          self.md.seal(relay_rewrite(bytes(tampered), new_seq=1)))
        self.assertEqual(receiver.unprotect(self.md.seal(relay_rewrite(self.plain, new_seq=2)))
                         .packet, self.packet)

    def test_outer_tamper(self):
        wire = bytearray(self.md.seal(self.plain))
        wire[-3] ^= 1
        with self.assertRaises(OuterAuthenticationError) as caught:
            self.fresh_receiver().unprotect(bytes(wire))
        self.assertEqual(caught.exception.reason, "outer authentication failed")

    def test_sender_key_relay_is_not_the_receivers(self):
        """Re-encrypted with the sender's hop key (forbidden): the receiver's outer check fails."""
        wire = self.keys.sender().protect(self.packet)
        self.assertRaises(OuterAuthenticationError, self.fresh_receiver().unprotect, wire)


# --------------------------------------------------------------------------
# Replay


class ReplayTests(SynchronousTestCase):

    def setUp(self):
        self.keys = Keys(P256, seed=0x66)
        self.receiver_hbh = (bytes(range(0x20, 0x40)), bytes(range(0x40, 0x4C)))
        self.sender = self.keys.sender()
        self.md = MediaDistributor(P256, (self.keys.hbh_key, self.keys.hbh_salt),
                                   self.receiver_hbh)
        self.receiver = self.keys.receiver(hbh=self.receiver_hbh, ssrcs=[0x11223344])

    def test_same_wire_packet_twice(self):
        wire = self.md.forward(self.sender.protect(rtp_packet(sequence=1)))
        self.receiver.unprotect(wire)
        with self.assertRaises(ReplayError) as caught:
            self.receiver.unprotect(wire)
        self.assertEqual(caught.exception.layer, "outer")
        self.assertEqual(caught.exception.reason, "replay")

    def test_relay_replays_with_new_outer_seq(self):
        """The inner check keys on the original SEQ, restored from the OHB."""
        e2e = self.md.open(self.sender.protect(rtp_packet(sequence=1000)))
        self.receiver.unprotect(self.md.seal(relay_rewrite(e2e, new_seq=5000)))
        # (libsrtp at the relay would refuse to send an older outer SEQ.)
        for new_seq in (5001, 5002, 65000):
            with self.assertRaises(ReplayError) as caught:
                self.receiver.unprotect(self.md.seal(relay_rewrite(e2e, new_seq=new_seq)))
            self.assertEqual(caught.exception.layer, "inner")

    def test_window(self):
        e2e = [self.md.open(self.sender.protect(rtp_packet(sequence=n))) for n in range(200)]
        outer_seq = iter(range(10000, 20000))
        def deliver(n):
            return self.receiver.unprotect(self.md.seal(relay_rewrite(e2e[n], new_seq=next(outer_seq))))
        for n in range(1, 200):
            if n != 100:
                deliver(n)
        # 99 behind the highest: late but inside the window, accepted once.
        self.assertEqual(deliver(100).sequence, 100)
        self.assertRaises(ReplayError, deliver, 100)
        # 199 behind: too old.
        self.assertRaises(ReplayError, deliver, 0)
        # The newest is still a replay.
        self.assertRaises(ReplayError, deliver, 199)

    def test_sender_refuses_sequence_reuse(self):
        self.sender.protect(rtp_packet(sequence=3))
        with self.assertRaises(SequenceReuseError) as caught:
            self.sender.protect(rtp_packet(sequence=3, payload=b"different"))
        self.assertEqual(caught.exception.reason, "sequence number already used")
        self.assertIsInstance(caught.exception, DoubleError)

    def test_unknown_roc_minus_one_is_rejected(self):
        """A first packet at SEQ 5 makes SEQ 65000 an index below zero."""
        receiver = self.keys.receiver(ssrcs=[0x11223344])
        sender = self.keys.sender()
        receiver.unprotect(sender.protect(rtp_packet(sequence=5)))
        other = self.keys.sender()
        self.assertRaises(ReplayError, receiver.unprotect, other.protect(rtp_packet(sequence=65000)))


# --------------------------------------------------------------------------
# Unknown senders and key management


class SenderKeyTests(SynchronousTestCase):

    def test_unknown_ssrc_until_add_sender_key(self):
        for profile in PROFILES:
            keys = Keys(profile, seed=0x77)
            sender = keys.sender()
            receiver = keys.receiver()
            wire = sender.protect(rtp_packet(ssrc=0xDEAD, sequence=1))
            with self.assertRaises(UnknownSenderError) as caught:
                receiver.unprotect(wire)
            self.assertEqual(caught.exception.ssrc, 0xDEAD)
            self.assertEqual(caught.exception.reason, "unknown sender SSRC")
            # Nothing was consumed: the very same packet works once the key is known.
            receiver.add_sender_key(0xDEAD, keys.inner_key, keys.inner_salt)
            self.assertEqual(receiver.unprotect(wire).packet, rtp_packet(ssrc=0xDEAD, sequence=1))
            self.assertEqual(receiver.known_ssrcs, frozenset([0xDEAD]))
            # Other SSRCs are still unknown.
            self.assertRaises(UnknownSenderError, receiver.unprotect,
                              sender.protect(rtp_packet(ssrc=0xBEEF, sequence=1)))

    def test_unknown_ssrc_reports_ekt_field(self):
        keys = Keys(P128, seed=0x78)
        receiver = keys.receiver(ekt=True)
        field = full_ekt_field(b"\x11" * 24, spi=1, epoch=2)
        wire = keys.sender().protect(rtp_packet(), ekt_field=field)
        with self.assertRaises(UnknownSenderError) as caught:
            receiver.unprotect(wire)
        self.assertEqual(caught.exception.ekt_field, field)
        receiver.add_sender_key(0x11223344, keys.inner_key, keys.inner_salt)
        self.assertEqual(receiver.unprotect(wire).ekt_field, field)

    def test_repeated_key_keeps_replay_state(self):
        keys = Keys(P128, seed=0x79)
        sender, receiver = keys.sender(), keys.receiver(ssrcs=[0x11223344])
        md = MediaDistributor(P128, (keys.hbh_key, keys.hbh_salt), (keys.hbh_key, keys.hbh_salt))
        e2e = md.open(sender.protect(rtp_packet(sequence=9)))
        receiver.unprotect(md.seal(relay_rewrite(e2e, new_seq=100)))
        receiver.add_sender_key(0x11223344, keys.inner_key, keys.inner_salt)
        self.assertRaises(ReplayError, receiver.unprotect, md.seal(relay_rewrite(e2e, new_seq=101)))

    def test_new_key_replaces_old(self):
        keys = Keys(P128, seed=0x7A)
        receiver = keys.receiver(ssrcs=[0x11223344])
        receiver.add_sender_key(0x11223344, b"\x01" * 16, b"\x02" * 12)
        self.assertRaises(InnerAuthenticationError, receiver.unprotect,
                          keys.sender().protect(rtp_packet()))
        receiver.remove_sender(0x11223344)
        self.assertRaises(UnknownSenderError, receiver.unprotect,
                          keys.sender().protect(rtp_packet(sequence=2)))
        receiver.remove_sender(0x11223344)  # no error

    def test_new_hop_by_hop_keys_keep_inner_state(self):
        """
        A rejoin gives new hop-by-hop keys: the outer layer switches, the
        inner key and both sides' sequence and replay state carry on.
        """
        old, new = Keys(P128, seed=0x7B), Keys(P128, seed=0x7C)
        sender, receiver = old.sender(), old.receiver(ssrcs=[0x11223344])
        first = sender.protect(rtp_packet(sequence=1))
        receiver.unprotect(first)
        sender.set_hop_by_hop(new.hbh_key, new.hbh_salt)
        wire = sender.protect(rtp_packet(sequence=2))
        # The old outer key no longer opens it; the new one does.
        self.assertRaises(OuterAuthenticationError, receiver.unprotect, wire)
        receiver.set_hop_by_hop(new.hbh_key, new.hbh_salt)
        self.assertEqual(receiver.unprotect(wire).packet, rtp_packet(sequence=2))
        # Inner replay state survived the switch: packet 1 again, under the
        # new outer key, is refused by the inner layer.
        md = MediaDistributor(P128, (new.hbh_key, new.hbh_salt), (new.hbh_key, new.hbh_salt))
        inner_only = MediaDistributor(P128, (old.hbh_key, old.hbh_salt),
                                      (new.hbh_key, new.hbh_salt))
        replayed = md.seal(relay_rewrite(inner_only.open(first), new_seq=500))
        with self.assertRaises(ReplayError) as caught:
            receiver.unprotect(replayed)
        self.assertEqual(caught.exception.layer, "inner")
        self.assertRaises(ValueError, sender.set_hop_by_hop, b"k" * 32, new.hbh_salt)
        self.assertRaises(ValueError, receiver.set_hop_by_hop, new.hbh_key, b"s" * 14)

    def test_key_validation(self):
        keys = Keys(P256)
        receiver = keys.receiver()
        self.assertRaises(ValueError, receiver.add_sender_key, 1, b"k" * 16, b"s" * 12)
        self.assertRaises(ValueError, receiver.add_sender_key, 1, b"k" * 32, b"s" * 14)
        self.assertRaises(ValueError, receiver.add_sender_key, -1, b"k" * 32, b"s" * 12)
        self.assertRaises(ValueError, receiver.add_sender_key, 1, b"k" * 32, b"s" * 12, roc=1 << 32)
        self.assertRaises(ValueError, DoubleSender, P256, b"k" * 16, b"s" * 12, b"h" * 32, b"t" * 12)
        self.assertRaises(ValueError, DoubleReceiver, P256, b"h" * 32, b"t" * 13)
        self.assertRaises(ValueError, DoubleReceiver, by_id(0x0007), b"h" * 16, b"t" * 12)
        self.assertRaises(ValueError, DoubleReceiver, 0x1234, b"h" * 16, b"t" * 12)
        # Profile ids work as well as Profile objects.
        DoubleReceiver(0x0009, b"h" * 16, b"t" * 12)


# --------------------------------------------------------------------------
# Repair mode


class RepairModeTests(SynchronousTestCase):
    """RFC 8723 sections 5.1 step 2, 5.3 step 2, 7.1: outer layer only."""

    RTX_PT = 97

    def test_sender_repair_packets_are_outer_only(self):
        for profile in PROFILES:
            keys = Keys(profile, seed=0x88)
            sender = keys.sender(repair_payload_types=[self.RTX_PT])
            reference = libsrtp_session(profile, keys.hbh_key, keys.hbh_salt,
                                        _Policy.SSRC_ANY_OUTBOUND)
            repair = rtp_packet(payload_type=self.RTX_PT, ssrc=0x5151, payload=b"\x00\x05repair")
            wire = sender.protect(repair)
            self.assertEqual(wire, reference.protect(repair))
            # Forced either way by the keyword.
            forced = rtp_packet(ssrc=0x5151, sequence=2)
            self.assertEqual(sender.protect(forced, repair=True), reference.protect(forced))
            normal = rtp_packet(payload_type=self.RTX_PT, ssrc=0x5152)
            self.assertEqual(len(sender.protect(normal, repair=False)), len(normal) + 33)

    def test_receiver_returns_repair_packet_without_inner_key(self):
        keys = Keys(P128, seed=0x89)
        receiver = keys.receiver(repair_payload_types=[self.RTX_PT])
        repair = rtp_packet(payload_type=self.RTX_PT, ssrc=0x5151, payload=b"\x00\x05data")
        result = receiver.unprotect(keys.sender(repair_payload_types=[self.RTX_PT]).protect(repair))
        self.assertTrue(result.repair)
        self.assertEqual(result.packet, repair)
        self.assertIsNone(result.ohb)
        self.assertIsNone(result.index)
        self.assertIsNone(result.roc)

    def test_rtx_recovery_through_relay(self):
        """
        The relay caches what it sent (double-encrypted for the receiver),
        retransmits it in an RTX packet protected with the receiver's outer key
        only; the receiver undoes RTX and processes the recovered packet normally.
        """
        keys = Keys(P128, seed=0x8A)
        receiver_hbh = (bytes(range(0x30, 0x40)), bytes(range(0x40, 0x4C)))
        md = MediaDistributor(P128, (keys.hbh_key, keys.hbh_salt), receiver_hbh)
        receiver = keys.receiver(hbh=receiver_hbh, ssrcs=[0x11223344],
                                 repair_payload_types=[self.RTX_PT])
        sender = keys.sender()
        originals = [rtp_packet(sequence=s, timestamp=9000 + s, payload=bytes([s]) * 30)
                     for s in (10, 11, 12)]
        sent = [md.forward(sender.protect(p), new_seq=s) for p, s in zip(originals, (500, 501, 502))]
        receiver.unprotect(sent[0])
        receiver.unprotect(sent[2])  # sent[1] is lost
        lost = sent[1]
        header = parse_rtp_header(lost)
        # RFC 4588: RTX payload = OSN (the SEQ of the cached packet) + its payload.
        rtx = rtp_packet(payload_type=self.RTX_PT, ssrc=0x7777, sequence=1,
                         timestamp=header.timestamp, payload=struct.pack("!H", header.sequence)
                         + lost[header.header_length:])
        rtx_wire = md.seal(rtx)  # outer only, receiver's key
        repaired = receiver.unprotect(rtx_wire)
        self.assertTrue(repaired.repair)
        osn = struct.unpack("!H", repaired.payload[:2])[0]
        recovered = rtp_packet(payload_type=96, ssrc=0x11223344, sequence=osn,
                               timestamp=repaired.header.timestamp, payload=repaired.payload[2:])
        self.assertEqual(recovered, lost)
        result = receiver.unprotect(recovered)
        self.assertEqual(result.packet, originals[1])
        self.assertEqual(result.outer_sequence, 501)


# --------------------------------------------------------------------------
# Malformed input and secrets


class HygieneTests(SynchronousTestCase):

    def test_malformed_packets(self):
        keys = Keys(P128)
        sender = keys.sender()
        receiver = keys.receiver(ssrcs=[0x11223344])
        for bad in (b"", b"\x80\x60\x00", b"\x40" + b"\x00" * 20, b"\x8F" + b"\x00" * 20):
            self.assertRaises(MalformedPacketError, sender.protect, bad)
            self.assertRaises(MalformedPacketError, receiver.unprotect, bad)
        # RFC 8723 section 5.1 step 1: extensions must be RFC 8285.
        with self.assertRaises(MalformedPacketError) as caught:
            sender.protect(rtp_packet(extension=(0x1234, b"\x00" * 4)))
        self.assertIn("RFC 8285", str(caught.exception))
        # Bad padding counts.
        for padding in (b"\x00", b"\x03\x03", b"\x00" * 40):
            packet = rtp_packet(payload=b"", padding=b"x")[:-1] + padding
            self.assertRaises(MalformedPacketError, sender.protect, packet)
        self.assertRaises(OuterAuthenticationError, receiver.unprotect, rtp_packet(payload=b"1"))
        # libsrtp's buffer limit surfaces as a DoubleError too.
        self.assertRaises(OuterProtectError, sender.protect, rtp_packet(payload=b"x" * 1400))

    def test_error_family(self):
        for cls in (OuterAuthenticationError, UnknownSenderError, InnerAuthenticationError,
                    ReplayError, SequenceReuseError, MalformedOhbError, MalformedPacketError,
                    OuterProtectError):
            self.assertTrue(issubclass(cls, DoubleError))
            self.assertTrue(issubclass(cls, ValueError))
            self.assertEqual(cls().reason, cls.REASON)

    def test_keys_never_shown(self):
        for profile in PROFILES:
            keys = Keys(profile, seed=0x99)
            secrets = keys.secrets()
            sender = keys.sender()
            receiver = keys.receiver(ssrcs=[0x11223344])
            wire = sender.protect(rtp_packet(sequence=1))
            result = receiver.unprotect(wire)
            texts = [repr(sender), str(sender), repr(receiver), str(receiver), repr(result)]
            errors = []
            for call in (lambda: receiver.unprotect(wire),
                         lambda: receiver.unprotect(wire[:-1] + bytes([wire[-1] ^ 1])),
                         lambda: sender.protect(rtp_packet(sequence=1)),
                         lambda: keys.receiver().unprotect(sender.protect(rtp_packet(sequence=2))),
                         lambda: DoubleSender(profile, keys.inner_key, keys.inner_salt[:5],
                                              keys.hbh_key, keys.hbh_salt),
                         lambda: receiver.add_sender_key(1, keys.inner_key[:3], keys.inner_salt)):
                try:
                    call()
                except ValueError as e:
                    errors.append(e)
            self.assertEqual(len(errors), 6)
            texts += [str(e) for e in errors] + [repr(e) for e in errors]
            for text in texts:
                for secret in secrets:
                    for form in (secret.hex(), secret.hex().upper(), repr(secret), secret[:6].hex()):
                        self.assertNotIn(form, text)
