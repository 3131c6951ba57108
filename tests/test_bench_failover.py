"""
``perc bench failover`` (bench/failover.py) without running it: its help,
its options and their checks, and the one line it ends with when no
PostgreSQL server answers.  The benchmark itself runs for minutes against
real daemons and a real database; it is run by hand (bench/RESULTS.rst).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import failover  # noqa: E402


def run_bench(*args):
    return subprocess.run(
        [sys.executable, os.path.join(BENCH, "failover.py")] + list(args),
        capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(BENCH)] + sys.path)))


class FailoverBenchOptionsTests(SynchronousTestCase):
    def parse(self, *argv):
        return failover.parse_args(["--db", "postgresql://u@db.test:5432/postgres"] + list(argv))

    def test_help(self):
        result = run_bench("--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        for option in ("--db", "--repeat", "--lease-seconds", "--handshake-endpoints",
                       "--rounds"):
            self.assertIn(option, result.stdout)

    def test_defaults(self):
        args = self.parse()
        self.assertEqual((args.repeat, args.endpoints, args.conferences, args.lease_seconds),
                         (3, 12, 3, 3.0))
        self.assertEqual((args.handshake_endpoints, args.concurrency, args.rounds),
                         (200, 200, 2))
        self.assertIsNone(args.only)

    def test_server_from_the_environment(self):
        self.patch(os, "environ", dict(os.environ, PERC_BENCH_POSTGRES="postgresql://x@h/db"))
        self.assertEqual(failover.parse_args([]).db, "postgresql://x@h/db")
        self.patch(os, "environ", {k: v for k, v in os.environ.items()
                                   if k != "PERC_BENCH_POSTGRES"})
        self.assertEqual(failover.parse_args([]).db, failover.DEFAULT_SERVER)

    def test_refused(self):
        for argv in (["--db", "/tmp/kd.sqlite3"], ["--repeat", "0"], ["--conferences", "7"],
                     ["--lease-seconds", "0"], ["--handshake-endpoints", "0"],
                     ["--concurrency", "0"], ["--only", "both"]):
            self.assertRaises(SystemExit, self.parse, *argv)

    def test_no_server(self):
        # Nothing listens on port 1 of loopback: refused at once.
        result = run_bench("--db", "postgresql://postgres:pw@127.0.0.1:1/postgres")
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        lines = result.stdout.strip().splitlines()
        self.assertEqual(len(lines), 2, result.stdout)
        self.assertTrue(lines[0].startswith("FAILED: PostgreSQL at postgresql://postgres:***@"
                                            "127.0.0.1:1/postgres does not answer"), lines[0])
        self.assertIn("--db postgresql://USER@HOST:PORT/DB", lines[0])
        self.assertNotIn("pw", result.stdout)
        self.assertFalse(json.loads(lines[-1])["ok"])
        self.assertEqual(result.stderr, "")
