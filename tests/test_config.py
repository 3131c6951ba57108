"""
``--config FILE`` for both daemons: TOML under the long option names, the
command line overriding it, one-line errors naming the file and the key,
and a real ``twistd -n perc-kd`` / ``perc-md`` started from a file.
"""

from __future__ import annotations

import os
import signal
import subprocess

from twisted.trial.unittest import SynchronousTestCase

from perc import pki, profiles
from perc.config import ConfigFileError
from perc.kd import tap as kd_tap
from perc.md import tap as md_tap
from tests.daemonhelpers import TWISTD, DaemonOutput, listening_port


class ConfigFileTestsMixin:
    Options = None
    #: What every file for this daemon needs besides the keys under test.
    required = ""

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "daemon.toml")

    def parse(self, text: str, *argv):
        with open(self.path, "w") as target:
            target.write(self.required + text)
        options = self.Options()
        options.parseOptions(["--config", self.path] + list(argv))
        return options

    def assertRefused(self, text: str, *expected):
        error = self.assertRaises(ConfigFileError, self.parse, text)
        message = str(error)
        self.assertEqual(len(message.splitlines()), 1, message)
        self.assertTrue(message.startswith("--config {}: ".format(self.path)), message)
        for part in expected:
            self.assertIn(part, message)
        return message

    def test_unknown_key(self):
        self.assertRefused('tunnel-listn = "tcp:1"\n', "unknown key 'tunnel-listn'")

    def test_short_name_and_python_spelling_refused(self):
        self.assertRefused('tunnel_listen = "tcp:1"\n', "unknown key 'tunnel_listen'")

    def test_not_toml(self):
        self.assertRefused('tunnel-listen = tcp:1\n', "not valid TOML")

    def test_unreadable(self):
        error = self.assertRaises(ConfigFileError, self.Options().parseOptions,
                                  ["--config", os.path.join(self.dir, "missing.toml")])
        self.assertIn("missing.toml: no such file", str(error))

    def test_bad_values(self):
        self.assertRefused("max-associations = -3\n", "max-associations = -3",
                           "must be a positive integer")
        self.assertRefused('max-associations = "many"\n', "max-associations")
        self.assertRefused("handshake-timeout = true\n", "handshake-timeout",
                           "a string or a number")
        self.assertRefused('handshake-timeout = ["1"]\n', "handshake-timeout")
        self.assertRefused("tunnel-timeout = 1\n", "tunnel-timeout = 1", "from 2 to 32767")

    def test_config_is_not_a_setting(self):
        self.assertRefused('config = "other.toml"\n', "'config'")

    def test_numbers_and_strings(self):
        options = self.parse('profiles = "SRTP_AES128_CM_HMAC_SHA1_80"\n'
                             "handshake-timeout = 7\ntunnel-timeout = 4.5\n")
        self.assertEqual(options["profiles"], (profiles.by_id(0x0001),))
        self.assertEqual(options["handshake-timeout"], 7.0)
        self.assertEqual(options["tunnel-timeout"], 4.5)

    def test_command_line_overrides(self):
        options = self.parse('handshake-timeout = 7\napi = "none"\n',
                             "--handshake-timeout", "9")
        self.assertEqual(options["handshake-timeout"], 9.0)
        self.assertEqual(options["api"], "none")
        options = self.parse("handshake-timeout = 7\n", "--handshake-timeout=11")
        self.assertEqual(options["handshake-timeout"], 11.0)


