"""
Failure cases of a Key Distributor cluster (issue 14; README, "Key
Distributor cluster") with real ``twistd -n perc-kd`` processes on real
PostgreSQL, a Media Distributor service in this process with a tunnel to
each, and reference endpoints on real UDP:

- a Key Distributor cut from the database (its ``--db`` through a
  :class:`perc.testing.tcprelay.TcpRelay` that is stopped) while its tunnel
  stays up: it stops serving before its lease expires, the other adopts its
  association and rekeys it with no handshake, and once the relay is back
  it serves new joins without taking the association back
  (PERC_TEST_POSTGRES);
- the database restarted (``pg_ctl restart -m fast``, every connection
  cut) and stopped for longer than the lease, on a PostgreSQL cluster of
  the test's own (the PostgreSQL 15 binaries; skipped, saying why, without
  them).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from urllib.parse import urlsplit, urlunsplit

from cryptography import x509
from twisted.internet import defer, reactor, task, threads
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from perc import dtls, pki
from perc.daemons import start_key_distributors
from perc.endpoint import ReferenceEndpoint
from perc.md import tap as md_tap
from perc.md.service import MediaDistributorService
from perc.profiles import by_id
from perc.scripts.register import put_json, register_with_key_distributor
from perc.testing.tcprelay import TcpRelay
from tests.storehelpers import postgres_database
from tests.test_md_e2e import eventually

CONFERENCE = "faults"
WAIT = 30

#: What a Key Distributor logs when it stops serving, and when it serves again.
STOPS_SERVING = "it stops serving before the lease expires"
SERVING_AGAIN = "holds its lease again: serving"

#: The PostgreSQL binaries the database restart tests run (as .ci/run does).
POSTGRES_BIN = "/usr/lib/postgresql/15/bin"


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


def query(dsn: str, statement: str, arguments: tuple = ()) -> list:
    """Rows of one statement on a connection of its own (not a Key Distributor's)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as connection:
        cursor = connection.execute(statement, arguments)
        return cursor.fetchall() if cursor.description else []


def lease_left(dsn: str, node_id: str) -> float:
    """Seconds ``node_id``'s lease has left, on the database's clock (negative: expired)."""
    [(seconds,)] = query(dsn, "SELECT lease_expires_at - extract(epoch FROM clock_timestamp())"
                              " FROM nodes WHERE node_id = %s", (node_id,))
    return float(seconds)


def lease_expiry(dsn: str, node_id: str) -> float:
    [(expires,)] = query(dsn, "SELECT lease_expires_at FROM nodes WHERE node_id = %s", (node_id,))
    return float(expires)


def renewals(dsn: str, node_id: str, count: int) -> defer.Deferred:
    """Fires once ``node_id`` has renewed its lease ``count`` times from now (seen in the database)."""
    seen = {lease_expiry(dsn, node_id)}

    def renewed():
        seen.add(lease_expiry(dsn, node_id))
        return len(seen) > count

    return eventually(renewed, step=0.1, what="{} renewals of {}'s lease".format(count, node_id))


def holds(endpoint, spi: int) -> bool:
    """Whether ``endpoint`` protects, or is about to, under the EKTKey of ``spi``."""
    return endpoint._heldKey(spi) is not None


def owner(dsn: str, association_id) -> str | None:
    rows = query(dsn, "SELECT owner_node FROM associations WHERE association_id = %s",
                 (str(association_id),))
    return rows[0][0] if rows else None


class TunnelTraffic:
    """
    What the Media Distributor gets from its Key Distributors, in order:
    ``("keys" | "dtls", tunnel port, association id)`` for each MediaKeys
    and TunneledDtls, and ``("down", tunnel port, None)`` each time a tunnel
    goes down; the tunnel port names the Key Distributor.  Recorded on the
    way to the relay, which handles each message as before.
    """

    def __init__(self, relay):
        self.events: list[tuple] = []
        mediaKeysReceived = relay.mediaKeysReceived
        tunneledDtlsReceived = relay.tunneledDtlsReceived
        tunnelDown = relay.tunnelDown

        def keys(tunnel, message):
            self.events.append(("keys", _port(tunnel), message.association_id))
            return mediaKeysReceived(tunnel, message)

        def dtls(tunnel, association_id, data):
            self.events.append(("dtls", _port(tunnel), association_id))
            return tunneledDtlsReceived(tunnel, association_id, data)

        def down(tunnel, reason=None):
            self.events.append(("down", _port(tunnel), None))
            return tunnelDown(tunnel, reason)

        relay.mediaKeysReceived = keys
        relay.tunneledDtlsReceived = dtls
        relay.tunnelDown = down

    def keys(self) -> list:
        """``(association id, tunnel port)`` of every MediaKeys: one per handshake."""
        return [(aid, port) for kind, port, aid in self.events if kind == "keys"]


def _port(tunnel) -> int:
    return tunnel.transport.getPeer().port


class ClusterFaultsMixin:
    """
    A development PKI; Key Distributor processes (:func:`start_key_distributors`),
    a Media Distributor service with a tunnel to each, and endpoints
    registered through a Key Distributor's control API.
    """

    #: Each test takes 10 to 20 s.
    timeout = 60

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.pki = pki.create_dev_pki(os.path.join(self.dir, "pki"))
        with open(self.pki.kd_certificate, "rb") as f:
            self.kd_fingerprint = pki.fingerprint(x509.load_pem_x509_certificate(f.read()))
        self.agent = Agent(reactor)

    @defer.inlineCallbacks
    def startCluster(self, db, count: int, lease_seconds: float):
        """``count`` Key Distributors on ``db`` (a DSN, or one each), and the Media Distributor."""
        self.kds = yield defer.Deferred.fromCoroutine(start_key_distributors(
            reactor, self.dir, count, pki_directory=self.pki.directory, db=db,
            lease_seconds=lease_seconds))
        for kd in self.kds:
            self.addCleanup(lambda kd=kd: defer.Deferred.fromCoroutine(
                kd.daemon.stopped(reactor)))
        with open(os.path.join(self.dir, "perc-kd-api.token")) as f:
            self.token = f.read().strip()
        config = md_tap.Options()
        config.parseOptions(
            ["--pki", self.pki.directory, "--media-port", "0", "--media-interface", "127.0.0.1",
             "--api", "none"] + [arg for kd in self.kds for arg in ("--kd", kd.tunnel_endpoint)])
        self.md = MediaDistributorService.fromOptions(config, reactor)
        self.traffic = TunnelTraffic(self.md.relay)
        self.md.privilegedStartService()
        self.md.startService()
        self.addCleanup(self.md.stopService)
        yield eventually(lambda: self.tunnelsUp() == {kd.tunnel_port for kd in self.kds},
                         what="the Media Distributor's tunnels up")

    def tunnelsUp(self) -> set:
        return {_port(tunnel) for tunnel in self.md.pool.tunnels if tunnel.usable}

    def kdOf(self, port: int):
        [kd] = [kd for kd in self.kds if kd.tunnel_port == port]
        return kd

    @defer.inlineCallbacks
    def member(self, name: str, through, keepalive: float = 1.0, keepalive_timeout: float = 5.0):
        """
        An endpoint registered through ``through``'s API, once every Key
        Distributor knows it (a Key Distributor that did not would refuse
        its handshake for good), then listening (it starts joining).
        """
        credentials = dtls.Credentials.self_signed(name)
        tls_id = "{}-{}".format(name, os.urandom(12).hex())
        registration, created = yield register_with_key_distributor(
            self.agent, through.api_url, self.token, CONFERENCE, tls_id, credentials.fingerprint,
            reactor=reactor)
        self.assertTrue(created)
        path = "/v1/conferences/{}/endpoints/{}".format(CONFERENCE, tls_id)
        deadline = reactor.seconds() + WAIT
        for kd in self.kds:
            while (yield self.api(kd, b"GET", path))[0] != 200:
                self.assertLess(reactor.seconds(), deadline, "{} unknown to {}".format(
                    name, kd.node_id))
                yield sleep(0.05)
        self.md.memberships.put(CONFERENCE, tls_id)
        endpoint = ReferenceEndpoint(
            name=name, credentials=credentials, tls_id=tls_id,
            server=("127.0.0.1", self.md.ports["media"].getHost().port), profile=by_id(0x0009),
            clock=reactor, expected_kd_tls_id=registration["kd_tls_id"],
            expected_kd_fingerprint=self.kd_fingerprint, rate=20, keepalive=keepalive,
            keepalive_timeout=keepalive_timeout)
        port = reactor.listenUDP(0, endpoint, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(endpoint.stopSending)
        return endpoint

    @defer.inlineCallbacks
    def join(self, name: str, through, **options):
        """:meth:`member`, joined; returns it, its association id and the Key Distributor it joined through."""
        handshakes = len(self.traffic.keys())
        endpoint = yield self.member(name, through, **options)
        yield endpoint.joined.addTimeout(WAIT, reactor)
        endpoint.startSending()
        [(association_id, port)] = self.traffic.keys()[handshakes:]
        return endpoint, association_id, self.kdOf(port)

    @defer.inlineCallbacks
    def api(self, kd, method: bytes, path: str, token: bool = True):
        """``(status, JSON answer)`` of a request to ``kd``'s control API."""
        headers = Headers({b"authorization": [b"Bearer " + self.token.encode()]} if token else {})
        response = yield self.agent.request(method, (kd.api_url + path).encode(), headers)
        body = yield readBody(response)
        return response.code, json.loads(body) if body else None

    @defer.inlineCallbacks
    def rekey(self, kd) -> defer.Deferred:
        """Rekey the conference through ``kd``'s API; fires with the new SPI."""
        code, answer = yield put_json(
            self.agent, "{}/v1/conferences/{}/rekey".format(kd.api_url, CONFERENCE).encode(),
            self.token, {}, reactor=reactor, method=b"POST")
        self.assertEqual(code, 200, answer)
        return answer["ekt_spi"]

    @defer.inlineCallbacks
    def ready(self, kd) -> defer.Deferred:
        """``(ready, reason)`` from ``kd``'s ``/readyz``."""
        code, answer = yield self.api(kd, b"GET", "/readyz", token=False)
        self.assertEqual(code == 200, answer["ready"])
        return answer["ready"], answer["reason"]

    @staticmethod
    def verified(receiver, sender) -> int:
        stats = receiver.stats.get(sender.ssrc)
        return 0 if stats is None else stats.verified

    def allVerifyEachOther(self, members, more: int = 10):
        """Fires once every member has verified ``more`` new packets of every other one."""
        start = {(r.name, s.name): self.verified(r, s) for r in members for s in members}
        return eventually(lambda: all(
            self.verified(r, s) >= start[r.name, s.name] + more
            for r in members for s in members if r is not s),
            what="every member verifying every other one's media")

    def assertJoinedOnceNothingFailed(self, *members):
        for member in members:
            self.assertEqual(member.joins, 1, member.summary())
            for stats in member.stats.values():
                self.assertEqual(stats.failed, 0, member.summary())

    def assertNoTraceback(self):
        for kd in self.kds:
            self.assertNotIn("Traceback", kd.daemon.output(), kd.daemon.log_path)


class PartitionedFromTheDatabaseTests(ClusterFaultsMixin, TestCase):
    """
    Two Key Distributors, each with its ``--db`` through a TCP relay of its
    own to one PostgreSQL database (3 s leases).  The relay of the one that
    served an endpoint's handshake is stopped (listening ends, every
    connection reset), its tunnel to the Media Distributor untouched.
    """

    LEASE = 3.0

    @defer.inlineCallbacks
    def setUp(self):
        self.db = postgres_database(self)
        super().setUp()
        parts = urlsplit(self.db)
        self.relays = []
        dsns = []
        for _ in range(2):
            relay = TcpRelay(reactor, (parts.hostname, parts.port or 5432))
            relay.listen()
            self.addCleanup(lambda relay=relay: relay.stop())
            self.relays.append(relay)
            dsns.append(urlunsplit(parts._replace(netloc="{}@127.0.0.1:{}".format(
                parts.username, relay.port.getHost().port))))
        yield self.startCluster(dsns, 2, self.LEASE)

    @defer.inlineCallbacks
    def test_cut_node_stops_the_other_adopts_then_it_serves_new_joins(self):
        alice, alice_aid, cut = yield self.join("alice", self.kds[0])
        bob, _, other = yield self.join("bob", self.kds[0])
        self.assertIsNot(other, cut)  # the least-loaded Key Distributor
        yield self.allVerifyEachOther([alice, bob])
        yield eventually(lambda: owner(self.db, alice_aid) == cut.node_id,
                         what="alice's ownership row")
        relay = self.relays[self.kds.index(cut)]
        relay_port = relay.port.getHost().port

        yield relay.stop()
        yield cut.daemon.said(reactor, STOPS_SERVING, poll=0.01)
        # Before its lease expired on the database's clock: nobody could
        # have adopted the association yet.
        self.assertGreater(lease_left(self.db, cut.node_id), 0)
        self.assertEqual(owner(self.db, alice_aid), cut.node_id)
        yield eventually(lambda: cut.tunnel_port not in self.tunnelsUp(),
                         what="the cut Key Distributor's tunnel closed")
        ready, reason = yield self.ready(cut)
        self.assertFalse(ready)
        self.assertIn("lease", reason)
        self.assertTrue(cut.daemon.running)

        yield other.daemon.said(reactor, "Association {} adopted".format(alice_aid))
        self.assertEqual(owner(self.db, alice_aid), other.node_id)
        self.assertNotIn(cut.tunnel_port, self.tunnelsUp())  # still refused
        spi = yield self.rekey(other)
        yield eventually(lambda: holds(alice, spi) and holds(bob, spi),
                         what="the rekey at both endpoints")
        yield self.allVerifyEachOther([alice, bob])
        self.assertTrue(holds(alice, spi) and holds(bob, spi))

        relay.listen(relay_port)
        yield cut.daemon.said(reactor, SERVING_AGAIN)
        yield eventually(lambda: cut.tunnel_port in self.tunnelsUp(),
                         what="the tunnel to the healed Key Distributor")
        ready, reason = yield self.ready(cut)
        self.assertTrue(ready, reason)
        # A new join goes to the least-loaded Key Distributor: the healed one.
        carol, carol_aid, kd = yield self.join("carol", other)
        self.assertIs(kd, cut)
        yield eventually(lambda: owner(self.db, carol_aid) == cut.node_id,
                         what="carol's ownership row")
        # Its orphan adoption (every third of the lease, as the renewals)
        # has run since it serves again.
        yield renewals(self.db, cut.node_id, 3)
        self.assertEqual(owner(self.db, alice_aid), other.node_id)
        code, status = yield self.api(cut, b"GET", "/v1/status")
        self.assertEqual((code, status["associations"]), (200, 1))
        self.assertNotIn("adopted", status["counters"])
        # A rekey through the other one reaches carol through the healed one
        # (its LISTEN connection is back) and alice through the adopter.
        spi = yield self.rekey(other)
        yield eventually(lambda: all(holds(m, spi) for m in (alice, bob, carol)),
                         what="the second rekey at every endpoint")
        yield self.allVerifyEachOther([alice, bob, carol])
        self.assertJoinedOnceNothingFailed(alice, bob, carol)

        # At the Media Distributor, alice's association was served by one
        # Key Distributor at a time: the cut one until its tunnel closed,
        # the adopter after, the healed one never again.
        down = self.traffic.events.index(("down", cut.tunnel_port, None))
        served = [(index, port) for index, (kind, port, aid) in enumerate(self.traffic.events)
                  if aid == alice_aid]
        self.assertEqual({port for index, port in served if index < down}, {cut.tunnel_port})
        self.assertEqual({port for index, port in served if index > down}, {other.tunnel_port})
        self.assertEqual(len(self.traffic.keys()), 3)
        self.assertNoTraceback()


class ThrowawayPostgres:
    """
    A PostgreSQL cluster of a test's own (initdb, then ``pg_ctl`` with the
    socket directory in its temporary directory and fsync off), which the
    test may restart or stop; stopped and removed at cleanup.  As root it
    runs as the ``postgres`` user (initdb refuses root), as .ci/run does.
    ``SkipTest`` (saying why) without the binaries or that user.
    """

    def __init__(self, testcase, bin_directory: str = POSTGRES_BIN):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise SkipTest('the database restart tests need psycopg (pip install '
                           '".[postgresql]")') from None
        self.bin = bin_directory
        missing = [name for name in ("initdb", "pg_ctl")
                   if not os.access(os.path.join(bin_directory, name), os.X_OK)]
        if missing:
            raise SkipTest("the database restart tests need the PostgreSQL 15 binaries "
                           "({} not found in {})".format(", ".join(missing), bin_directory))
        self.user = None
        if os.geteuid() == 0:
            try:
                self.user = pwd.getpwnam("postgres")
            except KeyError:
                raise SkipTest("the database restart tests run as root need a 'postgres' "
                               "user for initdb, which refuses root: there is none") from None
            if shutil.which("runuser") is None:
                raise SkipTest("the database restart tests run as root need runuser to run "
                               "initdb as 'postgres': not found")
        self.directory = tempfile.mkdtemp(prefix="perc-pg-")
        testcase.addCleanup(shutil.rmtree, self.directory, ignore_errors=True)
        if self.user is not None:
            os.chown(self.directory, self.user.pw_uid, self.user.pw_gid)
        self.data = os.path.join(self.directory, "data")
        self.port = _free_port()
        self.dsn = "postgresql://postgres@127.0.0.1:{}/postgres".format(self.port)
        self._testcase = testcase

    @defer.inlineCallbacks
    def create(self):
        """initdb and start; stopped at the test's cleanup."""
        yield self._run("initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "--no-sync")
        yield self.start()
        self._testcase.addCleanup(self.stop)

    def start(self) -> defer.Deferred:
        return self._pg_ctl("start")

    def stop(self) -> defer.Deferred:
        """``pg_ctl stop -m fast`` (every connection ended), if it runs."""
        if not os.path.exists(os.path.join(self.data, "postmaster.pid")):
            return defer.succeed(None)
        return self._pg_ctl("stop")

    def restart(self) -> defer.Deferred:
        """``pg_ctl restart -m fast``: every connection ended, the server back."""
        return self._pg_ctl("restart")

    def _pg_ctl(self, action: str) -> defer.Deferred:
        return self._run("pg_ctl", "-D", self.data, "-l", os.path.join(self.directory, "log"),
                         "-w", "-m", "fast", "-o", "-h 127.0.0.1 -p {} -k {} -F".format(
                             self.port, self.directory), action)

    def _run(self, program: str, *args) -> defer.Deferred:
        """Run a PostgreSQL program in a thread (this reactor runs the Media Distributor)."""
        command = [os.path.join(self.bin, program)] + list(args)
        if self.user is not None:
            command = ["runuser", "-u", "postgres", "--"] + command

        def run():
            done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, timeout=60)
            if done.returncode:
                raise AssertionError("{} failed (exit status {}):\n{}".format(
                    " ".join(command), done.returncode, done.stdout.decode(errors="replace")))

        return threads.deferToThread(run)

    def listening_connections(self) -> int:
        """Backends whose last statement was a LISTEN: the Key Distributors' notification connections."""
        [(count,)] = query(self.dsn, "SELECT count(*) FROM pg_stat_activity"
                                     " WHERE query LIKE 'LISTEN %%'")
        return count


def _free_port() -> int:
    # PostgreSQL cannot be given port 0 and say which it bound: pick one.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DatabaseRestartTests(ClusterFaultsMixin, TestCase):
    """Key Distributors on a PostgreSQL cluster of the test's own, restarted or stopped."""

    @defer.inlineCallbacks
    def setUp(self):
        super().setUp()
        self.postgres = ThrowawayPostgres(self)
        yield self.postgres.create()

    @defer.inlineCallbacks
    def test_restart_shorter_than_the_lease(self):
        """
        ``pg_ctl restart -m fast`` ends every connection of both Key
        Distributors (9 s leases, a restart of well under a third of it):
        both keep their lease (they never stop serving), their pools and
        LISTEN connections come back, a rekey through either reaches the
        endpoint of the other, a new registration and join work, and no
        endpoint handshakes again.
        """
        yield self.startCluster(self.postgres.dsn, 2, lease_seconds=9.0)
        alice, _, first = yield self.join("alice", self.kds[0])
        bob, _, second = yield self.join("bob", self.kds[0])
        self.assertIsNot(first, second)
        yield self.allVerifyEachOther([alice, bob])
        yield eventually(lambda: self.postgres.listening_connections() == 2,
                         what="both LISTEN connections")

        yield self.postgres.restart()
        for kd in self.kds:
            yield kd.daemon.said(reactor, "Database notifications interrupted")
        for kd in self.kds:
            yield kd.daemon.said(reactor, "Database notifications listening again")
        # Both notification connections established again (on the server's side).
        self.assertEqual(self.postgres.listening_connections(), 2)
        # A rekey through one reaches the other's endpoint by NOTIFY.
        for through, member in ((second, alice), (first, bob)):
            spi = yield self.rekey(through)
            yield eventually(lambda: holds(alice, spi) and holds(bob, spi),
                             what="the rekey through {} at {}".format(through.node_id,
                                                                      member.name))
        for kd in self.kds:
            yield renewals(self.postgres.dsn, kd.node_id, 1)
        carol, _, _ = yield self.join("carol", second)
        yield self.allVerifyEachOther([alice, bob, carol])
        for kd in self.kds:
            self.assertTrue(kd.daemon.running)
            output = kd.daemon.output()
            self.assertNotIn(STOPS_SERVING, output)
            # What a Key Distributor reads again once its LISTEN connection
            # is back (notifications it may have missed) was read: not lost
            # on a pooled connection the restart had ended.
            for failed in ("Could not reload registrations", "Could not read the stored EKTKey"):
                self.assertNotIn(failed, output)
            ready, reason = yield self.ready(kd)
            self.assertTrue(ready, reason)
        self.assertJoinedOnceNothingFailed(alice, bob, carol)
        self.assertEqual(len(self.traffic.keys()), 3)
        self.assertNoTraceback()

    @defer.inlineCallbacks
    def test_outage_longer_than_the_lease(self):
        """
        The database stopped for longer than the lease (3 s): the Key
        Distributor stops serving (its tunnel closed, not ready) but runs
        on; once the database is back it holds its lease again, serves,
        takes back its own associations from their rows (no handshake: a
        rekey reaches the endpoints) and serves a new join.  The endpoints
        do not probe (keepalive 0): one that did would join again after its
        keepalive timeout, which is its design, not the Key Distributor's.
        """
        lease = 3.0
        yield self.startCluster(self.postgres.dsn, 1, lease_seconds=lease)
        [kd] = self.kds
        alice, _, _ = yield self.join("alice", kd, keepalive=0)
        bob, _, _ = yield self.join("bob", kd, keepalive=0)
        yield self.allVerifyEachOther([alice, bob])
        yield eventually(lambda: len(query(self.postgres.dsn, "SELECT 1 FROM associations")) == 2,
                         what="both ownership rows")

        yield self.postgres.stop()
        yield kd.daemon.said(reactor, STOPS_SERVING)
        yield eventually(lambda: not self.tunnelsUp(), what="the tunnel closed")
        ready, reason = yield self.ready(kd)
        self.assertFalse(ready)
        self.assertIn("lease", reason)
        # Keyed endpoints go on without a Key Distributor.
        yield self.allVerifyEachOther([alice, bob])
        yield sleep(lease)  # the outage outlasts the lease
        self.assertTrue(kd.daemon.running)

        yield self.postgres.start()
        yield kd.daemon.said(reactor, SERVING_AGAIN)
        yield kd.daemon.said(reactor, "Node kd-1 adopted 2 orphaned associations")
        yield eventually(lambda: self.tunnelsUp() == {kd.tunnel_port},
                         what="the tunnel up again")
        ready, reason = yield self.ready(kd)
        self.assertTrue(ready, reason)
        spi = yield self.rekey(kd)
        yield eventually(lambda: holds(alice, spi) and holds(bob, spi),
                         what="the rekey at both endpoints")
        carol, _, _ = yield self.join("carol", kd)
        yield self.allVerifyEachOther([alice, bob, carol])
        self.assertJoinedOnceNothingFailed(alice, bob, carol)
        self.assertTrue(kd.daemon.running)
        self.assertNoTraceback()
