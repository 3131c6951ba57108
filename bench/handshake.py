"""
Handshake benchmark: how fast endpoints join through a real ``twistd
perc-md`` and ``twistd perc-kd``, and what each association costs the Key
Distributor in CPU, against the bare DTLS engine doing the same handshake.

Set-up: a temporary development PKI, ``twistd -n perc-kd`` and ``twistd -n
perc-md`` (subprocesses, via ``bench/_common.py``), and a *worker process*
(this script with ``--worker``) that runs N client-role DTLS engines
(``perc.dtls.ClientAssociation``: extension 56 tls-id, EKT offered, the Key
Distributor's tls-id and fingerprint checked) over one UDP socket each,
towards the Media Distributor's media port.  Each endpoint has its own
self-signed P-256 certificate.  A worker raises its soft open-file limit to
the hard one; when the endpoints do not fit under the hard limit (less
64 descriptors), they are split evenly over several worker processes (at
most 8, :class:`WorkerPool`), and a run that would need more fails at once
with one line saying so.

Registration (``--register``), done by the worker before the clock starts:

``api`` (default)
    ``PUT /v1/conferences/C/endpoints/TLS_ID`` on the Key Distributor's
    registration API for each endpoint (one keep-alive HTTP connection);
    the Media Distributor places everyone with ``--default-conference C``.
``both``
    As ``api``, and ``PUT`` on the Media Distributor's control API too (no
    ``--default-conference``): what ``perc register --md-api`` does.
``sqlite``
    The worker writes the registrations (its own random ``kd_tls_id`` per
    endpoint) into the Key Distributor's SQLite file, with the roster's own
    schema, *before* the Key Distributor starts; the Media Distributor uses
    ``--default-conference``.  Fastest for thousands of endpoints.

The Media Distributor runs with ``--new-associations-per-second`` raised
(every endpoint comes from 127.0.0.1) and large association limits.

Measure: ``--rounds`` rounds (default 3), each of N fresh endpoints (N =
``--endpoints``, default 200): on "go" the worker starts ``--concurrency``
handshakes at once (all N by default) and a new one whenever one finishes;
the next round starts once every endpoint of the previous one holds its
keys (and all stay connected).  Join latency of an
endpoint = from its first ClientHello to the moment it holds its keys (the
hop-by-hop keys exported at HandshakeComplete *and* the conference EKTKey,
which the Key Distributor sends as RFC 8870's ``ekt_key`` message right
after its final flight; an endpoint without it after 0.5 s asks again, as
``perc endpoint`` does).
``assoc_per_s`` = associations / the rounds' time from first ClientHello
to last join; latency percentiles are over every join of every round.  Key
Distributor CPU = the ``perc-kd`` process's time on a CPU (user + system,
summed over its threads from ``/proc/PID/task/*/schedstat``, to the
nanosecond), delta from just before each round's "go" until it is idle after
its last join, summed and divided by the number of associations.

Baseline, same run: ``--baseline-count`` handshakes of the same profile,
extensions (56 both ways, 39) and certificates done in this process with
``perc.dtls.ServerListener`` (cookie exchange included) and
``ClientAssociation`` shuttling datagrams in memory, no tunnel, no reactor;
only the server's calls are timed (``time.process_time``).  It runs before
each round and after the last one, so that it sees the same (shared)
machine as the rounds; ``baseline_cpu_per_assoc`` is the median of those
runs.  ``ratio`` = kd_cpu_per_assoc / baseline_cpu_per_assoc.

Second baseline, same run and same schedule: ``--baseline-count`` bare
pyOpenSSL DTLS 1.2 server handshakes (ECDSA P-256 certificates, mutual
authentication by OpenSSL alone, use_srtp with the same profile, memory
BIOs, no cookie exchange, no custom extension, no Python callback; see
:func:`bare_openssl_cpu_per_handshake`): the floor under any Python DTLS
engine.  ``bare_openssl_cpu_per_assoc`` is the median of those runs and
``ratio_vs_bare_openssl`` = kd_cpu_per_assoc / bare_openssl_cpu_per_assoc.

    python bench/handshake.py [--endpoints 200] [--rounds 3] [--concurrency 200]
    perc bench handshake --endpoints 500 --concurrency 100 --register sqlite
    perc bench handshake --kd-profile kd.prof     # perc-kd under cProfile
    perc bench handshake --md-profile md.prof     # perc-md under cProfile
    perc bench handshake --kd-perf kd.perf        # where perc-kd's CPU goes, by library

``--kd-perf`` records perc-kd with Linux perf during the rounds (CPU-clock
samples, see ``bench/_perfsplit.py``) and adds ``kd_cpu_split`` (each
group's share: OpenSSL, the system libcrypto behind hashlib, the Python
interpreter and extension modules, the C library, the kernel, other),
``kd_cpu_split_ms_per_assoc`` (the same in ms per association) and
``kd_openssl_vs_bare_openssl`` (perc-kd's OpenSSL time per association over
the bare handshake: what the ratio would be if nothing else cost anything)
and ``kd_openssl_top_symbols`` (the busiest OpenSSL functions, each with its
share of all samples).

Targets: ratio_vs_bare_openssl <= 2.0 and join_p99_s < 0.25 at 200
concurrent joins.  The last
line printed is one JSON object with the figures.  Exit status 1 (with a
line starting ``FAILED``) if any endpoint fails to join; the targets are
reported (``targets_met``), not enforced.
"""

from __future__ import annotations

import argparse
import errno
import heapq
import http.client
import json
import os
import resource
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from urllib.parse import quote

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import _perfsplit  # noqa: E402

CONFERENCE = "bench-handshake"
#: An endpoint that has its keys but no EKTKey record after this long asks again.
EKT_KEY_RETRY = 0.5
EKT_KEY_REQUEST = b"\x01"
#: Endpoint sockets' receive buffer (so that bursts are never lost there).
ENDPOINT_RCVBUF = 1 << 20
#: Descriptors a worker process holds besides its endpoints' sockets (standard
#: streams, the epoll, the interpreter's and OpenSSL's own, the SQLite file).
WORKER_FD_RESERVE = 64
#: Worker processes at most: more means a hard open-file limit far below what
#: the endpoints asked for, better raised than worked around.
MAX_WORKERS = 8


