"""
The Key Distributor service end to end on real loopback sockets: real TLS
tunnels with development-PKI certificates, the real registration API, real
DTLS from a client-role engine relayed through a test Media Distributor, and
``openssl s_client`` relayed over UDP.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import uuid

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import connectProtocol
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent

from perc import dtls, pki, wire
from perc.framing import TunnelFramingProtocol
from perc.kd import tap
from perc.kd.service import KeyDistributorService
from perc.netutil import tls_client_endpoint
from perc.profiles import by_id
from perc.scripts.register import register_with_key_distributor
from perc.tls import TlsCredentials

from tests import tlshelpers
from tests.test_dtls_interop import EXPORT, KEYING_MATERIAL, OPENSSL, OpenSSLProcess, material
from tests.waits import WAIT, eventually

CONFERENCE = "e2e"
TLS_ID = "EndToEndTlsId-0123456789"


class TestMediaDistributor(TunnelFramingProtocol):
    """A minimal Media Distributor side: says SupportedProfiles, queues what arrives."""

    def __init__(self, profiles=(0x0009, 0x000A)):
        self.profiles = profiles
        self.messages = defer.DeferredQueue()
        self.lost = defer.Deferred()

    def connectionMade(self):
        self.sendMessage(wire.SupportedProfiles(0, tuple(self.profiles)))

    def messageReceived(self, message):
        self.messages.put(message)

    def connectionLost(self, reason):
        self.lostReason = reason
        self.lost.callback(None)

    def next(self):
        return self.messages.get().addTimeout(WAIT, reactor)


class KeyDistributorServiceMixin:
    """A Key Distributor service on loopback with a development PKI."""

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        self.pki = pki.create_dev_pki(os.path.join(self.dir, "pki"), md_names=["md.test"])
        other = pki.create_dev_pki(os.path.join(self.dir, "other-pki"))
        self.md_credentials = TlsCredentials.from_pki_dir(self.pki.directory, "md")
        self.foreign_credentials = TlsCredentials.from_pki_dir(other.directory, "md")
        self.service = None
        yield self.start()

    def options(self, *extra):
        config = tap.Options()
        config.parseOptions([
            "--pki", self.pki.directory,
            "--tunnel-listen", "tcp:0:interface=127.0.0.1",
            "--api", "tcp:0:interface=127.0.0.1",
            "--api-token-file", os.path.join(self.dir, "token"),
            "--db", os.path.join(self.dir, "kd.sqlite3"),
        ] + list(extra))
        return config

    @defer.inlineCallbacks
    def start(self, *extra):
        if self.service is not None:
            yield self.service.stopService()
        self.service = KeyDistributorService.fromOptions(self.options(*extra), reactor)
        self.service.privilegedStartService()
        self.service.startService()
        self.addCleanup(self.stopService, self.service)
        yield self.service.ready
        tunnel_port, api_port = self.service._ports
        self.tunnel_port = tunnel_port.getHost().port
        self.api_url = "http://127.0.0.1:{}".format(api_port.getHost().port)
        with open(os.path.join(self.dir, "token")) as f:
            self.token = f.read().strip()

    def stopService(self, service):
        if service.running:
            return service.stopService()

    @defer.inlineCallbacks
    def register(self, fingerprint, tls_id=TLS_ID):
        body, _ = yield register_with_key_distributor(
            Agent(reactor), self.api_url, self.token, CONFERENCE, tls_id, fingerprint,
            reactor=reactor)
        return body["kd_tls_id"]

    @defer.inlineCallbacks
    def tunnel(self, credentials=None, profiles=(0x0009, 0x000A)):
        endpoint = tls_client_endpoint(
            reactor, "tcp:127.0.0.1:{}".format(self.tunnel_port),
            credentials or self.md_credentials, "--kd")
        md = TestMediaDistributor(profiles)
        yield connectProtocol(endpoint, md)
        self.addCleanup(self.closeTunnel, md)
        return md

    def closeTunnel(self, md):
        if not md.lost.called:
            md.transport.loseConnection()
            return md.lost

    @defer.inlineCallbacks
    def relay(self, md, client, aid):
        """Carry a client engine's handshake through the tunnel; returns (events, messages)."""
        events, messages = [], []
        output = client.start(reactor.seconds())
        while True:
            for datagram in output.datagrams:
                md.sendMessage(wire.TunneledDtls(aid, datagram))
            events.extend(output.events)
            if any(isinstance(e, (dtls.HandshakeComplete, dtls.Closed)) for e in events) and (
                    any(isinstance(m, (wire.MediaKeys, wire.EndpointDisconnect))
                        for m in messages)):
                return events, messages
            message = yield md.next()
            messages.append(message)
            if isinstance(message, wire.TunneledDtls):
                output = client.receive(message.dtls_message, reactor.seconds())
            else:
                output = dtls.Output()


