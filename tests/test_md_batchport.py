"""
Batched UDP I/O (perc.mmsg, perc.md.srtpbatch, perc.md.batchport) on real
loopback sockets with real SRTP: the batched port forwards exactly what
Twisted's own port does, partial sends are handled, malformed datagrams in
a batch are dropped and counted.
"""

from __future__ import annotations

import errno
import os
import select
import socket

from twisted.internet import udp
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from perc import mmsg, rtp, wire
from perc.md import batchport, srtpbatch
from perc.md.conference import Memberships
from perc.md.relay import MediaRelay
from perc.profiles import DEFAULT_PROFILES
from tests.test_md_relay import (
    DOUBLE_128,
    TLS_A,
    TLS_B,
    TLS_C,
    FakePool,
    FakeTunnel,
    Peer,
    client_hello,
    hbh_keys,
    server_hello,
)

ANY_SOCKET = ("127.0.0.1", 0)


def udp_socket(family=socket.AF_INET, host="127.0.0.1"):
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


def flip_last(packet: bytes) -> bytes:
    """``packet`` with its last octet (part of the SRTP tag) changed."""
    return packet[:-1] + bytes([packet[-1] ^ 1])


def receive_all(sock, timeout=1.0) -> list:
    """Every datagram ``sock`` gets until nothing more comes for a moment."""
    got = []
    while select.select([sock], [], [], timeout)[0]:
        try:
            while True:
                got.append(sock.recvfrom(65536))
        except BlockingIOError:
            pass
        timeout = 0.05
    return got


class BatchTestCase(SynchronousTestCase):
    def setUp(self):
        if not (mmsg.available() and srtpbatch.available()):
            raise SkipTest("recvmmsg/sendmmsg or in-place SRTP are not available here")

    def socket(self, family=socket.AF_INET, host="127.0.0.1"):
        sock = udp_socket(family, host)
        self.addCleanup(sock.close)
        return sock