class BenchFailure(Exception):
    """Something measured did not work: exit 1."""


# --------------------------------------------------------------------------
# Options


def add_common_options(parser, default_endpoints):
    parser.add_argument("--endpoints", "-n", type=int, default=default_endpoints,
                        help="endpoints joining (per round) (default %(default)s)")
    parser.add_argument("--concurrency", "-c", type=int, default=None,
                        help="handshakes in flight at once (default: all of them)")
    parser.add_argument("--register", choices=("api", "both", "sqlite"), default="api",
                        help="how endpoints are registered before the clock starts "
                             "(default %(default)s; see the module help)")
    parser.add_argument("--profile", "-p", default="DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM",
                        help="SRTP protection profile the endpoints offer (default 0x0009)")
    parser.add_argument("--timeout", type=float, default=45.0,
                        help="seconds for all joins before the run fails (default 45)")
    parser.add_argument("--kd-profile", metavar="FILE",
                        help="run perc-kd under cProfile (twistd --profiler cprofile) and "
                             "save the statistics to FILE; the figures are then not "
                             "representative")
    parser.add_argument("--md-profile", metavar="FILE",
                        help="the same for perc-md")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (PKI, daemon logs)")
    parser.add_argument("--worker", metavar="CONFIG", help=argparse.SUPPRESS)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="perc bench handshake",
        description="Association setup through real perc-md and perc-kd: associations/s, "
                    "join latency, Key Distributor CPU per association against an "
                    "in-process DTLS baseline and a bare pyOpenSSL handshake.")
    add_common_options(parser, 200)
    parser.add_argument("--rounds", "-r", type=int, default=3,
                        help="rounds of --endpoints joins, each with fresh endpoints; a "
                             "baseline measurement before each round and after the last "
                             "(default 3)")
    parser.add_argument("--baseline-count", type=int, default=200,
                        help="handshakes per measurement of each baseline (default 200)")
    parser.add_argument("--kd-perf", metavar="FILE",
                        help="record perc-kd's CPU-clock samples with Linux perf during the "
                             "rounds into FILE and report where its CPU went by library "
                             "(kd_cpu_split); needs perf and root or "
                             "kernel.perf_event_paranoid <= 1")
    args = parser.parse_args(argv)
    if args.worker:
        return args
    check_common_options(parser, args)
    if args.kd_perf:
        if args.kd_profile:
            parser.error("--kd-perf and --kd-profile: choose one (perf would sample cProfile)")
        try:
            _perfsplit.perf_command()
        except _perfsplit.PerfUnavailable as error:
            parser.error("--kd-perf: {}".format(error))
    if not 1 <= args.rounds <= 50:
        parser.error("--rounds must be 1 to 50")
    if args.baseline_count < 10:
        parser.error("--baseline-count must be at least 10")
    return args


def check_common_options(parser, args):
    from perc import profiles

    # How many endpoints fit is the machine's open-file limits' business
    # (plan_workers, when the run starts).
    if args.endpoints < 1:
        parser.error("--endpoints must be at least 1")
    if args.concurrency is None:
        args.concurrency = args.endpoints
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    try:
        [profile] = profiles.parse_profile_list(args.profile)
    except (profiles.ProfileError, ValueError) as error:
        parser.error("--profile: {}".format(error))
    args.profile_id = profile.id


# --------------------------------------------------------------------------
# The worker: client-role DTLS engines over UDP (a process of its own)


class Joiner:
    """One endpoint: its credentials, socket, DTLS client engine and timestamps."""

    __slots__ = ("index", "credentials", "tls_id", "conference", "kd_tls_id", "sock",
                 "association", "started", "handshake_done", "keyed", "closed", "ekt_cipher",
                 "due", "ekt_requests", "hbh")

    def __init__(self, index, credentials, tls_id, conference=CONFERENCE):
        self.index = index
        self.credentials = credentials
        self.tls_id = tls_id
        self.conference = conference
        self.kd_tls_id = None
        self.sock = None
        self.association = None
        self.started = self.handshake_done = self.keyed = None
        self.closed = None
        self.ekt_cipher = None
        self.due = None
        self.ekt_requests = 0
        self.hbh = None