class KeyDistributorConfigTests(ConfigFileTestsMixin, SynchronousTestCase):
    Options = kd_tap.Options

    def test_repeatable_options_and_flags(self):
        options = self.parse('connect = ["tcp:md1.test:4750", "tcp:md2.test:4750"]\n'
                             'allow-md = "md1.test"\nallow-missing-tls-id = true\n')
        self.assertEqual(options["connect"], ["tcp:md1.test:4750", "tcp:md2.test:4750"])
        self.assertEqual(options["allow-md"], ["md1.test"])
        self.assertTrue(options["allow-missing-tls-id"])
        self.assertFalse(self.parse("allow-missing-tls-id = false\n")["allow-missing-tls-id"])
        self.assertRefused('allow-missing-tls-id = "yes"\n', "true or false")
        self.assertRefused("connect = [4750, true]\n", "connect", "array of strings")

    def test_command_line_replaces_a_repeatable_option(self):
        options = self.parse('connect = ["tcp:md1.test:4750", "tcp:md2.test:4750"]\n',
                             "--connect", "tcp:md3.test:4750")
        self.assertEqual(options["connect"], ["tcp:md3.test:4750"])

    def test_every_long_option_has_a_key(self):
        # New options work in the file without being listed anywhere.
        options = self.Options()
        for name in options.synonyms.values():
            if name in ("config", "help", "version"):
                continue
            if name in {flag[0] for flag in options.optFlags}:
                self.parse("{} = true\n".format(name))


class MediaDistributorConfigTests(ConfigFileTestsMixin, SynchronousTestCase):
    Options = md_tap.Options
    required = 'tunnel-listen = "tcp:4750"\n'

    def test_repeatable_kd_and_port(self):
        options = self.parse('kd = ["tcp:kd1.test:4740", "tcp:kd2.test:4740"]\nmedia-port = 6000\n')
        self.assertEqual(options["tunnel-listen"], "tcp:4750")
        self.assertEqual(options["kd"], ["tcp:kd1.test:4740", "tcp:kd2.test:4740"])
        self.assertEqual(options["media-port"], 6000)
        options = self.parse('kd = "tcp:kd1.test:4740"\n', "--media-port", "7000")
        self.assertEqual(options["kd"], ["tcp:kd1.test:4740"])
        self.assertEqual(options["media-port"], 7000)
        self.assertRefused('kd = "tcp:kd1.test:4740"\nmedia-port = 70000\n',
                           "media-port = 70000", "0..65535")


class DaemonFromConfigFileTests(SynchronousTestCase):
    """Both daemons started by twistd from a config file, talking to each other."""

    def test_daemons_from_config_files(self):
        directory = os.path.abspath(self.mktemp())
        dev = pki.create_dev_pki(os.path.join(directory, "pki"))
        with open(os.path.join(directory, "kd.toml"), "w") as target:
            target.write('pki = "pki"\napi = "none"\n'
                         'tunnel-listen = "tcp:0:interface=127.0.0.1"\n'
                         'allow-md = ["localhost"]\n')
        kd = subprocess.Popen(TWISTD + ["-n", "--pidfile=", "perc-kd", "--config", "kd.toml"],
                              cwd=directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        kd_output = DaemonOutput(kd)
        self.addCleanup(kd_output.stop)
        kd_output.wait_for("Key Distributor ready")
        tunnel = listening_port(kd_output, "tunnel-listen")
        with open(os.path.join(directory, "md.toml"), "w") as target:
            target.write('pki = "pki"\napi = "none"\nmedia-port = 0\n'
                         'media-interface = "127.0.0.1"\n'
                         'kd = ["tcp:127.0.0.1:{}"]\nkd-name = "localhost"\n'.format(tunnel))
        md = subprocess.Popen(TWISTD + ["-n", "--pidfile=", "perc-md", "--config", "md.toml"],
                              cwd=directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        md_output = DaemonOutput(md)
        self.addCleanup(md_output.stop)
        # The KD accepts the MD's tunnel: the file's allow-md list names it,
        # and the MD verified the KD as the file's kd-name.
        self.assertIn("localhost", kd_output.wait_for("up: Media Distributor profiles"))
        self.assertTrue(os.path.exists(dev.ca_certificate))
        for process in (md, kd):
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)

    def test_bad_key_is_one_line(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with open(os.path.join(directory, "kd.toml"), "w") as target:
            target.write('max-associations = "lots"\n')
        result = subprocess.run(TWISTD + ["-n", "--pidfile=", "perc-kd", "--config", "kd.toml"],
                                cwd=directory, capture_output=True, text=True, timeout=60)
        self.assertNotEqual(result.returncode, 0)
        output = result.stdout + result.stderr
        self.assertNotIn("Traceback", output)
        [line] = [line for line in output.splitlines() if "kd.toml" in line]
        self.assertIn("--config kd.toml: max-associations = \"lots\"", line)
