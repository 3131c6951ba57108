"""
perc.dtls.bindings: the private OpenSSL bindings perc.dtls still needs are
checked when it is imported, and a missing one is named in one line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from OpenSSL import SSL
from OpenSSL._util import lib
from twisted.trial.unittest import SynchronousTestCase

import perc.dtls
from perc.dtls import bindings


class Without:
    """``lib`` with some symbols hidden, as an older or different build would be."""

    def __init__(self, hidden):
        self._hidden = set(hidden)

    def __getattr__(self, name):
        if name in self._hidden:
            raise AttributeError(name)
        return getattr(lib, name)


class CheckTests(SynchronousTestCase):
    def test_this_build_has_everything(self):
        self.assertEqual(bindings.missing(), [])
        bindings.check()

    def test_missing_private_symbols_are_named_in_one_line(self):
        hidden = ["SSL_CTX_add_server_custom_ext", "X509_STORE_CTX_set_error"]
        self.assertEqual(bindings.missing(Without(hidden)), hidden)
        with self.assertRaises(bindings.MissingBindings) as caught:
            bindings.check(Without(hidden))
        message = str(caught.exception)
        self.assertEqual(len(message.splitlines()), 1)
        self.assertIn("missing SSL_CTX_add_server_custom_ext, X509_STORE_CTX_set_error", message)

    def test_missing_public_api_is_named(self):
        public = bindings.PUBLIC_API + ((SSL.Context, "set_no_such_thing"),)
        with self.assertRaises(bindings.MissingBindings) as caught:
            bindings.check(public=public)
        self.assertIn("missing Context.set_no_such_thing", str(caught.exception))

    def test_importing_perc_dtls_names_the_missing_symbol(self):
        """A real import of perc.dtls in a process whose bindings lack one symbol."""
        script = textwrap.dedent("""
            import OpenSSL.SSL, OpenSSL._util as util

            class Without:
                def __getattr__(self, name):
                    if name == "SSL_CTX_add_client_custom_ext":
                        raise AttributeError(name)
                    return getattr(real, name)

            real, util.lib = util.lib, Without()
            try:
                import perc.dtls
            except ImportError as error:
                print(type(error).__name__, error)
        """)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(perc.dtls.__file__))))
        env = dict(os.environ, PYTHONPATH=root)
        result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True,
                                timeout=60, env=env)
        self.assertEqual(result.returncode, 0, result.stderr)
        [line] = result.stdout.splitlines()
        self.assertTrue(line.startswith("MissingBindings perc.dtls cannot run on this pyOpenSSL"),
                        line)
        self.assertTrue(line.endswith("missing SSL_CTX_add_client_custom_ext"), line)


class PrivateDoorTests(SynchronousTestCase):
    def test_only_bindings_imports_the_private_bindings(self):
        directory = os.path.dirname(perc.dtls.__file__)
        users = []
        for name in sorted(os.listdir(directory)):
            if name.endswith(".py"):
                with open(os.path.join(directory, name), encoding="utf-8") as f:
                    if "OpenSSL._util" in f.read():
                        users.append(name)
        self.assertEqual(users, ["bindings.py"])
