"""
Tests for perc.apitoken: API token files and bearer token checks.
"""

import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from perc import apitoken
from perc.apitoken import (
    bearer_token_from_header,
    bearer_token_matches,
    generate_token,
    load_or_create_token,
    read_token,
    tokens_equal,
)
from perc.errors import ConfigError


class TokenFileTests(SynchronousTestCase):
    def setUp(self):
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "api-token")

    def assertOneLineAbout(self, error, *fragments):
        message = str(error)
        self.assertNotIn("\n", message)
        for fragment in fragments:
            self.assertIn(fragment, message)

    def test_created_with_mode_0600(self):
        old_umask = os.umask(0)  # a permissive umask must not widen the mode
        try:
            token = load_or_create_token(self.path)
        finally:
            os.umask(old_umask)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        with open(self.path) as handle:
            self.assertEqual(handle.read().strip(), token)

    def test_created_mode_is_set_at_creation(self):
        """The file is opened exclusively with mode 0600, never chmod-ed later."""
        calls = []
        real_open = os.open

        def spy(path, flags, mode=0o777, *args, **kwargs):
            calls.append((path, flags, mode))
            return real_open(path, flags, mode, *args, **kwargs)

        self.patch(apitoken.os, "open", spy)
        load_or_create_token(self.path)
        self.assertEqual(len(calls), 1)
        path, flags, mode = calls[0]
        self.assertEqual(path, self.path)
        self.assertEqual(mode, 0o600)
        self.assertTrue(flags & os.O_CREAT)
        self.assertTrue(flags & os.O_EXCL)

    def test_token_is_random_and_url_safe(self):
        token = load_or_create_token(self.path)
        self.assertGreaterEqual(len(token), 43)  # 32 octets in base64
        self.assertRegex(token, r"\A[A-Za-z0-9_-]+\Z")
        other = os.path.join(self.directory, "other")
        self.assertNotEqual(load_or_create_token(other), token)
        self.assertNotEqual(generate_token(), generate_token())

    def test_reused(self):
        token = load_or_create_token(self.path)
        self.assertEqual(load_or_create_token(self.path), token)
        self.assertEqual(read_token(self.path), token)

    def test_existing_file_read_and_stripped(self):
        with open(self.path, "w") as handle:
            handle.write("  chosen-by-operator.Token~/+==\n\n")
        self.assertEqual(load_or_create_token(self.path), "chosen-by-operator.Token~/+==")
        self.assertEqual(read_token(self.path), "chosen-by-operator.Token~/+==")

    def test_empty_file_refused(self):
        with open(self.path, "w") as handle:
            handle.write(" \n")
        for function in (load_or_create_token, read_token):
            with self.assertRaises(ConfigError) as caught:
                function(self.path)
            self.assertOneLineAbout(caught.exception, self.path, "empty")

    def test_not_a_token_refused(self):
        for content in (b"two words\n", b"\xff\xfe binary", b"x" * 5000):
            with open(self.path, "wb") as handle:
                handle.write(content)
            with self.assertRaises(ConfigError) as caught:
                read_token(self.path)
            self.assertOneLineAbout(caught.exception, self.path)

    def test_read_missing_file_does_not_create(self):
        with self.assertRaises(ConfigError) as caught:
            read_token(self.path)
        self.assertOneLineAbout(caught.exception, self.path, "No such file")
        self.assertFalse(os.path.exists(self.path))

    def test_missing_directory(self):
        path = os.path.join(self.directory, "absent", "api-token")
        with self.assertRaises(ConfigError) as caught:
            load_or_create_token(path)
        self.assertOneLineAbout(caught.exception, path, "No such file or directory")

    def test_directory_in_the_way(self):
        os.makedirs(self.path)
        with self.assertRaises(ConfigError) as caught:
            load_or_create_token(self.path)
        self.assertOneLineAbout(caught.exception, self.path, "Is a directory")

    def test_permission_denied(self):
        if os.geteuid() == 0:
            raise self.skipTest("root reads files whatever their mode")
        with open(self.path, "w") as handle:
            handle.write("token\n")
        os.chmod(self.path, 0)
        with self.assertRaises(ConfigError) as caught:
            load_or_create_token(self.path)
        self.assertOneLineAbout(caught.exception, self.path, "Permission denied")

    def test_permission_denied_reported(self):
        """Whatever the user, an OS refusal is reported with path and reason."""

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        # Shadow the builtin in the module only, for this test.
        apitoken.open = refuse
        self.addCleanup(delattr, apitoken, "open")
        with self.assertRaises(ConfigError) as caught:
            read_token(self.path)
        self.assertOneLineAbout(caught.exception, self.path, "Permission denied")


class ComparisonTests(SynchronousTestCase):
    def test_tokens_equal(self):
        self.assertTrue(tokens_equal("abc", "abc"))
        self.assertTrue(tokens_equal(b"abc", "abc"))
        self.assertFalse(tokens_equal("abc", "abd"))
        self.assertFalse(tokens_equal("abc", "abcd"))
        self.assertFalse(tokens_equal("", "abc"))

    def test_bearer_token_from_header(self):
        self.assertEqual(bearer_token_from_header(b"Bearer abc"), b"abc")
        self.assertEqual(bearer_token_from_header(b"bearer   abc "), b"abc")
        self.assertEqual(bearer_token_from_header("BEARER abc"), b"abc")
        self.assertIsNone(bearer_token_from_header(None))
        self.assertIsNone(bearer_token_from_header(b"Basic abc"))
        self.assertIsNone(bearer_token_from_header(b"Bearer"))
        self.assertIsNone(bearer_token_from_header(b"Bearer "))
        self.assertIsNone(bearer_token_from_header(b"abc"))

    def test_bearer_token_matches(self):
        self.assertTrue(bearer_token_matches([b"Bearer secret"], "secret"))
        self.assertFalse(bearer_token_matches([b"Bearer wrong"], "secret"))
        self.assertFalse(bearer_token_matches([b"Bearer secretX"], "secret"))
        self.assertFalse(bearer_token_matches([b"Basic secret"], "secret"))
        self.assertFalse(bearer_token_matches(None, "secret"))
        self.assertFalse(bearer_token_matches([], "secret"))
        self.assertFalse(bearer_token_matches([b"Bearer secret", b"Bearer secret"], "secret"))

    def test_comparison_is_constant_time(self):
        """The comparison goes through hmac.compare_digest."""
        calls = []
        real = apitoken.hmac.compare_digest

        def spy(a, b):
            calls.append((a, b))
            return real(a, b)

        self.patch(apitoken.hmac, "compare_digest", spy)
        self.assertTrue(tokens_equal("same", "same"))
        self.assertFalse(bearer_token_matches([b"Bearer other"], "same"))
        self.assertEqual(len(calls), 2)
