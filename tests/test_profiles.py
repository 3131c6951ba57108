"""
Tests for perc.profiles: the profile table, key splits and list parsing.
"""

import pylibsrtp
from twisted.trial.unittest import SynchronousTestCase

from perc import profiles
from perc.profiles import ProfileError, by_id, parse_profile_list


class TableTests(SynchronousTestCase):
    def test_lengths(self):
        expected = {
            0x0001: (16, 14, False, 60),
            0x0002: (16, 14, False, 60),
            0x0007: (16, 12, False, 56),
            0x0008: (32, 12, False, 88),
            0x0009: (32, 24, True, 112),
            0x000A: (64, 24, True, 176),
        }
        self.assertEqual(sorted(p.id for p in profiles.PROFILES), sorted(expected))
        for profile_id, (key, salt, double, material) in expected.items():
            profile = by_id(profile_id)
            self.assertEqual((profile.key_length, profile.salt_length, profile.double,
                              profile.keying_material_length), (key, salt, double, material))

    def test_hbh_lengths(self):
        self.assertEqual((by_id(9).hbh_key_length, by_id(9).hbh_salt_length), (16, 12))
        self.assertEqual((by_id(10).hbh_key_length, by_id(10).hbh_salt_length), (32, 12))
        self.assertEqual((by_id(7).hbh_key_length, by_id(7).hbh_salt_length), (16, 12))
        self.assertEqual((by_id(1).hbh_key_length, by_id(1).hbh_salt_length), (16, 14))

    def test_hbh_libsrtp_profile(self):
        """The outer layer of a double profile is plain AEAD GCM of half the key."""
        self.assertEqual(by_id(9).hbh_libsrtp_profile, pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM)
        self.assertEqual(by_id(10).hbh_libsrtp_profile, pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_256_GCM)
        self.assertEqual(by_id(1).hbh_libsrtp_profile, pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80)

    def test_unknown_id(self):
        self.assertIsNone(by_id(0x0003))

    def test_defaults_are_the_double_profiles(self):
        self.assertEqual([p.id for p in profiles.DEFAULT_PROFILES], [0x0009, 0x000A])


class SplitTests(SynchronousTestCase):
    """Splits checked by hand against RFC 5764 section 4.2 and RFC 8723 5.1."""

    def test_split_aead_128(self):
        material = bytes(range(56))
        keys = by_id(7).split(material)
        self.assertEqual(keys.client_key, bytes(range(0, 16)))
        self.assertEqual(keys.server_key, bytes(range(16, 32)))
        self.assertEqual(keys.client_salt, bytes(range(32, 44)))
        self.assertEqual(keys.server_salt, bytes(range(44, 56)))
        self.assertIs(by_id(7).hbh_keys(keys), keys)

    def test_split_double_128(self):
        material = bytes(range(112))
        profile = by_id(9)
        keys = profile.split(material)
        self.assertEqual(keys.client_key, bytes(range(0, 32)))
        self.assertEqual(keys.server_key, bytes(range(32, 64)))
        self.assertEqual(keys.client_salt, bytes(range(64, 88)))
        self.assertEqual(keys.server_salt, bytes(range(88, 112)))
        outer = profile.hbh_keys(keys)
        self.assertEqual(outer.client_key, bytes(range(16, 32)))
        self.assertEqual(outer.server_key, bytes(range(48, 64)))
        self.assertEqual(outer.client_salt, bytes(range(76, 88)))
        self.assertEqual(outer.server_salt, bytes(range(100, 112)))
        inner = profile.inner_keys(keys)
        self.assertEqual(inner.client_key, bytes(range(0, 16)))
        self.assertEqual(inner.server_key, bytes(range(32, 48)))
        self.assertEqual(inner.client_salt, bytes(range(64, 76)))
        self.assertEqual(inner.server_salt, bytes(range(88, 100)))

    def test_split_double_256(self):
        material = bytes(range(176))
        profile = by_id(10)
        outer = profile.hbh_keys(profile.split(material))
        self.assertEqual(outer.client_key, bytes(range(32, 64)))
        self.assertEqual(outer.server_key, bytes(range(96, 128)))
        self.assertEqual(outer.client_salt, bytes(range(140, 152)))
        self.assertEqual(outer.server_salt, bytes(range(164, 176)))

    def test_wrong_material_length(self):
        with self.assertRaises(ProfileError):
            by_id(9).split(bytes(56))

    def test_inner_keys_of_non_double(self):
        with self.assertRaises(ProfileError):
            by_id(7).inner_keys(by_id(7).split(bytes(56)))

    def test_keys_repr_hides_values(self):
        keys = by_id(7).split(b"\xab" * 56)
        self.assertNotIn("abab", repr(keys).lower())
        self.assertNotIn("\\xab", repr(keys))


class ParseTests(SynchronousTestCase):
    def test_names_from_notes(self):
        self.assertEqual(
            [p.id for p in parse_profile_list(
                "SRTP_AEAD_AES_128_GCM,DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM")],
            [0x0007, 0x0009])

    def test_openssl_spellings(self):
        self.assertEqual(
            [p.id for p in parse_profile_list(
                "SRTP_AES128_CM_SHA1_80, SRTP_DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM")],
            [0x0001, 0x000A])

    def test_hex_ids_and_case(self):
        self.assertEqual([p.id for p in parse_profile_list("0x0007, 0X000a,srtp_aead_aes_256_gcm")],
                         [0x0007, 0x000A, 0x0008])

    def test_duplicates_dropped_order_kept(self):
        self.assertEqual([p.id for p in parse_profile_list("0x000A,0x0009,0x000a")], [0x000A, 0x0009])

    def test_unknown_name_lists_valid_ones(self):
        with self.assertRaises(ProfileError) as caught:
            parse_profile_list("SRTP_AEAD_AES_128_GCM,NOPE")
        message = str(caught.exception)
        self.assertIn("'NOPE'", message)
        for profile in profiles.PROFILES:
            self.assertIn(profile.name, message)

    def test_unknown_hex_id(self):
        with self.assertRaises(ProfileError):
            parse_profile_list("0x0003")
        with self.assertRaises(ProfileError):
            parse_profile_list("0xZZ")

    def test_empty(self):
        with self.assertRaises(ProfileError):
            parse_profile_list(" , ")

    def test_format_round_trip(self):
        chosen = parse_profile_list("0x0009,0x0001")
        self.assertEqual(parse_profile_list(profiles.format_profile_list(chosen)), chosen)

    def test_openssl_string(self):
        self.assertEqual(profiles.openssl_srtp_string(parse_profile_list("0x0007,0x0009")),
                         b"SRTP_AEAD_AES_128_GCM:SRTP_DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM")