class Worker:
    """
    Driven by the benchmark over stdin/stdout, one JSON object per line:
    it prints ``{"state": "credentials", ...}`` once its endpoints have
    credentials (and, for ``sqlite``, the database is written); reads the
    distributors' addresses; registers (``api``/``both``) and prints
    ``{"state": "registered", ...}``; on each ``{"go": [first, end]}`` runs
    the joins of endpoints[first:end] and prints ``{"state": "joined",
    ...}``.  Associations stay up (sockets open) until end of input, so
    that the benchmark can look at the daemons while they hold them.

    Optional configuration (for bench/load.py): ``first_index`` numbers the
    endpoints from there; ``conference_size`` puts each run of that many
    (by number) in a conference of its own instead of all in
    :data:`CONFERENCE`; ``hosts`` gives each endpoint its own loopback
    address to bind to (instead of 127.0.0.1).
    """

    def __init__(self, config):
        from perc import dtls
        from perc.profiles import by_id

        self.config = config
        self.profile = by_id(config["profile_id"])
        count = config["endpoints"]
        first = config.get("first_index", 0)
        size = config.get("conference_size")
        prefix = "Bench-{}-".format(uuid.uuid4().hex[:12])
        self.endpoints = [
            Joiner(i, dtls.Credentials.self_signed("endpoint-{}".format(i)),
                   "{}{:06d}-TlsId".format(prefix, i),
                   "{}-{:05d}".format(CONFERENCE, i // size) if size else CONFERENCE)
            for i in range(first, first + count)]

    # -- registration ---------------------------------------------------

    def write_sqlite(self, path):
        import sqlite3

        from perc.kd import roster
        from perc.kd.store import dialects, schema

        connection = sqlite3.connect(path)
        try:
            cursor = connection.cursor()
            # The Key Distributor's own schema, then the rows its store's
            # insert_registration writes.
            schema.upgrade(cursor, dialects.SQLITE)
            rows = []
            for e in self.endpoints:
                e.kd_tls_id = roster.new_kd_tls_id()
                rows.append((e.tls_id, e.conference, e.credentials.fingerprint, e.kd_tls_id))
            cursor.executemany(
                "INSERT INTO registrations (tls_id, conference, fingerprint, kd_tls_id)"
                " VALUES (?, ?, ?, ?)", rows)
            connection.commit()
        finally:
            connection.close()

    def register_api(self, info, also_md, kd=True):
        """PUT every endpoint on the Key Distributor's API (unless not ``kd``), and the MD's."""
        kd = _KeepAlive(info["kd_api"], info["kd_token"]) if kd else None
        md = _KeepAlive(info["md_api"], info["md_token"]) if also_md else None
        try:
            for e in self.endpoints:
                path = "/v1/conferences/{}/endpoints/{}".format(
                    quote(e.conference, safe=""), quote(e.tls_id, safe=""))
                if kd is not None:
                    status, answer = kd.request("PUT", path,
                                                {"fingerprint": e.credentials.fingerprint})
                    if status not in (200, 201):
                        raise BenchFailure("Key Distributor API refused {}: {} {}".format(
                            e.tls_id, status, answer))
                    e.kd_tls_id = answer["kd_tls_id"]
                if md is not None:
                    status, answer = md.request("PUT", path, {})
                    if status not in (200, 201):
                        raise BenchFailure("Media Distributor API refused {}: {} {}".format(
                            e.tls_id, status, answer))
        finally:
            if kd is not None:
                kd.close()
            if md is not None:
                md.close()

    # -- joining --------------------------------------------------------

    def prepare(self, kd_fingerprint):
        from perc import dtls
        from perc.ekt import EktCipher

        hosts = self.config.get("hosts")
        raise_open_file_limit()
        for n, e in enumerate(self.endpoints):
            try:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            except OSError as error:
                if error.errno not in (errno.EMFILE, errno.ENFILE):
                    raise
                soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                raise BenchFailure(
                    "endpoint {:,} of this worker's {:,} could not open its UDP socket: {} "
                    "(open-file limit {} soft, {} hard)".format(
                        n + 1, len(self.endpoints), os.strerror(error.errno),
                        _limit_text(soft), _limit_text(hard))) from None
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, ENDPOINT_RCVBUF)
            sock.bind((hosts[n] if hosts else "127.0.0.1", 0))
            sock.setblocking(False)
            e.sock = sock
            e.association = dtls.ClientAssociation(
                e.credentials, [self.profile], tls_id=e.tls_id.encode("ascii"),
                expected_peer_tls_id=e.kd_tls_id.encode("ascii"),
                expected_peer_fingerprint=kd_fingerprint,
                ekt_ciphers=(int(EktCipher.AESKW_128),))

    def join(self, server, concurrency, timeout, endpoints=None):
        """Run the joins of ``endpoints`` (default: all); returns the result document."""
        from perc import dtls

        if endpoints is None:
            endpoints = self.endpoints
        by_fd = {e.sock.fileno(): e for e in endpoints}
        poller = select.epoll(len(endpoints) + 1)
        for fd in by_fd:
            poller.register(fd, select.EPOLLIN)
        waiting = deque(endpoints)
        timers = []  # (due, index, endpoint): stale entries are skipped
        state = {"active": 0, "done": 0, "failed": []}
        HandshakeComplete, EktKeyReceived, Closed = (
            dtls.HandshakeComplete, dtls.EktKeyReceived, dtls.Closed)

        def finish(e):
            state["active"] -= 1
            state["done"] += 1
            e.due = None

        def handle(e, output, now):
            sendto = e.sock.sendto
            for datagram in output.datagrams:
                sendto(datagram, server)
            for event in output.events:
                if isinstance(event, HandshakeComplete):
                    e.handshake_done = now
                    e.ekt_cipher = event.ekt_cipher
                    e.hbh = event.profile.hbh_keys(event.keys)
                    if event.ekt_cipher is None:
                        e.closed = "the Key Distributor did not negotiate EKT"
                elif isinstance(event, EktKeyReceived):
                    # RFC 8870's ekt_key message, decoded, checked against
                    # the negotiated cipher and acknowledged by the engine.
                    if e.keyed is None and e.ekt_cipher is not None:
                        e.keyed = now
                        finish(e)
                        return
                elif isinstance(event, Closed):
                    e.closed = event.reason
            if e.closed is not None:
                if e.keyed is None:
                    state["failed"].append((e.index, e.closed))
                    finish(e)
                return
            if e.handshake_done is None:
                e.due = e.association.next_timeout(now)
            elif e.due is None or e.due <= now:
                e.due = now + EKT_KEY_RETRY
            if e.due is not None:
                heapq.heappush(timers, (e.due, e.index, e))

        start = time.monotonic()
        deadline = start + timeout
        recv_buffer = bytearray(65536)
        while state["done"] < len(endpoints):
            now = time.monotonic()
            if now >= deadline:
                break
            while waiting and state["active"] < concurrency:
                e = waiting.popleft()
                state["active"] += 1
                now = e.started = time.monotonic()
                handle(e, e.association.start(now), now)
            wait = deadline - now
            if timers:
                wait = min(wait, timers[0][0] - now)
            for fd, _ in poller.poll(max(0.0, wait)):
                e = by_fd[fd]
                recv_into = e.sock.recvfrom_into
                while True:
                    try:
                        n, source = recv_into(recv_buffer)
                    except BlockingIOError:
                        break
                    if source != server or not n or not 20 <= recv_buffer[0] <= 63:
                        continue
                    if e.keyed is None and e.closed is None:
                        now = time.monotonic()
                        handle(e, e.association.receive(bytes(recv_buffer[:n]), now), now)
            now = time.monotonic()
            while timers and timers[0][0] <= now:
                due, _, e = heapq.heappop(timers)
                if e.due != due or e.keyed is not None or e.closed is not None:
                    continue
                e.due = None
                if e.handshake_done is None:
                    handle(e, e.association.handle_timeout(now), now)
                else:
                    e.ekt_requests += 1
                    handle(e, e.association.send_application_data(EKT_KEY_REQUEST), now)
        poller.close()
        missing = [e.index for e in endpoints if e.keyed is None and e.closed is None]
        return {
            "state": "joined",
            "endpoints": len(endpoints),
            "joined": sum(1 for e in endpoints if e.keyed is not None),
            "failed": state["failed"][:20],
            "failed_count": len(state["failed"]),
            "missing": missing[:20],
            "missing_count": len(missing),
            # Per joined endpoint: start, handshake complete, keyed (monotonic seconds).
            "times": [[e.started, e.handshake_done, e.keyed] for e in endpoints
                      if e.keyed is not None],
            "retransmissions": sum(e.association.retransmissions for e in endpoints),
            "ekt_requests": sum(e.ekt_requests for e in endpoints),
        }

    def close(self):
        # No close_notify: the daemons are stopped next, and thousands of
        # orderly closes would only make the teardown slow.
        for e in self.endpoints:
            if e.sock is not None:
                e.sock.close()


class _KeepAlive:
    """JSON requests with a bearer token over one persistent HTTP/1.1 connection."""

    def __init__(self, base, token):
        from urllib.parse import urlsplit

        parts = urlsplit(base)
        self.host, self.port = parts.hostname, parts.port
        self.token = token
        self.connection = None

    def request(self, method, path, body):
        data = json.dumps(body).encode("utf-8")
        headers = {"Authorization": "Bearer " + self.token,
                   "Content-Type": "application/json"}
        for attempt in (1, 2):
            if self.connection is None:
                self.connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
            try:
                self.connection.request(method, path, body=data, headers=headers)
                response = self.connection.getresponse()
                raw = response.read()
            except (http.client.HTTPException, OSError):
                self.connection.close()
                self.connection = None
                if attempt == 2:
                    raise
                continue
            if response.getheader("Connection", "").lower() == "close":
                self.connection.close()
                self.connection = None
            try:
                return response.status, json.loads(raw) if raw else None
            except ValueError:
                return response.status, None

    def close(self):
        if self.connection is not None:
            self.connection.close()


def _say(document):
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


def run_worker(config_path):
    with open(config_path) as f:
        config = json.load(f)
    try:
        worker = Worker(config)
        if config["register"] == "sqlite":
            worker.write_sqlite(config["db"])
        _say({"state": "credentials", "endpoints": len(worker.endpoints)})
        info = json.loads(sys.stdin.readline())
        started = time.monotonic()
        if config["register"] in ("api", "both"):
            worker.register_api(info, config["register"] == "both")
        worker.prepare(info["kd_fingerprint"])
        _say({"state": "registered", "seconds": time.monotonic() - started})
        # {"go": [first, end]} joins endpoints[first:end]; anything else (or
        # end of input) closes every association and ends the worker.
        while True:
            line = sys.stdin.readline()
            order = json.loads(line) if line.strip() else {}
            go = order.get("go")
            if not go:
                break
            first, end = go
            # A WorkerPool gives each of its workers a share of the handshakes in flight.
            concurrency = order.get("concurrency") or config["concurrency"]
            _say(worker.join(tuple(info["media"]), concurrency, config["timeout"],
                             worker.endpoints[first:end]))
        worker.close()
    except BenchFailure as error:
        _say({"state": "failed", "reason": str(error)})
        return 1
    return 0


class WorkerProcess:
    """The benchmark's side of the worker."""

    def __init__(self, directory, args, db_path, share=None, number=0):
        """``share``: (first, end) of the run's endpoints for this worker (default: all)."""
        first, end = share or (0, total_endpoints(args))
        config_path = os.path.join(directory, "worker-{}.json".format(number))
        with open(config_path, "w") as f:
            json.dump({"endpoints": end - first, "first_index": first,
                       "concurrency": args.concurrency,
                       "register": args.register, "profile_id": args.profile_id,
                       "timeout": args.timeout, "db": db_path}, f)
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", config_path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    @property
    def pid(self):
        return self.process.pid

    def expect(self, state, timeout):
        line = self.process.stdout.readline()
        if not line:
            raise BenchFailure("the worker process ended (exit status {}) while the benchmark "
                               "waited for {!r}".format(self.process.wait(), state))
        document = json.loads(line)
        if document.get("state") == "failed":
            raise BenchFailure("worker: {}".format(document.get("reason")))
        if document.get("state") != state:
            raise BenchFailure("worker said {!r}, expected {!r}".format(document, state))
        return document

    def send(self, document):
        self.process.stdin.write(json.dumps(document) + "\n")
        self.process.stdin.flush()

    def stop(self):
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
            except OSError:
                pass
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()


# --------------------------------------------------------------------------
# Several worker processes: one UDP socket per endpoint, and each process
# has at most its hard open-file limit of them


def total_endpoints(args):
    """Endpoints of the whole run: every round's (bench/memory.py has one round)."""
    return args.endpoints * getattr(args, "rounds", 1)


def _limit_text(limit):
    return "unlimited" if limit == resource.RLIM_INFINITY else "{:,}".format(limit)


def _kernel_open_file_ceiling():
    """fs.nr_open: what an unlimited hard RLIMIT_NOFILE lets a process raise its soft one to."""
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def raise_open_file_limit():
    """Soft RLIMIT_NOFILE up to the hard one: a worker holds one socket per endpoint."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = _kernel_open_file_ceiling()
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # the sockets beyond the soft limit then fail, and say why


def machine_open_file_limits():
    """
    (hard RLIMIT_NOFILE every worker inherits, descriptors the system can
    still open (fs.file-max less those open; None if unknown)).
    """
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        hard = _kernel_open_file_ceiling()
    try:
        with open("/proc/sys/fs/file-nr") as f:
            allocated, _, maximum = (int(v) for v in f.read().split())
    except (OSError, ValueError):
        return hard, None
    return hard, maximum - allocated


def plan_workers(total, hard_limit, system_free=None, max_workers=MAX_WORKERS):
    """
    Endpoints 0 .. ``total`` - 1 as the (first, end) share of each worker
    process: as few workers as the hard open-file limit allows (each holds
    at most ``hard_limit`` - :data:`WORKER_FD_RESERVE` sockets), shares
    within one endpoint of each other.  Raises :class:`BenchFailure` (one
    line) when the machine's limits cannot hold them.
    """
    per_worker = hard_limit - WORKER_FD_RESERVE
    if per_worker < 1:
        raise BenchFailure(
            "the hard open-file limit ({:,}) leaves no descriptor for endpoint sockets "
            "(each worker keeps {} for itself): raise it (ulimit -Hn)".format(
                hard_limit, WORKER_FD_RESERVE))
    workers = -(-total // per_worker)
    if workers > max_workers:
        raise BenchFailure(
            "{:,} endpoints (one UDP socket each) need {} worker processes of at most {:,} "
            "under the hard open-file limit of {:,}, more than the {} allowed: raise the "
            "limit (ulimit -Hn) or ask for fewer".format(
                total, workers, per_worker, hard_limit, max_workers))
    if system_free is not None and total + workers * WORKER_FD_RESERVE > system_free:
        raise BenchFailure(
            "{:,} endpoints (one UDP socket each) need {:,} descriptors and the system can "
            "open only {:,} more (fs.file-max)".format(
                total, total + workers * WORKER_FD_RESERVE, system_free))
    bounds = [total * w // workers for w in range(workers + 1)]
    return [(bounds[w], bounds[w + 1]) for w in range(workers)]


def split_go(shares, first, end, concurrency):
    """
    Endpoints [``first``, ``end``) of the run, as each worker's part: {worker
    number: (first, end) in its own numbering, its share of ``concurrency``
    (in proportion to its part, at least 1)}.
    """
    parts = {}
    for number, (low, high) in enumerate(shares):
        start, stop = max(first, low), min(end, high)
        if start < stop:
            parts[number] = ((start - low, stop - low),
                             max(1, concurrency * (stop - start) // (end - first)))
    return parts


def merge_joined(results):
    """One "joined" document from the workers' (endpoint indexes are the run's)."""
    merged = {"state": "joined", "endpoints": 0, "joined": 0, "failed": [], "failed_count": 0,
              "missing": [], "missing_count": 0, "times": [], "retransmissions": 0,
              "ekt_requests": 0}
    for result in results:
        for key in ("endpoints", "joined", "failed_count", "missing_count", "retransmissions",
                    "ekt_requests"):
            merged[key] += result[key]
        for key in ("failed", "missing", "times"):
            merged[key].extend(result[key])
    merged["failed"] = merged["failed"][:20]
    merged["missing"] = merged["missing"][:20]
    return merged


class WorkerPool:
    """
    The run's endpoints over as many :class:`WorkerProcess` as the hard
    open-file limit needs (:func:`plan_workers`), spoken to as one worker:
    ``send`` hands a ``{"go": [first, end]}`` to the workers holding those
    endpoints (each with its share of the handshakes in flight) and
    anything else to all; ``expect`` gathers the answers into one.  The
    workers are started one after another, each once the previous has its
    credentials: with ``--register sqlite`` each writes the Key
    Distributor's database.
    """

    def __init__(self, directory, args, db_path):
        self.shares = plan_workers(total_endpoints(args), *machine_open_file_limits())
        self.concurrency = args.concurrency
        self.workers = []
        self.waiting = []
        try:
            for number, share in enumerate(self.shares):
                worker = WorkerProcess(directory, args, db_path, share, number)
                self.workers.append(worker)
                worker.expect("credentials", 300)
        except BaseException:
            self.stop()
            raise

    def send(self, document):
        go = document.get("go")
        if go is None:
            self.waiting = list(self.workers)
            for worker in self.workers:
                worker.send(document)
            return
        self.waiting = []
        for number, (part, concurrency) in split_go(self.shares, go[0], go[1],
                                                    self.concurrency).items():
            self.workers[number].send({"go": list(part), "concurrency": concurrency})
            self.waiting.append(self.workers[number])

    def expect(self, state, timeout):
        answers = [worker.expect(state, timeout) for worker in self.waiting]
        self.waiting = []
        if state == "joined":
            return merge_joined(answers)
        if state == "registered":
            # They register side by side: the slowest is the run's time.
            return {"state": state, "seconds": max(a["seconds"] for a in answers)}
        return answers[0] if len(answers) == 1 else {"state": state, "workers": answers}

    def stop(self):
        for worker in self.workers:
            worker.stop()


# --------------------------------------------------------------------------
# A live run: worker, daemons, joins (shared with bench/memory.py)


def distributor_args(args, extra_md=(), extra_kd=()):
    # Every endpoint comes from 127.0.0.1 through one tunnel: the daemons'
    # limits must hold the whole run, whatever its size.
    most = str(max(50000, 2 * total_endpoints(args)))
    md = ["--new-associations-per-second", "1000000", "--max-associations", most,
          "--handshake-timeout", "120"]
    if args.register != "both":
        md += ["--default-conference", CONFERENCE]
    kd = ["--max-associations", most, "--max-associations-per-tunnel", most]
    return md + list(extra_md), kd + list(extra_kd)


def _profiler_options(path):
    """twistd's own options that run a daemon under cProfile, saving to ``path`` (or none)."""
    if not path:
        return []
    return ["--profile", os.path.abspath(path), "--profiler", "cprofile", "--savestats"]


