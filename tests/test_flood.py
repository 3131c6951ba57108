"""
A ClientHello flood at the Media Distributor's endpoint port (the short
version of ``perc bench flood``): real ``perc-md`` and ``perc-kd`` services
in this process, real TLS tunnel, real UDP from many loopback source
addresses.

The flood is cookieless first ClientHellos, each from a fresh source port,
from 40 source hosts at 25 times what the Media Distributor admits per
host (one new association per host per second here); its association
table is small (20), so the flood fills it within a second and keeps it
full.  What must hold:

- the Media Distributor's table never holds more than its bound, and its
  per-address rate limit refuses most of the flood;
- the Key Distributor answers the flood (HelloVerifyRequests reach the
  flood's sockets) and keeps nothing for it: no association, no OpenSSL
  object beyond those it had;
- a legitimate endpoint joins while the flood goes on, and it is then the
  Key Distributor's only association.

On the relay alone: the flood does not become a log flood
(``FloodLoggingTests``), and new handshakes are shed while the tunnel to
the Key Distributor is backed up rather than queued until the tunnel's
write bound drops it (``TunnelBusyTests``).
"""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from perc import dtls, hello
from perc.md.relay import RelayLimits
from perc.testing import flood

from tests.test_md_e2e import DistributorsMixin, eventually
from tests.test_md_relay import (ADDR_A, ADDR_B, ADDR_C, TLS_A, TLS_B, TLS_C, RelayTestCase,
                                  client_hello, dtls_application_data, server_hello)

MAX_ASSOCIATIONS = 20
HOSTS = 40
#: ClientHellos per tick of TICK seconds: 1,000 a second, against the 40 a
#: second (1 per host) that the Media Distributor admits.
PER_TICK = 10
TICK = 0.01


class ClientHelloFloodTests(DistributorsMixin, TestCase):
    timeout = 90
    # Every tls-id is placed (the worst case: each admitted ClientHello
    # becomes an association and goes to the Key Distributor).
    md_options = ("--default-conference", "flooded",
                  "--max-associations", str(MAX_ASSOCIATIONS),
                  "--new-associations-per-second", "1")

    def setUp(self):
        d = super().setUp()
        self.flooder = None
        self.peaks = {"md_associations": 0, "kd_associations": 0, "dtls_objects": 0}
        return d

    def tick(self):
        self.flooder.send(PER_TICK)
        self.flooder.read()
        self.sample()

    def sample(self):
        peaks = self.peaks
        peaks["md_associations"] = max(peaks["md_associations"],
                                       self.md.relay.status()["associations"])
        status = self.kd.distributor.status()
        peaks["kd_associations"] = max(peaks["kd_associations"], status["associations"])
        peaks["dtls_objects"] = max(peaks["dtls_objects"], status["dtls_objects"])

    def startFlood(self):
        self.flooder = flood.Flooder(self.media_address, flood.loopback_hosts(HOSTS), keep=128)
        self.addCleanup(self.flooder.close)
        loop = task.LoopingCall(self.tick)
        loop.start(TICK)
        self.addCleanup(lambda: loop.running and loop.stop())
        return loop

    @defer.inlineCallbacks
    def test_flood_bounded_stateless_and_a_legitimate_endpoint_joins(self):
        relay, distributor = self.md.relay, self.kd.distributor
        dtls_objects = dtls.callback_registry_size()
        self.assertEqual(len(distributor), 0)
        loop = self.startFlood()
        # Half a second of flood (longer on a slow machine): twice what the
        # table holds is admitted (40 hosts x 1 a second), 25 times that sent.
        yield eventually(lambda: self.flooder.sent >= 500)
        # The table filled and churned: cookieless handshakes made room for
        # new ClientHellos; the per-address limit refused most of the flood;
        # the Key Distributor answered (statelessly).
        self.assertGreaterEqual(relay.counters.get("evicted-unverified", 0), MAX_ASSOCIATIONS)
        self.assertEqual(relay.counters.get("refused-association-limit", 0), 0)
        self.assertGreater(relay.counters.get("refused-rate-limit", 0),
                           relay.counters["evicted-unverified"])
        yield eventually(lambda: self.flooder.hello_verify_requests >= MAX_ASSOCIATIONS)
        self.assertEqual(self.peaks["md_associations"], MAX_ASSOCIATIONS)
        self.assertEqual(self.peaks["kd_associations"], 0)
        self.assertEqual(self.peaks["dtls_objects"], dtls_objects)
        self.assertEqual(distributor.counters, {})

        endpoint = yield self.join("legitimate")
        self.assertTrue(loop.running)
        self.assertIsNotNone(endpoint.outbound)
        self.sample()
        self.assertEqual(relay.status()["established"], 1)
        self.assertEqual(len(distributor), 1)
        [association] = distributor._associations.values()
        self.assertTrue(association.established)
        self.assertEqual(self.peaks["kd_associations"], 1)
        self.assertLessEqual(self.peaks["md_associations"], MAX_ASSOCIATIONS)
        # The flood's sources: many addresses, many hosts.
        self.assertEqual(self.flooder.hosts_used, HOSTS)
        self.assertGreater(len(self.flooder.addresses), 2 * MAX_ASSOCIATIONS)


