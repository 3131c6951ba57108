"""
Running ``twistd`` daemons in tests: their output read line by line with a
deadline on every wait, so a daemon that never says something fails the
test instead of hanging it.  Daemons are given port 0 and report the port
they bound (:func:`listening_port`): no port is picked, closed and hoped
free until the daemon binds it.
"""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
import time

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
PERC = [sys.executable, "-m", "perc.scripts.cli"]
WAIT = 30


class DaemonOutput:
    """The lines of ``process.stdout`` (bytes or text), read by a thread as they come."""

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._queue.put(line.decode("utf-8", "replace") if isinstance(line, bytes) else line)
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float = WAIT) -> str:
        """The first new line holding ``text``; AssertionError after ``timeout`` s or at EOF."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._queue.get(timeout=max(0.0, remaining))
            except queue.Empty:
                line = None if remaining <= 0 else ""
                if line is None:
                    raise AssertionError("no line with {!r} within {} s; output:\n{}".format(
                        text, timeout, "".join(self.lines))) from None
            if line is None:
                self._queue.put(None)  # stays at EOF
                raise AssertionError("the daemon ended without {!r}; output:\n{}".format(
                    text, "".join(self.lines)))
            self.lines.append(line)
            if text in line:
                return line

    def rest(self, timeout: float = WAIT) -> list[str]:
        """Every line until the process closes its output (after ``timeout`` s: AssertionError)."""
        self._reader.join(timeout)
        if self._reader.is_alive():
            raise AssertionError("the daemon's output did not end within {} s".format(timeout))
        while True:
            line = self._queue.get()
            if line is None:
                self._queue.put(None)
                return self.lines
            self.lines.append(line)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=WAIT)
        self.process.stdout.close()


#: What the daemons log once they listen, by what listens: the option's name
#: (``Listening for api on IPv4Address(..., port=4741)``) or "media", the
#: Media Distributor's UDP port.
_LISTENING = "Listening for {} on "
_MEDIA = "Endpoints' UDP port: "
_PORT = re.compile(r"port=(\d+)\)")


def listening_port(output: DaemonOutput, what: str) -> int:
    """
    The port the daemon says it bound for ``what`` ("tunnel-listen", "api",
    "metrics" or "media"), from a line already read or the next one to say
    it (AssertionError after the deadline, as :meth:`DaemonOutput.wait_for`).
    """
    text = _MEDIA if what == "media" else _LISTENING.format(what)
    lines = [line for line in output.lines if text in line]
    line = lines[0] if lines else output.wait_for(text)
    match = _PORT.search(line)
    if match is None:
        raise AssertionError("no port in {!r}".format(line))
    return int(match.group(1))
