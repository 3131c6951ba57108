"""
``perc bench scale`` (bench/scale.py): its options, how it reads a
benchmark's last JSON line, and its plots drawn from a fixed set of points.
The sweeps themselves (minutes of real daemons) are not run here.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import sys

from twisted.trial.unittest import SynchronousTestCase

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import scale  # noqa: E402

try:
    import matplotlib  # noqa: F401
except ImportError:
    NO_MATPLOTLIB = "matplotlib is not installed (the bench extra: pip install -e '.[bench]')"
else:
    NO_MATPLOTLIB = None


def spread(low, median, high):
    return {"min": low, "median": median, "max": high}


def forward_point(members, conferences, rate, ok=True):
    if not ok:
        return {"members": members, "conferences": conferences, "ok": False,
                "error": "no loss-free rate", "command": "c", "wall_s": 1.0}
    return {"members": members, "conferences": conferences, "ok": True, "command": "c",
            "wall_s": 60.0, "forward_pps": spread(rate * 0.9, rate, rate * 1.1),
            "baseline_pps": spread(rate, rate, rate),
            "md_cpu_s_per_packet_same_rate": spread(9e-6, 1e-5, 1.1e-5),
            "baseline_cpu_s_per_packet_same_rate": 1.3e-5, "floor_s": 7e-6,
            "ratio": spread(0.9, 1.0, 1.1), "md_cpu_per_packet_over_floor": 1.4,
            "receivers_per_conference": members - 1, "repeat": 3}


def handshake_point(concurrency):
    return {"concurrency": concurrency, "ok": True, "command": "c", "wall_s": 30.0,
            "associations": 1000, "assoc_per_s": 400.0 - concurrency / 10,
            "join_p50_s": 0.001 * concurrency, "join_p99_s": 0.002 * concurrency,
            "kd_cpu_per_assoc": 0.0009, "md_cpu_per_assoc": 0.0004,
            "baseline_cpu_per_assoc": 0.0006, "bare_openssl_cpu_per_assoc": 0.0003,
            "ratio": 1.5, "ratio_vs_bare_openssl": 3.0, "client_retransmissions": 0}


MEMORY = {
    "ok": True, "command": "c", "wall_s": 100.0, "warmup": 100, "register": "sqlite",
    "registrations": 5100, "kd_rss_before_registrations_kib": 60000,
    "md_rss_before_registrations_kib": 61000, "kd_kib_per_registration": 1.2,
    "md_kib_per_registration": None, "kd_rss_start_kib": 66000, "md_rss_start_kib": 61000,
    "kd_rss_after_warmup_kib": 70000, "md_rss_after_warmup_kib": 62000,
    "steps": [{"count": 1000, "kd_rss_kib": 110000, "md_rss_kib": 72000,
               "kd_kib_per_assoc": 40.0, "md_kib_per_endpoint": 10.0, "join_s": 3.0},
              {"count": 5000, "kd_rss_kib": 270000, "md_rss_kib": 112000,
               "kd_kib_per_assoc": 40.0, "md_kib_per_endpoint": 10.0, "join_s": 12.0}],
}


def png_size(path):
    """(width, height) from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", head
    return struct.unpack("!II", head[16:24])


class OptionsTests(SynchronousTestCase):
    def error(self, argv):
        """The usage error ``argv`` gets (argparse exits with status 2)."""
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), self.assertRaises(SystemExit) as raised:
            scale.parse_args(argv)
        self.assertEqual(raised.exception.code, 2)
        return stderr.getvalue()

    def test_defaults_are_the_full_sweep(self):
        args = scale.parse_args([])
        self.assertEqual(args.only, ["forward", "handshake", "memory"])
        self.assertEqual(args.sizes, [2, 5, 10, 20, 50])
        self.assertEqual(args.conferences, [1, 2, 5, 10])
        self.assertEqual(args.concurrency, [50, 200, 1000])
        self.assertEqual(args.associations, scale.DEFAULTS["associations"])
        self.assertEqual(args.forward_seconds, 1.0)
        self.assertFalse(args.quick)

    def test_quick_takes_small_points_unless_given(self):
        args = scale.parse_args(["--quick", "--sizes", "4,2,4"])
        self.assertEqual(args.sizes, [2, 4])
        self.assertEqual(args.concurrency, scale.QUICK["concurrency"])
        self.assertEqual(args.forward_seconds, 0.3)

    def test_only_keeps_the_order_of_the_sweeps(self):
        self.assertEqual(scale.parse_args(["--only", "memory, forward"]).only,
                         ["forward", "memory"])

    def test_unknown_sweep(self):
        self.assertIn("--only: choose among forward, handshake, memory", self.error(
            ["--only", "forward,latency"]))

    def test_points_must_be_integers(self):
        self.assertIn("comma-separated integers expected", self.error(["--sizes", "2,five"]))
        self.assertIn("positive integers expected", self.error(["--associations", "0,10"]))

    def test_points_bench_forward_refuses(self):
        self.assertIn("--sizes must be 2 to 50", self.error(["--sizes", "2,60"]))
        self.assertIn("--conferences must be 1 to 20", self.error(["--conferences", "1,30"]))

    def test_handshake_endpoints_cover_the_concurrency(self):
        self.assertIn("must be at least the largest --concurrency", self.error(
            ["--concurrency", "50,500", "--handshake-endpoints", "200"]))


