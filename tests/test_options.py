"""
Tests for what every command's options share (perc.options): ``--version``
prints perc's version, usage lines name the command as typed, help texts
carry no source indentation; and the shared coercers (perc.optiontypes).
"""

import io
import os
import re
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

from twisted.trial.unittest import SynchronousTestCase

from perc import __version__
from perc.kd import tap as kd_tap
from perc.md import tap as md_tap
from perc.optiontypes import udp_port
from perc.scripts import cli

#: Every ``perc`` subcommand, as typed.
SUBCOMMANDS = (("bench",), ("demo",), ("endpoint",), ("pki",), ("pki", "init"),
               ("pki", "endpoint"), ("register",))


def run_perc(*argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            status = cli.main(list(argv))
        except SystemExit as exit:
            status = exit.code
    return status, out.getvalue(), err.getvalue()


def all_options():
    """An instance of every Options class behind a command or daemon, with its parents."""
    cli.PercOptions.subCommands = cli._load_subcommands()
    found = [cli.PercOptions(), kd_tap.Options(), md_tap.Options()]
    pending = list(found[:1])
    while pending:
        options = pending.pop()
        for name, _, factory, _ in getattr(options, "subCommands", None) or ():
            sub = factory()
            sub.parent = options
            options.subCommand = name
            found.append(sub)
            pending.append(sub)
    return found


class VersionTests(SynchronousTestCase):
    def test_root_and_every_subcommand_print_percs_version(self):
        for command in ((),) + SUBCOMMANDS:
            status, out, _ = run_perc(*command, "--version")
            self.assertEqual((status, out), (0, f"perc {__version__}\n"), command)

    def test_daemons_print_percs_version(self):
        """The real ``twistd -n perc-kd --version`` (and perc-md), not Twisted's version."""
        for tapname in ("perc-kd", "perc-md"):
            result = subprocess.run(
                [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                 "-n", tapname, "--version"],
                check=False, capture_output=True, text=True, timeout=60, env=dict(os.environ))
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(result.stdout, f"perc {__version__}\n")


class UsageTests(SynchronousTestCase):
    def test_usage_lines_name_the_command_as_typed(self):
        expected = {
            ("demo",): "Usage: perc demo [--endpoints N]",
            ("pki",): "Usage: perc pki <init|endpoint> [options]",
            ("pki", "init"): "Usage: perc pki init DIR ",
            ("register",): "Usage: perc register --kd-api URL",
            ("bench",): "Usage: perc bench NAME",
            ("endpoint",): "Usage: perc endpoint --media HOST:PORT",
        }
        for command, start in expected.items():
            status, out, _ = run_perc(*command, "--help")
            self.assertEqual(status, 0)
            self.assertTrue(out.startswith(start), (command, out.splitlines()[0]))

    def test_daemon_usage_line_is_twistds(self):
        options = kd_tap.Options()
        self.assertIn("perc-kd", str(self._parsed_under_twistd(options)).splitlines()[0])

    def _parsed_under_twistd(self, options):
        from twisted.scripts.twistd import ServerOptions
        options.parent = ServerOptions()
        options.parent.subCommand = "perc-kd"
        return options

    def test_help_texts_have_no_source_indentation(self):
        for options in all_options():
            for name, doc in options.docs.items():
                if doc:
                    self.assertNotRegex(doc, r"\n|\s{3,}", (type(options).__name__, name))

    def test_multi_line_docstring_reads_as_one_paragraph_in_help(self):
        out = io.StringIO()
        with redirect_stdout(out), self.assertRaises(SystemExit):
            kd_tap.Options().parseOptions(["--help"])
        # The wrapped paragraph, joined back: single spaces between its words.
        lines = [line.strip() for line in out.getvalue().splitlines()]
        start = next(i for i, line in enumerate(lines) if line.startswith("--allow-md="))
        paragraph = " ".join(lines[start:start + 4])
        self.assertIn("(certificate subjectAltName DNS name) allowed to open tunnels", paragraph)

    def test_register_example_names_the_kd_api_default_port(self):
        from perc.scripts.register import RegisterOptions

        default_api = {row[0]: row[2] for row in kd_tap.Options.optParameters}["api"]
        port = re.match(r"tcp:(\d+)", default_api).group(1)
        self.assertIn(f"http://127.0.0.1:{port}", RegisterOptions().docs["kd-api"])


class UdpPortTests(SynchronousTestCase):
    def test_valid_ports(self):
        self.assertEqual([udp_port(text) for text in ("0", "5004", "65535")], [0, 5004, 65535])

    def test_invalid_ports_say_what_was_expected(self):
        for text in ("-1", "65536", "port", ""):
            with self.assertRaises(ValueError) as caught:
                udp_port(text)
            self.assertEqual(str(caught.exception), "must be a UDP port number 0..65535")

    def test_media_port_option_refuses_a_bad_port_in_one_line(self):
        from twisted.python import usage

        with self.assertRaises(usage.UsageError) as caught:
            md_tap.Options().parseOptions(["--media-port", "70000"])
        self.assertIn("must be a UDP port number 0..65535", str(caught.exception))