def start_run(directory, args, extra_md=(), extra_kd=(), before_registration=None):
    """
    Workers (a :class:`WorkerPool`: credentials; SQLite registrations if
    asked), then the daemons, then registration through the APIs if asked.
    Returns (worker pool, distributors, registration seconds).  ``before_registration`` is called
    with the distributors once they are up, before the worker registers
    through the APIs (bench/memory.py reads their memory there).
    """
    db_path = os.path.join(directory, "perc-kd.sqlite3")
    worker = WorkerPool(directory, args, db_path)
    distributors = None
    try:
        md_args, kd_args = distributor_args(args, extra_md, extra_kd)
        distributors = _common.start_distributors(
            directory, md_args=md_args, kd_args=kd_args,
            kd_twistd_options=_profiler_options(getattr(args, "kd_profile", None)),
            md_twistd_options=_profiler_options(getattr(args, "md_profile", None)))
        if before_registration is not None:
            before_registration(distributors)
        worker.send({"media": list(distributors.media_address),
                     "kd_api": distributors.kd_api, "kd_token": distributors.kd_token,
                     "md_api": distributors.md_api, "md_token": distributors.md_token,
                     "kd_fingerprint": distributors.kd_fingerprint})
        registered = worker.expect("registered", 300)
        return worker, distributors, registered["seconds"]
    except BaseException:
        worker.stop()
        if distributors is not None:
            distributors.stop()
        raise


