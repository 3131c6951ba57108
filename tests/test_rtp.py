"""
Tests for perc.rtp: demultiplexing, RTP/RTCP headers, EKT fields and the
Original Header Block.  Every packet here is built by hand from the RFCs.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from perc import rtp
from perc.rtp import Kind


def rtp_packet(*, payload_type=96, sequence=1, timestamp=2, ssrc=0x11223344, marker=False,
               padding=False, csrcs=(), extension=None, payload=b"\xEE" * 20):
    """An RTP packet; ``extension`` is ``(profile, data)`` with len(data) % 4 == 0."""
    first = 0x80 | (0x20 if padding else 0) | (0x10 if extension else 0) | len(csrcs)
    header = struct.pack("!BBHII", first, (0x80 if marker else 0) | payload_type,
                         sequence, timestamp, ssrc)
    header += b"".join(struct.pack("!I", c) for c in csrcs)
    if extension is not None:
        profile, data = extension
        header += struct.pack("!HH", profile, len(data) // 4) + data
    return header + payload


def rtcp_packet(ssrc=0xCAFEBABE, packet_type=200, length=28):
    """An RTCP packet of ``length`` octets (at least 8) of type ``packet_type``."""
    return struct.pack("!BBHI", 0x80, packet_type, length // 4 - 1, ssrc) + b"\x00" * (length - 8)


class ClassifyTests(SynchronousTestCase):
    """classify follows RFC 7983's first-octet ranges and RFC 5761's RTCP rule."""

    def test_first_octet_ranges(self):
        expected = {}
        for first in range(256):
            if first <= 3:
                expected[first] = Kind.STUN
            elif 16 <= first <= 19:
                expected[first] = Kind.ZRTP
            elif 20 <= first <= 63:
                expected[first] = Kind.DTLS
            elif 64 <= first <= 79:
                expected[first] = Kind.TURN_CHANNEL
            elif 128 <= first <= 191:
                expected[first] = None  # checked below
            else:
                expected[first] = Kind.OTHER
        for first, kind in expected.items():
            datagram = bytes([first]) + b"\x00" * 99
            if kind is None:
                # 100 octets is long enough for any CC, with no extension data.
                self.assertIn(rtp.classify(datagram), (Kind.RTP, Kind.MALFORMED))
            else:
                self.assertIs(rtp.classify(datagram), kind, first)

    def test_empty_is_other(self):
        self.assertIs(rtp.classify(b""), Kind.OTHER)

    def test_one_octet_in_rtp_range_is_malformed(self):
        self.assertIs(rtp.classify(b"\x80"), Kind.MALFORMED)

    def test_rtcp_second_octet_range(self):
        for second in range(256):
            datagram = bytes([0x80, second]) + b"\x00" * 30
            kind = Kind.RTCP if 192 <= second <= 223 else Kind.RTP
            self.assertIs(rtp.classify(datagram), kind, second)

    def test_every_rtcp_length(self):
        """Every RTCP length from 0 to 1500: no exception, MALFORMED below 8 octets."""
        full = rtcp_packet(length=1500)
        for length in range(1501):
            kind = rtp.classify(full[:length])
            if length == 0:
                self.assertIs(kind, Kind.OTHER)
            elif length < 8:
                self.assertIs(kind, Kind.MALFORMED, length)
            else:
                self.assertIs(kind, Kind.RTCP, length)

    def test_every_rtp_length(self):
        full = rtp_packet(payload=b"\x01" * 1500)
        for length in range(1, 1500):
            kind = rtp.classify(full[:length])
            self.assertIs(kind, Kind.RTP if length >= 13 else Kind.MALFORMED, length)

    def test_rtp_needs_one_octet_after_the_header(self):
        self.assertIs(rtp.classify(rtp_packet(payload=b"")), Kind.MALFORMED)
        self.assertIs(rtp.classify(rtp_packet(payload=b"x")), Kind.RTP)

    def test_rtp_csrcs_count(self):
        csrcs = tuple(range(15))
        self.assertIs(rtp.classify(rtp_packet(csrcs=csrcs, payload=b"")), Kind.MALFORMED)
        self.assertIs(rtp.classify(rtp_packet(csrcs=csrcs, payload=b"x")), Kind.RTP)
        # CC=15 claimed, but only 12 + 59 octets.
        self.assertIs(rtp.classify(rtp_packet(csrcs=csrcs, payload=b"")[:71]), Kind.MALFORMED)

    def test_rtp_extension_counts(self):
        extension = (0xBEDE, b"\x10\xAA\x00\x00" * 3)
        self.assertIs(rtp.classify(rtp_packet(extension=extension, payload=b"")),
                      Kind.MALFORMED)
        self.assertIs(rtp.classify(rtp_packet(extension=extension, payload=b"x")), Kind.RTP)
        # X set but the extension header is cut short.
        truncated = rtp_packet(extension=extension, payload=b"")[:15]
        self.assertIs(rtp.classify(truncated), Kind.MALFORMED)
        # Extension length claims more words than the packet holds.
        packet = bytearray(rtp_packet(extension=extension, payload=b"x" * 8))
        packet[14:16] = b"\x00\x06"
        self.assertIs(rtp.classify(bytes(packet)), Kind.MALFORMED)

    def test_bytearray_and_memoryview(self):
        packet = rtp_packet()
        self.assertIs(rtp.classify(bytearray(packet)), Kind.RTP)
        self.assertIs(rtp.classify(memoryview(packet)), Kind.RTP)

    @settings(max_examples=1000)
    @given(st.binary(max_size=200))
    def test_random_bytes(self, data):
        """Never raises, and whatever it calls RTP parses with payload left over."""
        kind = rtp.classify(data)
        self.assertIsInstance(kind, Kind)
        if kind is Kind.RTP:
            header = rtp.parse_rtp_header(data)
            self.assertLess(header.header_length, len(data))
        elif kind is Kind.RTCP:
            rtp.rtcp_ssrc(data)


class RtpHeaderTests(SynchronousTestCase):

    def test_vector(self):
        """A header written out octet by octet."""
        packet = bytes.fromhex(
            "b2"          # V=2 P=1 X=1 CC=2
            "e1"          # M=1 PT=97
            "abcd"        # sequence
            "01020304"    # timestamp
            "deadbeef"    # SSRC
            "00000001" "00000002"  # CSRCs
            "bede0001"    # extension profile, one word
            "10ff0000"    # one-byte header element + padding
            "99")         # payload
        header = rtp.parse_rtp_header(packet)
        self.assertEqual(header, rtp.RtpHeader(
            version=2, padding=True, extension=True, csrc_count=2, marker=True,
            payload_type=97, sequence=0xABCD, timestamp=0x01020304, ssrc=0xDEADBEEF,
            header_length=12 + 8 + 4 + 4, csrcs=(1, 2), extension_profile=0xBEDE))

    def test_minimal(self):
        header = rtp.parse_rtp_header(rtp_packet(payload=b""))
        self.assertEqual(header.header_length, 12)
        self.assertFalse(header.extension)
        self.assertIsNone(header.extension_profile)
        self.assertEqual(header.csrcs, ())

    def assertRtpError(self, packet, words):
        error = self.assertRaises(rtp.RtpError, rtp.parse_rtp_header, packet)
        self.assertIsInstance(error, ValueError)
        self.assertIn(words, error.reason)

    def test_errors(self):
        self.assertRtpError(b"", "shorter than the 12-octet header")
        self.assertRtpError(rtp_packet()[:11], "shorter than the 12-octet header")
        self.assertRtpError(b"\x40" + rtp_packet()[1:], "version 1")
        self.assertRtpError(rtp_packet(csrcs=(1, 2, 3), payload=b"")[:23], "CSRCs")
        self.assertRtpError(rtp_packet(extension=(0xBEDE, b""), payload=b"")[:15],
                            "extension header")
        packet = bytearray(rtp_packet(extension=(0xBEDE, b"\x00" * 4), payload=b""))
        packet[15] = 2
        self.assertRtpError(bytes(packet), "does not fit")

    @given(payload_type=st.integers(0, 127), sequence=st.integers(0, 0xFFFF),
           timestamp=st.integers(0, 0xFFFFFFFF), ssrc=st.integers(0, 0xFFFFFFFF),
           marker=st.booleans(), padding=st.booleans(),
           csrcs=st.lists(st.integers(0, 0xFFFFFFFF), max_size=15).map(tuple),
           extension=st.none() | st.tuples(
               st.integers(0, 0xFFFF),
               st.lists(st.binary(min_size=4, max_size=4), max_size=8).map(b"".join)),
           payload=st.binary(max_size=40))
    def test_round_trip(self, **fields):
        """Fields written by the test's builder are the fields parsed."""
        packet = rtp_packet(**fields)
        header = rtp.parse_rtp_header(packet)
        extension = fields["extension"]
        length = 12 + 4 * len(fields["csrcs"]) + (0 if extension is None
                                                  else 4 + len(extension[1]))
        self.assertEqual(header, rtp.RtpHeader(
            version=2, padding=fields["padding"], extension=extension is not None,
            csrc_count=len(fields["csrcs"]), marker=fields["marker"],
            payload_type=fields["payload_type"], sequence=fields["sequence"],
            timestamp=fields["timestamp"], ssrc=fields["ssrc"], header_length=length,
            csrcs=fields["csrcs"],
            extension_profile=None if extension is None else extension[0]))
        self.assertEqual(packet[header.header_length:], fields["payload"])

    @settings(max_examples=500)
    @given(st.binary(max_size=100))
    def test_random_bytes(self, data):
        try:
            header = rtp.parse_rtp_header(data)
        except rtp.RtpError:
            return
        self.assertLessEqual(header.header_length, len(data))


