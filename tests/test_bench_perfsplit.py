"""
bench/_perfsplit.py and ``perc bench handshake --kd-perf``: where a
process's CPU goes by library, from real ``perf`` samples of a real child
process (skipped, saying why, where perf cannot record).
"""

from __future__ import annotations

import collections
import functools
import os
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SkipTest, SynchronousTestCase

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import _perfsplit  # noqa: E402

#: Signs with P-256 through cryptography's OpenSSL, then spins in Python,
#: each for about the given seconds, then waits on stdin.
_CHILD = """
import sys, time
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
key = ec.generate_private_key(ec.SECP256R1())
print("ready", flush=True)
sys.stdin.readline()
end = time.process_time() + {openssl}
while time.process_time() < end:
    key.sign(b"x" * 64, ec.ECDSA(hashes.SHA256()))
end = time.process_time() + {python}
n = 0
while time.process_time() < end:
    n += sum(range(20000))
print("done", flush=True)
sys.stdin.readline()
"""


@functools.lru_cache(maxsize=None)
def _perf_usable() -> str:
    """Why perf cannot record here, or "" when it can."""
    try:
        perf = _perfsplit.perf_command()
    except _perfsplit.PerfUnavailable as error:
        return str(error)
    with tempfile.TemporaryDirectory() as directory:
        result = subprocess.run(
            [perf, "record", "-q", "-e", "cpu-clock", "-o", os.path.join(directory, "p"),
             "--", sys.executable, "-c", "pass"],
            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return "perf record fails here: {}".format(
            (result.stderr.strip().splitlines() or ["exit status {}".format(
                result.returncode)])[0])
    return ""


class GroupTests(SynchronousTestCase):
    """Shared objects, named as perf names them, fall in the right group."""

    def test_this_interpreters_own_objects(self):
        import _cffi_backend
        import _struct

        from cryptography.hazmat.bindings import _rust

        self.assertEqual(_perfsplit.group_of(_rust.__file__), "openssl")
        self.assertEqual(_perfsplit.group_of(_struct.__file__), "python")
        self.assertEqual(_perfsplit.group_of(_cffi_backend.__file__), "python")
        self.assertEqual(_perfsplit.group_of(os.path.realpath(sys.executable)), "python")

    def test_system_objects(self):
        self.assertEqual(_perfsplit.group_of("[kernel.kallsyms]"), "kernel")
        self.assertEqual(_perfsplit.group_of("[vdso]"), "kernel")
        self.assertEqual(_perfsplit.group_of("/usr/lib/x86_64-linux-gnu/libc.so.6"), "libc")
        self.assertEqual(_perfsplit.group_of("/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
                         "libc")
        self.assertEqual(_perfsplit.group_of("/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0"),
                         "python")
        self.assertEqual(_perfsplit.group_of("/usr/lib/x86_64-linux-gnu/libcrypto.so.3"),
                         "hashlib")
        # An OpenSSL another wheel carries is not the one the engine drives.
        self.assertEqual(_perfsplit.group_of(
            "/venv/lib/python3.11/site-packages/pylibsrtp.libs/libcrypto-1b2c3d.so.3"), "other")
        self.assertEqual(_perfsplit.group_of("[unknown]"), "other")

    def test_count_and_split(self):
        rust = "/venv/site-packages/cryptography/hazmat/bindings/_rust.abi3.so"
        script = (
            "     7f93c49a9580 _int_malloc (/usr/lib/x86_64-linux-gnu/libc.so.6)\n"
            " ffffffff815e69ed handle_softirqs ([kernel.kallsyms])\n"
            "     7f0000000001 __ecp_nistz256_mul_montx ({0})\n"
            "     7f0000000002 __ecp_nistz256_mul_montx ({0})\n"
            "     7f0000000003 [unknown] ({0})\n"
            "     7f0000000004 std::vec::Vec<u8>::push (x) ({0})\n"
            "\n"
            "not a sample line\n").format(rust)
        counts = _perfsplit.count_samples(script)
        self.assertEqual(sum(counts.values()), 6)
        self.assertEqual(counts[rust, "__ecp_nistz256_mul_montx"], 2)
        self.assertEqual(counts[rust, "std::vec::Vec<u8>::push (x)"], 1)
        shares = _perfsplit.split(counts)
        self.assertEqual(set(shares), set(_perfsplit.GROUPS))
        self.assertEqual(shares["openssl"], 4 / 6)
        self.assertEqual(shares["libc"], 1 / 6)
        self.assertEqual(shares["kernel"], 1 / 6)
        self.assertEqual(shares["python"], 0.0)
        self.assertEqual(_perfsplit.top_symbols(counts, "openssl", 1),
                         [("__ecp_nistz256_mul_montx", 2 / 6)])
        self.assertEqual(_perfsplit.split(collections.Counter()),
                         dict.fromkeys(_perfsplit.GROUPS, 0.0))


class RecorderTests(SynchronousTestCase):
    """A real perf recording of a real child process."""

    def setUp(self):
        why = _perf_usable()
        if why:
            raise SkipTest("{} (Debian: apt-get install linux-perf; run as root or with "
                           "kernel.perf_event_paranoid <= 1)".format(why))
        self.directory = self.mktemp()
        os.makedirs(self.directory)

    def child(self, openssl, python):
        process = subprocess.Popen(
            [sys.executable, "-c", _CHILD.format(openssl=openssl, python=python)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.addCleanup(process.wait)
        self.addCleanup(process.stdin.close)
        self.assertEqual(process.stdout.readline(), "ready\n")
        return process

    def record(self, openssl, python):
        process = self.child(openssl, python)
        recorder = _perfsplit.Recorder(process.pid, os.path.join(self.directory, "perf.data"))
        recorder.start()
        process.stdin.write("go\n")
        process.stdin.flush()
        self.assertEqual(process.stdout.readline(), "done\n")
        recorder.stop()
        return recorder.counts()

    def test_openssl_work_and_python_work_are_told_apart(self):
        signing_counts = self.record(openssl=0.6, python=0.0)
        signing = _perfsplit.split(signing_counts)
        spinning = _perfsplit.split(self.record(openssl=0.0, python=0.6))
        self.assertGreater(signing["openssl"], 0.5)
        # ECDSA over P-256: OpenSSL's P-256 field arithmetic leads.
        self.assertIn("nistz256", " ".join(
            symbol for symbol, _ in _perfsplit.top_symbols(signing_counts, "openssl")))
        self.assertLess(spinning["openssl"], 0.05)
        self.assertGreater(spinning["python"], 0.8)

    def test_samples_match_the_cpu_time(self):
        counts = self.record(openssl=0.3, python=0.3)
        # 0.6 s of CPU at 2,000 samples per second (and the loops' ends).
        self.assertTrue(900 < sum(counts.values()) < 1800, sum(counts.values()))

    def test_a_process_that_is_gone(self):
        process = subprocess.Popen([sys.executable, "-c", "pass"])
        process.wait()
        recorder = _perfsplit.Recorder(process.pid, os.path.join(self.directory, "gone.data"))
        error = self.assertRaises(_perfsplit.PerfUnavailable, recorder.start, 2.0)
        self.assertIn("perf record stopped at once", str(error))
        self.assertNotIn("\n", str(error))


class OptionTests(SynchronousTestCase):
    """``perc bench handshake --kd-perf`` refuses in one line what cannot work."""

    def run_handshake(self, *arguments, env=None):
        return subprocess.run(
            [sys.executable, os.path.join(BENCH, "handshake.py"), *arguments],
            capture_output=True, text=True, env=env, timeout=60, check=False)

    def test_not_with_cprofile(self):
        result = self.run_handshake("--kd-perf", "x.data", "--kd-profile", "x.prof")
        self.assertEqual(result.returncode, 2)
        self.assertIn("--kd-perf and --kd-profile: choose one", result.stderr)

    def test_without_perf(self):
        with tempfile.TemporaryDirectory() as empty:
            env = dict(os.environ, PATH=empty)
            result = self.run_handshake("--kd-perf", "x.data", env=env)
        self.assertEqual(result.returncode, 2)
        self.assertIn("--kd-perf: perf is not installed (Debian: apt-get install linux-perf)",
                      result.stderr)
