"""
Media Distributor and Key Distributor together on real loopback sockets:
endpoints handshake through ``perc-md`` with ``perc-kd`` and their
hop-by-hop SRTP is forwarded to each other.
"""

from __future__ import annotations

import os
import socket
import struct

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from perc import dtls, pki
from perc.kd import tap as kd_tap
from perc.kd.service import KeyDistributorService
from perc.md import tap as md_tap
from perc.md.service import MediaDistributorService
from perc.profiles import by_id
from perc.tls import TlsCredentials

from tests.endpointhelpers import UdpEndpoint, rtp_packet
from tests.waits import WAIT, eventually

CONFERENCE = "room"


class DistributorsMixin:
    """A Key Distributor and a Media Distributor service on loopback."""

    endpoint_timeout = "30"
    #: More perc-kd options (e.g. a short --tunnel-grace).
    kd_options = ()
    #: More perc-md options, for subclasses.
    md_options: tuple = ()

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        self.pki = pki.create_dev_pki(os.path.join(self.dir, "pki"))
        self.kd_fingerprint = pki.fingerprint(
            TlsCredentials.from_pki_dir(self.pki.directory, "kd").certificate)
        self.kd = None
        yield self.startKeyDistributor("tcp:0:interface=127.0.0.1")
        self.kd_port = self.kd._ports[0].getHost().port
        config = md_tap.Options()
        config.parseOptions([
            "--pki", self.pki.directory, "--kd", "tcp:127.0.0.1:{}".format(self.kd_port),
            "--media-port", "0", "--media-interface", "127.0.0.1", "--api", "none",
            "--endpoint-timeout", self.endpoint_timeout] + list(self.md_options))
        self.md = MediaDistributorService.fromOptions(config, reactor)
        self.md.privilegedStartService()
        self.md.startService()
        self.addCleanup(self.md.stopService)
        self.media_address = ("127.0.0.1", self.md.ports["media"].getHost().port)
        yield eventually(lambda: self.md.pool.pick() is not None and self.kd.distributor.tunnels)

    @defer.inlineCallbacks
    def startKeyDistributor(self, listen):
        config = kd_tap.Options()
        config.parseOptions([
            "--pki", self.pki.directory, "--tunnel-listen", listen, "--api", "none",
            "--db", os.path.join(self.dir, "kd.sqlite3"), *self.kd_options])
        self.kd = KeyDistributorService.fromOptions(config, reactor)
        self.kd.privilegedStartService()
        self.kd.startService()
        service = self.kd
        self.addCleanup(lambda: service.stopService() if service.running else None)
        yield self.kd.ready

    @defer.inlineCallbacks
    def join(self, name, conference=CONFERENCE):
        credentials = dtls.Credentials.self_signed(name)
        tls_id = "{}-TlsId-0123456789abcdef".format(name)
        registration, _ = yield self.kd.roster.put(conference, tls_id, credentials.fingerprint)
        self.md.memberships.put(conference, tls_id)
        association = dtls.ClientAssociation(
            credentials, [by_id(0x0009)], tls_id=tls_id.encode(),
            expected_peer_tls_id=registration.kd_tls_id.encode(),
            expected_peer_fingerprint=self.kd_fingerprint)
        endpoint = UdpEndpoint(association, self.media_address)
        port = reactor.listenUDP(0, endpoint, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        # Its HandshakeComplete, for the tests that read it.
        endpoint.completed = yield endpoint.handshake.addTimeout(WAIT, reactor)
        return endpoint

    def receive(self, endpoint):
        return endpoint.media.get().addTimeout(WAIT, reactor)


def reset(tunnel):
    """Reset the TCP connection under a tunnel (RST, as a middlebox or a peer's kernel would)."""
    tcp = tunnel.transport.transport
    tcp.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    tcp.abortConnection()


class TunnelResetMixin:
    """The issue 13 story: a tunnel reset under keyed endpoints, then a registration deleted."""

    def address(self, endpoint):
        return ("127.0.0.1", endpoint.transport.getHost().port)

    def associationOf(self, endpoint):
        return self.md.relay._established[self.address(endpoint)].id

    @defer.inlineCallbacks
    def resetAndReconnect(self):
        [old] = self.kd.distributor.tunnels
        reset(old)
        # Both sides notice, and a new tunnel comes up by itself.
        yield eventually(lambda: self.kd.distributor.tunnels and old not in
                         self.kd.distributor.tunnels and self.md.pool.pick() is not None)
        [new] = self.kd.distributor.tunnels
        return new

    @defer.inlineCallbacks
    def assertForwarded(self, sender, receiver, sequence):
        packet = rtp_packet(0x0A, sequence, b"keyed media\x00")
        sender.send_rtp(packet)
        protected = yield self.receive(receiver)
        self.assertEqual(receiver.inbound.unprotect(protected), packet)

    @defer.inlineCallbacks
    def test_registration_deleted_after_a_reconnect_cuts_the_endpoint_off(self):
        a = yield self.join("alice")
        b = yield self.join("bob")
        aid = self.associationOf(a)
        new = yield self.resetAndReconnect()
        yield self.assertForwarded(a, b, 1)
        yield self.assertForwarded(b, a, 2)
        # The Key Distributor's association now goes through the new tunnel.
        self.assertIs(self.kd.distributor.association(aid).tunnel, new)
        yield self.kd.roster.delete(CONFERENCE, "alice-TlsId-0123456789abcdef")
        # EndpointDisconnect reaches the Media Distributor, which stops
        # forwarding to and from alice.
        yield eventually(lambda: self.md.relay.endpoint(aid) is None, timeout=2)
        relay = self.md.relay
        forwarded = relay.counters.get("forwarded-rtp", 0)
        dropped = relay.counters.get("dropped-srtp-unknown-source", 0)
        a.send_rtp(rtp_packet(0x0A, 3, b"after the deletion\x00"))
        yield eventually(lambda: relay.counters.get("dropped-srtp-unknown-source", 0)
                         == dropped + 1)
        bob = relay._established[self.address(b)]
        heard = bob.last_seen
        b.send_rtp(rtp_packet(0x0B, 4, b"to the others\x00"))
        yield eventually(lambda: bob.last_seen > heard)  # bob's packet was handled
        self.assertEqual(relay.counters.get("forwarded-rtp", 0), forwarded)
        self.assertEqual(relay.status()["established"], 1)
        self.assertEqual(a.media.pending, [])


class ReconnectTests(TunnelResetMixin, DistributorsMixin, TestCase):
    """The Media Distributor dials (``--kd``); a long grace, so only the fix can pass."""

    timeout = 60
    kd_options = ("--tunnel-grace", "60")


class SilentAfterReconnectTests(DistributorsMixin, TestCase):
    timeout = 60
    endpoint_timeout = "2"
    kd_options = ("--tunnel-grace", "60")

    @defer.inlineCallbacks
    def test_silence_sweep_disconnect_reaches_the_key_distributor(self):
        a = yield self.join("alice")
        aid = self.md.relay._established[("127.0.0.1", a.transport.getHost().port)].id
        [old] = self.kd.distributor.tunnels
        reset(old)
        yield eventually(lambda: self.md.relay.endpoint(aid) is None)
        # The sweep's EndpointDisconnect went through the new tunnel (or
        # waited for it): the Key Distributor forgets alice long before its
        # 60-second grace would have.
        yield eventually(lambda: self.kd.distributor.association(aid) is None)
        self.assertNotIn(old, self.kd.distributor.tunnels)


class ConferenceTests(DistributorsMixin, TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_media_forwarded_hop_by_hop(self):
        a = yield self.join("alice")
        b = yield self.join("bob")
        c = yield self.join("carol")
        # Payload stands for inner ciphertext + OHB, which the MD must not touch.
        for sender, ssrc in ((a, 0x0A), (b, 0x0B), (c, 0x0C)):
            packet = rtp_packet(ssrc, 1, b"inner-ciphertext-and-tag" + b"\x00")
            sender.send_rtp(packet)
            for receiver in {a, b, c} - {sender}:
                protected = yield self.receive(receiver)
                self.assertEqual(receiver.inbound.unprotect(protected), packet)
        # RTCP (sender report header) travels the same way.
        rtcp = struct.pack("!BBHI", 0x80, 200, 6, 0x0A) + b"\x00" * 20
        a.send_rtcp(rtcp)
        for receiver in (b, c):
            protected = yield self.receive(receiver)
            self.assertEqual(receiver.inbound.unprotect_rtcp(protected), rtcp)
        self.assertEqual(a.media.pending, [])
        counters = self.md.relay.counters
        self.assertEqual(counters["forwarded-rtp"], 6)
        self.assertEqual(counters["forwarded-rtcp"], 2)

    @defer.inlineCallbacks
    def test_bad_tag_and_replay_not_forwarded(self):
        a = yield self.join("alice")
        b = yield self.join("bob")
        protected = a.send_rtp(rtp_packet(0x0A, 1, b"payload\x00"))
        yield self.receive(b)
        a.transport.write(protected, self.media_address)  # replay
        tampered = bytearray(a.outbound.protect(rtp_packet(0x0A, 2, b"payload\x00")))
        tampered[-1] ^= 1
        a.transport.write(bytes(tampered), self.media_address)
        yield eventually(lambda: self.md.relay.counters.get("dropped-srtp-unprotect-failed") == 2)
        packet = rtp_packet(0x0A, 3, b"after\x00")
        a.send_rtp(packet)
        protected = yield self.receive(b)
        self.assertEqual(b.inbound.unprotect(protected), packet)

    @defer.inlineCallbacks
    def test_conferences_are_separate(self):
        a = yield self.join("alice")
        b = yield self.join("bob")
        x = yield self.join("xavier", conference="other-room")
        a.send_rtp(rtp_packet(0x0A, 1, b"for bob\x00"))
        yield self.receive(b)
        # Counted per copy sent: one, to bob, none to the other conference.
        self.assertEqual(self.md.relay.counters.get("forwarded-rtp"), 1)
        self.assertEqual(x.media.pending, [])

    @defer.inlineCallbacks
    def test_key_distributor_restart(self):
        a = yield self.join("alice")
        b = yield self.join("bob")
        old_tunnels = set(self.kd.distributor.tunnels)
        yield self.kd.stopService()
        yield eventually(lambda: self.md.pool.pick() is None)
        # Keyed endpoints keep talking while the Key Distributor is away.
        packet = rtp_packet(0x0A, 1, b"while the KD is down\x00")
        a.send_rtp(packet)
        protected = yield self.receive(b)
        self.assertEqual(b.inbound.unprotect(protected), packet)
        # The Media Distributor keeps trying (with backoff: test_md_tunnel
        # drives that with a clock).
        [link] = self.md.pool.managers
        before = link.status()["connection_attempts"]
        yield eventually(lambda: link.status()["connection_attempts"] > before,
                         what="a reconnection attempt")
        yield self.startKeyDistributor("tcp:{}:interface=127.0.0.1".format(self.kd_port))
        # The tunnel comes back by itself and says SupportedProfiles again:
        # the new Key Distributor has an up tunnel, which only that makes.
        yield eventually(lambda: self.kd.distributor.tunnels and self.md.pool.pick() is not None)
        self.assertFalse(old_tunnels & self.kd.distributor.tunnels)
        [tunnel] = self.kd.distributor.tunnels
        self.assertEqual(tunnel.media_distributor_profiles, (0x0009, 0x000A))
        status = link.status()
        # A redial may land while the new KD is still opening its roster
        # (refused at its gate): more connections, still two tunnels' SupportedProfiles.
        self.assertGreaterEqual(status["connections"], 2)
        self.assertEqual(status["messages_sent"]["SupportedProfiles"], 2)
        # A new endpoint can join through the new tunnel; the old ones still talk.
        c = yield self.join("carol")
        packet = rtp_packet(0x0A, 2, b"after the restart\x00")
        a.send_rtp(packet)
        for receiver in (b, c):
            protected = yield self.receive(receiver)
            self.assertEqual(receiver.inbound.unprotect(protected), packet)


class FragmentedClientHelloTests(DistributorsMixin, TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_fragmented_client_hello_joins(self):
        """A ClientHello OpenSSL splits over two datagrams (MTU 256) through both distributors."""
        credentials = dtls.Credentials.self_signed("big")
        tls_id = "B" * 255
        registration, _ = yield self.kd.roster.put(CONFERENCE, tls_id, credentials.fingerprint)
        self.md.memberships.put(CONFERENCE, tls_id)
        association = dtls.ClientAssociation(
            credentials, [by_id(0x0009)], tls_id=tls_id.encode(), mtu=256,
            expected_peer_tls_id=registration.kd_tls_id.encode(),
            expected_peer_fingerprint=self.kd_fingerprint)
        endpoint = UdpEndpoint(association, self.media_address)
        port = reactor.listenUDP(0, endpoint, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        yield endpoint.handshake.addTimeout(WAIT, reactor)
        self.assertGreaterEqual(self.md.relay.counters.get("hello-reassembled", 0), 2)


class TimeoutTests(DistributorsMixin, TestCase):
    timeout = 60
    endpoint_timeout = "1"

    @defer.inlineCallbacks
    def test_silent_endpoint_disconnected_at_both_distributors(self):
        a = yield self.join("alice")
        [association_id] = [e.id for e in [self.md.relay._established[k]
                                             for k in self.md.relay._established]]
        self.assertIsNotNone(self.kd.distributor.association(association_id))
        yield eventually(lambda: self.md.relay.endpoint(association_id) is None, timeout=10)
        # EndpointDisconnect reached the Key Distributor, which forgot it too.
        yield eventually(lambda: self.kd.distributor.association(association_id) is None)
        del a


class KeyDistributorDialsTests(TunnelResetMixin, DistributorsMixin, TestCase):
    """Either side may open the TLS connection; the message roles stay the same."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        self.pki = pki.create_dev_pki(os.path.join(self.dir, "pki"))
        self.kd_fingerprint = pki.fingerprint(
            TlsCredentials.from_pki_dir(self.pki.directory, "kd").certificate)
        config = md_tap.Options()
        config.parseOptions([
            "--pki", self.pki.directory, "--tunnel-listen", "tcp:0:interface=127.0.0.1",
            "--media-port", "0", "--media-interface", "127.0.0.1", "--api", "none"])
        self.md = MediaDistributorService.fromOptions(config, reactor)
        self.md.privilegedStartService()
        self.md.startService()
        self.addCleanup(self.md.stopService)
        self.media_address = ("127.0.0.1", self.md.ports["media"].getHost().port)
        tunnel_port = self.md.ports["tunnel-listen"].getHost().port
        config = kd_tap.Options()
        config.parseOptions([
            "--pki", self.pki.directory, "--tunnel-listen", "none", "--api", "none",
            "--connect", "tcp:127.0.0.1:{}".format(tunnel_port), "--tunnel-grace", "60",
            "--db", os.path.join(self.dir, "kd.sqlite3")])
        self.kd = KeyDistributorService.fromOptions(config, reactor)
        self.kd.privilegedStartService()
        self.kd.startService()
        self.addCleanup(lambda: self.kd.stopService() if self.kd.running else None)
        yield self.kd.ready
        yield eventually(lambda: self.md.pool.pick() is not None and self.kd.distributor.tunnels)

    @defer.inlineCallbacks
    def test_media_through_a_tunnel_the_key_distributor_opened(self):
        a = yield self.join("alice")
        b = yield self.join("bob")
        packet = rtp_packet(0x0A, 1, b"reverse\x00")
        a.send_rtp(packet)
        protected = yield self.receive(b)
        self.assertEqual(b.inbound.unprotect(protected), packet)