class BatchSocketTests(BatchTestCase):
    def test_round_trip_more_than_a_batch(self):
        """Three batches' worth arrive in order, with the sender's address, nothing more."""
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            if family == socket.AF_INET6 and not socket.has_ipv6:
                continue
            a, b = self.socket(family, host), self.socket(family, host)
            sender = mmsg.BatchSocket(a.fileno(), family, batch=8)
            receiver = mmsg.BatchSocket(b.fileno(), family, batch=8)
            messages = [(os.urandom(1 + i * 37), b.getsockname()[:2]) for i in range(20)]
            result = sender.send(messages)
            self.assertEqual((result.sent, result.failed), (20, {}))
            got = []
            select.select([b], [], [], 1.0)
            while True:
                batch = receiver.receive()
                if not batch:
                    break
                self.assertLessEqual(len(batch), 8)
                got.extend(batch)
            self.assertEqual([data for data, _ in got], [data for data, _ in messages])
            self.assertEqual({address for _, address in got}, {a.getsockname()[:2]})

    def test_nothing_waiting(self):
        a = self.socket()
        self.assertEqual(mmsg.BatchSocket(a.fileno(), socket.AF_INET).receive(), [])

    def test_unsendable_messages_skipped_and_counted(self):
        """Too long for a slot (EMSGSIZE), or not a numeric address (EINVAL): the rest goes."""
        a, b = self.socket(), self.socket()
        sender = mmsg.BatchSocket(a.fileno(), socket.AF_INET, send_slot=100)
        to = b.getsockname()
        result = sender.send([(b"1", to), (bytes(101), to), (b"2", ("example.org", 1)),
                              (b"3", to)])
        self.assertEqual((result.sent, result.failed), (2, {errno.EMSGSIZE: 1, errno.EINVAL: 1}))
        self.assertEqual([data for data, _ in receive_all(b)], [b"1", b"3"])

    def limited(self, sender, script):
        """
        ``sender``'s sendmmsg does what ``script`` says per call: a number n
        sends at most n messages for real, an errno fails the call with it.
        """
        real, ffi = sender._sendmmsg, sender._ffi
        calls = []

        def sendmmsg(fd, headers, count, flags):
            step = script[len(calls)] if len(calls) < len(script) else count
            calls.append(count)
            if isinstance(step, tuple):
                ffi.errno = step[0]
                return -1
            return real(fd, headers, min(count, step), flags)

        sender._sendmmsg = sendmmsg
        return calls

    def test_partial_send_then_buffer_full(self):
        """3 sent, then EAGAIN: the 3 arrive, the other 7 are counted, not queued."""
        a, b = self.socket(), self.socket()
        sender = mmsg.BatchSocket(a.fileno(), socket.AF_INET)
        calls = self.limited(sender, [3, (errno.EAGAIN,)])
        messages = [(bytes([i]) * 20, b.getsockname()) for i in range(10)]
        result = sender.send(messages)
        self.assertEqual((result.sent, result.failed), (3, {errno.EAGAIN: 7}))
        self.assertEqual(calls, [10, 7])
        self.assertEqual([data for data, _ in receive_all(b)], [m for m, _ in messages[:3]])
        # The socket is usable again afterwards.
        self.assertEqual(sender.send(messages[:2]).sent, 2)
        self.assertEqual(len(receive_all(b)), 2)

    def test_refused_message_skipped(self):
        """An error other than a full buffer loses that message only."""
        a, b = self.socket(), self.socket()
        sender = mmsg.BatchSocket(a.fileno(), socket.AF_INET)
        calls = self.limited(sender, [2, (errno.EPERM,), (errno.EINTR,)])
        messages = [(bytes([i]) * 20, b.getsockname()) for i in range(6)]
        result = sender.send(messages)
        self.assertEqual((result.sent, result.failed), (5, {errno.EPERM: 1}))
        self.assertEqual(calls, [6, 4, 3, 3])
        self.assertEqual([data for data, _ in receive_all(b)],
                         [m for i, (m, _) in enumerate(messages) if i != 2])

    def test_forced_portable(self):
        os.environ["PERC_UDP_BATCH"] = "0"
        self.addCleanup(os.environ.pop, "PERC_UDP_BATCH")
        self.assertFalse(mmsg.available())


