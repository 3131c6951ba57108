"""
Where a process's CPU time goes, by library: Linux ``perf`` samples on the
CPU clock (``perf record -e cpu-clock -p PID``), each attributed to the
shared object its instruction pointer was in, grouped into what a join of
the Key Distributor is made of.

The groups (:data:`GROUPS`, :func:`group_of`):

``openssl``
    OpenSSL as pyOpenSSL and the DTLS engine use it: the copy cryptography
    carries (inside its ``_rust.abi3.so``, or as an ``_openssl`` module or
    ``libssl``/``libcrypto`` under its directory).
``hashlib``
    The system's ``libcrypto`` that CPython's ``hashlib`` and ``hmac``
    call (the engine's own PRF, cookies, fingerprints).
``python``
    The interpreter (``libpython``, the ``python`` executable) and its
    extension modules (``*.cpython-*.so``, ``_cffi_backend``): every line
    of Python, and the glue between Python and C.
``libc``
    The C library and the dynamic loader: mostly ``malloc``/``free`` and
    ``memcpy``, called from OpenSSL and from the interpreter alike (the
    samples do not say which).
``kernel``
    System calls (the tunnel's TCP, ``epoll``), interrupts, page faults.
``other``
    Anything else (an unknown or anonymous mapping).

The CPU clock event counts only time on a CPU, so a process that is idle
while perf records it adds no samples: recording across a benchmark's
rounds and the idle gaps between them splits the rounds' CPU alone.
Needs ``perf`` (Debian: ``linux-perf``) and permission to trace the process
(root, or ``kernel.perf_event_paranoid`` at most 1).
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import time

GROUPS = ("openssl", "hashlib", "python", "libc", "kernel", "other")
#: Samples per second: enough for a few hundred joins, little enough not to
#: slow the process measurably (each sample is one timer interrupt).
DEFAULT_FREQUENCY = 2000

#: A line of ``perf script -F ip,sym,dso``: address, symbol (which may
#: hold spaces and parentheses), and the shared object in parentheses last.
_SAMPLE = re.compile(r"^\s*[0-9a-fA-F]+\s+(.*?)\s*\(([^()]*)\)\s*$")


class PerfUnavailable(Exception):
    """perf cannot record here; the message says why in one line."""


def group_of(dso: str) -> str:
    """The group (one of :data:`GROUPS`) of a shared object's path or perf name."""
    name = os.path.basename(dso)
    if dso.startswith("[kernel") or name in ("[vdso]", "[vsyscall]"):
        return "kernel"
    if "cryptography" in dso and name.startswith(("_rust.", "_openssl.", "libssl", "libcrypto")):
        return "openssl"
    if name.startswith(("libcrypto.", "libssl.")) and dso.startswith(("/usr/lib", "/lib")):
        return "hashlib"
    if name.startswith(("libpython", "python")) or ".cpython-" in name or \
            name.startswith("_cffi_backend"):
        return "python"
    if name.startswith(("libc.", "libc-", "libm.", "libpthread", "ld-linux", "ld-2.")):
        return "libc"
    return "other"


def count_samples(script_output: str) -> collections.Counter:
    """Samples per (shared object, symbol), from ``perf script -F ip,sym,dso`` output."""
    counts: collections.Counter = collections.Counter()
    for line in script_output.splitlines():
        match = _SAMPLE.match(line)
        if match:
            counts[match.group(2), match.group(1) or "[unknown]"] += 1
    return counts


def split(counts: collections.Counter) -> dict[str, float]:
    """Each group's share (0 to 1) of all samples; every group present."""
    total = sum(counts.values())
    shares = dict.fromkeys(GROUPS, 0.0)
    if total:
        for (dso, _), n in counts.items():
            shares[group_of(dso)] += n / total
    return shares


def top_symbols(counts: collections.Counter, group: str, limit: int = 5) -> list:
    """The ``limit`` busiest symbols of ``group``, as (symbol, share of all samples)."""
    total = sum(counts.values()) or 1
    in_group: collections.Counter = collections.Counter()
    for (dso, symbol), n in counts.items():
        if group_of(dso) == group:
            in_group[symbol] += n
    return [(symbol, n / total) for symbol, n in in_group.most_common(limit)]


def perf_command() -> str:
    """The perf executable, or :class:`PerfUnavailable` saying how to get it."""
    perf = shutil.which("perf")
    if perf is None:
        raise PerfUnavailable("perf is not installed (Debian: apt-get install linux-perf)")
    return perf


class Recorder:
    """
    ``perf record`` of one process's CPU-clock samples into ``path``, from
    :meth:`start` to :meth:`stop`; :meth:`counts` reads them back.
    """

    def __init__(self, pid: int, path: str, frequency: int = DEFAULT_FREQUENCY) -> None:
        self.pid = pid
        self.path = path
        self.frequency = frequency
        self._process: subprocess.Popen | None = None
        self._perf = perf_command()

    def start(self, settle: float = 0.3) -> None:
        """Start recording; :class:`PerfUnavailable` if perf gives up at once."""
        self._process = subprocess.Popen(
            [self._perf, "record", "-q", "-e", "cpu-clock", "-F", str(self.frequency),
             "-p", str(self.pid), "-o", self.path],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # perf attaches within a moment or exits saying why (permissions,
        # no such process, an event the kernel lacks).
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise PerfUnavailable(self._failure("perf record stopped at once"))
            time.sleep(0.02)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop recording (SIGINT, as ``perf record`` expects) and wait for the file."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise PerfUnavailable("perf record did not stop within {:g} s".format(timeout))
        finally:
            if process.stderr is not None:
                process.stderr.close()
        if not os.path.exists(self.path):
            raise PerfUnavailable("perf record wrote no {}".format(self.path))

    def counts(self) -> collections.Counter:
        """Samples per (shared object, symbol) in the recording."""
        result = subprocess.run(
            [self._perf, "script", "-i", self.path, "-F", "ip,sym,dso"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise PerfUnavailable("perf script failed: {}".format(
                _first_line(result.stderr) or "exit status {}".format(result.returncode)))
        return count_samples(result.stdout)

    def _failure(self, what: str) -> str:
        assert self._process is not None
        stderr = self._process.stderr.read().decode("utf-8", "replace") \
            if self._process.stderr is not None else ""
        reason = _first_line(stderr)
        return "{}: {}".format(what, reason) if reason else what


def _first_line(text: str) -> str:
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line
    return ""
