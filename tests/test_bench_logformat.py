"""bench/logformat.py: it checks the two observers agree before it times them."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys

from twisted.trial.unittest import SynchronousTestCase

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import logformat  # noqa: E402

from perc import logs  # noqa: E402


class LogFormatBenchTests(SynchronousTestCase):
    def run_bench(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = logformat.main(["--events", "100", "--repeat", "1"])
        return status, out.getvalue().splitlines()

    def test_daemon_events_timed_both_ways(self):
        status, lines = self.run_bench()
        self.assertEqual(status, 0)
        document = json.loads(lines[-1])
        self.assertEqual([r["event"] for r in document["results"]],
                         ["kd accepted", "md new association", "md keyed"])
        for result in document["results"]:
            self.assertGreater(result["twisted_us"], 0)
            self.assertGreater(result["perc_us"], 0)

    def test_text_that_differs_fails(self):
        self.patch(logs, "classic_text", lambda event: "not Twisted's text\n")
        status, lines = self.run_bench()
        self.assertEqual(status, 1)
        self.assertTrue(lines[-1].startswith("FAILED: perc.logs.classic_text differs"))
