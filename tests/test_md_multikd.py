"""
One Media Distributor, two real Key Distributors (issue 14 item 5): real
TLS tunnels on loopback, real DTLS handshakes from UDP endpoints.  New
associations go to the least-loaded live Key Distributor; an association
whose Key Distributor is gone goes through another one of the same
certificate identity, never through one of another identity.
"""

from __future__ import annotations

import os

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, protocol, reactor
from twisted.trial.unittest import TestCase

from perc import dtls, pki
from perc.kd import tap as kd_tap
from perc.kd.service import KeyDistributorService
from perc.md import tap as md_tap
from perc.md.service import MediaDistributorService
from perc.metrics import exposition
from perc.profiles import by_id

from tests.endpointhelpers import UdpEndpoint
from tests.test_md_e2e import WAIT, eventually

CONFERENCE = "room"

#: A DTLS 1.2 application-data record (epoch 1): what an established
#: endpoint's DTLS looks like to the Media Distributor.
DTLS_RECORD = bytes([23, 0xFE, 0xFD, 0, 1]) + bytes(6) + bytes([0, 4]) + b"data"


class TwoKeyDistributorsMixin:
    """Key Distributors "a" and "b" on loopback; one Media Distributor with a --kd for each."""

    #: Whether "b" has a certificate of its own (another identity) or "a"'s.
    other_identity = False

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        self.pki = pki.create_dev_pki(os.path.join(self.dir, "pki"))
        self.credentials = {"a": ["--pki", self.pki.directory],
                            "b": ["--pki", self.pki.directory]}
        if self.other_identity:
            self.credentials["b"] = self.issueOtherKeyDistributorCertificate()
        self.kds = {}
        self.ports = {}
        for name in ("a", "b"):
            yield self.startKeyDistributor(name, "tcp:0:interface=127.0.0.1")
            self.ports[name] = self.kds[name]._ports[0].getHost().port
        config = md_tap.Options()
        config.parseOptions([
            "--pki", self.pki.directory,
            "--kd", "tcp:127.0.0.1:{}".format(self.ports["a"]),
            "--kd", "tcp:127.0.0.1:{}".format(self.ports["b"]),
            "--media-port", "0", "--media-interface", "127.0.0.1", "--api", "none"])
        self.md = MediaDistributorService.fromOptions(config, reactor)
        self.md.privilegedStartService()
        self.md.startService()
        self.addCleanup(self.md.stopService)
        self.media_address = ("127.0.0.1", self.md.ports["media"].getHost().port)
        self.managers = dict(zip(("a", "b"), self.md.pool.managers))
        yield eventually(lambda: self.isUp("a") and self.isUp("b"))

    def issueOtherKeyDistributorCertificate(self) -> list:
        with open(self.pki.ca_certificate, "rb") as f:
            ca_certificate = x509.load_pem_x509_certificate(f.read())
        with open(self.pki.ca_key, "rb") as f:
            ca_key = serialization.load_pem_private_key(f.read(), None)
        certificate, key = pki.issue_certificate(
            ca_certificate, ca_key, "perc-kd-other", ["kd-other.test", "127.0.0.1"])
        cert_path = os.path.join(self.dir, "kd-other.pem")
        key_path = os.path.join(self.dir, "kd-other.key")
        pki.write_certificate(cert_path, certificate)
        pki.write_private_key(key_path, key)
        return ["--cert", cert_path, "--key", key_path, "--ca", self.pki.ca_certificate]

    @defer.inlineCallbacks
    def startKeyDistributor(self, name, listen):
        config = kd_tap.Options()
        config.parseOptions([
            *self.credentials[name], "--tunnel-listen", listen, "--api", "none",
            "--db", os.path.join(self.dir, "kd-{}.sqlite3".format(name))])
        kd = self.kds[name] = KeyDistributorService.fromOptions(config, reactor)
        kd.privilegedStartService()
        kd.startService()
        self.addCleanup(lambda: kd.stopService() if kd.running else None)
        yield kd.ready

    def isUp(self, name) -> bool:
        tunnel = self.managers[name].tunnel
        return (tunnel is not None and tunnel.usable
                and bool(self.kds[name].running and self.kds[name].distributor.tunnels))

    @defer.inlineCallbacks
    def stopKeyDistributor(self, name):
        """Key Distributor ``name`` is gone (its tunnel closes; its port refuses)."""
        yield self.kds[name].stopService()
        yield eventually(lambda: not self.managers[name].status()["up"])

    @defer.inlineCallbacks
    def restartKeyDistributor(self, name):
        yield self.startKeyDistributor(name, "tcp:{}:interface=127.0.0.1".format(
            self.ports[name]))
        yield eventually(lambda: self.isUp(name))

    @defer.inlineCallbacks
    def join(self, who):
        """A real DTLS handshake through the Media Distributor, with whichever KD it picks."""
        credentials = dtls.Credentials.self_signed(who)
        tls_id = "{}-TlsId-0123456789abcdef".format(who)
        for kd in self.kds.values():
            if kd.running:
                yield kd.roster.put(CONFERENCE, tls_id, credentials.fingerprint)
        self.md.memberships.put(CONFERENCE, tls_id)
        association = dtls.ClientAssociation(credentials, [by_id(0x0009)],
                                             tls_id=tls_id.encode())
        endpoint = UdpEndpoint(association, self.media_address)
        port = reactor.listenUDP(0, endpoint, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        yield endpoint.handshake.addTimeout(WAIT, reactor)
        endpoint.tls_id = tls_id
        return endpoint

    def associationOf(self, endpoint):
        address = ("127.0.0.1", endpoint.transport.getHost().port)
        return self.md.relay._established[address]

    def keyDistributorOf(self, endpoint) -> str:
        """Which Key Distributor terminates ``endpoint``'s association."""
        aid = self.associationOf(endpoint).id
        [name] = [name for name, kd in self.kds.items()
                  if kd.running and kd.distributor.association(aid) is not None]
        return name

    def counted(self, name, reason) -> int:
        return self.kds[name].distributor.counters.get(reason, 0)

    def tunnelsUpMetric(self) -> float:
        """``perc_md_tunnels_up`` as a Prometheus scrape reads it."""
        for line in exposition(self.md.metrics).decode().splitlines():
            if line.startswith("perc_md_tunnels_up "):
                return float(line.split()[1])
        raise AssertionError("no perc_md_tunnels_up")

    def statusOf(self, name) -> dict:
        [status] = [s for s in self.md.status()["tunnels"]["key_distributors"]
                    if s["endpoint"] == "tcp:127.0.0.1:{}".format(self.ports[name])]
        return status


class Datagrams(protocol.DatagramProtocol):
    """A UDP socket that keeps what it receives."""

    def __init__(self):
        self.received: list[bytes] = []

    def datagramReceived(self, data, address):
        self.received.append(data)


class RetriedHandshakeMixin:
    @defer.inlineCallbacks
    def test_a_handshake_retried_after_its_key_distributor_left_goes_to_a_live_one(self):
        credentials = dtls.Credentials.self_signed("retrier")
        tls_id = "retrier-TlsId-0123456789abcdef"
        for kd in self.kds.values():
            yield kd.roster.put(CONFERENCE, tls_id, credentials.fingerprint)
        self.md.memberships.put(CONFERENCE, tls_id)

        def client_hello():
            association = dtls.ClientAssociation(credentials, [by_id(0x0009)],
                                                 tls_id=tls_id.encode())
            return association.start(reactor.seconds()).datagrams[0]

        socket = Datagrams()
        port = reactor.listenUDP(0, socket, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        address = ("127.0.0.1", port.getHost().port)
        port.write(client_hello(), self.media_address)
        yield eventually(lambda: socket.received)  # a Key Distributor's HelloVerifyRequest
        first = self.md.relay._pending[address]
        [gone] = [n for n, m in self.managers.items() if m.tunnel is first.tunnel]
        [live] = [n for n in self.managers if n != gone]
        yield self.stopKeyDistributor(gone)
        # The endpoint gives up on that handshake and starts another.
        port.write(client_hello(), self.media_address)
        yield eventually(lambda: len(socket.received) == 2)
        retry = self.md.relay._pending[address]
        self.assertIsNone(self.md.relay.endpoint(first.id))
        self.assertIs(retry.tunnel, self.managers[live].tunnel)


class LeastLoadedTests(TwoKeyDistributorsMixin, TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_new_associations_go_to_the_least_loaded_live_key_distributor(self):
        self.assertEqual(self.tunnelsUpMetric(), 2)
        yield self.stopKeyDistributor("b")
        self.assertEqual(self.tunnelsUpMetric(), 1)
        # Only "a" is up: both go there, whatever the load.
        first = yield self.join("alice")
        second = yield self.join("bob")
        self.assertEqual([self.keyDistributorOf(e) for e in (first, second)], ["a", "a"])
        self.assertEqual(self.statusOf("b")["up"], False)
        # "b" back: it has the fewest associations, so the next two go there.
        yield self.restartKeyDistributor("b")
        self.assertEqual(self.tunnelsUpMetric(), 2)
        third = yield self.join("carol")
        fourth = yield self.join("dave")
        self.assertEqual([self.keyDistributorOf(e) for e in (third, fourth)], ["b", "b"])
        # Now equal: one more on each, in either order.
        fifth = yield self.join("erin")
        sixth = yield self.join("frank")
        self.assertEqual(sorted(self.keyDistributorOf(e) for e in (fifth, sixth)), ["a", "b"])
        for name in ("a", "b"):
            status = self.statusOf(name)
            self.assertEqual(status["up"], True)
            self.assertEqual(status["identity"], "localhost")
            self.assertEqual(status["associations"], 3)
            self.assertEqual(len(self.kds[name].distributor), 3)


class SameIdentityTests(RetriedHandshakeMixin, TwoKeyDistributorsMixin, TestCase):
    """Both Key Distributors present the same certificate: one identity, two tunnels."""

    timeout = 120

    @defer.inlineCallbacks
    def joinOnePerKeyDistributor(self):
        first = yield self.join("alice")
        second = yield self.join("bob")
        on = {self.keyDistributorOf(e): e for e in (first, second)}
        self.assertEqual(set(on), {"a", "b"})
        return on

    @defer.inlineCallbacks
    def test_associations_of_a_dead_key_distributor_go_through_the_other(self):
        on = yield self.joinOnePerKeyDistributor()
        orphan = self.associationOf(on["a"])
        b_tunnel = self.managers["b"].tunnel
        [b_kd_tunnel] = self.kds["b"].distributor.tunnels
        yield self.stopKeyDistributor("a")
        # At once through "b"'s tunnel, the other Key Distributor of its identity.
        self.assertIs(orphan.tunnel, b_tunnel)
        self.assertEqual(self.statusOf("b")["associations"], 2)
        self.assertEqual(self.statusOf("a")["associations"], 0)
        # Its DTLS reaches "b" (which has no state for it: a stateless
        # Key Distributor drops it; a cluster member would adopt it).
        on["a"].transport.write(DTLS_RECORD, self.media_address)
        yield eventually(lambda: self.counted("b", "dtls-not-client-hello") == 1)
        # So does its EndpointDisconnect.
        self.assertEqual(self.md.relay.disconnect(on["a"].tls_id, "test"), 1)
        yield eventually(lambda: self.counted("b", "disconnect-unknown-association") == 1)
        self.assertEqual(b_kd_tunnel.associations, {self.associationOf(on["b"]).id})
        # "b"'s own association was not disturbed.
        self.assertIs(self.associationOf(on["b"]).tunnel, b_tunnel)

    @defer.inlineCallbacks
    def test_a_key_distributor_coming_back_is_used_again_and_takes_nothing(self):
        on = yield self.joinOnePerKeyDistributor()
        orphan = self.associationOf(on["a"])
        yield self.stopKeyDistributor("a")
        b_tunnel = self.managers["b"].tunnel
        self.assertIs(orphan.tunnel, b_tunnel)
        yield self.restartKeyDistributor("a")
        # The moved association stays where it is carried now.
        self.assertIs(orphan.tunnel, b_tunnel)
        self.assertEqual(self.statusOf("a")["associations"], 0)
        # New ones go to the one back, the least loaded.
        carol = yield self.join("carol")
        self.assertEqual(self.keyDistributorOf(carol), "a")


class OtherIdentityTests(RetriedHandshakeMixin, TwoKeyDistributorsMixin, TestCase):
    """Two Key Distributors with different certificates: associations never cross."""

    timeout = 120
    other_identity = True

    @defer.inlineCallbacks
    def test_associations_never_move_to_another_identity(self):
        first = yield self.join("alice")
        second = yield self.join("bob")
        on = {self.keyDistributorOf(e): e for e in (first, second)}
        self.assertEqual(set(on), {"a", "b"})
        self.assertEqual(self.statusOf("b")["identity"], "kd-other.test")
        self.assertEqual(self.statusOf("a")["identity"], "localhost")
        orphan = self.associationOf(on["a"])
        b_tunnel = self.managers["b"].tunnel
        sent_to_b = dict(b_tunnel.messagesSent)
        yield self.stopKeyDistributor("a")
        self.assertIsNone(orphan.tunnel)
        # Its DTLS and its EndpointDisconnect wait for "a", not for "b".
        on["a"].transport.write(DTLS_RECORD, self.media_address)
        yield eventually(lambda: self.md.relay.status()["waiting_messages"] == 1)
        self.assertEqual(self.md.relay.disconnect(on["a"].tls_id, "test"), 1)
        self.assertEqual(b_tunnel.messagesSent, sent_to_b)
        self.assertEqual(self.md.relay.status()["waiting_messages"], 2)
        # New associations meanwhile go to "b".
        carol = yield self.join("carol")
        self.assertEqual(self.keyDistributorOf(carol), "b")
        self.assertEqual(b_tunnel.messagesSent["EndpointDisconnect"], 0)
        self.assertEqual(self.counted("b", "dtls-not-client-hello"), 0)
        self.assertEqual(self.counted("b", "disconnect-unknown-association"), 0)
        # "a" back: what waited for it goes there (its EndpointDisconnect
        # however long it took; the DTLS only within the waiting limit).
        yield self.restartKeyDistributor("a")
        a_tunnel = self.managers["a"].tunnel
        yield eventually(lambda: a_tunnel.messagesSent["EndpointDisconnect"] == 1)
        self.assertEqual(b_tunnel.messagesSent["EndpointDisconnect"], 0)
        self.assertEqual(self.md.relay.status()["waiting_messages"], 0)
