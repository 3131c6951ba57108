"""
The live deployment ``bench/soak.py``, ``bench/faults.py`` and
``bench/failover.py`` put faults into: a development PKI, ``twistd -n
perc-kd`` and ``twistd -n perc-md`` as real processes on loopback, and
reference endpoints (real UDP, real DTLS) on this process's reactor,
registered through both control APIs.  By default one Key Distributor on
SQLite, its tunnel through an in-process TCP relay
(:class:`perc.testing.tcprelay.TcpRelay`); with a PostgreSQL ``db``, a
cluster of Key Distributors on it
(:func:`perc.daemons.start_key_distributors`), each dialled directly by the
Media Distributor (one ``--kd`` each).  :class:`Deployment` makes the
faults; :class:`Monitor` measures what each did to the media;
:func:`run_on_reactor` runs a benchmark on one deployment and
:func:`run_in_directory` one that makes its own, their daemons stopped
whatever happens.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import _common

#: The endpoint's loss count does not follow RTP sequence numbers past a
#: wrap: a run stays below this many packets per sender.
SEQUENCE_SPACE = 1 << 16


class BenchFailure(RuntimeError):
    """The run could not be completed or its verdict failed; ``figures`` so far."""

    def __init__(self, message, figures=None):
        super().__init__(message)
        self.figures = figures


def open_fds(pid: int):
    """Open file descriptors of process ``pid`` (``/proc/PID/fd``), None if it is gone."""
    try:
        return len(os.listdir("/proc/{}/fd".format(pid)))
    except OSError:
        return None


def process_figures(daemon) -> tuple:
    """``(RSS KiB, open fds)`` of a running daemon, Nones if it is not running."""
    if daemon is None or daemon.process.poll() is not None:
        return None, None
    try:
        rss = _common.rss_kib(daemon.pid)
    except (OSError, RuntimeError):
        rss = None
    return rss, open_fds(daemon.pid)


def slope_kib_per_hour(samples):
    """
    Least-squares slope of ``samples`` ((seconds, KiB, life)), in KiB per
    hour, with one intercept per ``life`` (a restarted process starts
    afresh; only growth within a life counts).  None without two samples in
    one life.
    """
    lives = {}
    for t, kib, life in samples:
        if kib is not None:
            lives.setdefault(life, []).append((t, kib))
    numerator = denominator = 0.0
    for points in lives.values():
        if len(points) < 2:
            continue
        mean_t = sum(t for t, _ in points) / len(points)
        mean_k = sum(k for _, k in points) / len(points)
        numerator += sum((t - mean_t) * (k - mean_k) for t, k in points)
        denominator += sum((t - mean_t) ** 2 for t, _ in points)
    if denominator == 0:
        return None
    return numerator / denominator * 3600.0


async def sleep(reactor, seconds: float) -> None:
    from twisted.internet import task

    await task.deferLater(reactor, max(0.0, seconds), lambda: None)


async def wait_until(reactor, predicate, timeout: float, what: str, poll: float = 0.05,
                     refresh=None) -> None:
    """
    Poll ``predicate`` until it holds; BenchFailure("<what> not seen ...")
    after ``timeout``.  ``refresh`` (a coroutine function) is awaited before
    each check: for a predicate on what a request answers.
    """
    deadline = reactor.seconds() + timeout
    while True:
        if refresh is not None:
            await refresh()
        if predicate():
            return
        if reactor.seconds() > deadline:
            raise BenchFailure("{} not seen within {} s".format(what, timeout))
        await sleep(reactor, poll)


class Deployment:
    """
    The daemons, the relay between them and the endpoints of one run, on
    ``reactor``; faults are methods.  :meth:`kill` (synchronous, idempotent)
    stops the daemons from anywhere; it runs at reactor shutdown too.

    With ``db`` (a PostgreSQL URL), ``key_distributors`` Key Distributors
    share it (``lease_seconds`` each) and no relay is used:
    :attr:`cluster` holds them (:class:`perc.daemons.KeyDistributorProcess`),
    :attr:`kd` is None and the KD-restarting and tunnel-resetting faults are
    not available.  ``endpoints=0`` starts the daemons only.
    """

    def __init__(self, reactor, directory: str, *, endpoints: int = 10, conferences: int = 2,
                 rate: float = 20.0, ekt_ttl=None, keepalive: float = 5.0,
                 keepalive_timeout: float = 5.0, kd_args=(), md_args=(), db: str | None = None,
                 key_distributors: int = 1, lease_seconds: float = 10.0,
                 conference_prefix: str = "soak"):
        self.reactor = reactor
        self.directory = directory
        self.endpoint_count = endpoints
        self.conferences = ["{}-{}".format(conference_prefix, n + 1)
                            for n in range(conferences)]
        self.db = db
        self.key_distributor_count = key_distributors if db is not None else 1
        self.lease_seconds = lease_seconds
        self.cluster = []
        self.rate = rate
        self.ekt_ttl = ekt_ttl
        self.keepalive = keepalive
        self.keepalive_timeout = keepalive_timeout
        self.kd_args = list(kd_args)
        self.md_args = list(md_args)
        self.kd = self.md = None
        self.kd_lives = self.md_lives = 0
        self.endpoints = []
        self._ports = []
        self.relay = None
        self.joins_source = None
        # Whatever ends the reactor (a signal included) ends the daemons first.
        self._shutdown = reactor.addSystemEventTrigger("before", "shutdown", self.kill)

    # -- daemons --------------------------------------------------------

    async def start(self) -> None:
        from perc import pki
        from perc.testing.tcprelay import TcpRelay
        from twisted.web.client import Agent

        self.pki = pki.create_dev_pki(os.path.join(self.directory, "pki"))
        # Port 0 the first time, read back from the logs; restarts reuse them.
        self.kd_port = self.kd_api_port = self.md_api_port = self.media_port = 0
        self.agent = Agent(self.reactor)
        if self.db is None:
            await self.start_kd()
            self.relay = TcpRelay(self.reactor, ("127.0.0.1", self.kd_port))
            self.relay.listen()
        else:
            await self.start_cluster()
        await self.start_md()
        with open(os.path.join(self.directory, "perc-kd-api.token")) as f:
            self.kd_token = f.read().strip()
        with open(os.path.join(self.directory, "perc-md-api.token")) as f:
            self.md_token = f.read().strip()
        if self.cluster:
            # The Media Distributor spreads associations only over tunnels that are up.
            up = {"n": 0}

            async def refresh():
                up["n"] = ((await self.status("md")) or {}).get("tunnels", {}).get("up", 0)

            await wait_until(self.reactor, lambda: up["n"] == len(self.cluster), 30,
                             "every Key Distributor tunnel up at the Media Distributor",
                             poll=0.1, refresh=refresh)
        if self.endpoint_count:
            await self._add_endpoints()

    async def start_cluster(self) -> None:
        from perc.daemons import start_key_distributors

        args = list(self.kd_args)
        if self.ekt_ttl is not None:
            args += ["--ekt-ttl", str(self.ekt_ttl)]
        self.kd_lives += 1
        self.cluster = await start_key_distributors(
            self.reactor, self.directory, self.key_distributor_count,
            pki_directory=self.pki.directory, db=self.db, lease_seconds=self.lease_seconds,
            extra_args=args)
        # Registrations and rekeys go through the first unless told otherwise.
        self.kd_api_port = self.cluster[0].api_port

    async def start_kd(self) -> None:
        self.kd_lives += 1
        args = ["perc-kd", "--pki", self.pki.directory,
                "--tunnel-listen", "tcp:{}:interface=127.0.0.1".format(self.kd_port),
                "--api", "tcp:{}:interface=127.0.0.1".format(self.kd_api_port),
                "--db", os.path.join(self.directory, "perc-kd.sqlite3")]
        if self.ekt_ttl is not None:
            args += ["--ekt-ttl", str(self.ekt_ttl)]
        self.kd = _common.Daemon(self.directory, args + self.kd_args,
                                 "perc-kd.{}.log".format(self.kd_lives), die_with_parent=True)
        await self._wait_log(self.kd, "Key Distributor ready")
        if not self.kd_port:
            output = self.kd.output()
            self.kd_port = _common.bound_port(output, "tunnel-listen")
            self.kd_api_port = _common.bound_port(output, "api")

    async def start_md(self) -> None:
        self.md_lives += 1
        if self.cluster:
            kds = [kd.tunnel_endpoint for kd in self.cluster]
        else:
            kds = ["tcp:127.0.0.1:{}".format(self.relay.port.getHost().port)]
        args = ["perc-md", "--pki", self.pki.directory]
        for kd in kds:
            args += ["--kd", kd]
        args += ["--media-port", str(self.media_port), "--media-interface", "127.0.0.1",
                "--api", "tcp:{}:interface=127.0.0.1".format(self.md_api_port)]
        self.md = _common.Daemon(self.directory, args + self.md_args,
                                 "perc-md.{}.log".format(self.md_lives), die_with_parent=True)
        await self._wait_log(self.md, "up: sent SupportedProfiles")
        if not self.md_api_port:
            output = self.md.output()
            self.md_api_port = _common.bound_port(output, "api")
            self.media_port = _common.bound_port(output, "media")

    async def _wait_log(self, daemon, text: str, timeout: float = 30.0) -> None:
        from perc.daemons import DaemonError

        try:
            await daemon.said(self.reactor, text, timeout)
        except DaemonError as error:
            raise BenchFailure(str(error)) from None

    async def restart_kd(self) -> None:
        """SIGTERM, then the same ports and roster database."""
        if self.kd is None:
            raise BenchFailure("restart_kd: not with a Key Distributor cluster")
        await self.kd.stopped(self.reactor)
        await self.start_kd()

    async def restart_md(self) -> None:
        """SIGTERM, then the same ports; the memberships are put again (they live in memory)."""
        await self.md.stopped(self.reactor)
        await self.start_md()
        for endpoint in self.endpoints:
            await self._put("md", endpoint.conference, endpoint.tls_id, {})

    def reset_tunnel(self) -> int:
        """Reset both TCP connections of every tunnel through the relay."""
        if self.relay is None:
            raise BenchFailure("reset_tunnel: no relay with a Key Distributor cluster")
        return self.relay.reset()

    async def rekey(self, conference: str, via=None):
        """
        A rekey of ``conference`` through the API of ``via`` (a
        :class:`perc.daemons.KeyDistributorProcess`; default: the first Key
        Distributor); its answer (``ekt_spi``, ``endpoints``), or None if
        it did not answer 200.
        """
        from perc.errors import ConfigError
        from perc.scripts.register import put_json

        port = self.kd_api_port if via is None else via.api_port
        url = "http://127.0.0.1:{}/v1/conferences/{}/rekey".format(port, conference)
        try:
            code, answer = await put_json(self.agent, url.encode("ascii"), self.kd_token, {},
                                          reactor=self.reactor, timeout=10, method=b"POST")
        except ConfigError:
            return None  # the Key Distributor is restarting
        return answer if code == 200 and isinstance(answer, dict) else None

    async def status(self, which, timeout: float = 10):
        """
        ``GET /v1/status`` of ``"md"``, ``"kd"`` (the first Key Distributor)
        or a :class:`perc.daemons.KeyDistributorProcess`; None if it does
        not answer 200.
        """
        import json

        from twisted.web.client import readBody
        from twisted.web.http_headers import Headers

        if which == "md":
            port, token = self.md_api_port, self.md_token
        else:
            port = self.kd_api_port if which == "kd" else which.api_port
            token = self.kd_token
        url = "http://127.0.0.1:{}/v1/status".format(port).encode("ascii")
        try:
            d = self.agent.request(b"GET", url, Headers(
                {b"authorization": [b"Bearer " + token.encode("ascii")]}))
            response = await d.addTimeout(timeout, self.reactor)
            body = await readBody(response)
        except Exception:
            return None  # refused, reset or timed out: the daemon is not answering
        if response.code != 200:
            return None
        try:
            return json.loads(body)
        except ValueError:
            return None

    def kill_key_distributor(self, kd) -> None:
        """SIGKILL one Key Distributor of the cluster (a crash: its lease is not released)."""
        kd.daemon.kill()

    @property
    def daemons(self) -> list:
        """Every daemon of the deployment, Media Distributor first."""
        return [d for d in [self.md, self.kd] + [kd.daemon for kd in self.cluster]
                if d is not None]

    def kill(self) -> None:
        """Stop every daemon now (blocking; for exit paths)."""
        for daemon in self.daemons:
            daemon.stop(timeout=10)

    async def stop(self) -> None:
        from twisted.internet import defer

        for endpoint in self.endpoints:
            endpoint.stopSending()
        for port in self._ports:
            await defer.maybeDeferred(port.stopListening)
        self._ports = []
        if self.relay is not None:
            await defer.maybeDeferred(self.relay.stop)
        for daemon in self.daemons:
            await daemon.stopped(self.reactor)
        if self._shutdown is not None:
            self.reactor.removeSystemEventTrigger(self._shutdown)
            self._shutdown = None

    # -- endpoints ------------------------------------------------------

    async def _put(self, which: str, conference: str, tls_id: str, body: dict):
        from urllib.parse import quote

        from perc.scripts.register import put_json

        port, token = ((self.kd_api_port, self.kd_token) if which == "kd"
                       else (self.md_api_port, self.md_token))
        url = "http://127.0.0.1:{}/v1/conferences/{}/endpoints/{}".format(
            port, quote(conference, safe=""), quote(tls_id, safe=""))
        code, answer = await put_json(self.agent, url.encode("ascii"), token, body,
                                      reactor=self.reactor, timeout=10)
        if code not in (200, 201):
            raise BenchFailure("{} refused {}: {} {}".format(which, tls_id, code, answer))
        return answer

    @property
    def kd_fingerprint(self) -> str:
        """Fingerprint of the Key Distributors' certificate (one identity for a cluster)."""
        from cryptography import x509

        from perc import pki

        with open(self.pki.kd_certificate, "rb") as f:
            return pki.fingerprint(x509.load_pem_x509_certificate(f.read()))

    async def _add_endpoints(self) -> None:
        from twisted.internet import defer

        from perc import dtls
        from perc.endpoint import ReferenceEndpoint
        from perc.profiles import by_id

        kd_fingerprint = self.kd_fingerprint
        registered = []
        for index in range(self.endpoint_count):
            conference = self.conferences[index % len(self.conferences)]
            name = "endpoint-{}".format(index + 1)
            credentials = dtls.Credentials.self_signed(name)
            tls_id = "{}-{}".format(name, os.urandom(12).hex())
            answer = await self._put("kd", conference, tls_id,
                                     {"fingerprint": credentials.fingerprint})
            await self._put("md", conference, tls_id, {})
            registered.append((conference, name, credentials, tls_id, answer["kd_tls_id"]))
        for kd in self.cluster[1:]:
            # The others learn the registrations by NOTIFY: an endpoint
            # placed on one that has not yet would be refused.
            await self.registrations_known(kd, len(registered))
        for conference, name, credentials, tls_id, kd_tls_id in registered:
            endpoint = ReferenceEndpoint(
                name=name, credentials=credentials, tls_id=tls_id,
                server=("127.0.0.1", self.media_port), profile=by_id(0x0009),
                clock=self.reactor, expected_kd_tls_id=kd_tls_id,
                expected_kd_fingerprint=kd_fingerprint, rate=self.rate,
                keepalive=self.keepalive, keepalive_timeout=self.keepalive_timeout)
            endpoint.conference = conference
            endpoint.tls_id = tls_id
            self._ports.append(self.reactor.listenUDP(0, endpoint, interface="127.0.0.1"))
            self.endpoints.append(endpoint)
        joined = defer.gatherResults([e.joined for e in self.endpoints], consumeErrors=True)
        await joined.addTimeout(60, self.reactor)
        self.joins_source = ("endpoint summary" if "joins" in self.endpoints[0].summary()
                             else "derived: first join + rejoins")
        for endpoint in self.endpoints:
            endpoint.startSending()

    async def registrations_known(self, kd, count: int, timeout: float = 30.0) -> None:
        """Until Key Distributor ``kd`` holds at least ``count`` registrations."""
        known = {"n": 0}

        async def refresh():
            known["n"] = ((await self.status(kd)) or {}).get("registrations", 0)

        await wait_until(self.reactor, lambda: known["n"] >= count, timeout,
                         "{} registrations on {}".format(count, kd.node_id), poll=0.1,
                         refresh=refresh)

    # -- what the endpoints saw -------------------------------------------

    @staticmethod
    def joins(endpoint) -> int:
        """
        Handshakes ``endpoint`` completed: its summary's ``joins`` where it
        has one, else its first join (its hop-by-hop keys exist) plus its
        rejoins (handshakes completed after the first).
        """
        summary = endpoint.summary()
        if "joins" in summary:
            return summary["joins"]
        return endpoint.rejoins + (1 if endpoint.hbh_keys is not None else 0)

    def pairs(self) -> list:
        """(receiver, sender) for every two members of one conference."""
        return [(r, s) for r in self.endpoints for s in self.endpoints
                if r is not s and r.conference == s.conference]

    def totals(self) -> dict:
        """Counts summed over the endpoints (cumulative)."""
        totals = dict(sent=0, verified=0, failed=0, lost=0, undecryptable=0, joins=0,
                      new_keys=0)
        for endpoint in self.endpoints:
            totals["sent"] += endpoint.sent
            totals["joins"] += self.joins(endpoint)
            totals["new_keys"] += endpoint.rekeys
            for stats in endpoint.stats.values():
                totals["verified"] += stats.verified
                totals["failed"] += stats.failed
                totals["lost"] += stats.lost
                totals["undecryptable"] += stats.undecryptable
        return totals


