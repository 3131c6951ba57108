"""
Endpoint descriptions as Twisted parses them (perc.netutil.endpoint_host),
and a whole conference over IPv6 loopback: the Key Distributor's tunnel
listener, the Media Distributor dialling it with an escaped
``tcp:host=\\:\\:1:port=...`` description (Twisted's client endpoints have
no ``tcp6``), its media port and the endpoints, all on ``::1``.
"""

from __future__ import annotations

import os
import socket

from twisted.internet import defer, reactor
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from perc import dtls, pki
from perc.kd import tap as kd_tap
from perc.kd.service import KeyDistributorService
from perc.md import tap as md_tap
from perc.md.service import MediaDistributorService
from perc.netutil import endpoint_host
from perc.profiles import by_id
from perc.tls import TlsCredentials
from tests.endpointhelpers import UdpEndpoint, rtp_packet
from tests.test_md_e2e import WAIT, eventually

CONFERENCE = "room6"


class EndpointHostTests(SynchronousTestCase):
    def test_hosts(self):
        cases = {
            "tcp:kd.example:4740": "kd.example",
            "tcp:host=kd.example:port=4740": "kd.example",
            "tcp:port=4740:host=kd.example": "kd.example",
            r"tcp:host=\:\:1:port=4740": "::1",
            r"tcp:\:\:1:4740": "::1",
            r"tcp:host=fe80\:\:1%eth0:port=4740": "fe80::1%eth0",
            "tcp:127.0.0.1:4740:timeout=5": "127.0.0.1",
        }
        for description, host in cases.items():
            self.assertEqual(endpoint_host(description), host, description)

    def test_no_host(self):
        for description in ("unix:/run/perc.sock", r"tcp6:host=\:\:1:port=4740", "tcp",
                            "tcp:port=4740", "", "tls:\\"):
            self.assertIsNone(endpoint_host(description), description)


def ipv6_loopback_usable() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


class Ipv6ConferenceTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        if not ipv6_loopback_usable():
            raise SkipTest("IPv6 loopback (::1) is not available on this host")
        self.dir = os.path.abspath(self.mktemp())
        # The Media Distributor verifies the Key Distributor as "::1", the
        # host of its --kd description.
        self.pki = pki.create_dev_pki(os.path.join(self.dir, "pki"), kd_names=["::1"])
        self.kd_fingerprint = pki.fingerprint(
            TlsCredentials.from_pki_dir(self.pki.directory, "kd").certificate)
        config = kd_tap.Options()
        config.parseOptions([
            "--pki", self.pki.directory, "--tunnel-listen", r"tcp6:0:interface=\:\:1",
            "--api", "none", "--db", os.path.join(self.dir, "kd.sqlite3")])
        self.kd = KeyDistributorService.fromOptions(config, reactor)
        self.kd.privilegedStartService()
        self.kd.startService()
        self.addCleanup(self.kd.stopService)
        yield self.kd.ready
        kd_port = self.kd._ports[0].getHost().port
        config = md_tap.Options()
        config.parseOptions([
            "--pki", self.pki.directory, "--kd", rf"tcp:host=\:\:1:port={kd_port}",
            "--media-port", "0", "--media-interface", "::1", "--api", "none"])
        self.md = MediaDistributorService.fromOptions(config, reactor)
        self.md.privilegedStartService()
        self.md.startService()
        self.addCleanup(self.md.stopService)
        self.media_address = ("::1", self.md.ports["media"].getHost().port)
        yield eventually(lambda: self.md.pool.pick() is not None and self.kd.distributor.tunnels)

    @defer.inlineCallbacks
    def join(self, name):
        credentials = dtls.Credentials.self_signed(name)
        tls_id = f"{name}-TlsId-0123456789abcdef"
        registration, _ = yield self.kd.roster.put(CONFERENCE, tls_id, credentials.fingerprint)
        self.md.memberships.put(CONFERENCE, tls_id)
        association = dtls.ClientAssociation(
            credentials, [by_id(0x0009)], tls_id=tls_id.encode(),
            expected_peer_tls_id=registration.kd_tls_id.encode(),
            expected_peer_fingerprint=self.kd_fingerprint)
        endpoint = UdpEndpoint(association, self.media_address)
        port = reactor.listenUDP(0, endpoint, interface="::1")
        self.addCleanup(port.stopListening)
        yield endpoint.handshake.addTimeout(WAIT, reactor)
        return endpoint

    @defer.inlineCallbacks
    def test_conference_over_ipv6_loopback(self):
        [tunnel] = self.kd.distributor.tunnels
        self.assertEqual(tunnel.transport.getPeer().host, "::1")
        alice = yield self.join("alice")
        bob = yield self.join("bob")
        for sender, receiver, sequence in ((alice, bob, 1), (bob, alice, 2)):
            packet = rtp_packet(0x0A + sequence, sequence, b"over IPv6\x00")
            sender.send_rtp(packet)
            protected = yield receiver.media.get().addTimeout(WAIT, reactor)
            self.assertEqual(receiver.inbound.unprotect(protected), packet)
