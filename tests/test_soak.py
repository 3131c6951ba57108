"""
A one-minute ``perc bench soak`` (real ``perc-kd`` and ``perc-md``
processes, 10 reference endpoints, the tunnel reset and the Key Distributor
restarted during the minute) and the pieces it is built from: the TCP relay
that flaps the tunnel and the RSS slope.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from twisted.internet import defer, protocol, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from perc.testing.tcprelay import TcpRelay

from tests.test_md_e2e import eventually

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import _deployment  # noqa: E402


class Recorder(protocol.Protocol):
    """Keeps what it receives and how its connection ended."""

    def __init__(self):
        self.received = b""
        self.lost = defer.Deferred()

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.reason = reason
        self.lost.callback(None)


class TcpRelayTests(TestCase):
    def setUp(self):
        self.servers = []
        factory = protocol.ServerFactory()
        factory.protocol = self.newServer
        self.target = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.target.stopListening)
        self.relay = TcpRelay(reactor, ("127.0.0.1", self.target.getHost().port))
        self.relay.listen()
        self.addCleanup(self.relay.stop)

    def newServer(self):
        server = Recorder()
        self.servers.append(server)
        return server

    @defer.inlineCallbacks
    def connect(self):
        client = Recorder()
        yield protocol.ClientCreator(reactor, lambda: client).connectTCP(
            "127.0.0.1", self.relay.port.getHost().port)
        return client

    @defer.inlineCallbacks
    def test_bytes_go_both_ways(self):
        client = yield self.connect()
        client.transport.write(b"sent before the target answered")
        yield eventually(lambda: self.servers and self.servers[0].received)
        self.servers[0].transport.write(b"answer")
        yield eventually(lambda: client.received == b"answer")
        self.assertEqual(self.servers[0].received, b"sent before the target answered")
        client.transport.loseConnection()
        yield self.servers[0].lost
        self.assertEqual(self.relay.connections, 0)

    @defer.inlineCallbacks
    def test_reset_breaks_both_sides_and_the_client_dials_again(self):
        from twisted.internet.error import ConnectionLost

        client = yield self.connect()
        yield eventually(lambda: self.servers)
        self.assertEqual(self.relay.reset(), 1)
        yield client.lost
        yield self.servers[0].lost
        # Broken abruptly (a reset), not closed in order, on both sides.
        self.assertTrue(client.reason.check(ConnectionLost), client.reason)
        self.assertTrue(self.servers[0].reason.check(ConnectionLost), self.servers[0].reason)
        again = yield self.connect()
        yield eventually(lambda: len(self.servers) == 2)
        again.transport.write(b"after")
        yield eventually(lambda: self.servers[1].received == b"after")
        self.assertEqual((self.relay.accepted, self.relay.resets), (2, 1))
        again.transport.loseConnection()
        yield again.lost

    @defer.inlineCallbacks
    def test_target_down_closes_the_accepted_side(self):
        yield self.target.stopListening()
        client = yield self.connect()
        yield client.lost
        self.assertEqual(self.relay.connections, 0)


class SlopeTests(SynchronousTestCase):
    def test_growth_within_lives_only(self):
        # 60 KiB per minute within each life; each restart starts lower.
        samples = [(t * 60.0, 1000 + 60 * t - 500 * (t // 3), t // 3) for t in range(9)]
        self.assertAlmostEqual(_deployment.slope_kib_per_hour(samples), 3600.0)

    def test_flat_and_unmeasured(self):
        self.assertEqual(_deployment.slope_kib_per_hour([(0, 5, 1), (60, 5, 1)]), 0.0)
        self.assertIsNone(_deployment.slope_kib_per_hour([(0, 5, 1), (60, 5, 2)]))
        self.assertIsNone(_deployment.slope_kib_per_hour([(0, None, 1), (60, 5, 1)]))


class SoakMinuteTests(SynchronousTestCase):
    """``perc bench soak`` for one minute, as its own process (it runs its own reactor)."""

    #: Passed to perc-kd as --ekt-ttl: short, so that EKTKeys roll over
    #: (every 9 s at the default --ekt-rollover 0.75) during the minute.
    EKT_TTL = 12

    def test_one_minute(self):
        result = subprocess.run(
            [sys.executable, os.path.join(BENCH, "soak.py"), "--minutes", "1",
             "--interval", "10", "--tunnel-reset-every", "20", "--kd-restart-every", "30",
             "--rekey-every", "15", "--keepalive", "1", "--keepalive-timeout", "1",
             "--ekt-ttl", "none" if self.EKT_TTL is None else str(self.EKT_TTL)],
            capture_output=True, text=True, timeout=240,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                [os.path.dirname(BENCH)] + sys.path)))
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        self.assertTrue(figures["ok"])
        self.assertEqual(figures["totals"]["failed"], 0)
        self.assertEqual(figures["kd_lives"], 2)
        kinds = [fault["kind"] for fault in figures["faults"]]
        self.assertIn("tunnel-reset", kinds)
        self.assertIn("kd-restart", kinds)
        for fault in figures["faults"]:
            # Every member verified media sent after the fault and after the
            # rejoins it caused.
            self.assertIsNotNone(fault["recovered_s"], fault)
            self.assertGreater(fault["verified"], 0, fault)
            self.assertEqual(fault["failed"], 0, fault)
        self.assertGreater(figures["totals"]["verified"], 0)
        self.assertEqual(figures["intervals"][-1]["verifying_pairs"], 2 * 5 * 4)
        for row in figures["intervals"]:
            self.assertIsNotNone(row["kd_rss_kib"])
            self.assertIsNotNone(row["md_fds"])
