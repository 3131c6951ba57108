"""
Tests for perc.tls: mutual TLS over real loopback connections, peer
authorisation, and the one-line configuration errors.
"""

from __future__ import annotations

import builtins
import datetime
import errno
import os

from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, reactor, ssl
from twisted.internet.endpoints import SSL4ClientEndpoint, SSL4ServerEndpoint
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol, ServerFactory
from twisted.trial import unittest
from zope.interface import implementer

from perc import pki, tls
from perc.errors import ConfigError

PAYLOAD = b"a tunnel message, both ways"


# Peers

class EchoServer(tls.PeerAuthorisationMixin, Protocol):
    """Echoes what it receives; records the handshake and the authorisation."""

    def connectionMade(self):
        self.factory.connections.append(self)
        self.authorise = self.factory.authorise
        self.received = b""
        self.handshakeDone = False
        self.refusal = None
        self.lost = defer.Deferred()

    def handshakeCompleted(self):
        self.handshakeDone = True
        self.version = self.transport.getHandle().get_protocol_version_name()
        self.options = self.transport.getHandle().set_options(0)
        super().handshakeCompleted()

    def peerRefused(self, identity, reason):
        self.refusal = reason

    def dataReceived(self, data):
        self.received += data
        self.transport.write(data)

    def connectionLost(self, reason):
        # A Failure given to callback() would errback; hand it over boxed.
        self.lost.callback([reason])


@implementer(IHandshakeListener)
class Client(Protocol):
    """Sends PAYLOAD, closes once it has come back."""

    def connectionMade(self):
        self.received = b""
        self.handshakeDone = False
        self.lost = defer.Deferred()
        # Buffered by the TLS layer until the handshake is done.
        self.transport.write(PAYLOAD)

    def handshakeCompleted(self):
        self.handshakeDone = True
        self.version = self.transport.getHandle().get_protocol_version_name()
        self.options = self.transport.getHandle().set_options(0)

    def dataReceived(self, data):
        self.received += data
        if len(self.received) >= len(PAYLOAD):
            self.transport.loseConnection()

    def connectionLost(self, reason):
        # A Failure given to callback() would errback; hand it over boxed.
        self.lost.callback([reason])


class Outcome:
    def __init__(self, client, client_reason, server, server_reason):
        self.client, self.client_reason = client, client_reason
        self.server, self.server_reason = server, server_reason


def make_pki(testcase, **kwargs):
    return pki.create_dev_pki(testcase.mktemp(), **kwargs)