def wait_idle(pid, quiet=0.15, limit=10.0, tolerance=0.001):
    """
    Wait until process ``pid`` used at most ``tolerance`` CPU seconds in
    ``quiet`` seconds (at most ``limit`` seconds); returns its CPU seconds.
    The default tolerance (under 1% of a CPU) lets an idle daemon's timers
    run: CPU time is read to the nanosecond.
    """
    deadline = time.monotonic() + limit
    last = _common.cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = _common.cpu_seconds(pid)
        if now - last <= tolerance:
            return now
        last = now
    return last


def check_joined(result):
    if result["failed_count"] or result["missing_count"]:
        raise BenchFailure("{} of {} endpoints did not join ({} failed, {} still handshaking at "
                           "the timeout); first failures: {}; still missing: {}".format(
                               result["endpoints"] - result["joined"], result["endpoints"],
                               result["failed_count"], result["missing_count"],
                               result["failed"][:5], result["missing"][:5]))


# --------------------------------------------------------------------------
# The in-process baseline


def baseline_cpu_per_handshake(count, profile_id):
    """
    Server-side CPU seconds per DTLS-SRTP handshake over memory BIOs: the
    same profile, extensions and kind of certificates as the live run.
    """
    from perc import dtls
    from perc.ekt import EktCipher
    from perc.profiles import DEFAULT_PROFILES, by_id

    profile = by_id(profile_id)
    server_profiles = tuple(DEFAULT_PROFILES) if profile in DEFAULT_PROFILES else (profile,)
    kd = dtls.Credentials.self_signed("kd")
    listener = dtls.ServerListener(kd, server_profiles, ekt_ciphers=(int(EktCipher.AESKW_128),))
    kd_tls_id = b"KeyDistributorTlsId-0123456789ab"
    accept_hello = dtls.Accept(tls_id=kd_tls_id)
    accept = dtls.Accept()

    def hook(query):
        return accept_hello if query.stage == dtls.STAGE_HELLO else accept

    clients = []
    for i in range(count):
        credentials = dtls.Credentials.self_signed("endpoint-{}".format(i))
        clients.append(dtls.ClientAssociation(
            credentials, [profile], tls_id="Baseline-{:06d}-TlsId-0123".format(i).encode(),
            expected_peer_tls_id=kd_tls_id, expected_peer_fingerprint=kd.fingerprint,
            ekt_ciphers=(int(EktCipher.AESKW_128),)))
    clock = time.process_time
    server_cpu = 0.0
    for client in clients:
        association_id = uuid.uuid4().bytes
        now = time.monotonic()
        hello = client.start(now).datagrams
        t = clock()
        replies, engine = listener.listen(association_id, hello[0], now, identity_hook=hook)
        server_cpu += clock() - t
        hello = client.receive(replies[0], now).datagrams
        t = clock()
        replies, engine = listener.listen(association_id, hello[0], now, identity_hook=hook)
        flight = engine.start(now).datagrams
        server_cpu += clock() - t
        answer = []
        for datagram in flight:
            answer.extend(client.receive(datagram, now).datagrams)
        t = clock()
        outputs = [engine.receive(datagram, now) for datagram in answer]
        server_cpu += clock() - t
        done = False
        for output in outputs:
            for datagram in output.datagrams:
                done = done or any(isinstance(e, dtls.HandshakeComplete)
                                   for e in client.receive(datagram, now).events)
        if not (done and engine.established
                and any(isinstance(e, dtls.HandshakeComplete)
                        for o in outputs for e in o.events)):
            raise BenchFailure("the in-process baseline handshake did not complete")
    return server_cpu / count