class KeyDistributorServiceTests(KeyDistributorServiceMixin, TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_endpoint_gets_keys_through_real_tunnel(self):
        endpoint = dtls.Credentials.self_signed("endpoint")
        kd_tls_id = yield self.register(endpoint.fingerprint)
        md = yield self.tunnel()
        client = dtls.ClientAssociation(
            endpoint, [by_id(0x0009)], tls_id=TLS_ID.encode(),
            expected_peer_tls_id=kd_tls_id.encode(),
            expected_peer_fingerprint=pki.fingerprint(
                TlsCredentials.from_pki_dir(self.pki.directory, "kd").certificate))
        aid = uuid.uuid4()
        events, messages = yield self.relay(md, client, aid)
        [done] = [e for e in events if isinstance(e, dtls.HandshakeComplete)]
        [keys] = [m for m in messages if isinstance(m, wire.MediaKeys)]
        hbh = done.profile.hbh_keys(done.keys)
        self.assertEqual(keys, wire.MediaKeys(aid, 0x0009, b"", hbh.client_key, hbh.server_key,
                                              hbh.client_salt, hbh.server_salt))
        # MediaKeys precedes the TunneledDtls that finished the handshake.
        self.assertIsInstance(messages[-2], wire.MediaKeys)
        self.assertIsInstance(messages[-1], wire.TunneledDtls)
        association = self.service.distributor.association(aid)
        self.assertEqual(association.registration.conference, CONFERENCE)

    @defer.inlineCallbacks
    def test_unregistered_endpoint_rejected(self):
        md = yield self.tunnel()
        client = dtls.ClientAssociation(dtls.Credentials.self_signed("x"), [by_id(0x0009)],
                                        tls_id=b"NobodyRegisteredThis-42")
        aid = uuid.uuid4()
        events, messages = yield self.relay(md, client, aid)
        self.assertEqual(messages[-1], wire.EndpointDisconnect(aid))
        self.assertFalse([m for m in messages if isinstance(m, wire.MediaKeys)])
        self.assertTrue([e for e in events if isinstance(e, dtls.Closed)])

    @defer.inlineCallbacks
    def test_certificate_from_another_ca_refused(self):
        endpoint = tls_client_endpoint(
            reactor, "tcp:127.0.0.1:{}".format(self.tunnel_port), self.foreign_credentials, "--kd")
        md = TestMediaDistributor()
        yield connectProtocol(endpoint, md)
        yield md.lost.addTimeout(WAIT, reactor)
        self.assertEqual(self.service.distributor.tunnels, set())

    @defer.inlineCallbacks
    def test_no_client_certificate_refused(self):
        from twisted.internet import ssl
        from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
        kd_ca = ssl.Certificate.loadPEM(open(self.pki.ca_certificate, "rb").read())
        options = ssl.optionsForClientTLS("127.0.0.1", trustRoot=kd_ca)
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1",
                                                             self.tunnel_port))
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        md = TestMediaDistributor()
        yield connectProtocol(endpoint, md)
        yield md.lost.addTimeout(WAIT, reactor)
        self.assertEqual(self.service.distributor.tunnels, set())
        self.assertEqual(self.service.tunnelFactory.connections, set())
        yield eventually(lambda: [e for e in events if "Refusing tunnel" in e.get("log_format", "")])
        [refusal] = [e for e in events if "Refusing tunnel" in e.get("log_format", "")]
        self.assertIn("peer did not return a certificate", refusal["reason"])

    @defer.inlineCallbacks
    def test_media_distributor_not_in_allow_list_refused(self):
        yield self.start("--allow-md", "someone-else.test")
        md = yield self.tunnel()
        yield md.lost.addTimeout(WAIT, reactor)
        self.assertEqual(self.service.distributor.tunnels, set())

    @defer.inlineCallbacks
    def test_media_distributor_in_allow_list_accepted(self):
        yield self.start("--allow-md", "md.test")
        md = yield self.tunnel()
        md.sendMessage(wire.EndpointDisconnect(uuid.uuid4()))
        for _ in range(100):
            if self.service.distributor.tunnels:
                break
            yield deferLater(0.05)
        [tunnel] = self.service.distributor.tunnels
        self.assertEqual(tunnel.identity, "md.test")

    @defer.inlineCallbacks
    def test_registrations_survive_restart(self):
        endpoint = dtls.Credentials.self_signed("endpoint")
        kd_tls_id = yield self.register(endpoint.fingerprint)
        yield self.start()
        registration = self.service.roster.lookup(TLS_ID)
        self.assertEqual(registration.kd_tls_id, kd_tls_id)
        self.assertEqual(registration.fingerprint, endpoint.fingerprint)