class TunnelTestsMixin:
    timeout = 30

    async def exchange(self, server_options, client_options, authorise=None) -> Outcome:
        """
        Listen on 127.0.0.1 with ``server_options``, connect once with
        ``client_options``, let the client send PAYLOAD, and wait until both
        ends of the connection are closed.
        """
        factory = ServerFactory.forProtocol(EchoServer)
        factory.connections = []
        factory.authorise = authorise
        port = await SSL4ServerEndpoint(
            reactor, 0, server_options, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        client = await SSL4ClientEndpoint(
            reactor, "127.0.0.1", port.getHost().port, client_options
        ).connect(Factory.forProtocol(Client))
        [client_reason] = await client.lost
        self.assertEqual(len(factory.connections), 1)
        server = factory.connections[0]
        [server_reason] = await server.lost
        return Outcome(client, client_reason, server, server_reason)

    def assertExchanged(self, outcome: Outcome):
        self.assertTrue(outcome.server.handshakeDone)
        self.assertTrue(outcome.server.peerAuthorised)
        self.assertEqual(outcome.server.received, PAYLOAD)
        self.assertEqual(outcome.client.received, PAYLOAD)
        self.assertIsNone(outcome.client_reason.check(SSL.Error, VerificationError))

    def assertRefused(self, outcome: Outcome):
        """Nothing reached either application, and the server never accepted the peer."""
        self.assertFalse(outcome.server.peerAuthorised)
        self.assertEqual(outcome.server.received, b"")
        self.assertEqual(outcome.client.received, b"")


class MutualTlsTests(TunnelTestsMixin, unittest.TestCase):
    def setUp(self):
        self.pki = make_pki(self, kd_names=["kd1.test"], md_names=["md1.test"])
        self.kd = tls.TlsCredentials.from_pki_dir(self.pki.directory, "kd")
        self.md = tls.TlsCredentials.from_pki_dir(self.pki.directory, "md")

    async def test_pki_init_files_connect(self):
        """
        With ``perc pki init`` files, the MD connects to the KD by DNS name,
        data flows both ways, TLS 1.3 is chosen, and TLS 1.0 and 1.1 are
        disabled on both sides.
        """
        outcome = await self.exchange(self.kd.server_options(), self.md.client_options("kd1.test"))
        self.assertExchanged(outcome)
        self.assertEqual(outcome.server.peerIdentity, "md1.test")
        self.assertEqual(outcome.server.version, "TLSv1.3")
        self.assertEqual(outcome.client.version, "TLSv1.3")
        for options in (outcome.server.options, outcome.client.options):
            self.assertTrue(options & SSL.OP_NO_TLSv1)
            self.assertTrue(options & SSL.OP_NO_TLSv1_1)
            self.assertFalse(options & SSL.OP_NO_TLSv1_2)
            self.assertFalse(options & SSL.OP_NO_TLSv1_3)

    async def test_either_side_may_listen(self):
        """The KD may open the tunnel to a listening MD (from_files, reversed roles)."""
        kd = tls.TlsCredentials.from_files(self.pki.kd_certificate, self.pki.kd_key, self.pki.ca_certificate)
        md = tls.TlsCredentials.from_files(self.pki.md_certificate, self.pki.md_key, self.pki.ca_certificate)
        outcome = await self.exchange(md.server_options(), kd.client_options("md1.test"))
        self.assertExchanged(outcome)
        self.assertEqual(outcome.server.peerIdentity, "kd1.test")

    async def test_ip_address_identity(self):
        """The expected identity may be the IP address 127.0.0.1 (iPAddress SAN)."""
        outcome = await self.exchange(self.kd.server_options(), self.md.client_options("127.0.0.1"))
        self.assertExchanged(outcome)

    async def test_wrong_ip_address_fails(self):
        """An IP address the server certificate does not name is refused by the client."""
        outcome = await self.exchange(self.kd.server_options(), self.md.client_options("127.0.0.2"))
        self.assertRefused(outcome)
        self.assertTrue(outcome.client_reason.check(VerificationError))
        self.assertIn("127.0.0.2", str(outcome.client_reason.value))

    async def test_wrong_expected_name_fails(self):
        """A DNS name the server certificate does not name is refused by the client."""
        outcome = await self.exchange(self.kd.server_options(), self.md.client_options("kd2.test"))
        self.assertRefused(outcome)
        self.assertFalse(outcome.server.handshakeDone)
        self.assertTrue(outcome.client_reason.check(VerificationError))
        self.assertIn("kd2.test", str(outcome.client_reason.value))

    async def test_client_certificate_from_other_ca_fails(self):
        """The server refuses a client certificate another CA issued."""
        other = make_pki(self, md_names=["md1.test"])
        other_md = tls.TlsCredentials.from_pki_dir(other.directory, "md")
        # It trusts the right CA, so only its own certificate is wrong.
        impostor = tls.TlsCredentials(other_md.certificate, other_md.private_key, self.kd.authorities)
        outcome = await self.exchange(self.kd.server_options(), impostor.client_options("kd1.test"))
        self.assertRefused(outcome)
        self.assertFalse(outcome.server.handshakeDone)
        self.assertTrue(outcome.server_reason.check(SSL.Error))
        self.assertTrue(outcome.client_reason.check(SSL.Error))

    async def test_no_client_certificate_fails(self):
        """The server refuses a client that presents no certificate."""
        anonymous = ssl.optionsForClientTLS(
            "kd1.test",
            trustRoot=ssl.trustRootFromCertificates(
                [ssl.Certificate.loadPEM(pki.certificate_pem(self.md.authorities[0]))]))
        outcome = await self.exchange(self.kd.server_options(), anonymous)
        self.assertRefused(outcome)
        self.assertFalse(outcome.server.handshakeDone)
        self.assertTrue(outcome.server_reason.check(SSL.Error))
        self.assertTrue(outcome.client_reason.check(SSL.Error))

    async def test_server_from_other_ca_fails(self):
        """The client refuses a server certificate another CA issued."""
        other = make_pki(self, kd_names=["kd1.test"])
        other_kd = tls.TlsCredentials.from_pki_dir(other.directory, "kd")
        impostor = tls.TlsCredentials(other_kd.certificate, other_kd.private_key, self.kd.authorities)
        outcome = await self.exchange(impostor.server_options(), self.md.client_options("kd1.test"))
        self.assertRefused(outcome)
        self.assertFalse(outcome.server.handshakeDone)
        self.assertTrue(outcome.client_reason.check(SSL.Error))

    async def test_tls_1_2_client_accepted(self):
        """A client that stops at TLS 1.2 still connects, with TLS 1.2."""
        md = self.md
        old = ssl.optionsForClientTLS(
            "kd1.test",
            trustRoot=ssl.trustRootFromCertificates(
                [ssl.Certificate.loadPEM(pki.certificate_pem(md.authorities[0]))]),
            extraCertificateOptions=dict(
                privateKey=md.private_key, certificate=md.certificate,
                lowerMaximumSecurityTo=ssl.TLSVersion.TLSv1_2))
        outcome = await self.exchange(self.kd.server_options(), old)
        self.assertExchanged(outcome)
        self.assertEqual(outcome.server.version, "TLSv1.2")

    async def test_ca_bundle_with_several_cas(self):
        """A CA file may hold several CAs; clients of each are accepted."""
        other = make_pki(self, md_names=["md2.test"])
        bundle = self.mktemp()
        with open(bundle, "wb") as out:
            for path in (other.ca_certificate, self.pki.ca_certificate):
                with open(path, "rb") as source:
                    out.write(source.read())
        kd = tls.TlsCredentials.from_files(self.pki.kd_certificate, self.pki.kd_key, bundle)
        self.assertEqual(len(kd.authorities), 2)
        for md, identity in [(self.md, "md1.test"),
                             (tls.TlsCredentials.from_pki_dir(other.directory, "md"), "md2.test")]:
            # Each MD trusts the KD's CA so that only the server side is tested.
            md = tls.TlsCredentials(md.certificate, md.private_key, self.kd.authorities)
            outcome = await self.exchange(kd.server_options(), md.client_options("kd1.test"))
            self.assertExchanged(outcome)
            self.assertEqual(outcome.server.peerIdentity, identity)

    async def test_allow_list_accepts_listed_name(self):
        outcome = await self.exchange(
            self.kd.server_options(), self.md.client_options("kd1.test"),
            authorise=tls.Authoriser(["other.test", "MD1.test."]))
        self.assertExchanged(outcome)
        self.assertEqual(outcome.server.peerIdentity, "md1.test")

    async def test_allow_list_refuses_other_name(self):
        """
        A peer the CA issued but whose names are not listed is cut off when
        the handshake completes, before any of its data is delivered.
        """
        outcome = await self.exchange(
            self.kd.server_options(), self.md.client_options("kd1.test"),
            authorise=tls.Authoriser(["md2.test"]))
        self.assertTrue(outcome.server.handshakeDone)
        self.assertRefused(outcome)
        self.assertEqual(outcome.server.peerIdentity, "md1.test")
        self.assertIn("md2.test", outcome.server.refusal)
        self.assertIn("md1.test", outcome.server.refusal)


class AuthorisationTests(unittest.SynchronousTestCase):
    """authorise_peer, Authoriser and the identity helpers, without a network."""

    def setUp(self):
        self.pki = make_pki(self, md_names=["md1.test", "10.0.0.1", "md-alias.test"])
        self.md = tls.TlsCredentials.from_pki_dir(self.pki.directory, "md")

    def test_no_allow_list(self):
        for allowed in (None, (), [""]):
            authorised, identity, reason = tls.authorise_peer(self.md.certificate, allowed)
            self.assertTrue(authorised)
            self.assertEqual(identity, "md1.test")

    def test_any_listed_dns_name(self):
        self.assertEqual(
            tls.Authoriser(["md-alias.test"])(self.md.certificate),
            (True, "md-alias.test", "'md-alias.test' is in the allow-list"))

    def test_ip_address_is_not_a_dns_name(self):
        authorised, _, _ = tls.authorise_peer(self.md.certificate, ["10.0.0.1"])
        self.assertFalse(authorised)

    def test_no_wildcard_expansion(self):
        authorised, _, _ = tls.authorise_peer(self.md.certificate, ["*.test"])
        self.assertFalse(authorised)

    def test_refusal_reason_is_one_line(self):
        authorised, identity, reason = tls.authorise_peer(self.md.certificate, ["kd.test"])
        self.assertFalse(authorised)
        self.assertEqual(identity, "md1.test")
        self.assertEqual(
            reason,
            "none of the peer's DNS names (md1.test, md-alias.test, localhost) is in the"
            " allow-list (kd.test)")

    def test_no_certificate(self):
        class Plain:
            def getPeerCertificate(self):
                return None

        self.assertEqual(tls.authorise_peer(Plain(), None)[0], False)
        self.assertEqual(tls.authorise_peer(object(), None)[0], False)
        self.assertEqual(tls.peer_identity(Plain()), "(no certificate)")

    def test_peer_certificate_from_transport(self):
        """A transport returning a pyOpenSSL certificate is understood."""
        from OpenSSL import crypto

        class Transport:
            def getPeerCertificate(self):
                return crypto.X509.from_cryptography(certificate)

        certificate = self.md.certificate
        self.assertEqual(tls.peer_certificate(Transport()), certificate)
        self.assertEqual(tls.peer_identity(Transport()), "md1.test")

    def test_identity_falls_back_to_common_name(self):
        certificate, _ = pki.self_signed_certificate("alice")
        self.assertEqual(tls.certificate_identity(certificate), "alice")
        self.assertEqual(tls.certificate_dns_names(certificate), [])

    def test_mixin_aborts_refused_peer(self):
        """PeerAuthorisationMixin aborts and reports a refused peer, accepts a listed one."""
        certificate = self.md.certificate

        class Transport:
            aborted = False

            def getPeerCertificate(self):
                return certificate

            def getPeer(self):
                return None

            def abortConnection(self):
                self.aborted = True

        class Peer(tls.PeerAuthorisationMixin, Protocol):
            outcome = None

            def peerAccepted(self, identity, reason):
                self.outcome = ("accepted", identity)

            def peerRefused(self, identity, reason):
                self.outcome = ("refused", identity)

        self.assertTrue(IHandshakeListener.providedBy(Peer()))
        for allowed, outcome, aborted in [
            (["nobody.test"], ("refused", "md1.test"), True),
            (["md-alias.test"], ("accepted", "md-alias.test"), False),
        ]:
            peer, transport = Peer(), Transport()
            peer.authorise = tls.Authoriser(allowed)
            peer.makeConnection(transport)
            peer.handshakeCompleted()
            self.assertEqual(peer.outcome, outcome)
            self.assertEqual(transport.aborted, aborted)
            self.assertEqual(peer.peerAuthorised, not aborted)

    def test_own_identity(self):
        self.assertEqual(self.md.identity, "md1.test")


class ConfigErrorTests(unittest.SynchronousTestCase):
    """Each unusable file gives one line naming the option, the file and why."""

    def setUp(self):
        self.pki = make_pki(self)
        self.dir = self.pki.directory

    def write(self, name, data: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as out:
            out.write(data)
        return path

    def error(self, cert=None, key=None, ca=None, **kwargs) -> str:
        with self.assertRaises(ConfigError) as caught:
            tls.TlsCredentials.from_files(
                cert or self.pki.kd_certificate, key or self.pki.kd_key,
                ca or self.pki.ca_certificate, **kwargs)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        return message

    def test_valid_files_load(self):
        credentials = tls.TlsCredentials.from_files(
            self.pki.kd_certificate, self.pki.kd_key, self.pki.ca_certificate)
        self.assertEqual(credentials.identity, "localhost")
        self.assertEqual(credentials.chain, ())

    def test_missing_file(self):
        missing = os.path.join(self.dir, "nope.pem")
        self.assertEqual(self.error(cert=missing), "--cert {}: no such file".format(missing))
        self.assertEqual(self.error(key=missing), "--key {}: no such file".format(missing))
        self.assertEqual(self.error(ca=missing), "--ca {}: no such file".format(missing))

    def test_directory_instead_of_file(self):
        self.assertEqual(self.error(ca=self.dir), "--ca {}: is a directory, not a file".format(self.dir))

    def test_unreadable_file(self):
        if os.geteuid() == 0:
            # Root reads files whatever their mode: make open() refuse instead.
            real_open = builtins.open

            def refusing_open(path, *args, **kwargs):
                if path == self.pki.kd_certificate:
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
                return real_open(path, *args, **kwargs)

            self.patch(builtins, "open", refusing_open)
        else:
            os.chmod(self.pki.kd_certificate, 0)
        self.assertEqual(
            self.error(),
            "--cert {}: cannot read: Permission denied".format(self.pki.kd_certificate))

    def test_not_pem(self):
        path = self.write("garbage.pem", b"hello, I am not a certificate\n")
        self.assertEqual(
            self.error(cert=path),
            "--cert {}: not a PEM file; expected a PEM certificate".format(path))

    def test_der_is_named(self):
        with open(self.pki.kd_certificate, "rb") as source:
            from cryptography import x509
            der = x509.load_pem_x509_certificate(source.read()).public_bytes(
                serialization.Encoding.DER)
        path = self.write("kd.der", der)
        self.assertEqual(
            self.error(cert=path),
            "--cert {}: not a PEM file (it looks like DER; convert it to PEM);"
            " expected a PEM certificate".format(path))

    def test_key_given_as_certificate(self):
        self.assertEqual(
            self.error(cert=self.pki.kd_key),
            "--cert {}: no certificate in this PEM file (it holds: PRIVATE KEY);"
            " expected a PEM certificate".format(self.pki.kd_key))

    def test_certificate_given_as_key(self):
        self.assertEqual(
            self.error(key=self.pki.kd_certificate),
            "--key {}: no private key in this PEM file (it holds: CERTIFICATE)".format(
                self.pki.kd_certificate))

    def test_corrupt_certificate(self):
        path = self.write("bad.pem", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        self.assertTrue(self.error(cert=path).startswith(
            "--cert {}: a certificate in it cannot be parsed (".format(path)))

    def test_encrypted_key(self):
        with open(self.pki.kd_key, "rb") as source:
            key = serialization.load_pem_private_key(source.read(), None)
        path = self.write("encrypted.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret")))
        self.assertEqual(
            self.error(key=path),
            "--key {}: the private key is encrypted; perc needs an unencrypted key".format(path))

    def test_key_certificate_mismatch(self):
        self.assertEqual(
            self.error(key=self.pki.md_key),
            "--key {}: does not match the certificate in --cert {}".format(
                self.pki.md_key, self.pki.kd_certificate))

    def _issue(self, name, valid_from, days):
        with open(self.pki.ca_certificate, "rb") as source:
            from cryptography import x509
            ca = x509.load_pem_x509_certificate(source.read())
        with open(self.pki.ca_key, "rb") as source:
            ca_key = serialization.load_pem_private_key(source.read(), None)
        certificate, key = pki.issue_certificate(ca, ca_key, name, valid_from=valid_from, days=days)
        cert_path = os.path.join(self.dir, name + ".pem")
        key_path = os.path.join(self.dir, name + ".key")
        pki.write_certificate(cert_path, certificate)
        pki.write_private_key(key_path, key)
        return cert_path, key_path, certificate

    def test_expired_certificate(self):
        now = datetime.datetime.now(datetime.timezone.utc)
        cert, key, certificate = self._issue("old", now - datetime.timedelta(days=10), 2)
        self.assertEqual(
            self.error(cert=cert, key=key),
            "--cert {}: certificate 'CN=old,O=perc' expired on {}".format(
                cert, certificate.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S UTC")))

    def test_not_yet_valid_certificate(self):
        now = datetime.datetime.now(datetime.timezone.utc)
        cert, key, certificate = self._issue("early", now + datetime.timedelta(days=2), 2)
        self.assertEqual(
            self.error(cert=cert, key=key),
            "--cert {}: certificate 'CN=early,O=perc' is not valid until {}".format(
                cert, certificate.not_valid_before_utc.strftime("%Y-%m-%d %H:%M:%S UTC")))

    def test_expired_ca(self):
        """Expiry is judged at ``now``; an expired CA certificate is named."""
        later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=400)
        message = self.error(now=later)
        # The certificate comes first, so it is the one reported.
        self.assertTrue(message.startswith("--cert {}: certificate 'CN=perc-kd,O=perc' expired on ".format(
            self.pki.kd_certificate)), message)
        ca, _ = pki.certificate_authority(
            "old CA", valid_from=datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=5),
            days=1)
        path = self.write("old-ca.pem", pki.certificate_pem(ca))
        self.assertTrue(self.error(ca=path).startswith(
            "--ca {}: CA certificate 'CN=old CA,O=perc' expired on ".format(path)))

    def test_ca_file_without_certificates(self):
        empty = self.write("empty.pem", b"")
        self.assertEqual(
            self.error(ca=empty),
            "--ca {}: file is empty; expected a PEM CA certificate".format(empty))
        self.assertEqual(
            self.error(ca=self.pki.ca_key),
            "--ca {}: no certificate in this PEM file (it holds: PRIVATE KEY);"
            " expected a PEM CA certificate".format(self.pki.ca_key))

    def test_leaf_given_as_ca(self):
        self.assertEqual(
            self.error(ca=self.pki.md_certificate),
            "--ca {}: 'CN=perc-md,O=perc' is not a CA certificate (basicConstraints CA:FALSE)".format(
                self.pki.md_certificate))

    def test_pki_dir_errors(self):
        missing = os.path.join(self.dir, "missing")
        with self.assertRaises(ConfigError) as caught:
            tls.TlsCredentials.from_pki_dir(missing, "kd")
        self.assertEqual(str(caught.exception), "--pki {}: no such directory".format(missing))
        os.unlink(self.pki.md_key)
        with self.assertRaises(ConfigError) as caught:
            tls.TlsCredentials.from_pki_dir(self.dir, "md")
        self.assertEqual(str(caught.exception), "--pki {}: no such file".format(self.pki.md_key))
        # The other role is unaffected.
        tls.TlsCredentials.from_pki_dir(self.dir, "kd")

    def test_bad_expected_name(self):
        credentials = tls.TlsCredentials.from_pki_dir(self.dir, "md")
        with self.assertRaises(ConfigError) as caught:
            credentials.client_options("  ")
        self.assertNotIn("\n", str(caught.exception))


class FromOptionsTests(unittest.SynchronousTestCase):
    """TlsCredentials.from_options: --cert/--key/--ca win over --pki DIR."""

    def setUp(self):
        self.pki = make_pki(self, kd_names=["kd1.test"], md_names=["md1.test"])
        self.other = make_pki(self, kd_names=["kd2.test"])

    def test_pki_dir_alone(self):
        credentials = tls.TlsCredentials.from_options("md", pki_dir=self.pki.directory)
        self.assertEqual(credentials.identity, "md1.test")

    def test_explicit_files_win(self):
        credentials = tls.TlsCredentials.from_options(
            "kd", cert=self.other.kd_certificate, key=self.other.kd_key, pki_dir=self.pki.directory)
        self.assertEqual(credentials.identity, "kd2.test")
        # The CA still comes from --pki.
        self.assertEqual(credentials.authorities,
                         tls.TlsCredentials.from_pki_dir(self.pki.directory, "kd").authorities)

    def test_errors_name_the_option_used(self):
        with self.assertRaises(ConfigError) as caught:
            tls.TlsCredentials.from_options("kd", key=self.other.kd_key, pki_dir=self.pki.directory)
        self.assertEqual(
            str(caught.exception),
            "--key {}: does not match the certificate in --pki {}".format(
                self.other.kd_key, self.pki.kd_certificate))

    def test_missing_option(self):
        with self.assertRaises(ConfigError) as caught:
            tls.TlsCredentials.from_options("kd", cert=self.pki.kd_certificate, key=self.pki.kd_key)
        self.assertEqual(str(caught.exception), "--ca is required (or --pki DIR)")

    def test_all_explicit_ignores_missing_pki_dir(self):
        credentials = tls.TlsCredentials.from_options(
            "kd", cert=self.pki.kd_certificate, key=self.pki.kd_key, ca=self.pki.ca_certificate,
            pki_dir=os.path.join(self.pki.directory, "nowhere"))
        self.assertEqual(credentials.identity, "kd1.test")