def bare_openssl_cpu_per_handshake(count, profile_id):
    """
    Server-side CPU seconds per bare pyOpenSSL DTLS 1.2 handshake: the
    floor under any Python DTLS engine.  ECDSA P-256 certificates on both
    sides (each client its own, self-signed), mutual authentication by
    OpenSSL alone (each client certificate is a trust anchor of the
    server's store, so the same signature checks as the engine's
    fingerprint identity: none on the self-signed certificate), use_srtp
    with the profile's OpenSSL name, memory BIOs, no cookie exchange, no
    custom extension, no Python callback, no session cache or tickets; the
    keying material is exported as the engine does.  Only the server's
    calls are timed.
    """
    from OpenSSL import SSL, crypto

    from perc import pki
    from perc.dtls.constants import DEFAULT_MTU, DTLS1_2_VERSION, EXPORTER_LABEL
    from perc.dtls.contexts import drain
    from perc.profiles import by_id

    profile = by_id(profile_id)

    def context(method_role, certificate, key, trusted):
        ctx = SSL.Context(SSL.DTLS_METHOD)
        ctx.set_min_proto_version(DTLS1_2_VERSION)
        ctx.set_max_proto_version(DTLS1_2_VERSION)
        ctx.set_options(SSL.OP_NO_QUERY_MTU | SSL.OP_NO_TICKET | SSL.OP_NO_RENEGOTIATION)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx.set_tlsext_use_srtp(profile.openssl_name.encode("ascii"))
        ctx.use_certificate(crypto.X509.from_cryptography(certificate))
        ctx.use_privatekey(crypto.PKey.from_cryptography_key(key))
        store = ctx.get_cert_store()
        for trusted_certificate in trusted:
            store.add_cert(crypto.X509.from_cryptography(trusted_certificate))
        mode = SSL.VERIFY_PEER
        if method_role == "server":
            mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        ctx.set_verify(mode)
        return ctx

    def step(connection, data):
        if data:
            connection.bio_write(data)
        try:
            connection.do_handshake()
            done = True
        except SSL.WantReadError:
            done = False
        return done, drain(connection)

    server_certificate, server_key = pki.self_signed_certificate("kd")
    clients = [pki.self_signed_certificate("bare-endpoint-{}".format(i)) for i in range(count)]
    server_context = context("server", server_certificate, server_key,
                             [certificate for certificate, _ in clients])
    client_contexts = [context("client", certificate, key, [server_certificate])
                       for certificate, key in clients]
    clock = time.process_time
    server_cpu = 0.0
    for client_context in client_contexts:
        client = SSL.Connection(client_context, None)
        client.set_ciphertext_mtu(DEFAULT_MTU)
        client.set_connect_state()
        _, to_server = step(client, b"")
        t = clock()
        server = SSL.Connection(server_context, None)
        server.set_ciphertext_mtu(DEFAULT_MTU)
        server.set_accept_state()
        server_done, to_client = step(server, to_server)
        server_cpu += clock() - t
        client_done = False
        for _ in range(10):
            if server_done and client_done:
                break
            client_done, to_server = step(client, to_client)
            if to_server or not server_done:
                t = clock()
                server_done, to_client = step(server, to_server)
                if server_done:
                    server.export_keying_material(EXPORTER_LABEL,
                                                  profile.keying_material_length)
                server_cpu += clock() - t
        if not (server_done and client_done) or \
                server.get_selected_srtp_profile() != profile.openssl_name.encode("ascii"):
            raise BenchFailure("the bare OpenSSL handshake did not complete")
    return server_cpu / count


