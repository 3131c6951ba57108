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
import sys
import time
import urllib.error
import urllib.request

from perc.daemons import TWISTD, Daemon, bound_port

__all__ = [
    "TWISTD",
    "PERC",
    "bound_port",
    "Daemon",
    "Distributors",
    "start_distributors",
    "http_json",
    "register_endpoint",
    "cpu_seconds",
    "cpu_times",
    "print_json_last",
]

#: The ``perc`` command of the running interpreter.
PERC = [sys.executable, "-m", "perc.scripts.cli"]


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

    def stop(self, timeout: float = 15.0) -> None:
        self.md.stop(timeout)
        self.kd.stop(timeout)

    def problems(self) -> list:
        """What went wrong with the daemons so far: one exited, or one logged a traceback."""
        found = []
        for name, daemon in (("perc-kd", self.kd), ("perc-md", self.md)):
            if daemon.process.poll() is not None:
                found.append("{} exited (status {}); its output ends:\n{}".format(
                    name, daemon.process.poll(), daemon.output()[-3000:]))
            elif "Traceback" in daemon.output():
                found.append("{} logged a traceback (see {})".format(name, daemon.log_path))
        return found


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
    kd = Daemon(directory, list(kd_twistd_options) + [
        "perc-kd", "--pki", dev.directory,
        "--tunnel-listen", "tcp:0:interface=127.0.0.1", "--api", "tcp:0:interface=127.0.0.1",
        "--db", os.path.join(directory, "perc-kd.sqlite3")] + list(kd_args), "perc-kd.log")
    md = None
    try:
        kd.wait_for("Key Distributor ready", timeout)
        kd_port, kd_api = bound_port(kd.output(), "tunnel-listen"), bound_port(kd.output(), "api")
        md = Daemon(directory, list(md_twistd_options) + [
            "perc-md", "--pki", dev.directory, "--kd", "tcp:127.0.0.1:{}".format(kd_port),
            "--media-port", "0", "--media-interface", "127.0.0.1",
            "--api", "tcp:0:interface=127.0.0.1"] + list(md_args),
            "perc-md.log")
        try:
            kd.wait_for("Tunnel with", timeout)
            md_api, media_port = bound_port(md.output(), "api"), bound_port(md.output(), "media")
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


def cpu_seconds(pid: int, proc: str = "/proc") -> float:
    """
    CPU seconds (user + system) of process ``pid`` so far, to the
    nanosecond: the sum of its threads' time on a CPU from
    ``/proc/PID/task/TID/schedstat``.  ``/proc/PID/stat`` counts in clock
    ticks (10 ms), too coarse for a few hundred joins.  Threads that have
    ended are not in it (the daemons' threads live as long as they do);
    where schedstat is missing, the ticks of ``/proc/PID/stat``.
    """
    total = 0
    try:
        tasks = os.listdir("{}/{}/task".format(proc, pid))
        for task in tasks:
            try:
                with open("{}/{}/task/{}/schedstat".format(proc, pid, task)) as f:
                    total += int(f.read().split()[0])
            except FileNotFoundError:
                pass  # the thread ended meanwhile
    except (FileNotFoundError, NotADirectoryError, ValueError, IndexError):
        return sum(cpu_times(pid, proc))
    return total / 1e9


def cpu_times(pid: int, proc: str = "/proc") -> tuple[float, float]:
    """(user, system) CPU seconds of process ``pid`` so far (``/proc/PID/stat``)."""
    with open("{}/{}/stat".format(proc, pid)) as f:
        stat = f.read()
    # The command name (field 2) may hold spaces: split after its ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    # Fields 14 and 15 (utime, stime) are at 11 and 12 after the state (field 3).
    return int(fields[11]) / _CLOCK_TICKS, int(fields[12]) / _CLOCK_TICKS


def print_json_last(document: dict) -> None:
    """Print ``document`` as one compact JSON line (the last line a benchmark prints)."""
    sys.stdout.flush()
    print(json.dumps(document, sort_keys=True, separators=(",", ":")), flush=True)


# --------------------------------------------------------------------------
# Added for bench/handshake.py, bench/memory.py and bench/codec.py (generic).