class RunBenchmarkTests(SynchronousTestCase):
    """bench/codec.py stands for a benchmark: a real one, quick to run."""

    def quietly(self, *args):
        with contextlib.redirect_stdout(io.StringIO()):
            return scale.run_benchmark(*args)

    def test_last_json_line_is_the_document(self):
        document = self.quietly("codec", ["--seconds", "0.01", "--repeat", "1"])
        self.assertEqual(document["benchmark"], "codec")
        self.assertTrue(document["ok"])
        self.assertEqual(document["command"],
                         "python bench/codec.py --seconds 0.01 --repeat 1")
        self.assertIn("MediaKeys", document["types"])

    def test_no_json_line_is_a_failure(self):
        document = self.quietly("codec", ["--repeat", "0"])
        self.assertFalse(document["ok"])
        self.assertIn("exited with status 2 without a JSON line", document["error"])


class PointsTests(SynchronousTestCase):
    def test_forward_point_spreads_over_the_runs(self):
        runs = [{"forward_pps": rate, "baseline_pps": 1000.0, "ratio": rate / 1000.0,
                 "md_cpu_s_per_packet_same_rate": 1e-5} for rate in (900.0, 1200.0, 1000.0)]
        document = {"ok": True, "command": "c", "wall_s": 1.0, "runs": runs,
                    "baseline_cpu_s_per_packet_same_rate": 1.2e-5,
                    "floor": {"floor_s": 7e-6}, "md_cpu_per_packet_over_floor": 1.43,
                    "receivers": 4}
        point = scale.forward_point(document, 5, 2)
        self.assertEqual(point["forward_pps"], spread(900.0, 1000.0, 1200.0))
        self.assertEqual(point["ratio"], spread(0.9, 1.0, 1.2))
        self.assertEqual((point["members"], point["conferences"], point["repeat"]), (5, 2, 3))

    def test_failed_points_are_listed(self):
        document = {"forward": {"conference_size": [forward_point(2, 1, 1e4),
                                                    forward_point(5, 1, 0, ok=False)],
                                "conferences": []},
                    "handshake": [handshake_point(50)],
                    "memory": {"ok": False, "error": "worker ended"}}
        self.assertEqual(scale.failures(document), ["forward 1 x 5: no loss-free rate",
                                                    "memory: worker ended"])

    def test_tables_hold_every_good_point(self):
        document = {"forward": {"conference_size": [forward_point(2, 1, 1e4),
                                                    forward_point(5, 1, 0, ok=False)],
                                "conferences": []},
                    "handshake": [handshake_point(50), handshake_point(200)],
                    "memory": MEMORY}
        lines = scale.tables(document).splitlines()
        self.assertIn("1 x 2            10,000 (9,000–11,000)  10,000          "
                      "1.00 (0.90–1.10)  10.00 (9.00–11.00)  13.00        7.00      1.40",
                      lines)
        self.assertFalse([line for line in lines if line.startswith("1 x 5")])
        self.assertIn("50         1000   395      50      100     0.900    0.600   0.300"
                      "         3.00", lines)
        self.assertIn("none (5,100 registrations)  66,000       1.20 per registration  "
                      "61,000       (none held)", lines)
        self.assertIn("5,000                       270,000      40.0 per association   "
                      "112,000      10.0 per association", lines)


class PlotTests(SynchronousTestCase):
    skip = NO_MATPLOTLIB

    def test_every_plot_is_a_png(self):
        directory = self.mktemp()
        os.makedirs(directory)
        document = {
            "forward": {
                "conference_size": [forward_point(m, 1, 3e4 / m) for m in (2, 5, 10)]
                + [forward_point(20, 1, 0, ok=False)],
                "conferences": [forward_point(5, c, 6e3) for c in (1, 2, 5)]},
            "handshake": [handshake_point(c) for c in (50, 200)]
            + [{"concurrency": 1000, "ok": False, "error": "joins failed"}],
            "memory": MEMORY,
        }
        drawn = scale.draw(document, directory)
        names = ["forward_conference_size", "forward_conferences", "handshake_concurrency",
                 "memory_associations"]
        self.assertEqual(drawn, [os.path.join(directory, n + ".png") for n in names])
        self.assertEqual(sorted(os.listdir(directory)), sorted(n + ".png" for n in names))
        # Inches times scale.DPI.
        self.assertEqual(png_size(drawn[0]), (11 * scale.DPI, int(4.2 * scale.DPI)))
        self.assertEqual(png_size(drawn[2]), (14 * scale.DPI, int(4.2 * scale.DPI)))

    def test_nothing_to_draw(self):
        directory = self.mktemp()
        os.makedirs(directory)
        document = {"forward": {"conference_size": [forward_point(2, 1, 0, ok=False)],
                                "conferences": []},
                    "handshake": [], "memory": {"ok": False, "error": "x"}}
        self.assertEqual(scale.draw(document, directory), [])
        self.assertEqual(os.listdir(directory), [])
