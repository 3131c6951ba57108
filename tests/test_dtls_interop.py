"""
Interoperability of perc.dtls with Debian's ``openssl`` command over real
UDP on loopback: the server-role engine against ``openssl s_client`` and the
client-role engine against ``openssl s_server``.  Both sides export the
DTLS-SRTP keying material; openssl prints it as ``Keying material: <hex>``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.error import ProcessExitedAlready
from twisted.trial.unittest import TestCase

from perc import dtls, pki
from perc.profiles import by_id

OPENSSL = shutil.which("openssl")
SKIP = None if OPENSSL else "the openssl command is not installed"

P7 = by_id(0x0007)
EXPORT = ["-use_srtp", "SRTP_AEAD_AES_128_GCM",
          "-keymatexport", "EXTRACTOR-dtls_srtp", "-keymatexportlen", "56"]
KEYING_MATERIAL = re.compile(rb"Keying material: ([0-9A-Fa-f]+)")
#: Upper bound for any single wait; the whole test is bounded by ``timeout``.
WAIT = 15


class OpenSSLProcess(protocol.ProcessProtocol):
    """Collects an openssl command's output; lets a test wait for a pattern."""

    def __init__(self):
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.ended = defer.Deferred()
        self._waiters = []

    def outReceived(self, data):
        self.stdout += data
        self._check()

    def errReceived(self, data):
        self.stderr += data

    def processEnded(self, reason):
        for pattern, waiter in self._waiters:
            waiter.errback(AssertionError(
                "openssl ended before printing {!r}; stdout:\n{}\nstderr:\n{}".format(
                    pattern.pattern, self.stdout.decode(errors="replace"),
                    self.stderr.decode(errors="replace"))))
        self._waiters = []
        self.ended.callback(reason.value)

    def wait_for(self, pattern):
        """A Deferred firing with the first match of ``pattern`` in stdout."""
        waiter = defer.Deferred()
        self._waiters.append((pattern, waiter))
        self._check()
        if self.ended.called and not waiter.called:
            waiter.errback(AssertionError("openssl already ended"))
        return waiter.addTimeout(WAIT, reactor)

    def _check(self):
        remaining, matched = [], []
        for pattern, waiter in self._waiters:
            match = pattern.search(self.stdout)
            if match is not None:
                matched.append((waiter, match))
            else:
                remaining.append((pattern, waiter))
        # Update the list first: a callback may wait for the next pattern.
        self._waiters = remaining
        for waiter, match in matched:
            waiter.callback(match)

    def stop(self):
        """Close stdin, kill the process if needed; fires when it has ended."""
        if not self.ended.called:
            try:
                self.transport.closeStdin()
                self.transport.signalProcess("KILL")
            except ProcessExitedAlready:
                pass
        done = defer.Deferred()
        self.ended.addBoth(lambda _: done.callback(None))
        return done


