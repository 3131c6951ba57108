"""
Certificate rotation: ``reloadCredentials`` (what SIGHUP calls) on real
services over real TLS on loopback, and a real SIGHUP to a real
``twistd -n perc-kd``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from perc import dtls, pki, wire
from perc.md import tap as md_tap
from perc.md.service import MediaDistributorService
from perc.netutil import tls_client_endpoint, tls_server_factory
from perc.profiles import by_id
from perc.tls import TlsCredentials, peer_certificate
from tests import tlshelpers
from tests.daemonhelpers import TWISTD, DaemonOutput, listening_port
from tests.test_kd_service import (
    TLS_ID,
    WAIT,
    KeyDistributorServiceMixin,
)

RENEWED_NAMES = ["renewed.test", "localhost", "127.0.0.1"]


def renew(dev_pki: pki.DevPki, role: str) -> TlsCredentials:
    """A new certificate and key for ``role`` from the same CA, written over the old files."""
    credentials = tlshelpers.issued(dev_pki, RENEWED_NAMES, common_name="perc-renewed")
    pki.write_certificate(dev_pki.certificate(role), credentials.certificate, force=True)
    pki.write_private_key(dev_pki.key(role), credentials.private_key, force=True)
    return credentials


@implementer(IHandshakeListener)
class HandshakeRecorder(protocol.Protocol):
    """A TLS peer that says nothing and fires ``certificate`` with the peer's once TLS is up."""

    def __init__(self):
        self.certificate = defer.Deferred()
        self.lost = defer.Deferred()

    def handshakeCompleted(self):
        self.certificate.callback(peer_certificate(self.transport))

    def connectionLost(self, reason=protocol.connectionDone):
        self.lost.callback(None)


def presented_certificate(port: int, credentials: TlsCredentials, test: TestCase):
    """The certificate the TLS server on loopback ``port`` presents to a new connection."""
    endpoint = tls_client_endpoint(reactor, "tcp:127.0.0.1:{}".format(port), credentials,
                                   "--test", "127.0.0.1")
    peer = HandshakeRecorder()
    d = connectProtocol(endpoint, peer)

    def close():
        peer.transport.loseConnection()
        return peer.lost

    def connected(_):
        test.addCleanup(close)
        return peer.certificate.addTimeout(WAIT, reactor)
    return d.addCallback(connected)


def log_events(test: TestCase) -> list:
    events: list = []
    globalLogPublisher.addObserver(events.append)
    test.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