class ConferenceKeysAcrossRestartTests(KeyDistributorServiceMixin, TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_conference_key_survives_a_restart_sealed(self):
        """A restarted Key Distributor hands out the same EKTKey; the file holds it sealed."""
        key, _ = yield self.service.distributor.rekey(CONFERENCE)
        yield self.start()
        keys = self.service.distributor.conference_keys
        self.assertEqual(keys.key_for(CONFERENCE, reactor.seconds()).ekt_key_value,
                         key.ekt_key_value)
        self.assertEqual(os.stat(os.path.join(self.dir, "perc-kd.sealing-key")).st_mode & 0o777,
                         0o600)
        with open(os.path.join(self.dir, "kd.sqlite3"), "rb") as handle:
            stored = handle.read()
        self.assertNotIn(key.ekt_key_value, stored)
        self.assertNotIn(key.srtp_master_salt, stored)


class PostgresServiceTests(KeyDistributorServiceMixin, TestCase):
    """``--db postgresql://``: registrations and conference keys across a restart (PERC_TEST_POSTGRES)."""

    timeout = 90

    def setUp(self):
        from tests.storehelpers import postgres_database
        self.dsn = postgres_database(self)
        return super().setUp()

    def options(self, *extra):
        return super().options("--db", self.dsn, "--sealing-key",
                               os.path.join(self.dir, "cluster.sealing-key"), *extra)

    @defer.inlineCallbacks
    def test_registrations_and_conference_keys_survive_a_restart(self):
        endpoint = dtls.Credentials.self_signed("endpoint")
        kd_tls_id = yield self.register(endpoint.fingerprint)
        key, _ = yield self.service.distributor.rekey(CONFERENCE)
        yield self.start()
        self.assertEqual(self.service.roster.lookup(TLS_ID).kd_tls_id, kd_tls_id)
        self.assertEqual(self.service.distributor.conference_keys.key_for(
            CONFERENCE, reactor.seconds()).ekt_key_value, key.ekt_key_value)
        ready, reason = yield self.service.readiness()
        self.assertTrue(ready, reason)


class TlsRefusalTests(KeyDistributorServiceMixin, TestCase):
    """
    Every kind of Media Distributor the tunnel listener must refuse: refused
    in the TLS handshake (or right after it, for the allow-list), one log
    event with the reason, and nothing kept.
    """

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        yield self.start("--allow-md", "md.test")
        self.other = pki.dev_pki_paths(os.path.join(self.dir, "other-pki"))

    @defer.inlineCallbacks
    def assertRefused(self, credentials, reason):
        factory = self.service.tunnelFactory
        distributor = self.service.distributor
        built = []
        build = factory.buildProtocol

        def recording(address):
            tunnel = build(address)
            built.append(tunnel)
            return tunnel
        factory.buildProtocol = recording
        self.addCleanup(setattr, factory, "buildProtocol", build)
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        peer = yield tlshelpers.connect_with(self.tunnel_port, credentials, self.pki)
        yield peer.lost.addTimeout(WAIT, reactor)
        yield eventually(lambda: not factory.connections and tlshelpers.reasoned(events))
        yield deferLater(0.2)  # time for anything else to be logged
        [event] = tlshelpers.reasoned(events)
        self.assertTrue(event["log_format"].startswith("Refusing tunnel from"), event)
        self.assertIn(reason, event["reason"])
        self.assertNotIn("\n", event["reason"])
        # No state: no connection, tunnel, association, timer or producer.
        [tunnel] = built
        self.assertEqual(factory.connections, set())
        self.assertEqual(distributor.tunnels, set())
        self.assertEqual(len(distributor), 0)
        self.assertFalse(tunnel.up)
        self.assertIsNone(tunnel._firstMessageTimer)
        self.assertFalse(tunnel._producerRegistered)
        self.assertEqual(tunnel.associations, set())

    def test_no_certificate(self):
        return self.assertRefused(None, "peer did not return a certificate")

    def test_certificate_from_another_ca(self):
        return self.assertRefused(tlshelpers.issued(self.other, ["md.test"], trust=self.pki),
                                  "certificate verify failed (unable to get local issuer "
                                  "certificate)")

    def test_expired_certificate(self):
        return self.assertRefused(tlshelpers.expired(self.pki, ["md.test"]),
                                  "certificate verify failed (certificate has expired)")

    def test_certificate_not_yet_valid(self):
        return self.assertRefused(tlshelpers.not_yet_valid(self.pki, ["md.test"]),
                                  "certificate verify failed (certificate is not yet valid")

    def test_identity_not_in_allow_list(self):
        return self.assertRefused(
            tlshelpers.issued(self.pki, ["evil.test", "127.0.0.1"]),
            "none of the peer's DNS names (evil.test) is in the allow-list (md.test)")

    def test_key_distributor_certificate(self):
        # Issued by the right CA, valid, but for the Key Distributor.
        return self.assertRefused(TlsCredentials.from_pki_dir(self.pki.directory, "kd"),
                                  "is in the allow-list (md.test)")

    @defer.inlineCallbacks
    def test_listed_media_distributor_accepted(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        md = yield self.tunnel()
        yield eventually(lambda: self.service.distributor.tunnels)
        self.assertEqual(tlshelpers.reasoned(events), [])
        self.assertFalse(md.lost.called)


class BackpressureOverTcpTests(KeyDistributorServiceMixin, TestCase):
    """A real TLS tunnel whose Media Distributor stops reading from its socket."""

    timeout = 90
    BOUND = 32 * 1024

    @defer.inlineCallbacks
    def establish(self, **limits):
        """
        Small bounds, small kernel buffers at both ends (accepted sockets
        inherit the listener's), one established association; returns
        ``(md, KD's tunnel, association id)``.
        """
        distributor = self.service.distributor
        distributor.limits = dataclasses.replace(
            distributor.limits, tunnel_max_paused_octets=self.BOUND, tunnel_grace=0.5, **limits)
        self.service._ports[0].socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        endpoint = dtls.Credentials.self_signed("endpoint")
        kd_tls_id = yield self.register(endpoint.fingerprint)
        md = yield self.tunnel()
        client = dtls.ClientAssociation(
            endpoint, [by_id(0x0009)], tls_id=TLS_ID.encode(),
            expected_peer_tls_id=kd_tls_id.encode())
        aid = uuid.uuid4()
        yield self.relay(md, client, aid)
        self.assertTrue(distributor.association(aid).established)
        [tunnel] = self.service.tunnelFactory.connections
        return md, tunnel, aid

    @staticmethod
    def hello() -> bytes:
        return dtls.ClientAssociation(
            dtls.Credentials.self_signed("flood"), [by_id(0x0009)],
            tls_id=b"FloodTlsId-0123456789").start(0).datagrams[0]

    @defer.inlineCallbacks
    def test_reading_held_back_while_the_media_distributor_does_not_read(self):
        """
        The Key Distributor's answers are what it writes: while its writes
        are paused it stops reading, so however much the Media Distributor
        sends, what the Key Distributor buffers stays under the bound and
        the tunnel stays up; once the Media Distributor reads again every
        ClientHello is answered.  (Without holding back, this tunnel was
        dropped: 1,000 handshakes in flight on a busy Media Distributor.)
        """
        md, tunnel, aid = yield self.establish()
        tcp = md.transport.transport
        tcp.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        tcp.pauseProducing()
        hello = self.hello()
        sent = 0
        while not tunnel.writesPaused:
            self.assertLess(sent, 20000, "the Key Distributor's writes never paused")
            for _ in range(100):
                md.sendMessage(wire.TunneledDtls(uuid.uuid4(), hello))
            sent += 100
            yield deferLater(0.001)
        # Far more than the bound's worth of answers asked for: none is read.
        for _ in range(4 * self.BOUND // 60 // 100):
            for _ in range(100):
                md.sendMessage(wire.TunneledDtls(uuid.uuid4(), hello))
            sent += 100
            yield deferLater(0.001)
        self.assertIsNone(tunnel.closeReason)
        # Reading again, the Media Distributor gets an answer to each.
        answered = 0
        tcp.resumeProducing()
        while answered < sent:
            message = yield md.next()
            if isinstance(message, wire.TunneledDtls) and message.association_id != aid:
                answered += 1
        self.assertIsNone(tunnel.closeReason)
        self.assertFalse(tunnel.writesPaused)
        self.assertTrue(self.service.distributor.association(aid).established)

    @defer.inlineCallbacks
    def test_media_distributor_that_stops_reading_is_dropped(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        md, tunnel, aid = yield self.establish(tunnel_max_paused_seconds=1.0)
        distributor = self.service.distributor
        # The Media Distributor stops reading; it keeps sending ClientHellos,
        # each of which the Key Distributor would answer.
        tcp = md.transport.transport
        tcp.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        tcp.pauseProducing()
        hello = self.hello()
        deadline = reactor.seconds() + WAIT
        while tunnel.closeReason is None:
            # Without the bound the Key Distributor would wait for ever.
            self.assertLess(reactor.seconds(), deadline,
                            "the Key Distributor never dropped the tunnel")
            for _ in range(100):
                md.sendMessage(wire.TunneledDtls(uuid.uuid4(), hello))
            yield deferLater(0.01)
        self.assertEqual(tunnel.closeReason,
                         "the Media Distributor has not read from the tunnel for 1.0 seconds")
        yield eventually(lambda: not self.service.tunnelFactory.connections
                         and not distributor.tunnels)
        drops = [e for e in events if e.get("log_namespace") == "perc.kd.tunnel.KeyDistributorTunnel"
                 and e.get("log_format", "").startswith("Dropping tunnel")]
        self.assertEqual([e["reason"] for e in drops], [tunnel.closeReason])
        # Its association waits for the Media Distributor to come back, then goes.
        self.assertIsNone(distributor.association(aid).tunnel)
        yield eventually(lambda: distributor.association(aid) is None)
        tcp.resumeProducing()
        yield md.lost.addTimeout(WAIT, reactor)


def deferLater(seconds):
    from twisted.internet.task import deferLater as later
    return later(reactor, seconds, lambda: None)


class UdpRelay(protocol.DatagramProtocol):
    """The smallest Media Distributor: one UDP peer relayed through one tunnel."""

    def __init__(self, md):
        self.md = md
        self.aid = uuid.uuid4()
        self.peer = None
        self.keys = defer.Deferred()
        self._pump()

    def datagramReceived(self, data, address):
        self.peer = address
        self.md.sendMessage(wire.TunneledDtls(self.aid, data))

    @defer.inlineCallbacks
    def _pump(self):
        while True:
            message = yield self.md.messages.get()
            if isinstance(message, wire.TunneledDtls) and self.peer is not None:
                self.transport.write(message.dtls_message, self.peer)
            elif isinstance(message, wire.MediaKeys):
                self.keys.callback(message)
            elif isinstance(message, wire.EndpointDisconnect):
                if not self.keys.called:
                    self.keys.errback(AssertionError("association refused"))
                return


class OpenSSLThroughTunnelTests(KeyDistributorServiceMixin, TestCase):
    skip = None if OPENSSL else "the openssl command is not installed"
    timeout = 90

    @defer.inlineCallbacks
    def test_s_client_without_tls_id(self):
        yield self.start("--allow-missing-tls-id", "--profiles", "SRTP_AEAD_AES_128_GCM")
        certificate, key = pki.self_signed_certificate("s_client")
        cert_path = os.path.join(self.dir, "client.pem")
        key_path = os.path.join(self.dir, "client.key")
        with open(cert_path, "wb") as f:
            f.write(pki.certificate_pem(certificate))
        with open(key_path, "wb") as f:
            f.write(pki.private_key_pem(key))
        yield self.register(pki.fingerprint(certificate))
        md = yield self.tunnel(profiles=(0x0007,))
        relay = UdpRelay(md)
        port = reactor.listenUDP(0, relay, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        process = OpenSSLProcess()
        reactor.spawnProcess(process, OPENSSL, [OPENSSL, "s_client", "-dtls1_2"] + EXPORT + [
            "-connect", "127.0.0.1:{}".format(port.getHost().port),
            "-cert", cert_path, "-key", key_path], env=dict(os.environ))
        self.addCleanup(process.stop)
        keys = yield relay.keys.addTimeout(WAIT, reactor)
        match = yield process.wait_for(KEYING_MATERIAL)
        exported = bytes.fromhex(match.group(1).decode())
        self.assertEqual(keys.profile, 0x0007)
        self.assertEqual(material(keys), exported)