__all__ += ["rss_kib", "percentile", "format_table"]


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """
    Resident set size of process ``pid`` in KiB (``VmRSS`` of
    ``/proc/PID/status``; ``field="VmHWM"`` for its peak so far).
    """
    prefix = field + ":"
    with open("/proc/{}/status".format(pid)) as f:
        for line in f:
            if line.startswith(prefix):
                return int(line.split()[1])
    raise RuntimeError("no {} for process {}".format(field, pid))


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
    return loopback_ports_drops([(host, port)])


# --------------------------------------------------------------------------
# Added for bench/flood.py and bench/load.py (generic).

__all__ += ["MemorySampler", "status", "md_drop_counters", "loopback_ports_drops"]


class MemorySampler:
    """
    Reads ``VmRSS`` of some processes every ``interval`` seconds in a
    thread of its own, from :meth:`start` until :meth:`stop`; ``VmHWM``
    (the kernel's own peak) is read at :meth:`stop`.  ``pids`` maps a name
    to a process id.
    """

    def __init__(self, pids: dict, interval: float = 0.1):
        import threading

        self.pids = dict(pids)
        self.interval = interval
        self.samples = {name: [] for name in self.pids}  # (monotonic seconds, KiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> "MemorySampler":
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            now = time.monotonic()
            for name, pid in self.pids.items():
                try:
                    self.samples[name].append((now, rss_kib(pid)))
                except (OSError, RuntimeError):
                    pass
            if self._stop.wait(self.interval):
                return

    def stop(self) -> dict:
        """Per name: first, peak and last sampled VmRSS and VmHWM, in KiB."""
        self._stop.set()
        self._thread.join()
        figures = {}
        for name, pid in self.pids.items():
            samples = [kib for _, kib in self.samples[name]]
            try:
                hwm = rss_kib(pid, "VmHWM")
            except (OSError, RuntimeError):
                hwm = None
            figures[name] = {
                "rss_first_kib": samples[0] if samples else None,
                "rss_peak_kib": max(samples) if samples else None,
                "rss_last_kib": samples[-1] if samples else None,
                "vm_hwm_kib": hwm,
                "samples": len(samples),
            }
        return figures

    def at(self, name: str, when: float):
        """The last VmRSS sample of ``name`` taken at or before ``when`` (monotonic), or None."""
        found = None
        for t, kib in self.samples[name]:
            if t > when:
                break
            found = kib
        return found


def status(distributors: Distributors, which: str) -> dict:
    """``GET /v1/status`` of the ``"kd"`` or ``"md"`` control API (``{}`` if it fails)."""
    base, token = ((distributors.kd_api, distributors.kd_token) if which == "kd"
                   else (distributors.md_api, distributors.md_token))
    try:
        code, document = http_json("GET", base + "/v1/status", token, timeout=10)
    except OSError:
        return {}
    return document if code == 200 and isinstance(document, dict) else {}


def md_drop_counters(md_status: dict) -> dict:
    """The Media Distributor's counters of what it dropped, refused or evicted."""
    return {name: value for name, value in sorted(md_status.get("counters", {}).items())
            if name.startswith(("dropped", "refused", "evicted"))}


def loopback_ports_drops(addresses) -> int:
    """Datagrams dropped so far by the IPv4 UDP sockets bound to ``addresses`` ((host, port))."""
    import ipaddress

    wanted = {"{:08X}:{:04X}".format(
        int.from_bytes(ipaddress.IPv4Address(host).packed, "little"), port)
        for host, port in addresses}
    drops = 0
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[1] in wanted:
                drops += int(fields[-1])
    return drops


__all__ += ["bench_main"]


def bench_main(name: str, run, args, failures=(RuntimeError,)) -> int:
    """
    ``run(args)`` and the ending every benchmark has: its figures as the
    last line with ``"ok": true`` (exit status 0), or, for one of
    ``failures``, a line ``FAILED: ...`` and ``{"benchmark": name, "ok":
    false, "error": ...}`` (exit status 1), with the figures measured so far
    when the exception carries them (a ``figures`` attribute).
    """
    try:
        figures = run(args)
    except failures as error:
        print("FAILED: {}".format(error))
        document = dict(getattr(error, "figures", None) or {})
        document.update({"benchmark": name, "ok": False, "error": str(error)})
        print_json_last(document)
        return 1
    figures["ok"] = True
    print_json_last(figures)
    return 0
