"""
Running ``twistd`` daemons in tests: their output read line by line with a
deadline on every wait, so a daemon that never says something fails the
test instead of hanging it.
"""

from __future__ import annotations

import queue
import socket
import subprocess
import sys
import threading
import time

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
WAIT = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