# --------------------------------------------------------------------------
# Main


def run(args):
    baselines = []
    bare = []
    rounds = []
    directory = tempfile.mkdtemp(prefix="perc-bench-handshake-")
    worker = distributors = recorder = None
    kd_samples = None
    try:
        worker, distributors, registration_s = start_run(directory, args)
        workers = len(worker.shares)
        kd_pid, md_pid = distributors.kd.pid, distributors.md.pid
        media_port = distributors.media_address[1]
        if args.kd_perf:
            # Across every round: between rounds perc-kd is idle, which adds
            # no CPU-clock samples.
            recorder = _perfsplit.Recorder(kd_pid, os.path.abspath(args.kd_perf))
            try:
                recorder.start()
            except _perfsplit.PerfUnavailable as error:
                raise BenchFailure("--kd-perf: {}".format(error)) from None
        for number in range(args.rounds):
            # Baseline and live rounds alternate, so both see the same machine.
            baselines.append(baseline_cpu_per_handshake(args.baseline_count, args.profile_id))
            bare.append(bare_openssl_cpu_per_handshake(args.baseline_count, args.profile_id))
            kd_before = wait_idle(kd_pid)
            md_before = _common.cpu_seconds(md_pid)
            drops_before = _common.udp_drops(media_port)
            first = number * args.endpoints
            worker.send({"go": [first, first + args.endpoints]})
            result = worker.expect("joined", args.timeout + 60)
            kd_after = wait_idle(kd_pid)
            result["kd_cpu"] = kd_after - kd_before
            result["md_cpu"] = _common.cpu_seconds(md_pid) - md_before
            result["md_drops"] = _common.udp_drops(media_port) - drops_before
            check_joined(result)
            rounds.append(result)
        if recorder is not None:
            stopping, recorder = recorder, None
            try:
                stopping.stop()
                kd_samples = stopping.counts()
            except _perfsplit.PerfUnavailable as error:
                raise BenchFailure("--kd-perf: {}".format(error)) from None
        baselines.append(baseline_cpu_per_handshake(args.baseline_count, args.profile_id))
        bare.append(bare_openssl_cpu_per_handshake(args.baseline_count, args.profile_id))
        worker.stop()
        worker = None
    finally:
        if recorder is not None:
            try:
                recorder.stop()
            except _perfsplit.PerfUnavailable:
                pass  # the run failed already; that failure is the one to report
        if worker is not None:
            worker.stop()
        if distributors is not None:
            distributors.stop()
        if args.keep:
            print("kept", directory)
        else:
            shutil.rmtree(directory, ignore_errors=True)

    joins, handshakes, per_round = [], [], []
    for result in rounds:
        times = result["times"]
        joins.extend(t[2] - t[0] for t in times)
        handshakes.extend(t[1] - t[0] for t in times)
        elapsed = max(t[2] for t in times) - min(t[0] for t in times)
        per_round.append({
            "assoc_per_s": round(len(times) / elapsed, 1),
            "join_p99_s": round(_common.percentile([t[2] - t[0] for t in times], 0.99), 4),
            "kd_cpu_per_assoc": round(result["kd_cpu"] / len(times), 6)})
    n = len(joins)
    elapsed = sum(len(r["times"]) / p["assoc_per_s"] for r, p in zip(rounds, per_round))
    kd_cpu = sum(r["kd_cpu"] for r in rounds) / n
    md_cpu = sum(r["md_cpu"] for r in rounds) / n
    baseline = statistics.median(baselines)
    bare_openssl = statistics.median(bare)
    retransmissions = sum(r["retransmissions"] for r in rounds)
    ekt_requests = sum(r["ekt_requests"] for r in rounds)
    md_drops = sum(r["md_drops"] for r in rounds)
    figures = {
        "benchmark": "handshake",
        "endpoints": args.endpoints,
        "rounds": args.rounds,
        "associations": n,
        "concurrency": args.concurrency,
        "register": args.register,
        "worker_processes": workers,
        "registration_s": round(registration_s, 3),
        "assoc_per_s": round(n / elapsed, 1),
        "join_p50_s": round(_common.percentile(joins, 0.50), 4),
        "join_p95_s": round(_common.percentile(joins, 0.95), 4),
        "join_p99_s": round(_common.percentile(joins, 0.99), 4),
        "join_max_s": round(max(joins), 4),
        "handshake_p50_s": round(_common.percentile(handshakes, 0.50), 4),
        "handshake_p99_s": round(_common.percentile(handshakes, 0.99), 4),
        "kd_cpu_per_assoc": round(kd_cpu, 6),
        "md_cpu_per_assoc": round(md_cpu, 6),
        "baseline_cpu_per_assoc": round(baseline, 6),
        "baseline_runs": [round(b, 6) for b in baselines],
        "ratio": round(kd_cpu / baseline, 3),
        "bare_openssl_cpu_per_assoc": round(bare_openssl, 6),
        "bare_openssl_runs": [round(b, 6) for b in bare],
        "ratio_vs_bare_openssl": round(kd_cpu / bare_openssl, 3),
        "per_round": per_round,
        "client_retransmissions": retransmissions,
        "ekt_key_requests": ekt_requests,
        "md_udp_drops": md_drops,
    }
    if kd_samples is not None:
        shares = _perfsplit.split(kd_samples)
        figures["kd_perf_samples"] = sum(kd_samples.values())
        figures["kd_cpu_split"] = {group: round(share, 4) for group, share in shares.items()}
        figures["kd_cpu_split_ms_per_assoc"] = {
            group: round(share * kd_cpu * 1000.0, 4) for group, share in shares.items()}
        # What the KD would cost against the bare handshake if everything
        # but OpenSSL were free: the floor under any change to its Python.
        figures["kd_openssl_vs_bare_openssl"] = round(
            shares["openssl"] * kd_cpu / bare_openssl, 3)
        figures["kd_openssl_top_symbols"] = [
            [symbol, round(share, 4)]
            for symbol, share in _perfsplit.top_symbols(kd_samples, "openssl")]
    figures["targets"] = {"ratio_vs_bare_openssl": 2.0, "join_p99_s": 0.25}
    figures["targets_met"] = (figures["ratio_vs_bare_openssl"] <= 2.0
                              and figures["join_p99_s"] < 0.25)
    ms = 1000.0
    rows = [
        ["endpoints joined", "{} ({} rounds of {}, concurrency {})".format(
            n, args.rounds, args.endpoints, args.concurrency)],
        ["registration ({})".format(args.register), "{:.2f} s".format(registration_s)],
        ["associations per second", "{:.1f} (rounds: {})".format(
            figures["assoc_per_s"], ", ".join(str(p["assoc_per_s"]) for p in per_round))],
        ["join latency p50 / p95 / p99", "{:.1f} / {:.1f} / {:.1f} ms".format(
            figures["join_p50_s"] * ms, figures["join_p95_s"] * ms, figures["join_p99_s"] * ms)],
        ["join latency max", "{:.1f} ms".format(figures["join_max_s"] * ms)],
        ["DTLS handshake p50 / p99", "{:.1f} / {:.1f} ms".format(
            figures["handshake_p50_s"] * ms, figures["handshake_p99_s"] * ms)],
        ["Key Distributor CPU / association", "{:.3f} ms (rounds: {})".format(
            kd_cpu * ms, ", ".join("{:.3f}".format(p["kd_cpu_per_assoc"] * ms)
                                   for p in per_round))],
        ["Media Distributor CPU / association", "{:.3f} ms".format(md_cpu * ms)],
        ["baseline server CPU / handshake", "{:.3f} ms (median of {})".format(
            baseline * ms, ", ".join("{:.3f}".format(b * ms) for b in baselines))],
        ["ratio KD / baseline", "{:.2f}".format(figures["ratio"])],
        ["bare pyOpenSSL server CPU / handshake", "{:.3f} ms (median of {})".format(
            bare_openssl * ms, ", ".join("{:.3f}".format(b * ms) for b in bare))],
        ["ratio KD / bare pyOpenSSL", "{:.2f} (target <= 2.0)".format(
            figures["ratio_vs_bare_openssl"])],
        ["client retransmissions / EKTKey requests", "{} / {}".format(
            retransmissions, ekt_requests)],
        ["datagrams dropped at the MD's UDP socket", md_drops],
    ]
    if kd_samples is not None:
        for group in _perfsplit.GROUPS:
            rows.append(["KD CPU in {} (perf)".format(group), "{:.0%}, {:.3f} ms".format(
                figures["kd_cpu_split"][group], figures["kd_cpu_split_ms_per_assoc"][group])])
        rows.append(["KD's OpenSSL alone / bare pyOpenSSL",
                     "{:.2f} ({} samples)".format(figures["kd_openssl_vs_bare_openssl"],
                                                  figures["kd_perf_samples"])])
        rows.append(["KD's busiest OpenSSL functions", ", ".join(
            "{} {:.1%}".format(symbol, share)
            for symbol, share in figures["kd_openssl_top_symbols"])])
    print(_common.format_table(["handshake", "value"], rows))
    return figures


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        return run_worker(args.worker)
    return _common.bench_main("handshake", run, args, (BenchFailure,))


if __name__ == "__main__":
    sys.exit(main())
