"""
perc.kd.sealing: the sealing-key file (created 0600, refused when it is not
32 octets or group/others may access it, one line each) and AEAD sealing
bound to a row.
"""

from __future__ import annotations

import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from perc.errors import ConfigError
from perc.kd.sealing import SEALING_KEY_LENGTH, SealingError, SealingKey


class SealingKeyFileTests(SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "perc-kd.sealing-key")

    def assertOneLine(self, error: ConfigError, text: str):
        self.assertIn(text, str(error))
        self.assertIn(self.path, str(error))
        self.assertNotIn("\n", str(error))

    def test_created_with_mode_0600_and_read_back(self):
        key = SealingKey.load_or_create(self.path)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(os.path.getsize(self.path), SEALING_KEY_LENGTH)
        sealed = key.seal(b"secret", "t", ("row",))
        self.assertEqual(SealingKey.load_or_create(self.path).open(sealed, "t", ("row",)),
                         b"secret")
        with open(self.path, "rb") as handle:
            data = handle.read()
        self.assertNotIn(data.hex(), repr(key))
        self.assertIn(self.path, repr(key))

    def test_wrong_length_refused(self):
        for data in (b"", b"k" * 31, b"k" * 33):
            with open(self.path, "wb") as handle:
                handle.write(data)
            os.chmod(self.path, 0o600)
            error = self.assertRaises(ConfigError, SealingKey.load_or_create, self.path)
            self.assertOneLine(error, "is not 32 octets")

    def test_group_or_other_access_refused(self):
        SealingKey.load_or_create(self.path)
        for mode in (0o640, 0o604, 0o620):
            os.chmod(self.path, mode)
            error = self.assertRaises(ConfigError, SealingKey.load_or_create, self.path)
            self.assertOneLine(error, "may be accessed by group or others (mode {:04o})".format(
                mode))

    def test_missing_directory_refused(self):
        self.path = os.path.join(self.dir, "missing", "key")
        error = self.assertRaises(ConfigError, SealingKey.load_or_create, self.path)
        self.assertOneLine(error, "cannot create sealing key")


class SealTests(SynchronousTestCase):
    def test_bound_to_table_and_row_and_key(self):
        key = SealingKey.generate()
        sealed = key.seal(b"material", "conference_keys", ("conf", 7, 1, 3600, 1.5))
        self.assertEqual(key.open(sealed, "conference_keys", ("conf", 7, 1, 3600, 1.5)),
                         b"material")
        for table, row in [("associations", ("conf", 7, 1, 3600, 1.5)),
                           ("conference_keys", ("other", 7, 1, 3600, 1.5)),
                           ("conference_keys", ("conf", 8, 1, 3600, 1.5)),
                           ("conference_keys", ("conf", 7, 1, 3600, 2.5)),
                           ("conference_keys", ("conf", "7", 1, 3600, 1.5)),
                           ("conference_keys", ("conf7", 1, 3600, 1.5))]:
            self.assertRaises(SealingError, key.open, sealed, table, row)
        self.assertRaises(SealingError, SealingKey.generate().open, sealed, "conference_keys",
                          ("conf", 7, 1, 3600, 1.5))
        tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
        self.assertRaises(SealingError, key.open, tampered, "conference_keys",
                          ("conf", 7, 1, 3600, 1.5))
        self.assertRaises(SealingError, key.open, b"\x01short", "t", ())

    def test_fresh_nonce_each_seal(self):
        key = SealingKey.generate()
        self.assertNotEqual(key.seal(b"same", "t", (1,)), key.seal(b"same", "t", (1,)))
