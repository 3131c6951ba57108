"""Tests for perc.netutil.set_receive_buffer and perc-md's --udp-receive-buffer."""

from __future__ import annotations

import os
import socket

from twisted.internet import defer, protocol, reactor
from twisted.python import usage
from twisted.trial.unittest import TestCase

from perc import pki
from perc.md import tap as md_tap
from perc.md.service import MediaDistributorService
from perc.netutil import GatedFactory, set_receive_buffer, tls_server_factory
from perc.tls import TlsCredentials


def rmem_max():
    try:
        with open("/proc/sys/net/core/rmem_max") as f:
            return int(f.read())
    except OSError:
        return None


def expected(size):
    """What the kernel should grant: everything if privileged or under the cap."""
    cap = rmem_max()
    if os.geteuid() == 0 or cap is None:
        return size
    return min(size, cap)


class ReceiveBufferTests(TestCase):
    def test_granted_size_reported(self):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            default = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
            size = max(2 * default, 1 << 20)
            granted = set_receive_buffer(sock, size)
            self.assertEqual(granted, sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2)
            self.assertGreaterEqual(granted, expected(size))
            self.assertGreater(granted, default)

    def test_media_port_gets_the_option(self):
        directory = os.path.abspath(self.mktemp())
        dev = pki.create_dev_pki(os.path.join(directory, "pki"))
        size = 3 * 1024 * 1024
        config = md_tap.Options()
        config.parseOptions(["--pki", dev.directory, "--tunnel-listen", "tcp:0:interface=127.0.0.1",
                             "--media-port", "0", "--media-interface", "127.0.0.1",
                             "--api", "none", "--udp-receive-buffer", str(size)])
        md = MediaDistributorService.fromOptions(config, reactor)
        md.privilegedStartService()
        md.startService()
        self.addCleanup(md.stopService)
        sock = md.ports["media"].socket
        self.assertGreaterEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2,
                                expected(size))

    def test_option_must_be_positive(self):
        config = md_tap.Options()
        self.assertRaises(usage.UsageError, config.parseOptions,
                          ["--tunnel-listen", "tcp:0", "--udp-receive-buffer", "0"])


class _Closed(protocol.Protocol):
    def __init__(self):
        self.closed = defer.Deferred()

    def connectionLost(self, reason):
        self.closed.callback(None)


class ClosedGateTests(TestCase):
    """A tunnel connecting while the daemon's gate is still closed (it is starting)."""

    @defer.inlineCallbacks
    def test_connection_closed_without_an_error(self):
        dev = pki.create_dev_pki(os.path.join(os.path.abspath(self.mktemp()), "pki"))
        factory = tls_server_factory(TlsCredentials.from_pki_dir(dev.directory, "kd"),
                                     GatedFactory())
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = _Closed()
        yield protocol.ClientCreator(reactor, lambda: client).connectTCP(
            "127.0.0.1", port.getHost().port)
        # Closed by the listener (before the fix: an AttributeError in the
        # reactor, which trial reports, and a connection left open).
        yield client.closed.addTimeout(30, reactor)