class FloodLoggingTests(RelayTestCase):
    """
    A flood must not become a log flood: per-ClientHello events are
    summarised once per sweep, and an association is logged only once the
    Key Distributor is past its cookie exchange.
    """

    limits = RelayLimits(max_associations=10, new_associations_per_address_per_second=1000)

    def setUp(self):
        super().setUp()
        self.events = []
        self.relay.log = Logger(namespace="relay", source=self.relay,
                                observer=self.events.append)
        self.maker = flood.HelloMaker(len(TLS_A))

    def texts(self):
        texts = [formatEvent(event) for event in self.events]
        del self.events[:]
        return texts

    def test_unknown_tls_ids(self):
        for n in range(100):
            self.relay.datagramReceived(self.maker.hello(), ("198.51.100.{}".format(n), 5000))
        self.assertEqual(self.counted("refused-no-conference"), 100)
        [line] = self.texts()
        self.assertIn("is in no conference", line)
        self.clock.advance(self.limits.sweep_interval)
        self.assertEqual(self.texts(), ["Ignored 99 more ClientHellos whose tls-id is in no "
                                        "conference"])
        self.clock.advance(self.limits.sweep_interval)
        self.assertEqual(self.texts(), [])

    def test_associations_logged_past_the_cookie_exchange(self):
        self.memberships.put("conf", TLS_A)
        ids = [self.open(("198.51.100.{}".format(n), 5000), TLS_A) for n in range(30)]
        self.assertEqual(self.counted("evicted-unverified"), 20)
        self.assertEqual(self.texts(), [])
        self.relay.tunneledDtlsReceived(self.tunnel, ids[-1], server_hello(None))
        [line] = self.texts()
        self.assertIn("New association {}".format(ids[-1]), line)
        self.assertIn("past the cookie exchange", line)
        self.clock.advance(self.limits.sweep_interval)
        [line] = self.texts()
        self.assertIn("20 handshakes that never returned the Key Distributor's cookie were "
                      "evicted", line)


class TunnelBusyTests(RelayTestCase):
    """
    While the tunnel's transport has paused it (the Key Distributor reads
    more slowly than the flood arrives), new ClientHellos are refused
    rather than queued until the tunnel's write bound drops it; handshakes
    under way and keyed endpoints go on.
    """

    default_conference = "conf"

    def test_new_handshakes_shed_while_the_tunnel_is_paused(self):
        under_way = self.open(ADDR_A, TLS_A)
        keyed = self.join("B", ADDR_B, TLS_B)
        sent = len(self.tunnel.sent)
        self.tunnel.writesPaused = True
        self.relay.datagramReceived(client_hello(TLS_C), ADDR_C)
        self.assertEqual(self.counted("refused-tunnel-busy"), 1)
        self.assertIsNone(self.relay._pending.get(ADDR_C))
        self.assertEqual(len(self.tunnel.sent), sent)
        # The handshake under way and the keyed endpoint still reach the tunnel.
        self.relay.datagramReceived(client_hello(TLS_A), ADDR_A)
        record = dtls_application_data()
        self.relay.datagramReceived(record, ADDR_B)
        self.assertEqual(self.tunnel.sent[sent:], [(under_way, client_hello(TLS_A)),
                                                   (keyed.association_id, record)])
        # Once the tunnel drains, the retransmitted ClientHello gets through.
        self.tunnel.writesPaused = False
        self.relay.datagramReceived(client_hello(TLS_C), ADDR_C)
        self.assertIsNotNone(self.relay._pending.get(ADDR_C))


class HelloMakerTests(SynchronousTestCase):
    def test_distinct_first_client_hellos(self):
        maker = flood.HelloMaker(24)
        parsed = [hello.parse_client_hello(maker.hello()) for _ in range(20)]
        self.assertEqual(len({p.random for p in parsed}), 20)
        self.assertEqual(len({p.tls_id for p in parsed}), 20)
        for p in parsed:
            self.assertTrue(p.cookie_empty)
            self.assertEqual(len(p.tls_id), 24)
            self.assertFalse(p.tls_id_malformed)
            self.assertEqual(p.srtp_profiles, (0x0009, 0x000A))
        chosen = hello.parse_client_hello(maker.hello(b"x" * 24))
        self.assertEqual(chosen.tls_id, b"x" * 24)
        self.assertRaises(ValueError, maker.hello, b"short")

    def test_loopback_hosts(self):
        hosts = flood.loopback_hosts(300)
        self.assertEqual(hosts[:2], ["127.64.0.1", "127.64.0.2"])
        self.assertEqual(len(set(hosts)), 300)
        self.assertFalse([h for h in hosts if h.endswith((".0", ".255"))])
        self.assertRaises(ValueError, flood.loopback_hosts, 20, 0x7FFFFFF0)