class RelayPathTests(BatchTestCase):
    """The same conference, the same keys and the same datagrams through both ports."""

    def run_relay(self, port_class) -> tuple[dict, dict]:
        """Returns (what each receiver got, the relay's counters)."""
        clock = MemoryReactorClock()
        memberships = Memberships(None)
        tunnel = FakeTunnel()
        relay = MediaRelay(pool=FakePool(tunnel), memberships=memberships,
                           profiles=DEFAULT_PROFILES, clock=clock)
        port = port_class(0, relay, "127.0.0.1", reactor=clock)
        port.startListening()
        self.assertIsInstance(port, port_class)
        to = port.getHost().host, port.getHost().port
        sockets, peers = {}, {}
        for name, tls_id, ekt in (("A", TLS_A, 1), ("B", TLS_B, 1), ("C", TLS_C, None)):
            sock = sockets[name] = udp_socket()
            memberships.put("conf", tls_id)
            sock.sendto(client_hello(tls_id), to)
            self.read(port)
            association_id, _ = tunnel.sent[-1]
            relay.tunneledDtlsReceived(tunnel, association_id, server_hello(ekt))
            keys = self.keys[name]
            relay.mediaKeysReceived(tunnel, wire.MediaKeys(
                association_id, DOUBLE_128, b"", keys["client_key"], keys["server_key"],
                keys["client_salt"], keys["server_salt"]))
            peers[name] = Peer(name, sock.getsockname(), association_id, keys, self.ssrcs[name])
        for sock in sockets.values():
            receive_all(sock, 0.2)  # the server flights
        a, b = peers["A"], peers["B"]
        datagrams = [
            ("A", a.protect(a.rtp(self.payloads[0])) + rtp.SHORT_EKT_FIELD),
            ("A", b"\x80\x60\x00"),                       # malformed RTP
            ("B", b"\xff" * 30),                           # nothing RFC 7983 assigns here
            ("A", a.protect_rtcp(a.rtcp())),
            ("B", flip_last(b.protect(b.rtp(self.payloads[1]))) + rtp.SHORT_EKT_FIELD),
            ("B", b.protect(b.rtp(self.payloads[1])) + rtp.SHORT_EKT_FIELD),
            ("C", b"\x80\xc9\x00"),                       # malformed RTCP
        ] + [("A", a.protect(a.rtp(self.payloads[2])) + rtp.SHORT_EKT_FIELD)
             for _ in range(40)]
        for name, datagram in datagrams:
            sockets[name].sendto(datagram, to)
        self.read(port)
        got = {name: [data for data, source in receive_all(sock)] for name, sock in
               sockets.items()}
        for sock in sockets.values():
            sock.close()
        port.stopListening()
        clock.advance(0)
        relay.stop()
        return got, dict(relay.counters)

    def read(self, port):
        """Let the port read until its socket is empty, as the reactor would."""
        while select.select([port.socket], [], [], 0.5)[0]:
            port.doRead()

    def test_batched_forwards_exactly_what_the_portable_port_does(self):
        self.keys = {name: hbh_keys() for name in "ABC"}
        self.ssrcs = {"A": 0xA, "B": 0xB, "C": 0xC}
        self.payloads = [os.urandom(100) + rtp.EMPTY_OHB for _ in range(3)]
        portable, portable_counters = self.run_relay(udp.Port)
        batched, batched_counters = self.run_relay(batchport.BatchedPort)
        self.assertEqual(batched, portable)
        self.assertEqual(batched_counters, portable_counters)
        # And it is what it should be: A's 41 RTP and 1 RTCP to B (with the
        # EKT field) and C (without), B's RTP to A and C; the bad ones counted.
        self.assertEqual([len(batched[name]) for name in "ABC"], [1, 42, 43])
        self.assertEqual(portable_counters["forwarded-rtp"], 41 * 2 + 2)
        self.assertEqual(portable_counters["dropped-srtp-unprotect-failed"], 1)
        self.assertEqual(portable_counters["dropped-malformed"], 2)
        self.assertEqual(portable_counters["dropped-other"], 1)
        b_peer = Peer("B", None, None, self.keys["B"], 0xB)
        first, report, *media = batched["B"]
        self.assertEqual(b_peer.receiver.unprotect_rtcp(report)[:2], b"\x80\xc8")
        for data, payload in zip([first] + media, self.payloads[:1] + self.payloads[2:] * 40):
            packet, field = rtp.split_ekt_field(data)
            self.assertEqual(field, rtp.SHORT_EKT_FIELD)
            self.assertEqual(b_peer.receiver.unprotect(packet)[12:], payload)


class ListenTests(BatchTestCase):
    def listen(self, protocol, **kwargs):
        from twisted.internet import reactor

        port = batchport.listen_media_udp(reactor, 0, protocol, "127.0.0.1", **kwargs)
        self.addCleanup(port.stopListening)
        return port

    def test_batched_where_available(self):
        relay = MediaRelay(pool=FakePool(None), memberships=Memberships(None),
                           profiles=DEFAULT_PROFILES, clock=MemoryReactorClock())
        self.assertIsInstance(self.listen(relay), batchport.BatchedPort)

    def test_portable_when_forced_or_unsupported(self):
        from twisted.internet.protocol import DatagramProtocol

        relay = MediaRelay(pool=FakePool(None), memberships=Memberships(None),
                           profiles=DEFAULT_PROFILES, clock=MemoryReactorClock())
        os.environ["PERC_UDP_BATCH"] = "0"
        try:
            forced = self.listen(relay)
        finally:
            del os.environ["PERC_UDP_BATCH"]
        self.assertNotIsInstance(forced, batchport.BatchedPort)
        # A protocol that takes datagrams one at a time.
        self.assertNotIsInstance(self.listen(DatagramProtocol()), batchport.BatchedPort)