async def steady(reactor, deployment: Deployment, quiet: float, timeout: float = 120.0) -> None:
    """Every endpoint keyed and every member verifying every other, with no join for ``quiet`` s."""
    def verified():
        return {(r.name, s.name): (r.stats[s.ssrc].verified if s.ssrc in r.stats else 0)
                for r, s in deployment.pairs()}

    deadline = reactor.seconds() + timeout
    while True:
        joins = sum(deployment.joins(e) for e in deployment.endpoints)
        before = verified()
        await sleep(reactor, quiet)
        after = verified()
        if (all(e.keyed for e in deployment.endpoints)
                and all(after[k] > before[k] for k in after)
                and joins == sum(deployment.joins(e) for e in deployment.endpoints)):
            return
        if reactor.seconds() > deadline:
            raise BenchFailure("the conference was not steady within {} s".format(timeout))


class Monitor:
    """
    Polls the endpoints every ``poll`` seconds and follows each fault from
    the moment it is made (:meth:`fault`) until :meth:`close`: when every
    receiver had verified a packet every other member sent after the fault
    and after the last join seen since (``recovered_s``: the rejoins a fault
    causes are part of it), the longest any pair went without a verified
    packet (``gap_s``, counted from its last one before the fault), the last
    join seen (``last_join_s``), and the endpoints' counts over that time.
    ``lost`` counts every packet not verified below a receiver's highest
    verified sequence number, undecryptable ones included.
    """

    def __init__(self, deployment: Deployment, poll: float = 0.05):
        from twisted.internet import task

        self.deployment = deployment
        self.reactor = deployment.reactor
        self.open = []
        self._verified = {}
        self._changed = {}
        self._joins = None
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.reactor
        self.poll = poll

    def start(self) -> None:
        self._tick()
        self._loop.start(self.poll, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def fault(self, kind: str, started: float) -> dict:
        """A fault made now; ``started`` is the run's start (reactor seconds)."""
        self._tick()
        now = self.reactor.seconds()
        record = {
            "kind": kind, "at_s": round(now - started, 2), "_at": now,
            "_marks": self._marks(),
            "_before": self.deployment.totals(),
            "recovered_s": None, "gap_s": 0.0, "last_join_s": None,
        }
        self.open.append(record)
        return record

    def _tick(self) -> None:
        now = self.reactor.seconds()
        deployment = self.deployment
        for receiver, sender in deployment.pairs():
            key = receiver.name, sender.name
            stats = receiver.stats.get(sender.ssrc)
            verified = 0 if stats is None else stats.verified
            if verified != self._verified.get(key):
                previous = self._changed.get(key)
                for record in self.open:
                    # From the pair's last verified packet, before the fault if need be.
                    since = record["_at"] if previous is None else previous
                    record["gap_s"] = max(record["gap_s"], now - since)
                self._verified[key] = verified
                self._changed[key] = now
        joins = sum(deployment.joins(e) for e in deployment.endpoints)
        if self._joins is not None and joins != self._joins:
            for record in self.open:
                # A join after the fault (its consequence): media must flow after it too.
                record["last_join_s"] = round(now - record["_at"], 2)
                record["_marks"] = self._marks()
                record["recovered_s"] = None
        self._joins = joins
        for record in self.open:
            if record["recovered_s"] is None and self._recovered(record):
                record["recovered_s"] = round(now - record["_at"], 2)

    def _marks(self) -> dict:
        # A sender's RTP sequence number is its count of packets sent.
        return {(r.name, s.name): s.sent % SEQUENCE_SPACE for r, s in self.deployment.pairs()}

    def _recovered(self, record) -> bool:
        for receiver, sender in self.deployment.pairs():
            stats = receiver.stats.get(sender.ssrc)
            if stats is None or stats.highest_sequence is None:
                return False
            if stats.highest_sequence <= record["_marks"][receiver.name, sender.name]:
                return False
        return True

    def close(self, record) -> dict:
        """Stop following ``record``; returns it with the counts since the fault."""
        self._tick()
        now = self.reactor.seconds()
        for receiver, sender in self.deployment.pairs():
            # A pair silent since its last verified packet: that gap lasts until now.
            since = self._changed.get((receiver.name, sender.name), record["_at"])
            record["gap_s"] = max(record["gap_s"], now - since)
        after = self.deployment.totals()
        for name in ("sent", "verified", "failed", "lost", "undecryptable", "joins",
                     "new_keys"):
            record[name] = after[name] - record["_before"][name]
        record["gap_s"] = round(record["gap_s"], 2)
        record["observed_s"] = round(now - record["_at"], 2)
        self.open.remove(record)
        return {k: v for k, v in record.items() if not k.startswith("_")}


# --------------------------------------------------------------------------


def parse_ekt_ttl(parser, value):
    if value.lower() == "none":
        return None
    try:
        ttl = int(value)
    except ValueError:
        parser.error("--ekt-ttl: seconds or 'none'")
    if ttl < 1:
        parser.error("--ekt-ttl must be at least 1")
    return ttl


def check_deployment_options(parser, args) -> None:
    """Checks shared with bench/faults.py."""
    if not 2 <= args.endpoints <= 100:
        parser.error("--endpoints must be 2 to 100")
    if not 1 <= args.conferences <= args.endpoints // 2:
        parser.error("--conferences: each needs at least 2 endpoints")
    if not 0 < args.rate <= 100:
        parser.error("--rate must be above 0 and at most 100")
    if args.keepalive <= 0 or args.keepalive_timeout <= 0:
        parser.error("--keepalive and --keepalive-timeout must be positive (the faults are "
                     "noticed by the endpoints' liveness probes)")


def deployment_from(reactor, directory, args) -> Deployment:
    return Deployment(reactor, directory, endpoints=args.endpoints,
                      conferences=args.conferences, rate=args.rate, ekt_ttl=args.ekt_ttl,
                      keepalive=args.keepalive, keepalive_timeout=args.keepalive_timeout)


def run_on_reactor(name: str, coroutine_function, args):
    """
    Run ``coroutine_function(reactor, deployment, args)`` on the global
    reactor with a fresh :class:`Deployment` in a temporary directory;
    return its figures.  The daemons are stopped whatever happens.
    """
    async def with_deployment(reactor, directory, args):
        deployment = deployment_from(reactor, directory, args)
        try:
            await deployment.start()
            return await coroutine_function(reactor, deployment, args)
        finally:
            await deployment.stop()

    return run_in_directory(name, with_deployment, args)


def run_in_directory(name: str, coroutine_function, args):
    """
    Run ``coroutine_function(reactor, directory, args)`` on the global
    reactor, ``directory`` a new temporary one (kept with ``args.keep`` or
    when the run fails, removed otherwise), the reactor's log in its
    ``bench.log``; return its figures (a dict) or raise BenchFailure.  The
    deployments it makes are killed if the reactor stops under them.
    """
    from twisted.internet import defer, reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    directory = tempfile.mkdtemp(prefix="perc-{}-".format(name))
    log_file = open(os.path.join(directory, "bench.log"), "w")
    globalLogBeginner.beginLoggingTo([textFileLogObserver(log_file)],
                                     redirectStandardIO=False)
    outcome = {}

    def started():
        d = defer.ensureDeferred(coroutine_function(reactor, directory, args))
        d.addBoth(lambda result: outcome.__setitem__("result", result))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(started)
    try:
        reactor.run()
    finally:
        log_file.close()
        failed = not isinstance(outcome.get("result"), dict)
        if args.keep or failed:
            print("logs kept in {}".format(directory), flush=True)
        else:
            shutil.rmtree(directory, ignore_errors=True)
    result = outcome.get("result")
    if result is None:
        raise BenchFailure("interrupted")
    if isinstance(result, dict):
        return result
    error = result.value  # a Failure
    if isinstance(error, BenchFailure):
        raise error
    raise BenchFailure("{}: {}".format(type(error).__name__, error)) from None
