"""
bench/_common.py: the CPU time the benchmarks charge to a daemon, read
from /proc for a real child process.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import _common  # noqa: E402

#: Burns CPU in a second thread and in the main one, reports its own
#: process_time (all threads), then waits on stdin with both threads alive.
_CHILD = """
import sys, threading, time
def burn(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
burnt = threading.Event()
def work():
    burn(0.037)
    burnt.set()
    threading.Event().wait()
threading.Thread(target=work, daemon=True).start()
burn(0.023)
burnt.wait()
print(repr(time.process_time()), repr(time.thread_time()), flush=True)
sys.stdin.read()
"""


class CpuSecondsTests(SynchronousTestCase):
    def test_counts_every_thread_finer_than_clock_ticks(self):
        child = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        self.addCleanup(child.wait)
        self.addCleanup(child.stdin.close)
        reported, main_thread = map(float, child.stdout.readline().split())
        measured = _common.cpu_seconds(child.pid)
        # Both threads' time (the interpreter's start-up included), read
        # after the child's own reading: at least that (a loaded virtual
        # machine may add a few milliseconds after it, hence the loose
        # upper bound), and not in whole clock ticks as /proc/PID/stat is.
        self.assertGreaterEqual(measured, reported - 0.001)
        self.assertLess(measured, reported + 0.5)
        # The second thread's 37 ms are in it, beside the main thread's.
        self.assertGreaterEqual(measured - main_thread, 0.036)
        self.assertNotEqual(round(measured * 1e9) % 10_000_000, 0)

    def test_falls_back_to_ticks_without_schedstat(self):
        # A /proc without task/*/schedstat: utime + stime in clock ticks.
        proc = self.mktemp()
        os.makedirs(os.path.join(proc, "42"))
        ticks = os.sysconf("SC_CLK_TCK")
        with open(os.path.join(proc, "42", "stat"), "w") as f:
            f.write("42 (a name) S 1 42 42 0 -1 4194560 0 0 0 0 {} {} 0 0 20 0 1 0\n".format(
                3 * ticks, ticks))
        self.assertEqual(_common.cpu_times(42, proc), (3.0, 1.0))
        self.assertEqual(_common.cpu_seconds(42, proc), 4.0)