class RtcpTests(SynchronousTestCase):

    def test_sender_ssrc(self):
        for packet_type in (200, 201, 202, 203, 204, 205, 206):
            self.assertEqual(rtp.rtcp_ssrc(rtcp_packet(0x01020304, packet_type)), 0x01020304)

    def test_errors(self):
        self.assertRaises(rtp.RtpError, rtp.rtcp_ssrc, rtcp_packet()[:7])
        self.assertRaises(rtp.RtpError, rtp.rtcp_ssrc, b"\x40" + rtcp_packet()[1:])
        self.assertRaises(rtp.RtpError, rtp.rtcp_ssrc, rtcp_packet(packet_type=96))

    @given(st.binary(max_size=40))
    def test_random_bytes(self, data):
        try:
            rtp.rtcp_ssrc(data)
        except rtp.RtpError:
            pass


SRTP = rtp_packet(payload=b"\x55" * 30)


class EktFieldTests(SynchronousTestCase):

    def test_short_field(self):
        self.assertEqual(rtp.SHORT_EKT_FIELD, b"\x00")
        self.assertEqual(rtp.split_ekt_field(SRTP + b"\x00"), (SRTP, b"\x00"))

    def test_full_field_vector(self):
        """
        EKTMsgLength counts the whole FullEKTField: 8 octets of ciphertext,
        SPI, Epoch, EKTMsgLength and the type octet make 8 + 7 = 15.
        """
        field = bytes.fromhex("aaaaaaaaaaaaaaaa" "1234" "0001" "000f" "02")
        self.assertEqual(rtp.full_ekt_field(b"\xAA" * 8, 0x1234, 1), field)
        self.assertEqual(rtp.split_ekt_field(SRTP + field), (SRTP, field))
        self.assertEqual(rtp.parse_full_ekt_field(field),
                         rtp.FullEktField(b"\xAA" * 8, 0x1234, 1))
        self.assertEqual(rtp.FullEktField(b"\xAA" * 8, 0x1234, 1).encode(), field)

    def test_join(self):
        self.assertEqual(rtp.join_ekt_field(SRTP, b"\x00"), SRTP + b"\x00")

    def test_full_field_may_fill_all_but_a_header(self):
        header = SRTP[:12]
        field = rtp.full_ekt_field(b"\x01" * 20, 1, 2)
        self.assertEqual(rtp.split_ekt_field(header + field), (header, field))
        self.assertRaises(rtp.EktFieldError, rtp.split_ekt_field, header[:11] + field)
        self.assertEqual(rtp.split_ekt_field(header + b"\x00"), (header, b"\x00"))
        self.assertRaises(rtp.EktFieldError, rtp.split_ekt_field, header[:11] + b"\x00")

    def test_unknown_types(self):
        for message_type in (0x01, 0x03, 0x7F, 0xFF):
            error = self.assertRaises(rtp.EktFieldError, rtp.split_ekt_field,
                                      SRTP + b"\x00\x08" + bytes([message_type]))
            self.assertIsInstance(error, ValueError)

    def test_bad_lengths(self):
        for length in (0, 1, 6, 7):
            # Shorter than the fixed part plus one octet of ciphertext.
            field = b"\xAA" * 8 + struct.pack("!HHHB", 1, 1, length, 2)
            self.assertRaises(rtp.EktFieldError, rtp.split_ekt_field, SRTP + field)
        field = b"\xAA" + struct.pack("!HHHB", 1, 1, len(SRTP) - 12 + 9, 2)
        self.assertRaises(rtp.EktFieldError, rtp.split_ekt_field, SRTP + field)
        self.assertRaises(rtp.EktFieldError, rtp.split_ekt_field,
                          SRTP + b"\xAA" + struct.pack("!HHHB", 1, 1, 0xFFFF, 2))
        for short in (b"", b"\x02", b"\x00\x02"):
            self.assertRaises(rtp.EktFieldError, rtp.split_ekt_field, short)

    def test_builder_arguments(self):
        self.assertRaises(rtp.EktFieldError, rtp.full_ekt_field, b"", 1, 1)
        self.assertRaises(rtp.EktFieldError, rtp.full_ekt_field, b"x" * (0xFFFF - 6), 1, 1)
        self.assertEqual(len(rtp.full_ekt_field(b"x" * (0xFFFF - 7), 1, 1)), 0xFFFF)
        self.assertRaises(rtp.EktFieldError, rtp.full_ekt_field, b"x", 0x10000, 1)
        self.assertRaises(rtp.EktFieldError, rtp.full_ekt_field, b"x", 1, -1)

    def test_parse_full_errors(self):
        field = rtp.full_ekt_field(b"x" * 8, 1, 1)
        self.assertRaises(rtp.EktFieldError, rtp.parse_full_ekt_field, b"\x00")
        self.assertRaises(rtp.EktFieldError, rtp.parse_full_ekt_field, field[1:])
        self.assertRaises(rtp.EktFieldError, rtp.parse_full_ekt_field, b"\xFF" + field)

    @given(st.binary(min_size=12, max_size=200), st.binary(min_size=1, max_size=300),
           st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
    def test_round_trip_full(self, srtp, ciphertext, spi, epoch):
        field = rtp.full_ekt_field(ciphertext, spi, epoch)
        self.assertEqual(rtp.split_ekt_field(rtp.join_ekt_field(srtp, field)), (srtp, field))
        self.assertEqual(rtp.parse_full_ekt_field(field),
                         rtp.FullEktField(ciphertext, spi, epoch))

    @given(st.binary(min_size=12, max_size=200))
    def test_round_trip_short(self, srtp):
        joined = rtp.join_ekt_field(srtp, rtp.SHORT_EKT_FIELD)
        self.assertEqual(rtp.split_ekt_field(joined), (srtp, rtp.SHORT_EKT_FIELD))

    @settings(max_examples=1000)
    @given(st.binary(max_size=100))
    def test_random_bytes(self, data):
        try:
            srtp, field = rtp.split_ekt_field(data)
        except rtp.EktFieldError:
            return
        self.assertEqual(srtp + field, data)
        self.assertGreaterEqual(len(srtp), 12)
        if field != b"\x00":
            rtp.parse_full_ekt_field(field)


ohbs = st.builds(rtp.Ohb, st.none() | st.integers(0, 127), st.none() | st.integers(0, 0xFFFF),
                 st.none() | st.booleans())


class OhbTests(SynchronousTestCase):
    """RFC 8723 section 4: ``[PT] [SEQ] Config``, Config = ``R R R R B M P Q``."""

    def test_vectors(self):
        # Worked out from section 4: P=0x02, Q=0x01, M=0x04, B=0x08.
        vectors = [
            (rtp.Ohb(), "00"),
            (rtp.Ohb(marker=False), "04"),
            (rtp.Ohb(marker=True), "0c"),
            (rtp.Ohb(payload_type=96), "6002"),
            (rtp.Ohb(sequence=0x1234), "123401"),
            (rtp.Ohb(payload_type=0, sequence=0), "00000003"),
            (rtp.Ohb(payload_type=96, sequence=0x1234, marker=True), "6012340f"),
            (rtp.Ohb(payload_type=111, sequence=0xFFFE, marker=False), "6ffffe07"),
        ]
        for ohb, hex_form in vectors:
            encoded = bytes.fromhex(hex_form)
            self.assertEqual(ohb.encode(), encoded)
            self.assertEqual(ohb.size, len(encoded))
            self.assertEqual(rtp.parse_ohb(encoded), ohb)
            # Parsed from the end, behind inner ciphertext and tag.
            self.assertEqual(rtp.split_ohb(b"\xC0" * 20 + encoded), (b"\xC0" * 20, ohb))
        self.assertEqual(rtp.EMPTY_OHB, rtp.Ohb().encode())

    def test_every_config_octet(self):
        """Valid exactly when the reserved bits are zero and B is not set without M."""
        valid = 0
        for config in range(256):
            data = b"\x11" * 3 + bytes([config])
            if config & 0xF0 or (config & 0x0C) == 0x08:
                self.assertRaises(rtp.OhbError, rtp.parse_ohb, data)
            else:
                ohb = rtp.parse_ohb(data)
                self.assertEqual(ohb.config, config)
                valid += 1
        self.assertEqual(valid, 12)

    def test_truncated(self):
        self.assertRaises(rtp.OhbError, rtp.parse_ohb, b"")
        self.assertRaises(rtp.OhbError, rtp.parse_ohb, b"\x12\x03")
        self.assertRaises(rtp.OhbError, rtp.parse_ohb, b"\x12\x01")
        self.assertEqual(rtp.parse_ohb(b"\x12\x02"), rtp.Ohb(payload_type=0x12))

    def test_payload_type_octet_above_127(self):
        error = self.assertRaises(rtp.OhbError, rtp.parse_ohb, b"\x80\x02")
        self.assertIsInstance(error, ValueError)

    def test_construction_checks(self):
        self.assertRaises(rtp.OhbError, rtp.Ohb, payload_type=128)
        self.assertRaises(rtp.OhbError, rtp.Ohb, payload_type=-1)
        self.assertRaises(rtp.OhbError, rtp.Ohb, sequence=0x10000)
        self.assertRaises(rtp.OhbError, rtp.Ohb, marker=1)

    def test_restore(self):
        self.assertEqual(rtp.Ohb().restore(96, 7, True), (96, 7, True))
        self.assertEqual(rtp.Ohb(payload_type=100, sequence=3, marker=False).restore(96, 7, True),
                         (100, 3, False))

    def test_reflect(self):
        """Section 5.2 step 3, over two Media Distributors."""
        received = (96, 1000, False)
        # First MD renumbers: the original SEQ goes into the OHB.
        first = rtp.Ohb().reflect(received, (96, 5, False))
        self.assertEqual(first, rtp.Ohb(sequence=1000))
        # Second MD renumbers again: the OHB already holds the original.
        second = first.reflect((96, 5, False), (96, 9, True))
        self.assertEqual(second, rtp.Ohb(sequence=1000, marker=False))
        # A third puts everything back: the OHB empties.
        self.assertEqual(second.reflect((96, 9, True), received), rtp.Ohb())
        # No change: no change to the OHB.
        self.assertEqual(second.reflect((96, 9, True), (96, 9, True)), second)

    @given(ohbs, st.binary(max_size=40))
    def test_round_trip(self, ohb, prefix):
        encoded = ohb.encode()
        self.assertEqual(len(encoded), ohb.size)
        self.assertEqual(rtp.split_ohb(prefix + encoded), (prefix, ohb))

    @settings(max_examples=1000)
    @given(st.binary(max_size=8))
    def test_random_bytes(self, data):
        try:
            rest, ohb = rtp.split_ohb(data)
        except rtp.OhbError:
            return
        self.assertEqual(rest + ohb.encode(), data)
