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


def rtcp_part(packet_type, count=0, body=b"", padding=0):
    """One RTCP packet: header, then ``body`` (a multiple of 4), then ``padding`` octets."""
    if padding:
        body += b"\x00" * (padding - 1) + bytes([padding])
    return struct.pack("!BBH", 0x80 | (0x20 if padding else 0) | count, packet_type,
                       len(body) // 4) + body


def feedback(packet_type, fmt, sender, media, fci=b""):
    """An RTPFB or PSFB packet (RFC 4585 section 6.1)."""
    return rtcp_part(packet_type, fmt, struct.pack("!II", sender, media) + fci)


SR = rtcp_part(200, 0, struct.pack("!IQIII", 0xA1, 1 << 32, 960, 3, 300))
SDES = rtcp_part(202, 1, struct.pack("!I", 0xA1) + b"\x01\x02ab\x00\x00\x00\x00")
BYE = rtcp_part(203, 1, struct.pack("!I", 0xA1))
PLI = feedback(206, 1, 0xA1, 0xB2)
NACK = feedback(205, 1, 0xA1, 0xC3, struct.pack("!HH", 100, 0x0005))
#: FIR (RFC 5104 section 4.3.1.1): media source 0, then SSRC, seq nr, 3 reserved.
FIR = feedback(206, 4, 0xA1, 0, struct.pack("!IB3x", 0xB2, 7) + struct.pack("!IB3x", 0xD4, 9))


class RtcpCompoundTests(SynchronousTestCase):
    """parse_rtcp_compound walks RFC 3550 compounds and finds whom feedback is about."""

    def test_compound_of_every_kind(self):
        compound = SR + SDES + PLI + NACK + FIR + BYE
        parts = rtp.parse_rtcp_compound(compound)
        self.assertEqual([p.packet_type for p in parts], [200, 202, 206, 205, 206, 203])
        self.assertEqual([p.count for p in parts], [0, 1, 1, 1, 4, 1])
        self.assertEqual(b"".join(compound[p.start:p.end] for p in parts), compound)
        self.assertEqual([compound[p.start:p.end] for p in parts], [SR, SDES, PLI, NACK, FIR, BYE])
        self.assertEqual([p.media_ssrcs for p in parts],
                         [(), (), (0xB2,), (0xC3,), (0xB2, 0xD4), ()])

    def test_reduced_size_and_bytes_like(self):
        # RFC 5506: feedback alone is a packet of its own.
        for packet in (PLI, bytearray(PLI), memoryview(PLI)):
            (part,) = rtp.parse_rtcp_compound(packet)
            self.assertEqual(part, rtp.RtcpPacket(206, 1, 0, 12, (0xB2,)))

    def test_rfc_5104_entries(self):
        tmmbr = feedback(205, 3, 0xA1, 0, struct.pack("!II", 0xB2, 0x12345678))
        tmmbn = feedback(205, 4, 0xA1, 0, struct.pack("!II", 0xE5, 0) * 2)
        tstr = feedback(206, 5, 0xA1, 0, struct.pack("!IB2xB", 0xB2, 1, 3))
        tstn = feedback(206, 6, 0xA1, 0, struct.pack("!IB2xB", 0xE5, 1, 3))
        vbcm = feedback(206, 7, 0xA1, 0, struct.pack("!IBBH", 0xB2, 1, 96, 5) + b"abcde\x00\x00\x00"
                        + struct.pack("!IBBH", 0xD4, 2, 96, 0))
        got = [p.media_ssrcs for p in rtp.parse_rtcp_compound(tmmbr + tmmbn + tstr + tstn + vbcm)]
        self.assertEqual(got, [(0xB2,), (0xE5, 0xE5), (0xB2,), (0xE5,), (0xB2, 0xD4)])

    def test_remb_names_its_ssrcs(self):
        remb = feedback(206, 15, 0xA1, 0, b"REMB" + bytes([2, 0x12, 0x34, 0x56])
                        + struct.pack("!II", 0xB2, 0xD4))
        self.assertEqual(rtp.parse_rtcp_compound(remb)[0].media_ssrcs, (0xB2, 0xD4))
        other_afb = feedback(206, 15, 0xA1, 0xB2, b"ABCD")
        self.assertEqual(rtp.parse_rtcp_compound(other_afb)[0].media_ssrcs, (0xB2,))

    def test_padding_on_the_last_packet(self):
        padded = feedback(206, 4, 0xA1, 0, struct.pack("!IB3x", 0xB2, 1))
        padded = rtcp_part(206, 4, padded[4:], padding=4)
        parts = rtp.parse_rtcp_compound(SR + padded)
        self.assertEqual(parts[1].media_ssrcs, (0xB2,))
        self.assertEqual(parts[1].end, len(SR + padded))

    def test_malformed(self):
        padded_sr = rtcp_part(200, 0, SR[4:], padding=4)
        bad = {
            "empty": b"",
            "short header": SR[:3],
            "trailing octets": SR + b"\x80\xc8",
            "length past the end": SR[:-4],
            "second part version 1": SR + b"\x40" + SDES[1:],
            "second part not RTCP": SR + SDES[:1] + b"\x60" + SDES[2:],
            "padding not on the last": padded_sr + SDES,
            "padding count 0": padded_sr[:-1] + b"\x00",
            "padding count too big": padded_sr[:-1] + bytes([len(padded_sr) - 3]),
            "feedback without media source": rtcp_part(206, 1, struct.pack("!I", 0xA1)),
            "FIR entry cut": feedback(206, 4, 0xA1, 0, struct.pack("!I", 0xB2)),
            "FIR without entries": feedback(206, 4, 0xA1, 0),
            "VBCM entry past the FCI": feedback(206, 7, 0xA1, 0, struct.pack("!IBBH", 1, 1, 96, 9)
                                                + b"abcd"),
            "REMB lists more than it holds": feedback(
                206, 15, 0xA1, 0, b"REMB" + bytes([3, 0, 0, 0]) + struct.pack("!II", 1, 2)),
        }
        for name, packet in bad.items():
            with self.assertRaises(rtp.RtpError, msg=name):
                rtp.parse_rtcp_compound(packet)

    @given(st.lists(st.sampled_from([SR, SDES, BYE, PLI, NACK, FIR]), min_size=1, max_size=8))
    def test_any_sequence_of_parts(self, packets):
        compound = b"".join(packets)
        parts = rtp.parse_rtcp_compound(compound)
        self.assertEqual([compound[p.start:p.end] for p in parts], packets)

    @given(st.binary(max_size=80))
    @settings(max_examples=500)
    def test_random_bytes(self, data):
        for packet in (data, b"\x80\xce\x00\x02" + data, SR + data):
            try:
                parts = rtp.parse_rtcp_compound(packet)
            except rtp.RtpError:
                continue
            self.assertEqual(parts[-1].end, len(packet))


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
