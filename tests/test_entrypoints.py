"""
Tests for the entry points: the twistd plugins and the ``perc`` command.
"""

import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase

from perc.scripts import cli


class TwistdPluginTests(SynchronousTestCase):
    def makers(self):
        return {maker.tapname: maker for maker in getPlugins(IServiceMaker)}

    def test_plugins_are_found(self):
        makers = self.makers()
        self.assertIn("perc-kd", makers)
        self.assertIn("perc-md", makers)
        self.assertEqual(makers["perc-kd"].module, "perc.kd.tap")
        self.assertEqual(makers["perc-md"].module, "perc.md.tap")

    def test_options_parse_help(self):
        for name in ("perc-kd", "perc-md"):
            options = self.makers()[name].options()
            out = io.StringIO()
            with redirect_stdout(out), self.assertRaises(SystemExit) as caught:
                options.parseOptions(["--help"])
            self.assertEqual(caught.exception.code, 0)
            self.assertIn("Usage:", out.getvalue())

    def test_twistd_lists_plugins(self):
        """The real ``twistd --help``, in a process started from elsewhere."""
        elsewhere = self.mktemp()
        os.makedirs(elsewhere)
        env = dict(os.environ)
        if env.get("PYTHONPATH"):
            # A relative PYTHONPATH would mean something else from there.
            env["PYTHONPATH"] = os.pathsep.join(
                os.path.abspath(entry) for entry in env["PYTHONPATH"].split(os.pathsep))
        output = subprocess.run(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "--help"],
            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60,
        ).stdout
        self.assertIn("perc-kd", output)
        self.assertIn("perc-md", output)


class PercCommandTests(SynchronousTestCase):
    def run_perc(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            try:
                status = cli.main(list(argv))
            except SystemExit as exit:
                status = exit.code
        return status, out.getvalue(), err.getvalue()

    def test_help(self):
        status, out, _ = self.run_perc("--help")
        self.assertEqual(status, 0)
        self.assertIn("Usage: perc <command> [options]", out)
        self.assertIn("pki", out)

    def test_no_command(self):
        status, _, err = self.run_perc()
        self.assertEqual(status, 2)
        self.assertIn("perc: error: a command is required", err)

    def test_unknown_option(self):
        status, _, err = self.run_perc("--frobnicate")
        self.assertEqual(status, 2)
        self.assertIn("perc: error:", err)

    def test_console_script(self):
        """``python -m perc.scripts.cli --help`` runs the same entry point."""
        result = subprocess.run([sys.executable, "-m", "perc.scripts.cli", "--help"],
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("Usage: perc", result.stdout)


class BenchCommandTests(SynchronousTestCase):
    def test_unknown_benchmark_is_one_line(self):
        err = io.StringIO()
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            status = cli.main(["bench", "no-such-benchmark"])
        self.assertEqual(status, 1)
        self.assertEqual(len(err.getvalue().strip().splitlines()), 1)
        self.assertIn("no-such-benchmark", err.getvalue())