class EngineDriver(protocol.DatagramProtocol):
    """
    Feeds one association from a UDP socket on the real reactor, with its
    timers on reactor.callLater.  In the server role the first datagrams go
    through a ServerListener (cookie exchange); the peer's address is the
    association id.
    """

    def __init__(self, association=None, listener=None, peer=None):
        self.association = association
        self.listener = listener
        self.peer = peer
        self.completed = defer.Deferred()
        self.events = []
        self._timer = None

    def now(self):
        return reactor.seconds()

    def startProtocol(self):
        if self.association is not None:
            self._handle(self.association.start(self.now()))

    def datagramReceived(self, data, address):
        now = self.now()
        if self.association is None:
            replies, association = self.listener.listen(
                "{}:{}".format(*address).encode(), data, now)
            for reply in replies:
                self.transport.write(reply, address)
            if association is not None:
                self.association, self.peer = association, address
                self._handle(association.start(now))
        elif address == self.peer:
            self._handle(self.association.receive(data, now))

    def _handle(self, output):
        for datagram in output.datagrams:
            self.transport.write(datagram, self.peer)
        for event in output.events:
            self.events.append(event)
            if isinstance(event, dtls.HandshakeComplete) and not self.completed.called:
                self.completed.callback(event)
            elif isinstance(event, dtls.Closed) and not self.completed.called:
                self.completed.errback(AssertionError("association closed: " + event.reason))
        self._schedule()

    def _schedule(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        deadline = self.association.next_timeout(self.now())
        if deadline is not None:
            self._timer = reactor.callLater(max(0.0, deadline - self.now()), self._timeout)

    def _timeout(self):
        self._timer = None
        self._handle(self.association.handle_timeout(self.now()))

    def stopProtocol(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()


def material(keys):
    """The exported octets, reassembled in RFC 5764 order."""
    return keys.client_key + keys.server_key + keys.client_salt + keys.server_salt


class OpenSSLTestCase(TestCase):
    """Runs openssl processes and engines on real UDP sockets."""

    skip = SKIP
    timeout = 60

    def credentials_files(self, name):
        """A self-signed certificate and key written to a fresh directory."""
        directory = self.mktemp()
        os.makedirs(directory)
        certificate, key = pki.self_signed_certificate(name)
        cert_path = os.path.join(directory, "cert.pem")
        key_path = os.path.join(directory, "key.pem")
        with open(cert_path, "wb") as f:
            f.write(pki.certificate_pem(certificate))
        with open(key_path, "wb") as f:
            f.write(pki.private_key_pem(key))
        return certificate, cert_path, key_path

    def spawn(self, arguments):
        process = OpenSSLProcess()
        # stdin stays an open pipe until stop(): openssl quits on EOF.
        reactor.spawnProcess(process, OPENSSL, [OPENSSL] + arguments, env=dict(os.environ))
        self.addCleanup(process.stop)
        return process

    def listen_udp(self, driver):
        port = reactor.listenUDP(0, driver, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port



class InteropTests(OpenSSLTestCase):

    @defer.inlineCallbacks
    def test_server_role_against_s_client(self):
        certificate, cert_path, key_path = self.credentials_files("s_client")
        listener = dtls.ServerListener(dtls.Credentials.self_signed("engine-kd"), [P7])
        driver = EngineDriver(listener=listener)
        port = self.listen_udp(driver)
        process = self.spawn(["s_client", "-dtls1_2"] + EXPORT + [
            "-connect", "127.0.0.1:{}".format(port.getHost().port),
            "-cert", cert_path, "-key", key_path])
        event = yield driver.completed.addTimeout(WAIT, reactor)
        match = yield process.wait_for(KEYING_MATERIAL)
        self.assertEqual(event.profile, P7)
        self.assertEqual(event.peer_fingerprint, pki.fingerprint(certificate))
        self.assertEqual(bytes.fromhex(match.group(1).decode()), material(event.keys))

    @defer.inlineCallbacks
    def test_client_role_against_s_server(self):
        certificate, cert_path, key_path = self.credentials_files("s_server")
        for attempt in range(3):
            port = free_udp_port()
            process = self.spawn(["s_server", "-dtls1_2"] + EXPORT + [
                "-accept", "127.0.0.1:{}".format(port),
                "-cert", cert_path, "-key", key_path, "-verify", "1"])
            try:
                yield process.wait_for(re.compile(rb"ACCEPT"))
                break
            except AssertionError:
                # Lost the race for the port: try another one.
                if attempt == 2:
                    raise
        client = dtls.ClientAssociation(
            dtls.Credentials.self_signed("engine-endpoint"), [P7],
            expected_peer_fingerprint=pki.fingerprint(certificate))
        driver = EngineDriver(association=client, peer=("127.0.0.1", port))
        self.listen_udp(driver)
        event = yield driver.completed.addTimeout(WAIT, reactor)
        match = yield process.wait_for(KEYING_MATERIAL)
        self.assertEqual(event.profile, P7)
        self.assertEqual(event.peer_fingerprint, pki.fingerprint(certificate))
        self.assertEqual(bytes.fromhex(match.group(1).decode()), material(event.keys))


class CompactedServerInteropTests(OpenSSLTestCase):
    """
    After its handshake the server role leaves OpenSSL and protects records
    itself (perc.dtls.records): s_client, a real and independent peer, must
    read what it sends, be read, and see its close_notify, for each AEAD
    suite family.
    """

    @defer.inlineCallbacks
    def wait_for_event(self, driver, kind):
        for _ in range(int(WAIT / 0.05)):
            found = [e for e in driver.events if isinstance(e, kind)]
            if found:
                return found
            yield task.deferLater(reactor, 0.05, lambda: None)
        raise AssertionError("no {} event; got {!r}".format(kind.__name__, driver.events))

    @defer.inlineCallbacks
    def exchange_with_s_client(self, cipher):
        certificate, cert_path, key_path = self.credentials_files("s_client")
        listener = dtls.ServerListener(dtls.Credentials.self_signed("engine-kd"), [P7])
        driver = EngineDriver(listener=listener)
        port = self.listen_udp(driver)
        process = self.spawn(["s_client", "-dtls1_2", "-cipher", cipher] + EXPORT + [
            "-connect", "127.0.0.1:{}".format(port.getHost().port),
            "-cert", cert_path, "-key", key_path])
        event = yield driver.completed.addTimeout(WAIT, reactor)
        match = yield process.wait_for(KEYING_MATERIAL)
        self.assertEqual(bytes.fromhex(match.group(1).decode()), material(event.keys))
        association = driver.association
        self.assertTrue(association.compacted)
        # Several records, so that a repeated sequence number would be
        # dropped by s_client's replay detection.
        for n in range(3):
            driver._handle(association.send_application_data(
                "record {} from the compacted server\n".format(n).encode()))
        yield process.wait_for(re.compile(rb"record 2 from the compacted server"))
        self.assertIn(b"record 0 from the compacted server", process.stdout)
        self.assertIn(b"record 1 from the compacted server", process.stdout)
        process.transport.write(b"hello from s_client\n")
        data = yield self.wait_for_event(driver, dtls.ApplicationData)
        self.assertEqual(b"".join(e.data for e in data), b"hello from s_client\n")
        # s_client ends with close_notify when its input ends.
        process.transport.closeStdin()
        closed = yield self.wait_for_event(driver, dtls.Closed)
        self.assertEqual(closed[0].reason, "peer closed the association (close_notify)")
        return cipher

    def test_aes_128_gcm(self):
        return self.exchange_with_s_client("ECDHE-ECDSA-AES128-GCM-SHA256")

    def test_aes_256_gcm_sha384(self):
        return self.exchange_with_s_client("ECDHE-ECDSA-AES256-GCM-SHA384")

    def test_chacha20_poly1305(self):
        return self.exchange_with_s_client("ECDHE-ECDSA-CHACHA20-POLY1305")


def free_udp_port():
    """A UDP port that was free a moment ago (openssl binds it itself)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
