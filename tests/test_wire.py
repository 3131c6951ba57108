"""
Tests for perc.wire, the tunnel message codec.
"""

import dataclasses
import struct
import uuid

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from perc import wire

AID = uuid.UUID("0123456789abcdef0123456789abcdef")
AID_HEX = "0123456789abcdef0123456789abcdef"

uuids = st.builds(lambda b: uuid.UUID(bytes=b), st.binary(min_size=16, max_size=16))
keys = st.binary(min_size=1, max_size=255)

messages = st.one_of(
    st.builds(wire.SupportedProfiles, st.just(0),
              st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=64).map(tuple)),
    st.builds(wire.NewerSupportedProfiles, st.integers(1, 255), st.binary(max_size=64)),
    st.builds(wire.UnsupportedVersion, st.integers(0, 255)),
    st.builds(wire.MediaKeys, uuids, st.integers(0, 0xFFFF), st.binary(max_size=255),
              keys, keys, keys, keys),
    st.builds(wire.TunneledDtls, uuids, st.binary(min_size=1, max_size=2000)),
    st.builds(wire.EndpointDisconnect, uuids),
)


class TestVectors(SynchronousTestCase):
    """Known encodings, both ways."""

    def assertBothWays(self, message, hex_encoding):
        encoded = bytes.fromhex(hex_encoding)
        self.assertEqual(message.encode(), encoded)
        self.assertEqual(wire.decode_message(encoded), message)
        self.assertEqual(wire.decode(encoded[0], encoded[3:]), message)

    def test_rfc_supported_profiles_vector(self):
        """The test vector of draft -05 and RFC 9185."""
        self.assertBothWays(wire.SupportedProfiles(0, (0x0009, 0x000A)), "0100070000040009000A")

    def test_newer_supported_profiles(self):
        """Any version but 0: only the version octet is read, whatever follows."""
        # A newer version's body with a field version 0 does not have.
        self.assertBothWays(wire.NewerSupportedProfiles(1, bytes.fromhex("00040009000AFFEE")),
                            "01000901" "00040009000AFFEE")
        self.assertBothWays(wire.NewerSupportedProfiles(1), "01000101")
        self.assertBothWays(wire.NewerSupportedProfiles(255, b"\x00"), "010002FF00")

    def test_unsupported_version(self):
        self.assertBothWays(wire.UnsupportedVersion(0), "02000100")
        self.assertBothWays(wire.UnsupportedVersion(7), "02000107")

    def test_media_keys(self):
        message = wire.MediaKeys(AID, 0x0009, b"\x77", b"\x01" * 16, b"\x02" * 16,
                                 b"\x03" * 12, b"\x04" * 12)
        body = (AID_HEX + "0009" + "0177" + "10" + "01" * 16 + "10" + "02" * 16
                + "0c" + "03" * 12 + "0c" + "04" * 12)
        self.assertBothWays(message, "03{:04x}".format(len(body) // 2) + body)

    def test_media_keys_empty_mki(self):
        message = wire.MediaKeys(AID, 0x0007, b"", b"k", b"K", b"s", b"S")
        body = AID_HEX + "0007" + "00" + "016b" + "014b" + "0173" + "0153"
        self.assertEqual(len(body) // 2, 16 + 2 + 1 + 4 * 2)
        self.assertBothWays(message, "03001b" + body)

    def test_tunneled_dtls(self):
        record = bytes.fromhex("16fefd0000000000000000000301020304")
        message = wire.TunneledDtls(AID, record)
        self.assertBothWays(message, "040023" + AID_HEX + "0011" + record.hex())

    def test_endpoint_disconnect(self):
        self.assertBothWays(wire.EndpointDisconnect(AID), "050010" + AID_HEX)

    def test_media_keys_repr_hides_keys(self):
        message = wire.MediaKeys(AID, 9, b"", b"\xaa" * 16, b"\xbb" * 16, b"\xcc" * 12, b"\xdd" * 12)
        text = repr(message) + str(message)
        for secret in (b"\xaa" * 16, b"\xbb" * 16, b"\xcc" * 12, b"\xdd" * 12):
            self.assertNotIn(secret.hex(), text)
            self.assertNotIn(repr(secret), text)
        self.assertIn(str(AID), text)

    def test_messages_are_immutable(self):
        message = wire.EndpointDisconnect(AID)
        with self.assertRaises(dataclasses.FrozenInstanceError):
            message.association_id = uuid.uuid4()


class DecodeErrors(SynchronousTestCase):
    """Every malformed input raises WireError with a precise reason."""

    def assertReason(self, msg_type, body_hex, fragment):
        with self.assertRaises(wire.WireError) as caught:
            wire.decode(msg_type, bytes.fromhex(body_hex))
        self.assertIn(fragment, caught.exception.reason)

    def test_reserved_types(self):
        for msg_type in [0x00] + list(range(0x06, 0x100)):
            self.assertReason(msg_type, "", "unknown or reserved message type 0x{:02X}".format(msg_type))

    def test_profiles_odd_length(self):
        self.assertReason(1, "0000030009000A", "not an even number")

    def test_profiles_too_short(self):
        self.assertReason(1, "000000", "not an even number of at least 2")

    def test_profiles_length_beyond_body(self):
        self.assertReason(1, "0000060009000A", "body ends inside protection_profiles")

    def test_trailing_octets(self):
        self.assertReason(1, "0000040009000AFF", "1 trailing octets")
        self.assertReason(2, "0000", "1 trailing octets")
        self.assertReason(5, AID_HEX + "00", "1 trailing octets")

    def test_empty_supported_profiles(self):
        self.assertReason(1, "", "body ends inside version")

    def test_empty_unsupported_version(self):
        self.assertReason(2, "", "body ends inside highest_version")

    def test_short_uuid(self):
        self.assertReason(5, AID_HEX[:30], "body ends inside association_id")
        self.assertReason(4, AID_HEX[:-2], "body ends inside association_id")

    def test_media_keys_zero_length_key(self):
        body = AID_HEX + "0009" + "00" + "00" + "01ff" + "01ff" + "01ff"
        self.assertReason(3, body, "client_key length 0 below minimum 1")

    def test_media_keys_zero_length_salt(self):
        body = AID_HEX + "0009" + "00" + "01ff" + "01ff" + "01ff" + "00"
        self.assertReason(3, body, "server_salt length 0 below minimum 1")

    def test_media_keys_truncated_key(self):
        body = AID_HEX + "0009" + "00" + "10" + "01" * 15
        self.assertReason(3, body, "body ends inside client_key")

    def test_tunneled_dtls_empty(self):
        self.assertReason(4, AID_HEX + "0000", "dtls_message length 0 below minimum 1")

    def test_tunneled_dtls_short(self):
        self.assertReason(4, AID_HEX + "0005" + "01020304", "body ends inside dtls_message")

    def test_reason_names_message(self):
        with self.assertRaises(wire.WireError) as caught:
            wire.decode(4, bytes.fromhex(AID_HEX + "0000"))
        self.assertTrue(caught.exception.reason.startswith("TunneledDtls: "))

    def test_body_longer_than_16_bits(self):
        self.assertReason(4, "00" * 65536, "exceeds the 16-bit length")

    def test_decode_message_length_mismatch(self):
        with self.assertRaises(wire.WireError) as caught:
            wire.decode_message(bytes.fromhex("0100080000040009000A"))
        self.assertIn("header says 8 body octets, message has 7", caught.exception.reason)
        with self.assertRaises(wire.WireError):
            wire.decode_message(b"\x01\x00")


class EncodeRefusals(SynchronousTestCase):
    """Values that cannot be represented are refused at construction."""

    def test_dtls_message_too_long(self):
        wire.TunneledDtls(AID, b"\x16" * wire.MAX_DTLS_MESSAGE_LENGTH)
        self.assertEqual(wire.MAX_DTLS_MESSAGE_LENGTH, 65517)
        with self.assertRaises(wire.WireError):
            wire.TunneledDtls(AID, b"\x16" * (wire.MAX_DTLS_MESSAGE_LENGTH + 1))

    def test_longest_dtls_message_round_trips(self):
        message = wire.TunneledDtls(AID, b"\x17" * wire.MAX_DTLS_MESSAGE_LENGTH)
        encoded = message.encode()
        self.assertEqual(struct.unpack("!H", encoded[1:3])[0], 65535)
        self.assertEqual(wire.decode_message(encoded), message)

    def test_empty_dtls_message(self):
        with self.assertRaises(wire.WireError):
            wire.TunneledDtls(AID, b"")

    def test_key_lengths(self):
        with self.assertRaises(wire.WireError):
            wire.MediaKeys(AID, 9, b"", b"", b"k", b"s", b"s")
        with self.assertRaises(wire.WireError):
            wire.MediaKeys(AID, 9, b"", b"k" * 256, b"k", b"s", b"s")
        with self.assertRaises(wire.WireError):
            wire.MediaKeys(AID, 9, b"m" * 256, b"k", b"k", b"s", b"s")
        with self.assertRaises(wire.WireError):
            wire.MediaKeys(AID, 9, b"", b"k", b"k", b"s", b"")

    def test_profile_range(self):
        with self.assertRaises(wire.WireError):
            wire.MediaKeys(AID, 0x10000, b"", b"k", b"k", b"s", b"s")
        with self.assertRaises(wire.WireError):
            wire.SupportedProfiles(0, (0x10000,))
        with self.assertRaises(wire.WireError):
            wire.SupportedProfiles(0, (-1,))

    def test_profile_list_bounds(self):
        with self.assertRaises(wire.WireError):
            wire.SupportedProfiles(0, ())
        wire.SupportedProfiles(0, (1,) * 32766)
        with self.assertRaises(wire.WireError):
            wire.SupportedProfiles(0, (1,) * 32767)

    def test_version_range(self):
        with self.assertRaises(wire.WireError):
            wire.NewerSupportedProfiles(256)
        with self.assertRaises(wire.WireError):
            wire.NewerSupportedProfiles(0, b"\x00\x02\x00\x09")
        with self.assertRaises(wire.WireError):
            wire.UnsupportedVersion(-1)

    def test_supported_profiles_is_version_0_only(self):
        # A version-0 body under another number would lie about its format.
        for version in (1, 255):
            with self.assertRaises(wire.WireError):
                wire.SupportedProfiles(version, (9,))

    def test_association_id_type(self):
        with self.assertRaises(wire.WireError):
            wire.EndpointDisconnect(AID.bytes)


class Properties(SynchronousTestCase):
    @given(messages)
    def test_round_trip(self, message):
        encoded = message.encode()
        self.assertEqual(struct.unpack("!H", encoded[1:3])[0], len(encoded) - 3)
        self.assertEqual(wire.decode_message(encoded), message)

    @settings(max_examples=500)
    @given(st.integers(0, 255), st.binary(max_size=300))
    def test_random_bodies_raise_only_wire_error(self, msg_type, body):
        try:
            message = wire.decode(msg_type, body)
        except wire.WireError as error:
            self.assertTrue(error.reason)
        else:
            # Whatever decodes re-encodes to exactly the same bytes.
            self.assertEqual(message.encode()[3:], body)

    @settings(max_examples=500)
    @given(messages, st.data())
    def test_mutated_messages_raise_only_wire_error(self, message, data):
        encoded = bytearray(message.encode())
        for _ in range(data.draw(st.integers(1, 4))):
            action = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
            if action == "flip" and encoded:
                index = data.draw(st.integers(0, len(encoded) - 1))
                encoded[index] ^= data.draw(st.integers(1, 255))
            elif action == "truncate" and encoded:
                del encoded[data.draw(st.integers(0, len(encoded) - 1)):]
            else:
                encoded += data.draw(st.binary(min_size=1, max_size=8))
        try:
            decoded = wire.decode_message(bytes(encoded))
        except wire.WireError:
            pass
        else:
            self.assertEqual(decoded.encode(), bytes(encoded))
