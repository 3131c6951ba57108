"""
``twistd -n perc-kd`` / ``twistd -n perc-md`` as real child processes, for
``perc demo --key-distributors``, the benchmarks in ``bench/`` and the tests
that kill a daemon: start one with its output in a file, read back the
ports it bound, wait for a line (blocking, or on a reactor), stop it with
SIGTERM or kill it with SIGKILL.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

__all__ = ["TWISTD", "Daemon", "DaemonError", "bound_port"]

#: ``twistd`` of the running interpreter (works without the venv's bin/ on PATH).
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class DaemonError(RuntimeError):
    """A daemon did not say what was awaited, or ended; the message ends with its output."""


def bound_port(output: str, what: str) -> int:
    """
    The port a daemon bound for ``what`` ("tunnel-listen", "api", "metrics"
    or "media"), read from its log ``output``.  The daemons are given port 0:
    no port is picked, closed and hoped free until a daemon binds it.
    """
    text = "Endpoints' UDP port: " if what == "media" else "Listening for {} on ".format(what)
    for line in output.splitlines():
        if text in line:
            match = re.search(r"port=(\d+)\)", line)
            if match:
                return int(match.group(1))
    raise DaemonError("no {!r} line with a port in:\n{}".format(text, output))


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux; else nothing)."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Daemon:
    """
    A ``twistd -n`` process whose combined output goes to ``log_path`` (a
    file, not a pipe: a daemon that logs a lot never blocks on a reader).
    With ``die_with_parent`` (Linux) the kernel sends it SIGTERM if this
    process dies without stopping it: no orphan daemons.  Its log is
    ``perc.logs.text`` (twistd's text lines, at about a seventh of the
    cost per event) unless ``args`` choose a ``--logger``.
    """

    def __init__(self, directory: str, args: list, log_name: str,
                 die_with_parent: bool = False):
        self.log_path = os.path.join(directory, log_name)
        self._log = open(self.log_path, "w")
        logger = [] if any(arg == "--logger" or arg.startswith("--logger=") for arg in args) \
            else ["--logger", "perc.logs.text"]
        self.process = subprocess.Popen(
            TWISTD + ["-n", "--pidfile="] + logger + list(args), cwd=directory,
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if die_with_parent else None)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def port(self, what: str) -> int:
        """The port it bound for ``what`` (see :func:`bound_port`)."""
        return bound_port(self.output(), what)

    def _check(self, text: str) -> bool:
        if text in self.output():
            return True
        if not self.running:
            raise DaemonError("{} ended (exit status {}) without {!r}; its output ends:\n{}".format(
                self.log_path, self.process.returncode, text, self.output()[-3000:]))
        return False

    def wait_for(self, text: str, timeout: float = 30.0) -> None:
        """Block until ``text`` appears in the output; DaemonError if it ends or times out."""
        deadline = time.monotonic() + timeout
        while not self._check(text):
            if time.monotonic() > deadline:
                raise DaemonError("{!r} not seen within {} s in {}; its output ends:\n{}".format(
                    text, timeout, self.log_path, self.output()[-3000:]))
            time.sleep(0.05)

    async def said(self, reactor, text: str, timeout: float = 30.0, poll: float = 0.05) -> None:
        """:meth:`wait_for` without blocking ``reactor`` (an IReactorTime)."""
        from twisted.internet import task

        deadline = reactor.seconds() + timeout
        while not self._check(text):
            if reactor.seconds() > deadline:
                raise DaemonError("{!r} not seen within {} s in {}; its output ends:\n{}".format(
                    text, timeout, self.log_path, self.output()[-3000:]))
            await task.deferLater(reactor, poll, lambda: None)

    def kill(self) -> int:
        """SIGKILL (a crash: nothing is released, nothing is flushed); returns the exit status."""
        if self.running:
            self.process.kill()
        self.process.wait()
        self._close_log()
        return self.process.returncode

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if self.running:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._close_log()
        return self.process.returncode

    async def stopped(self, reactor, timeout: float = 15.0, poll: float = 0.05) -> int | None:
        """
        :meth:`stop` (SIGTERM, SIGKILL after ``timeout``) without blocking
        ``reactor`` (an IReactorTime): what the daemon needs while it stops
        (a relay to its database, say) may run on that reactor.
        """
        from twisted.internet import task

        if self.running:
            self.process.send_signal(signal.SIGTERM)
            deadline = reactor.seconds() + timeout
            while self.running and reactor.seconds() < deadline:
                await task.deferLater(reactor, poll, lambda: None)
        return self.kill() if self.running else self.stop()

    def _close_log(self) -> None:
        if not self._log.closed:
            self._log.close()


class KeyDistributorProcess:
    """
    One ``twistd -n perc-kd`` of a cluster: its :class:`Daemon`, node id and
    the ports it bound (tunnel listener, registration API).
    """

    def __init__(self, daemon: Daemon, node_id: str):
        self.daemon = daemon
        self.node_id = node_id
        self.tunnel_port = daemon.port("tunnel-listen")
        self.api_port = daemon.port("api")

    @property
    def api_url(self) -> str:
        return "http://127.0.0.1:{}".format(self.api_port)

    @property
    def tunnel_endpoint(self) -> str:
        """Client endpoint description a Media Distributor's ``--kd`` takes."""
        return "tcp:127.0.0.1:{}".format(self.tunnel_port)


async def start_key_distributors(reactor, directory: str, count: int, *, pki_directory: str,
                                 db, lease_seconds: float = 10.0, extra_args=(),
                                 log_prefix: str = "perc-kd") -> list:
    """
    Start ``count`` Key Distributors sharing ``db`` (a PostgreSQL DSN for
    more than one; or a list of ``count`` DSNs of one database, e.g. one
    through a relay that a test cuts), the PKI in ``pki_directory``, one
    sealing key and one API token (files in ``directory``), each with its
    own node id (``kd-1`` ...) and ports on 127.0.0.1; return their
    :class:`KeyDistributorProcess` once each has said it is ready.  They die
    with this process; a failure stops those already started.
    """
    dsns = [db] * count if isinstance(db, str) else list(db)
    if len(dsns) != count:
        raise ValueError("{} database DSNs for {} Key Distributors".format(len(dsns), count))
    started = []
    try:
        for index, dsn in enumerate(dsns, 1):
            node_id = "kd-{}".format(index)
            args = ["perc-kd", "--pki", pki_directory, "--db", dsn,
                    "--sealing-key", os.path.join(directory, "perc-kd.sealing-key"),
                    "--api-token-file", os.path.join(directory, "perc-kd-api.token"),
                    "--tunnel-listen", "tcp:0:interface=127.0.0.1",
                    "--api", "tcp:0:interface=127.0.0.1",
                    "--node-id", node_id, "--lease-seconds", str(lease_seconds)]
            daemon = Daemon(directory, args + list(extra_args),
                            "{}.{}.log".format(log_prefix, index), die_with_parent=True)
            started.append(daemon)
            # One at a time: the first creates the sealing key, token and schema.
            await daemon.said(reactor, "Key Distributor ready")
        return [KeyDistributorProcess(daemon, "kd-{}".format(index))
                for index, daemon in enumerate(started, 1)]
    except BaseException:
        for daemon in started:
            daemon.kill()
        raise
