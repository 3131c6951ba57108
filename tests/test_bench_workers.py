"""
The worker processes of ``perc bench handshake`` and ``perc bench memory``
(bench/handshake.py): how the endpoints, one UDP socket each, are split over
as many workers as the hard open-file limit needs, and what a run says when
the machine's limits cannot hold them.  The runs here are real (daemons,
workers, DTLS over UDP) but small, under a hard open-file limit lowered for
them.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import handshake  # noqa: E402

RESERVE = handshake.WORKER_FD_RESERVE


def run_python(argv, open_files, timeout=120):
    """``python ARGV`` under a hard (and soft) open-file limit of ``open_files``."""
    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    return subprocess.run(
        [sys.executable] + list(argv), capture_output=True, text=True, timeout=timeout,
        preexec_fn=limit,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(BENCH)] + sys.path)))


class PlanTests(SynchronousTestCase):
    def test_one_worker_when_they_fit(self):
        self.assertEqual(handshake.plan_workers(600, 20000), [(0, 600)])
        self.assertEqual(handshake.plan_workers(20000 - RESERVE, 20000), [(0, 20000 - RESERVE)])

    def test_twenty_thousand_and_the_warm_up_under_twenty_thousand(self):
        """This machine's case: 20,100 endpoints, hard limit 20,000: two even shares."""
        self.assertEqual(handshake.plan_workers(20100, 20000), [(0, 10050), (10050, 20100)])

    def test_shares_cover_every_endpoint_once_and_evenly(self):
        for total, hard in ((20001 - RESERVE, 20000), (50, RESERVE + 7), (75, 80), (1, 80)):
            shares = handshake.plan_workers(total, hard)
            self.assertEqual(shares[0][0], 0)
            self.assertEqual(shares[-1][1], total)
            for (_, end), (first, _) in zip(shares, shares[1:]):
                self.assertEqual(end, first)
            sizes = [end - first for first, end in shares]
            self.assertLessEqual(max(sizes), hard - RESERVE)
            self.assertLessEqual(max(sizes) - min(sizes), 1)
            self.assertEqual(len(shares), -(-total // (hard - RESERVE)))

    def test_too_many_workers(self):
        error = self.assertRaises(handshake.BenchFailure, handshake.plan_workers, 1100, 80)
        self.assertEqual(
            str(error), "1,100 endpoints (one UDP socket each) need 69 worker processes of at "
                        "most 16 under the hard open-file limit of 80, more than the 8 allowed: "
                        "raise the limit (ulimit -Hn) or ask for fewer")
        self.assertEqual(len(handshake.plan_workers(8 * 16, 80)), 8)

    def test_no_room_at_all(self):
        error = self.assertRaises(handshake.BenchFailure, handshake.plan_workers, 1, RESERVE)
        self.assertIn("leaves no descriptor for endpoint sockets", str(error))

    def test_system_wide_limit(self):
        error = self.assertRaises(handshake.BenchFailure, handshake.plan_workers,
                                  20100, 20000, system_free=20000)
        self.assertIn("the system can open only 20,000 more (fs.file-max)", str(error))
        self.assertEqual(len(handshake.plan_workers(20100, 20000, system_free=30000)), 2)

    def test_the_machines_limits(self):
        hard, free = handshake.machine_open_file_limits()
        self.assertGreater(hard, 0)
        self.assertTrue(free is None or free > 0)


class SplitTests(SynchronousTestCase):
    shares = [(0, 10050), (10050, 20100)]

    def test_a_step_inside_one_worker(self):
        self.assertEqual(handshake.split_go(self.shares, 100, 350, 200),
                         {0: ((100, 350), 200)})
        self.assertEqual(handshake.split_go(self.shares, 10050, 10300, 200),
                         {1: ((0, 250), 200)})

    def test_a_step_across_workers_shares_the_concurrency(self):
        self.assertEqual(handshake.split_go(self.shares, 9900, 10150, 200),
                         {0: ((9900, 10050), 120), 1: ((0, 100), 80)})

    def test_every_worker_has_at_least_one_in_flight(self):
        self.assertEqual(handshake.split_go(self.shares, 10049, 10300, 10),
                         {0: ((10049, 10050), 1), 1: ((0, 250), 9)})

    def test_results_merged(self):
        def result(first, joined, failed=()):
            return {"state": "joined", "endpoints": joined + len(failed), "joined": joined,
                    "failed": [[i, "refused"] for i in failed], "failed_count": len(failed),
                    "missing": [], "missing_count": 0,
                    "times": [[first + i, first + i + 0.5, first + i + 1] for i in range(joined)],
                    "retransmissions": 2, "ekt_requests": 1}

        merged = handshake.merge_joined([result(0, 2), result(10, 1, failed=[12, 13])])
        self.assertEqual(
            merged, {"state": "joined", "endpoints": 5, "joined": 3,
                     "failed": [[12, "refused"], [13, "refused"]], "failed_count": 2,
                     "missing": [], "missing_count": 0,
                     "times": [[0, 0.5, 1], [1, 1.5, 2], [10, 10.5, 11]],
                     "retransmissions": 4, "ekt_requests": 2})
        self.assertEqual(len(handshake.merge_joined(
            [result(0, 0, failed=range(15)), result(0, 0, failed=range(15))])["failed"]), 20)


class LimitedRunTests(SynchronousTestCase):
    """bench/memory.py and bench/handshake.py under a hard open-file limit of 80."""

    def test_memory_over_several_workers(self):
        """
        78 endpoints do not fit in one process with 80 descriptors: five
        workers of 15 or 16, and join steps of 25 that span two of them.
        """
        result = run_python([os.path.join(BENCH, "memory.py"), "--warmup", "8",
                             "--counts", "30,70", "--chunk", "25"], 80)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        figures = json.loads(result.stdout.splitlines()[-1])
        self.assertEqual(figures["worker_processes"], 5)
        self.assertEqual([s["count"] for s in figures["steps"]], [30, 70])
        self.assertNotIn("truncated", json.dumps(figures))
        self.assertEqual(figures["md_established_at_end"], 78)

    def test_memory_refuses_what_the_limits_cannot_hold(self):
        """One line, before any daemon or worker starts."""
        result = run_python([os.path.join(BENCH, "memory.py"), "--counts", "1000"], 80,
                            timeout=30)
        self.assertEqual(result.returncode, 1)
        lines = result.stdout.splitlines()
        self.assertEqual(len(lines), 2, result.stdout)
        self.assertEqual(lines[0], "FAILED: 1,100 endpoints (one UDP socket each) need 69 "
                                   "worker processes of at most 16 under the hard open-file "
                                   "limit of 80, more than the 8 allowed: raise the limit "
                                   "(ulimit -Hn) or ask for fewer")
        self.assertFalse(json.loads(lines[1])["ok"])

    def test_handshake_rounds_over_several_workers(self):
        result = run_python([os.path.join(BENCH, "handshake.py"), "--endpoints", "20",
                             "--rounds", "2", "--register", "sqlite",
                             "--baseline-count", "10"], 80)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        figures = json.loads(result.stdout.splitlines()[-1])
        self.assertEqual((figures["worker_processes"], figures["associations"]), (3, 40))

    def test_a_socket_refused_says_why(self):
        """A worker that runs out of descriptors anyway fails with one line, not a traceback."""
        code = "\n".join([
            "import resource, sys",
            "sys.path.insert(0, {!r})".format(BENCH),
            "import handshake",
            "worker = handshake.Worker({'endpoints': 40, 'profile_id': 9})",
            "for e in worker.endpoints:",
            "    e.kd_tls_id = 'KeyDistributorTlsId-0123456789ab'",
            "try:",
            "    worker.prepare('sha-256 ' + ':'.join(['00'] * 32))",
            "except handshake.BenchFailure as error:",
            "    print(error)",
        ])
        result = run_python(["-c", code], 40)
        self.assertEqual(result.stderr, "")
        self.assertRegex(result.stdout.strip(),
                         r"^endpoint \d+ of this worker's 40 could not open its UDP socket: "
                         r"Too many open files \(open-file limit 40 soft, 40 hard\)$")
