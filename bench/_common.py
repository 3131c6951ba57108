"""
Small helpers shared by the benchmarks in ``bench/`` (not installed; each
benchmark adds this directory to ``sys.path`` itself or is run from it).

Only generic pieces live here: starting and stopping ``twistd perc-kd`` /
``twistd perc-md`` as real processes with a temporary development PKI,
registering endpoints through the control APIs, the CPU time of a process
from ``/proc``, and printing the one JSON object every benchmark ends with.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

__all__ = [
    "TWISTD",
    "PERC",
    "free_port",
    "free_ports",
    "Daemon",
    "Distributors",
    "start_distributors",
    "http_json",
    "register_endpoint",
    "cpu_seconds",
    "print_json_last",
]

#: ``twistd`` of the running interpreter (works without the venv's bin/ on PATH).
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
#: The ``perc`` command of the running interpreter.
PERC = [sys.executable, "-m", "perc.cli"]


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port on 127.0.0.1 that was free a moment ago (TCP by default)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(count: int, kind: int = socket.SOCK_STREAM) -> list:
    """``count`` different ports on 127.0.0.1 that were free a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, kind)
            sockets.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Daemon:
    """
    A ``twistd -n`` process whose combined output goes to ``log_path`` (a
    file, not a pipe: a daemon that logs a lot never blocks on a reader).
    """

    def __init__(self, directory: str, args: list, log_name: str):
        self.log_path = os.path.join(directory, log_name)
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            TWISTD + ["-n", "--pidfile="] + list(args), cwd=directory,
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_for(self, text: str, timeout: float = 30.0) -> None:
        """Wait until ``text`` appears in the output; raise with the output if it does not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError("{!r} not seen (exit status {}); output:\n{}".format(
            text, self.process.poll(), self.output()))

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self._log.closed:
            self._log.close()
        return self.process.returncode


class Distributors:
    """A running ``perc-kd`` and ``perc-md`` pair (see :func:`start_distributors`)."""

    def __init__(self, directory, dev, kd, md, kd_api, md_api, media_port):
        self.directory = directory
        self.pki = dev
        self.kd = kd
        self.md = md
        self.kd_api = "http://127.0.0.1:{}".format(kd_api)
        self.md_api = "http://127.0.0.1:{}".format(md_api)
        self.media_address = ("127.0.0.1", media_port)
        with open(os.path.join(directory, "perc-kd-api.token")) as f:
            self.kd_token = f.read().strip()
        with open(os.path.join(directory, "perc-md-api.token")) as f:
            self.md_token = f.read().strip()

    @property
    def kd_fingerprint(self) -> str:
        from cryptography import x509

        from perc import pki

        with open(self.pki.kd_certificate, "rb") as f:
            return pki.fingerprint(x509.load_pem_x509_certificate(f.read()))

    def stop(self) -> None:
        self.md.stop()
        self.kd.stop()


def start_distributors(directory: str, md_args=(), kd_args=(), timeout: float = 30.0,
                       md_twistd_options=(), kd_twistd_options=()):
    """
    A development PKI in ``directory/pki``, then ``twistd -n perc-kd`` and
    ``twistd -n perc-md`` on loopback (each with its own API and token file in
    ``directory``), returned once the tunnel between them is up.  Extra
    options go in ``md_args`` / ``kd_args``; ``md_twistd_options`` are
    twistd's own (before the subcommand, e.g. ``--profile``), as are
    ``kd_twistd_options`` for the Key Distributor.  On failure
    both are stopped.
    """
    from perc import pki

    dev = pki.create_dev_pki(os.path.join(directory, "pki"))
    kd_port, kd_api, md_api = free_ports(3)
    media_port = free_port(socket.SOCK_DGRAM)
    kd = Daemon(directory, list(kd_twistd_options) + [
        "perc-kd", "--pki", dev.directory,
        "--tunnel-listen", "tcp:{}:interface=127.0.0.1".format(kd_port),
        "--api", "tcp:{}:interface=127.0.0.1".format(kd_api),
        "--db", os.path.join(directory, "perc-kd.sqlite3")] + list(kd_args), "perc-kd.log")
    md = None
    try:
        kd.wait_for("Key Distributor ready", timeout)
        md = Daemon(directory, list(md_twistd_options) + [
            "perc-md", "--pki", dev.directory, "--kd", "tcp:127.0.0.1:{}".format(kd_port),
            "--media-port", str(media_port), "--media-interface", "127.0.0.1",
            "--api", "tcp:{}:interface=127.0.0.1".format(md_api)] + list(md_args),
            "perc-md.log")
        try:
            kd.wait_for("Tunnel with", timeout)
        except RuntimeError as error:
            raise RuntimeError("{}\nperc-md output (exit status {}):\n{}".format(
                error, md.process.poll(), md.output())) from None
        return Distributors(directory, dev, kd, md, kd_api, md_api, media_port)
    except BaseException:
        if md is not None:
            md.stop()
        kd.stop()
        raise


def http_json(method: str, url: str, token: str, body=None, timeout: float = 30.0):
    """``(status, decoded JSON or None)`` of one request with a bearer token."""
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Authorization": "Bearer " + token, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw, status = response.read(), response.status
    except urllib.error.HTTPError as error:
        raw, status = error.read(), error.code
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, None


def register_endpoint(distributors: Distributors, conference: str, tls_id: str,
                      fingerprint: str) -> str:
    """
    Register ``tls_id`` with both distributors (what ``perc register`` does)
    and return the Key Distributor's ``kd_tls_id``.
    """
    from urllib.parse import quote

    path = "/v1/conferences/{}/endpoints/{}".format(quote(conference, safe=""),
                                                    quote(tls_id, safe=""))
    status, answer = http_json("PUT", distributors.kd_api + path, distributors.kd_token,
                               {"fingerprint": fingerprint})
    if status not in (200, 201):
        raise RuntimeError("Key Distributor refused {}: {} {}".format(tls_id, status, answer))
    status, placed = http_json("PUT", distributors.md_api + path, distributors.md_token, {})
    if status not in (200, 201):
        raise RuntimeError("Media Distributor refused {}: {} {}".format(tls_id, status, placed))
    return answer["kd_tls_id"]


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (``/proc/PID/stat``)."""
    with open("/proc/{}/stat".format(pid)) as f:
        stat = f.read()
    # The command name (field 2) may hold spaces: split after its ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    # Fields 14 and 15 (utime, stime) are at 11 and 12 after the state (field 3).
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def print_json_last(document: dict) -> None:
    """Print ``document`` as one compact JSON line (the last line a benchmark prints)."""
    sys.stdout.flush()
    print(json.dumps(document, sort_keys=True, separators=(",", ":")), flush=True)


# --------------------------------------------------------------------------
# Added for bench/handshake.py, bench/memory.py and bench/codec.py (generic).

__all__ += ["rss_kib", "percentile", "format_table"]


def rss_kib(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB (``VmRSS`` of ``/proc/PID/status``)."""
    with open("/proc/{}/status".format(pid)) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS for process {}".format(pid))


def percentile(values, fraction: float) -> float:
    """The ``fraction`` (0..1) percentile of ``values``, nearest-rank; NaN if empty."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), int(-(-fraction * len(ordered) // 1))))
    return ordered[rank - 1]


def format_table(header, rows) -> str:
    """A plain text table: ``header`` and ``rows`` are sequences of cells (str())."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if n and i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


__all__ += ["udp_drops"]


def udp_drops(port: int, host: str = "127.0.0.1") -> int:
    """Datagrams dropped so far by the IPv4 UDP socket(s) bound to ``host:port`` (/proc/net/udp)."""
    import ipaddress

    local = "{:08X}:{:04X}".format(
        int.from_bytes(ipaddress.IPv4Address(host).packed, "little"), port)
    drops = 0
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[1] == local:
                drops += int(fields[-1])
    return drops