class KeyDistributorRotationTests(KeyDistributorServiceMixin, TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def handshake(self, md, expected_certificate):
        """A registered endpoint's DTLS handshake through ``md`` that expects this KD certificate."""
        endpoint = dtls.Credentials.self_signed("endpoint")
        kd_tls_id = yield self.register(endpoint.fingerprint)
        client = dtls.ClientAssociation(
            endpoint, [by_id(0x0009)], tls_id=TLS_ID.encode(),
            expected_peer_tls_id=kd_tls_id.encode(),
            expected_peer_fingerprint=pki.fingerprint(expected_certificate))
        aid = uuid.uuid4()
        events, messages = yield self.relay(md, client, aid)
        self.assertTrue([e for e in events if isinstance(e, dtls.HandshakeComplete)], events)
        self.assertTrue([m for m in messages if isinstance(m, wire.MediaKeys)])
        return aid

    @defer.inlineCallbacks
    def test_new_tunnels_and_associations_use_the_reloaded_certificate(self):
        old = TlsCredentials.from_pki_dir(self.pki.directory, "kd")
        live = yield self.tunnel()
        before = yield self.handshake(live, old.certificate)
        self.assertEqual(peer_certificate(live.transport), old.certificate)

        renewed = renew(self.pki, "kd")
        self.assertTrue(self.service.reloadCredentials())

        fresh = yield presented_certificate(self.tunnel_port, self.md_credentials, self)
        self.assertEqual(fresh, renewed.certificate)
        # The live tunnel and its association are untouched; a new
        # association through that same tunnel gets the new DTLS certificate.
        self.assertFalse(live.lost.called)
        self.assertIsNotNone(self.service.distributor.association(before))
        after = yield self.handshake(live, renewed.certificate)
        self.assertIsNotNone(self.service.distributor.association(after))

    @defer.inlineCallbacks
    def test_bad_files_keep_the_current_credentials(self):
        old = TlsCredentials.from_pki_dir(self.pki.directory, "kd")
        other = pki.create_dev_pki(os.path.join(self.dir, "third-pki"))
        events = log_events(self)
        with open(self.pki.kd_certificate, "rb") as source:
            good_certificate = source.read()
        with open(self.pki.kd_key, "rb") as source:
            good_key = source.read()
        cases = [
            (self.pki.kd_certificate, b"not a certificate\n", "not a PEM file"),
            (self.pki.kd_certificate, None, "no such file"),
            (self.pki.kd_key, open(other.kd_key, "rb").read(), "does not match the certificate"),
            (self.pki.ca_certificate, open(self.pki.kd_certificate, "rb").read(),
             "is not a CA certificate"),
        ]
        for path, content, why in cases:
            saved = open(path, "rb").read()
            if content is None:
                os.remove(path)
            else:
                with open(path, "wb") as target:
                    target.write(content)
            del events[:]
            self.assertFalse(self.service.reloadCredentials())
            [failure] = [e for e in events if "reload failed" in e.get("log_format", "")]
            self.assertIn("--pki {}".format(path), failure["error"])
            self.assertIn(why, failure["error"])
            self.assertNotIn("\n", failure["error"])
            with open(path, "wb") as target:
                target.write(saved)
            certificate = yield presented_certificate(
                self.tunnel_port, self.md_credentials, self)
            self.assertEqual(certificate, old.certificate)
        self.assertEqual(open(self.pki.kd_certificate, "rb").read(), good_certificate)
        self.assertEqual(open(self.pki.kd_key, "rb").read(), good_key)

    @defer.inlineCallbacks
    def test_dialled_tunnels_present_the_reloaded_certificate(self):
        """--connect: the next tunnel the Key Distributor dials presents the new certificate."""
        accepted = defer.DeferredQueue()

        class Dialled(HandshakeRecorder):
            def connectionMade(self):
                accepted.put(self)

        factory = protocol.Factory.forProtocol(Dialled)
        port = reactor.listenTCP(0, tls_server_factory(self.md_credentials, factory),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        yield self.start("--connect", "tcp:127.0.0.1:{}".format(port.getHost().port))
        first = yield accepted.get().addTimeout(WAIT, reactor)
        certificate = yield first.certificate.addTimeout(WAIT, reactor)
        self.assertEqual(certificate, TlsCredentials.from_pki_dir(self.pki.directory, "kd").certificate)

        renewed = renew(self.pki, "kd")
        self.assertTrue(self.service.reloadCredentials())
        first.transport.loseConnection()  # the Key Distributor dials again
        second = yield accepted.get().addTimeout(WAIT, reactor)
        certificate = yield second.certificate.addTimeout(WAIT, reactor)
        self.assertEqual(certificate, renewed.certificate)
        second.transport.loseConnection()


class MediaDistributorRotationTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_accepted_tunnels_use_the_reloaded_certificate(self):
        directory = os.path.abspath(self.mktemp())
        dev = pki.create_dev_pki(os.path.join(directory, "pki"))
        config = md_tap.Options()
        config.parseOptions(["--pki", dev.directory, "--tunnel-listen", "tcp:0:interface=127.0.0.1",
                             "--media-port", "0", "--media-interface", "127.0.0.1",
                             "--api", "none"])
        service = MediaDistributorService.fromOptions(config, reactor)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        port = service.ports["tunnel-listen"].getHost().port
        kd = TlsCredentials.from_pki_dir(dev.directory, "kd")
        old = TlsCredentials.from_pki_dir(dev.directory, "md")
        certificate = yield presented_certificate(port, kd, self)
        self.assertEqual(certificate, old.certificate)

        with open(dev.md_key, "wb") as target:
            target.write(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
        self.assertFalse(service.reloadCredentials())
        certificate = yield presented_certificate(port, kd, self)
        self.assertEqual(certificate, old.certificate)

        renewed = renew(dev, "md")
        self.assertTrue(service.reloadCredentials())
        certificate = yield presented_certificate(port, kd, self)
        self.assertEqual(certificate, renewed.certificate)


class SighupTests(TestCase):
    """A real SIGHUP to a real ``twistd -n perc-kd``."""

    timeout = 90

    @defer.inlineCallbacks
    def test_sighup_reloads_the_certificate(self):
        directory = os.path.abspath(self.mktemp())
        dev = pki.create_dev_pki(os.path.join(directory, "pki"))
        process = subprocess.Popen(
            TWISTD + ["-n", "--pidfile=", "perc-kd", "--pki", dev.directory, "--api", "none",
                      "--tunnel-listen", "tcp:0:interface=127.0.0.1"],
            cwd=directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output = DaemonOutput(process)
        self.addCleanup(output.stop)
        output.wait_for("Key Distributor ready")
        port = listening_port(output, "tunnel-listen")
        md = TlsCredentials.from_pki_dir(dev.directory, "md")
        certificate = yield presented_certificate(port, md, self)
        self.assertEqual(certificate, TlsCredentials.from_pki_dir(dev.directory, "kd").certificate)

        renewed = renew(dev, "kd")
        process.send_signal(signal.SIGHUP)
        output.wait_for("Certificate reloaded")
        certificate = yield presented_certificate(port, md, self)
        self.assertEqual(certificate, renewed.certificate)
        # A second SIGHUP with a broken file: logged, the daemon keeps serving.
        with open(dev.kd_certificate, "wb") as target:
            target.write(b"garbage")
        process.send_signal(signal.SIGHUP)
        line = output.wait_for("Certificate reload failed")
        self.assertIn("--pki {}: not a PEM file".format(dev.kd_certificate), line)
        certificate = yield presented_certificate(port, md, self)
        self.assertEqual(certificate, renewed.certificate)
        self.assertIsNone(process.poll())
