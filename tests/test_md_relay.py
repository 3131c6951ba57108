"""
Tests for perc.md.relay: the Media Distributor's endpoint port.

The relay runs on a MemoryReactorClock with a transport that records
``(data, address)`` writes and tunnels that record what they are asked to
send; everything it parses or decrypts is real: ClientHellos come from the
DTLS engine (perc.dtls over OpenSSL), ServerHellos from a real handshake
(re-encoded with extension 39 where EKT is wanted), and SRTP/SRTCP is
protected and checked by the endpoints' own pylibsrtp sessions.
"""

from __future__ import annotations

import functools
import os
import socket
import struct
import uuid

import pylibsrtp
from hypothesis import given, settings, strategies as st
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from perc import dtls, hello, mmsg, rtp, wire
from perc.md import srtpbatch
from perc.md.conference import Memberships
from perc.md.relay import MediaRelay, RelayLimits
from perc.mmsg import BatchSocket
from perc.profiles import DEFAULT_PROFILES, by_id

from tests.test_hello import rewrite, server_flight
from tests.test_rtp import BYE, SDES, feedback, rtcp_part

TLS_A = "endpoint-a-tls-id-0123456789"
TLS_B = "endpoint-b-tls-id-0123456789"
TLS_C = "endpoint-c-tls-id-0123456789"
TLS_D = "endpoint-d-tls-id-0123456789"
TLS_STRANGER = "stranger-tls-id-0123456789"

ADDR_A = ("192.0.2.1", 5001)
ADDR_B = ("192.0.2.2", 5002)
ADDR_C = ("192.0.2.3", 5003)
ADDR_D = ("192.0.2.4", 5004)

DOUBLE_128 = 0x0009
GCM128 = pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM


# --------------------------------------------------------------------------
# Real DTLS hellos


@functools.lru_cache(maxsize=None)
def _credentials():
    return dtls.Credentials.self_signed("endpoint")


@functools.lru_cache(maxsize=None)
def client_hello(tls_id: str | None = TLS_A) -> bytes:
    """A real first ClientHello offering the double profiles, with ``tls_id`` in extension 56."""
    association = dtls.ClientAssociation(
        _credentials(), [by_id(DOUBLE_128)],
        tls_id=None if tls_id is None else tls_id.encode("ascii"))
    datagram = association.start(0.0).datagrams[0]
    parsed = hello.parse_client_hello(datagram)
    assert parsed is not None and parsed.tls_id == (None if tls_id is None else tls_id.encode())
    return datagram


def malformed_tls_id_hello() -> bytes:
    """A ClientHello whose extension 56 holds a 3-character tls-id."""
    def shorten(extensions):
        return [(t, b"\x03abc" if t == 56 else d) for t, d in extensions]

    datagram = rewrite(client_hello(TLS_A), shorten)
    assert hello.parse_client_hello(datagram).tls_id_malformed
    return datagram


def server_hello(ekt_cipher: int | None) -> bytes:
    """A real server flight; with ``ekt_cipher``, its ServerHello also selects that EKT cipher."""
    flight = server_flight()
    if ekt_cipher is not None:
        flight = rewrite(flight, lambda extensions: extensions + [(39, bytes([ekt_cipher]))])
    parsed = hello.parse_server_hello(flight)
    assert parsed.ekt_cipher == ekt_cipher
    return flight


def dtls_application_data(length: int = 40) -> bytes:
    """A DTLS 1.2 record of epoch 1 (not a hello): what an endpoint sends after the handshake."""
    return struct.pack("!BHH", 23, 0xFEFD, 1) + (7).to_bytes(6, "big") \
        + struct.pack("!H", length) + os.urandom(length)


# --------------------------------------------------------------------------
# Fakes around the relay


class RecordingTransport:
    """The relay's UDP transport: records every ``write(data, address)``."""

    def __init__(self):
        self.written: list[tuple[bytes, tuple]] = []

    def write(self, data, address=None):
        assert isinstance(data, bytes), type(data)
        self.written.append((data, address))

    def to(self, address) -> list[bytes]:
        return [data for data, where in self.written if where == address]

    def addresses(self) -> set:
        return {where for _, where in self.written}

    def clear(self):
        del self.written[:]


class FakeTunnel:
    """What the relay uses of a MediaDistributorTunnel, recording every call."""

    def __init__(self, name: str = "kd-1"):
        self.name = name
        self.usable = True
        self.sent: list[tuple[uuid.UUID, bytes]] = []
        self.disconnects: list[uuid.UUID] = []
        self.forgotten: list[uuid.UUID] = []

    def sendDtls(self, association_id, data):
        assert isinstance(association_id, uuid.UUID)
        self.sent.append((association_id, data))
        return True

    def sendDisconnect(self, association_id):
        self.disconnects.append(association_id)
        return True

    def forgetAssociation(self, association_id):
        self.forgotten.append(association_id)

    def peerDescription(self):
        return self.name


class FakePool:
    """``pick()`` returns ``tunnel`` (None: no tunnel is up) and counts the calls."""

    def __init__(self, tunnel):
        self.tunnel = tunnel
        self.picks = 0

    def pick(self):
        self.picks += 1
        return self.tunnel


# --------------------------------------------------------------------------
# Endpoints: their own SRTP sessions, independent of the relay's code


def hbh_keys():
    """Fresh hop-by-hop halves for DOUBLE_AEAD_AES_128_GCM: keys 16, salts 12."""
    return dict(client_key=os.urandom(16), server_key=os.urandom(16),
                client_salt=os.urandom(12), server_salt=os.urandom(12))


def srtp_session(key: bytes, salt: bytes, direction: int) -> pylibsrtp.Session:
    return pylibsrtp.Session(pylibsrtp.Policy(key=key + salt, ssrc_type=direction,
                                              srtp_profile=GCM128))


class Peer:
    """
    One simulated endpoint: it protects with its client key (what the Media
    Distributor's inbound session for it must accept) and unprotects with
    its server key (what the Media Distributor must encrypt to it with).
    """

    def __init__(self, name, address, association_id, keys, ssrc):
        self.name = name
        self.address = address
        self.association_id = association_id
        self.keys = keys
        self.ssrc = ssrc
        self.sequence = 1000
        self.sender = srtp_session(keys["client_key"], keys["client_salt"],
                                   pylibsrtp.Policy.SSRC_ANY_OUTBOUND)
        self.receiver = srtp_session(keys["server_key"], keys["server_salt"],
                                     pylibsrtp.Policy.SSRC_ANY_INBOUND)

    def rtp(self, payload: bytes | None = None) -> bytes:
        """A plain RTP packet whose payload stands for inner ciphertext and tag plus OHB 0x00."""
        self.sequence += 1
        if payload is None:
            payload = os.urandom(60) + rtp.EMPTY_OHB
        return struct.pack("!BBHII", 0x80, 96, self.sequence & 0xFFFF,
                           self.sequence * 960, self.ssrc) + payload

    def rtcp(self) -> bytes:
        """A plain RTCP sender report."""
        self.sequence += 1
        return struct.pack("!BBHIQIII", 0x80, 200, 6, self.ssrc, self.sequence << 32,
                           self.sequence * 960, self.sequence, self.sequence * 100)

    def protect(self, packet: bytes) -> bytes:
        return self.sender.protect(packet)

    def protect_rtcp(self, packet: bytes) -> bytes:
        return self.sender.protect_rtcp(packet)


def roomy(session: pylibsrtp.Session) -> pylibsrtp.Session:
    """
    Give a test endpoint's session a bigger work buffer than pylibsrtp's
    1500 octets, so that it can build packets the relay's sessions cannot
    re-protect (pylibsrtp has no option for this).
    """
    session._cdata = pylibsrtp._binding.ffi.new("char[]", 9000)
    session._buffer = pylibsrtp._binding.ffi.buffer(session._cdata)
    return session


class RelayTestCase(SynchronousTestCase):
    """A relay on a fake clock, transport and tunnel pool; double profiles offered."""

    limits = RelayLimits()
    default_conference = None

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.memberships = Memberships(self.default_conference)
        self.tunnel = FakeTunnel()
        self.pool = FakePool(self.tunnel)
        self.transport = RecordingTransport()
        self.relay = MediaRelay(pool=self.pool, memberships=self.memberships,
                                profiles=DEFAULT_PROFILES, clock=self.clock, limits=self.limits)
        self.relay.makeConnection(self.transport)
        self.addCleanup(self.stop)
        self._ssrc = 0x1000

    def stop(self):
        self.relay.doStop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    # -- helpers ----------------------------------------------------------

    def counted(self, name: str) -> int:
        return self.relay.counters.get(name, 0)

    def total_counted(self) -> int:
        return sum(self.relay.counters.values())

    def open(self, address, tls_id: str | None = TLS_A, conference: str | None = "conf",
             tunnel=None) -> uuid.UUID:
        """
        Register ``tls_id`` in ``conference`` (unless None) and send its
        ClientHello from ``address``; returns the new association's id.
        """
        if conference is not None and tls_id is not None:
            self.memberships.put(conference, tls_id)
        tunnel = tunnel or self.tunnel
        before = len(tunnel.sent)
        datagram = client_hello(tls_id)
        self.relay.datagramReceived(datagram, address)
        self.assertEqual(len(tunnel.sent), before + 1, self.relay.counters)
        association_id, data = tunnel.sent[-1]
        self.assertEqual(data, datagram)
        return association_id

    def media_keys(self, association_id, keys=None, profile=DOUBLE_128, mki=b""):
        keys = keys if keys is not None else hbh_keys()
        return wire.MediaKeys(association_id, profile, mki, keys["client_key"],
                              keys["server_key"], keys["client_salt"], keys["server_salt"])

    def key(self, association_id, address, name="peer", keys=None, tunnel=None) -> Peer:
        keys = keys if keys is not None else hbh_keys()
        self.relay.mediaKeysReceived(tunnel or self.tunnel, self.media_keys(association_id, keys))
        endpoint = self.relay.endpoint(association_id)
        self.assertIsNotNone(endpoint)
        self.assertTrue(endpoint.established)
        self._ssrc += 0x111
        return Peer(name, address, association_id, keys, self._ssrc)

    def join(self, name, address, tls_id, conference="conf", tunnel=None) -> Peer:
        """An endpoint with a keyed association in ``conference``."""
        association_id = self.open(address, tls_id, conference, tunnel=tunnel)
        return self.key(association_id, address, name, tunnel=tunnel)

    def send(self, peer: Peer, datagram: bytes, address=None) -> list:
        """Deliver ``datagram`` from ``peer`` (or ``address``); returns the writes it caused."""
        self.transport.clear()
        self.relay.datagramReceived(datagram, peer.address if address is None else address)
        written = list(self.transport.written)
        self.transport.clear()
        return written


# --------------------------------------------------------------------------


class ClassificationTests(RelayTestCase):
    def test_drops_counted_per_reason(self):
        datagrams = [
            (b"", "dropped-other"),
            (b"\x05" + os.urandom(30), "dropped-other"),
            (b"\x7f" + os.urandom(30), "dropped-other"),
            (b"\xc0" + os.urandom(30), "dropped-other"),
            (b"\xff" * 20, "dropped-other"),
            (b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12), "dropped-stun"),
            (b"\x03" + os.urandom(19), "dropped-stun"),
            (b"\x10" + os.urandom(40), "dropped-zrtp"),
            (b"\x40\x00\x00\x04abcd", "dropped-turn_channel"),
            (b"\x80\x60" + os.urandom(9), "dropped-malformed"),       # RTP shorter than a header
            (b"\x80", "dropped-malformed"),
            (b"\x80\xc8\x00\x06", "dropped-malformed"),               # RTCP under 8 octets
            # An RTP header extension longer than the datagram.
            (b"\x90\x60" + bytes(10) + b"\x00\x01\x00\x05", "dropped-malformed"),
            (b"\x16\xfe\xfd" + os.urandom(4), "dropped-malformed-hello"),
            (dtls_application_data(), "dropped-dtls-no-association"),
            (b"\x80\x60" + os.urandom(40), "dropped-srtp-unknown-source"),
            (b"\x80\xc9" + os.urandom(40), "dropped-srtp-unknown-source"),
        ]
        expected = {}
        for index, (datagram, reason) in enumerate(datagrams):
            self.relay.datagramReceived(datagram, ("198.51.100.7", 4000 + index))
            expected[reason] = expected.get(reason, 0) + 1
            self.assertEqual(self.relay.counters, expected, datagram)
        self.assertEqual(self.transport.written, [])
        self.assertEqual(self.tunnel.sent, [])
        self.assertEqual(self.relay.status()["associations"], 0)

    def test_rtcp_of_every_length_from_unknown_source(self):
        self.join("A", ADDR_A, TLS_A)
        self.join("B", ADDR_B, TLS_B)
        template = b"\x80\xc8" + bytes(range(256)) * 6
        for length in range(0, 1501):
            self.relay.datagramReceived(template[:length], ("198.51.100.9", 9999))
        self.assertEqual(self.relay.counters, {
            "dropped-other": 1,                   # the empty datagram
            "dropped-malformed": 7,               # 1 to 7 octets
            "dropped-srtp-unknown-source": 1493,  # 8 to 1500 octets
        })
        self.assertEqual(self.transport.written, [])

    def test_garbage_of_every_length_from_keyed_endpoint(self):
        """
        Bytes that look like RTP or RTCP but are not SRTP from the keyed
        endpoint's own address, up to what the UDP port reads (8192): nothing
        raises, each is counted once, nothing is forwarded.
        """
        a = self.join("A", ADDR_A, TLS_A)
        self.join("B", ADDR_B, TLS_B)
        lengths = list(range(0, 1601)) + [2000, 4096, 8192]
        for first, second in ((0x80, 0x60), (0x80, 0xc8)):
            before = self.total_counted()
            for length in lengths:
                datagram = (bytes([first, second]) + os.urandom(length))[:length]
                self.relay.datagramReceived(datagram, a.address)
            self.assertEqual(self.total_counted() - before, len(lengths))
        self.assertEqual(self.transport.written, [])
        self.assertEqual(self.counted("forwarded-rtp") + self.counted("forwarded-rtcp"), 0)

    @settings(max_examples=300, deadline=None)
    @given(datagram=st.one_of(st.binary(max_size=100), st.binary(min_size=1400, max_size=2000)),
           from_keyed=st.booleans())
    def test_random_datagrams(self, datagram, from_keyed):
        """Any datagram from anywhere is either counted once or tunnelled once, never forwarded."""
        # trial runs setUp once for all of hypothesis's examples.
        if not hasattr(self, "keyed"):
            self.keyed = (self.join("A", ADDR_A, TLS_A), self.join("B", ADDR_B, TLS_B))
        self.transport.clear()
        counted, sent = self.total_counted(), len(self.tunnel.sent)
        address = ADDR_A if from_keyed else ("198.51.100.1", 1234)
        self.relay.datagramReceived(datagram, address)
        self.assertEqual((self.total_counted() - counted) + (len(self.tunnel.sent) - sent), 1)
        self.assertEqual(self.transport.written, [])


class NewAssociationTests(RelayTestCase):
    def test_client_hello_creates_association(self):
        self.memberships.put("other", TLS_B)
        association_id = self.open(ADDR_A, TLS_A, "conf")
        endpoint = self.relay.endpoint(association_id)
        self.assertEqual(endpoint.conference, "conf")
        self.assertEqual(endpoint.tls_id, TLS_A)
        self.assertEqual(endpoint.address, ADDR_A)
        self.assertIs(endpoint.tunnel, self.tunnel)
        self.assertFalse(endpoint.established)
        self.assertEqual(association_id.version, 4)
        self.assertEqual(self.pool.picks, 1)
        self.assertEqual(self.relay.status()["associations"], 1)
        self.assertEqual(self.relay.status()["established"], 0)

        # The rest of the handshake from that address (the retransmitted or
        # cookie-bearing ClientHello, later flights) uses the same association.
        self.relay.datagramReceived(client_hello(TLS_A), ADDR_A)
        later = dtls_application_data()
        self.relay.datagramReceived(later, ADDR_A)
        self.assertEqual(self.tunnel.sent[1:], [(association_id, client_hello(TLS_A)),
                                                (association_id, later)])
        self.assertEqual(self.pool.picks, 1)
        self.assertEqual(self.relay.status()["associations"], 1)
        self.assertEqual(self.relay.counters, {})
        self.assertEqual(self.transport.written, [])

    def test_each_address_gets_its_own_association(self):
        a = self.open(ADDR_A, TLS_A, "conf")
        b = self.open(ADDR_B, TLS_B, "other")
        self.assertNotEqual(a, b)
        self.assertEqual(self.relay.endpoint(a).conference, "conf")
        self.assertEqual(self.relay.endpoint(b).conference, "other")

    def test_no_conference_no_default_refused(self):
        self.memberships.put("conf", TLS_B)
        for datagram in (client_hello(TLS_A), client_hello(None)):
            self.relay.datagramReceived(datagram, ADDR_A)
        self.assertEqual(self.relay.counters, {"refused-no-conference": 2})
        self.assertEqual(self.tunnel.sent, [])
        self.assertEqual(self.relay.status()["associations"], 0)
        self.assertEqual(self.pool.picks, 0)

    def test_no_tunnel_refused(self):
        self.memberships.put("conf", TLS_A)
        self.pool.tunnel = None
        self.relay.datagramReceived(client_hello(TLS_A), ADDR_A)
        self.assertEqual(self.relay.counters, {"refused-no-tunnel": 1})
        self.assertEqual(self.relay.status()["associations"], 0)
        # Once a tunnel is up, the endpoint's retransmission gets through.
        self.pool.tunnel = self.tunnel
        self.relay.datagramReceived(client_hello(TLS_A), ADDR_A)
        self.assertEqual(len(self.tunnel.sent), 1)
        self.assertEqual(self.relay.status()["associations"], 1)

    def test_rate_limit_per_address(self):
        limit = self.limits.new_associations_per_address_per_second
        self.memberships.put("conf", TLS_A)
        for port in range(limit):
            self.relay.datagramReceived(client_hello(TLS_A), ("203.0.113.5", 6000 + port))
        self.assertEqual(len(self.tunnel.sent), limit)
        self.relay.datagramReceived(client_hello(TLS_A), ("203.0.113.5", 7000))
        self.assertEqual(self.counted("refused-rate-limit"), 1)
        self.assertEqual(len(self.tunnel.sent), limit)
        self.assertEqual(self.relay.status()["associations"], limit)
        # Another address is not affected.
        self.relay.datagramReceived(client_hello(TLS_A), ("203.0.113.6", 7000))
        self.assertEqual(len(self.tunnel.sent), limit + 1)
        # Just before the sweep the limit still holds; after it, it is reset.
        self.clock.advance(self.limits.sweep_interval * 0.99)
        self.relay.datagramReceived(client_hello(TLS_A), ("203.0.113.5", 7001))
        self.assertEqual(self.counted("refused-rate-limit"), 2)
        self.clock.advance(self.limits.sweep_interval * 0.01)
        self.relay.datagramReceived(client_hello(TLS_A), ("203.0.113.5", 7002))
        self.assertEqual(len(self.tunnel.sent), limit + 2)
        self.assertEqual(self.counted("refused-rate-limit"), 2)


class AssociationLimitTests(RelayTestCase):
    limits = RelayLimits(max_associations=3, new_associations_per_address_per_second=100)

    def answered(self, association_id):
        """The Key Distributor answers past the cookie exchange (it keeps state now)."""
        self.relay.tunneledDtlsReceived(self.tunnel, association_id, server_hello(None))

    def test_total_association_limit(self):
        ids = [self.open(("192.0.2.{}".format(n), 5000), TLS_A) for n in range(3)]
        self.key(ids[0], ("192.0.2.0", 5000))  # keyed ones count as well as pending ones
        for association_id in ids[1:]:
            self.answered(association_id)
        self.relay.datagramReceived(client_hello(TLS_A), ("192.0.2.9", 5000))
        self.assertEqual(self.counted("refused-association-limit"), 1)
        self.assertEqual(len(self.tunnel.sent), 3)
        self.assertEqual(self.relay.status()["associations"], 3)
        # An association ending makes room for one more.
        self.relay.endpointDisconnectReceived(self.tunnel, ids[0])
        self.open(("192.0.2.9", 5000), TLS_A)
        self.assertEqual(self.relay.status()["associations"], 3)

    def test_full_table_evicts_oldest_cookieless_handshake(self):
        """
        At the limit, a new ClientHello evicts the oldest association the Key
        Distributor answered only with a HelloVerifyRequest (it keeps nothing
        for those), silently: a flood cannot lock legitimate endpoints out.
        """
        ids = [self.open(("192.0.2.{}".format(n), 5000), TLS_A) for n in range(3)]
        hvr = bytes.fromhex("16feff0000000000000000001f") + b"\x03" + bytes(30)
        self.relay.tunneledDtlsReceived(self.tunnel, ids[0], hvr)  # still unverified
        self.answered(ids[1])
        newest = self.open(("192.0.2.9", 5000), TLS_A)
        self.assertIsNone(self.relay.endpoint(ids[0]))
        self.assertEqual(self.counted("evicted-unverified"), 1)
        self.assertEqual(self.counted("refused-association-limit"), 0)
        self.assertEqual(self.tunnel.disconnects, [])  # the Key Distributor holds nothing
        self.assertIn(ids[0], self.tunnel.forgotten)
        # Next the other cookieless one; never the one past its cookie exchange.
        self.open(("192.0.2.10", 5000), TLS_A)
        self.assertIsNone(self.relay.endpoint(ids[2]))
        self.answered(newest)
        self.relay.datagramReceived(client_hello(TLS_A), ("192.0.2.11", 5000))
        self.assertIsNotNone(self.relay.endpoint(ids[1]))
        self.assertIsNotNone(self.relay.endpoint(newest))
        self.assertEqual(self.counted("evicted-unverified"), 3)
        self.assertEqual(self.relay.status()["associations"], 3)
        # Evictions are logged as one count at the sweep.
        self.clock.advance(self.limits.sweep_interval)
        self.assertEqual(self.relay._evicted_since_sweep, 0)


class TunnelMessageTests(RelayTestCase):
    def test_tunneled_dtls_reaches_endpoint(self):
        a = self.open(ADDR_A, TLS_A)
        b = self.open(ADDR_B, TLS_B)
        flight = server_hello(None)
        self.relay.tunneledDtlsReceived(self.tunnel, b, flight)
        self.relay.tunneledDtlsReceived(self.tunnel, a, b"\x16reply-to-a")
        self.assertEqual(self.transport.written, [(flight, ADDR_B), (b"\x16reply-to-a", ADDR_A)])
        # Also once keyed (the Key Distributor's last flight, the EKTKey record).
        self.key(a, ADDR_A)
        self.transport.clear()
        self.relay.tunneledDtlsReceived(self.tunnel, a, b"\x17after-keys")
        self.assertEqual(self.transport.written, [(b"\x17after-keys", ADDR_A)])
        self.assertEqual(self.relay.counters, {})

    def test_dtls_from_keyed_endpoint_goes_to_its_association(self):
        a = self.join("A", ADDR_A, TLS_A)
        record = dtls_application_data()
        self.relay.datagramReceived(record, ADDR_A)
        self.assertEqual(self.tunnel.sent[-1], (a.association_id, record))

    def test_unknown_association_counted(self):
        self.open(ADDR_A, TLS_A)
        stranger = uuid.uuid4()
        self.relay.tunneledDtlsReceived(self.tunnel, stranger, b"\x16abc")
        self.relay.mediaKeysReceived(self.tunnel, self.media_keys(stranger))
        self.relay.endpointDisconnectReceived(self.tunnel, stranger)
        self.assertEqual(self.relay.counters, {"tunnel-unknown-association": 3})
        self.assertEqual(self.transport.written, [])
        self.assertEqual(self.tunnel.disconnects, [])
        self.assertEqual(self.relay.status()["associations"], 1)

    def test_other_tunnel_cannot_steer_association(self):
        association_id = self.open(ADDR_A, TLS_A)
        other = FakeTunnel("kd-2")
        self.relay.tunneledDtlsReceived(other, association_id, b"\x16abc")
        self.relay.mediaKeysReceived(other, self.media_keys(association_id))
        self.relay.endpointDisconnectReceived(other, association_id)
        self.assertEqual(self.relay.counters, {"tunnel-foreign-association": 3})
        self.assertEqual(self.transport.written, [])
        endpoint = self.relay.endpoint(association_id)
        self.assertIsNotNone(endpoint)
        self.assertFalse(endpoint.established)

    def test_endpoint_disconnect_from_key_distributor(self):
        a = self.join("A", ADDR_A, TLS_A)
        b = self.join("B", ADDR_B, TLS_B)
        pending = self.open(ADDR_C, TLS_C)
        self.relay.endpointDisconnectReceived(self.tunnel, a.association_id)
        self.relay.endpointDisconnectReceived(self.tunnel, pending)
        self.assertIsNone(self.relay.endpoint(a.association_id))
        self.assertIsNone(self.relay.endpoint(pending))
        self.assertEqual(self.tunnel.disconnects, [])  # never echoed back
        self.assertEqual(set(self.tunnel.forgotten), {a.association_id, pending})
        self.assertEqual(self.send(a, a.protect(a.rtp())), [])
        self.assertEqual(self.counted("dropped-srtp-unknown-source"), 1)
        self.assertEqual(self.relay.status()["established"], 1)
        self.assertIsNotNone(self.relay.endpoint(b.association_id))


class MediaKeysTests(RelayTestCase):
    limits = RelayLimits(new_associations_per_address_per_second=1000)

    def assertRefused(self, message_for):
        association_id = self.open(ADDR_A, TLS_A)
        before = self.counted("media-keys-refused")
        self.relay.mediaKeysReceived(self.tunnel, message_for(association_id))
        self.assertIsNone(self.relay.endpoint(association_id))
        self.assertEqual(self.tunnel.disconnects[-1:], [association_id])
        self.assertIn(association_id, self.tunnel.forgotten)
        self.assertEqual(self.counted("media-keys-refused"), before + 1)
        self.assertEqual(self.relay.status()["associations"], 0)
        self.assertEqual(self.relay.status()["established"], 0)
        # Nothing from its address is taken for media.
        before = self.counted("dropped-srtp-unknown-source")
        self.relay.datagramReceived(b"\x80\x60" + os.urandom(40), ADDR_A)
        self.assertEqual(self.counted("dropped-srtp-unknown-source"), before + 1)

    def test_wrong_lengths(self):
        good = hbh_keys()
        for name, length in (("client_key", 15), ("client_key", 32), ("server_key", 17),
                             ("server_key", 32), ("client_salt", 14), ("client_salt", 24),
                             ("server_salt", 11), ("server_salt", 1)):
            keys = dict(good, **{name: os.urandom(length)})
            self.assertRefused(lambda aid: self.media_keys(aid, keys))
        # The whole double-profile key (both halves) is not what MediaKeys carries.
        whole = dict(client_key=os.urandom(32), server_key=os.urandom(32),
                     client_salt=os.urandom(24), server_salt=os.urandom(24))
        self.assertRefused(lambda aid: self.media_keys(aid, whole))

    def test_unknown_or_unoffered_profile(self):
        # 0x0007 has the lengths of 0x0009's outer half, but was not offered.
        for profile in (0x0000, 0x0003, 0x1234, 0xFFFF, 0x0001, 0x0007):
            self.assertRefused(lambda aid: self.media_keys(aid, profile=profile))

    def test_mki(self):
        for mki in (b"\x00", b"\x01", os.urandom(255)):
            self.assertRefused(lambda aid: self.media_keys(aid, mki=mki))

    def test_second_media_keys(self):
        association_id = self.open(ADDR_A, TLS_A)
        self.relay.mediaKeysReceived(self.tunnel, self.media_keys(association_id))
        self.assertTrue(self.relay.endpoint(association_id).established)
        self.relay.mediaKeysReceived(self.tunnel, self.media_keys(association_id))
        self.assertIsNone(self.relay.endpoint(association_id))
        self.assertEqual(self.tunnel.disconnects, [association_id])

    def test_valid_keys(self):
        association_id = self.open(ADDR_A, TLS_A)
        self.clock.advance(0.5)
        self.relay.mediaKeysReceived(self.tunnel, self.media_keys(association_id))
        endpoint = self.relay.endpoint(association_id)
        self.assertTrue(endpoint.established)
        self.assertEqual(endpoint.profile, by_id(DOUBLE_128))
        self.assertEqual(self.relay.status(), {
            "associations": 1, "established": 1, "waiting_messages": 0,
            "conferences": {"conf": 1}, "counters": {}})
        self.assertEqual(self.tunnel.disconnects, [])

    def test_256_profile(self):
        association_id = self.open(ADDR_A, TLS_A)
        keys = dict(client_key=os.urandom(32), server_key=os.urandom(32),
                    client_salt=os.urandom(12), server_salt=os.urandom(12))
        self.relay.mediaKeysReceived(self.tunnel, self.media_keys(association_id, keys, 0x000A))
        self.assertTrue(self.relay.endpoint(association_id).established)


# --------------------------------------------------------------------------


class ForwardingTests(RelayTestCase):
    def setUp(self):
        super().setUp()
        self.a = self.join("A", ADDR_A, TLS_A)
        self.b = self.join("B", ADDR_B, TLS_B)
        self.c = self.join("C", ADDR_C, TLS_C)
        self.d = self.join("D", ADDR_D, TLS_D, conference="other")
        self.peers = (self.a, self.b, self.c, self.d)
        self.transport.clear()

    def assertDelivered(self, written, plain, receivers, rtcp=False):
        self.assertEqual(sorted(address for _, address in written),
                         sorted(peer.address for peer in receivers))
        for peer in receivers:
            (data,) = [d for d, address in written if address == peer.address]
            self.assertNotEqual(data, plain)
            if rtcp:
                self.assertEqual(peer.receiver.unprotect_rtcp(data), plain)
            else:
                self.assertEqual(peer.receiver.unprotect(data), plain)

    def test_rtp_reaches_the_others_only(self):
        for sender, receivers in ((self.a, (self.b, self.c)), (self.b, (self.a, self.c)),
                                  (self.c, (self.a, self.b)), (self.a, (self.b, self.c))):
            plain = sender.rtp()
            written = self.send(sender, sender.protect(plain))
            self.assertDelivered(written, plain, receivers)
        self.assertEqual(self.counted("forwarded-rtp"), 8)

    def test_each_receiver_gets_its_own_encryption(self):
        plain = self.a.rtp()
        written = {address: data for data, address in self.send(self.a, self.a.protect(plain))}
        self.assertNotEqual(written[ADDR_B], written[ADDR_C])
        # C cannot decrypt B's copy.
        self.assertRaises(pylibsrtp.Error, self.c.receiver.unprotect, written[ADDR_B])

    def test_rtcp_reaches_the_others_only(self):
        for sender, receivers in ((self.a, (self.b, self.c)), (self.c, (self.a, self.b))):
            plain = sender.rtcp()
            written = self.send(sender, sender.protect_rtcp(plain))
            self.assertDelivered(written, plain, receivers, rtcp=True)
        self.assertEqual(self.counted("forwarded-rtcp"), 4)

    def test_other_conference_isolated(self):
        plain = self.d.rtp()
        self.assertEqual(self.send(self.d, self.d.protect(plain)), [])
        self.assertEqual(self.counted("forwarded-rtp"), 0)
        # Accepted, with no one to send it to.
        self.assertEqual(self.counted("dropped-srtp-unprotect-failed"), 0)
        written = self.send(self.a, self.a.protect(self.a.rtp()))
        self.assertNotIn(ADDR_D, {address for _, address in written})
        written = self.send(self.a, self.a.protect_rtcp(self.a.rtcp()))
        self.assertNotIn(ADDR_D, {address for _, address in written})
        self.assertEqual(len(written), 2)

    def test_flipped_bit_not_forwarded(self):
        plain = self.a.rtp()
        protected = self.a.protect(plain)
        for position in (1, 5, 11, 12, 30, len(protected) - 17, len(protected) - 1):
            for bit in (0x01, 0x80):
                damaged = bytearray(protected)
                damaged[position] ^= bit
                if rtp.classify(bytes(damaged)) is not rtp.Kind.RTP:
                    continue
                before = self.counted("dropped-srtp-unprotect-failed")
                self.assertEqual(self.send(self.a, bytes(damaged)), [])
                self.assertEqual(self.counted("dropped-srtp-unprotect-failed"), before + 1)
        self.assertEqual(self.send(self.a, protected[:-1]), [])
        self.assertEqual(self.send(self.a, protected + b"\x00"), [])
        # The genuine packet still goes through afterwards.
        self.assertDelivered(self.send(self.a, protected), plain, (self.b, self.c))

        plain = self.a.rtcp()
        protected = self.a.protect_rtcp(plain)
        damaged = bytearray(protected)
        damaged[9] ^= 0x04
        before = self.counted("dropped-srtp-unprotect-failed")
        self.assertEqual(self.send(self.a, bytes(damaged)), [])
        self.assertEqual(self.counted("dropped-srtp-unprotect-failed"), before + 1)
        self.assertDelivered(self.send(self.a, protected), plain, (self.b, self.c), rtcp=True)

    def test_replay_not_forwarded(self):
        protected = self.a.protect(self.a.rtp())
        self.assertEqual(len(self.send(self.a, protected)), 2)
        self.assertEqual(self.send(self.a, protected), [])
        self.assertEqual(self.counted("dropped-srtp-unprotect-failed"), 1)
        protected = self.a.protect_rtcp(self.a.rtcp())
        self.assertEqual(len(self.send(self.a, protected)), 2)
        self.assertEqual(self.send(self.a, protected), [])
        self.assertEqual(self.counted("dropped-srtp-unprotect-failed"), 2)
        # Out of order but new is fine.
        first, second = self.a.rtp(), self.a.rtp()
        late, early = self.a.protect(first), self.a.protect(second)
        self.assertDelivered(self.send(self.a, early), second, (self.b, self.c))
        self.assertDelivered(self.send(self.a, late), first, (self.b, self.c))

    def test_wrong_source_not_forwarded(self):
        protected = self.a.protect(self.a.rtp())
        # From B's address: B's inbound keys do not fit.
        self.assertEqual(self.send(self.a, protected, address=ADDR_B), [])
        self.assertEqual(self.counted("dropped-srtp-unprotect-failed"), 1)
        # From an address with no association.
        self.assertEqual(self.send(self.a, protected, address=("192.0.2.1", 5999)), [])
        self.assertEqual(self.counted("dropped-srtp-unknown-source"), 1)
        # Encrypted with A's *receiving* key (what the relay sends A): refused too.
        outbound_to_a = srtp_session(self.a.keys["server_key"], self.a.keys["server_salt"],
                                     pylibsrtp.Policy.SSRC_ANY_OUTBOUND)
        self.assertEqual(self.send(self.a, outbound_to_a.protect(self.a.rtp())), [])
        self.assertEqual(self.counted("dropped-srtp-unprotect-failed"), 2)

    def test_pending_address_gets_and_sends_nothing(self):
        pending = ("192.0.2.50", 5050)
        self.open(pending, TLS_STRANGER)
        written = self.send(self.a, self.a.protect(self.a.rtp()))
        self.assertNotIn(pending, {address for _, address in written})
        self.relay.datagramReceived(self.a.protect(self.a.rtp()), pending)
        self.assertEqual(self.counted("dropped-srtp-unknown-source"), 1)

    def test_largest_packets(self):
        """
        pylibsrtp re-protects at most 1500 - 144 octets (its buffer less the
        largest trailer): a packet up to that is forwarded; a larger one, or
        a datagram over 1500 octets (the UDP port reads up to 8192), is
        dropped and counted, never raised out of datagramReceived.
        """
        header, tag = 12, 16
        biggest = 1500 - 144
        roomy(self.a.sender)
        plain = self.a.rtp(os.urandom(biggest - header))
        self.assertDelivered(self.send(self.a, self.a.protect(plain)), plain, (self.b, self.c))
        for size in (biggest + 1, 1400, 1500 - tag):
            plain = self.a.rtp(os.urandom(size - header))
            protected = self.a.protect(plain)
            self.assertLessEqual(len(protected), 1500)
            before = self.total_counted()
            written = self.send(self.a, protected)
            if written:
                self.assertDelivered(written, plain, (self.b, self.c))
            else:
                self.assertGreater(self.total_counted(), before)
        for size in (1501, 1600, 8192):
            before = self.total_counted()
            self.assertEqual(self.send(self.a, b"\x80\x60" + os.urandom(size - 2)), [])
            self.assertEqual(self.send(self.a, b"\x80\xc8" + os.urandom(size - 2)), [])
            self.assertEqual(self.total_counted(), before + 2)
            big = self.a.protect(self.a.rtp(os.urandom(size - header - tag)))
            self.assertEqual(self.send(self.a, big), [])
            self.assertEqual(self.total_counted(), before + 3)
        # The endpoint is still served normally.
        plain = self.a.rtp()
        self.assertDelivered(self.send(self.a, self.a.protect(plain)), plain, (self.b, self.c))

    def test_status(self):
        self.assertEqual(self.relay.status()["conferences"], {"conf": 3, "other": 1})
        self.assertEqual(self.relay.status()["established"], 4)


class EktTests(RelayTestCase):
    def join_with_hello(self, name, address, tls_id, ekt_cipher):
        association_id = self.open(address, tls_id)
        flight = server_hello(ekt_cipher)
        self.relay.tunneledDtlsReceived(self.tunnel, association_id, flight)
        self.assertEqual(self.transport.to(address), [flight])
        self.transport.clear()
        return self.key(association_id, address, name)

    def setUp(self):
        super().setUp()
        self.a = self.join_with_hello("A", ADDR_A, TLS_A, 1)
        self.b = self.join_with_hello("B", ADDR_B, TLS_B, 1)
        self.c = self.join_with_hello("C", ADDR_C, TLS_C, None)

    def assertForwardedWithField(self, sender, ekt_field, receivers):
        plain = sender.rtp()
        written = self.send(sender, sender.protect(plain) + ekt_field)
        self.assertEqual(sorted(address for _, address in written),
                         sorted(peer.address for peer in receivers))
        for peer in receivers:
            (data,) = [d for d, address in written if address == peer.address]
            # C negotiated no EKT: it gets the SRTP packet alone, which its
            # session authenticates as it stands.
            if ekt_field and peer is not self.c:
                packet, field = rtp.split_ekt_field(data)
                self.assertEqual(field, ekt_field)
            else:
                packet = data
            self.assertEqual(peer.receiver.unprotect(packet), plain)

    def test_receiver_without_ekt_gets_no_field(self):
        field = rtp.full_ekt_field(os.urandom(24), spi=1, epoch=0)
        plain = self.a.rtp()
        written = dict((address, data) for data, address in
                       self.send(self.a, self.a.protect(plain) + field))
        self.assertEqual(self.c.receiver.unprotect(written[ADDR_C]), plain)
        self.assertTrue(written[ADDR_B].endswith(field))
        self.assertEqual(len(written[ADDR_B]), len(written[ADDR_C]) + len(field))

    def test_negotiation_seen_in_server_hello(self):
        self.assertTrue(self.relay.endpoint(self.a.association_id).ekt)
        self.assertFalse(self.relay.endpoint(self.c.association_id).ekt)

    def test_full_ekt_field_passes_unchanged(self):
        for ciphertext in (os.urandom(24), os.urandom(1), os.urandom(264)):
            field = rtp.full_ekt_field(ciphertext, spi=0x1234, epoch=7)
            self.assertForwardedWithField(self.a, field, (self.b, self.c))
        self.assertEqual(self.counted("forwarded-rtp"), 6)

    def test_short_ekt_field_passes_unchanged(self):
        self.assertForwardedWithField(self.a, rtp.SHORT_EKT_FIELD, (self.b, self.c))
        self.assertForwardedWithField(self.b, rtp.SHORT_EKT_FIELD, (self.a, self.c))

    def test_malformed_ekt_field_dropped(self):
        full = rtp.full_ekt_field(os.urandom(24), 1, 1)
        bad_fields = [
            b"",                                   # no field: the tag's last octet is read as one
            b"\x01", b"\x03", b"\xff",             # reserved and extension types
            full[:-3] + b"\x00\x07\x02",           # EKTMsgLength below 8
            full[:-3] + b"\xff\xf0\x02",           # longer than the packet
        ]
        for field in bad_fields:
            packet = self.a.protect(self.a.rtp())
            if not field:
                if packet[-1] in (0x00, 0x02):
                    continue
            before = self.counted("dropped-malformed-ekt")
            self.assertEqual(self.send(self.a, packet + field), [])
            self.assertEqual(self.counted("dropped-malformed-ekt"), before + 1, field)
        # A well-formed field of the wrong length makes the SRTP part fail instead.
        wrong = full[:-3] + struct.pack("!H", len(full) + 1) + b"\x02"
        self.assertEqual(self.send(self.a, self.a.protect(self.a.rtp()) + wrong), [])
        self.assertEqual(self.counted("dropped-srtp-unprotect-failed"), 1)
        self.assertEqual(self.counted("forwarded-rtp"), 0)

    def test_rtcp_has_no_ekt_field(self):
        plain = self.a.rtcp()
        written = self.send(self.a, self.a.protect_rtcp(plain))
        self.assertEqual(len(written), 2)
        for data, address in written:
            peer = self.b if address == ADDR_B else self.c
            self.assertEqual(peer.receiver.unprotect_rtcp(data), plain)

    def test_without_ekt_a_tag_ending_in_zero_is_kept(self):
        """C did not negotiate EKT: a packet ending in 0x00 (or 0x02) is all SRTP."""
        for last in (0x00, 0x02):
            for _ in range(20000):
                plain = self.c.rtp()
                protected = self.c.protect(plain)
                if protected[-1] == last:
                    break
            else:
                self.fail("no tag ended in 0x{:02x}".format(last))
            written = self.send(self.c, protected)
            self.assertEqual(len(written), 2)
            for data, address in written:
                peer = self.a if address == ADDR_A else self.b
                self.assertEqual(peer.receiver.unprotect(data), plain)

    def test_ekt_endpoint_without_field_ending_in_zero(self):
        """
        With EKT negotiated the last octet is always the field's: a packet
        without one whose tag happens to end in 0x00 loses that octet and
        fails authentication.
        """
        for _ in range(20000):
            protected = self.a.protect(self.a.rtp())
            if protected[-1] == 0x00:
                break
        self.assertEqual(self.send(self.a, protected), [])
        self.assertEqual(self.counted("dropped-srtp-unprotect-failed"), 1)


class TimeoutTests(RelayTestCase):
    limits = RelayLimits(endpoint_timeout=10.0, handshake_timeout=5.0, sweep_interval=1.0)

    def test_silent_endpoint_times_out_talking_one_stays(self):
        a = self.join("A", ADDR_A, TLS_A)
        b = self.join("B", ADDR_B, TLS_B)
        c = self.join("C", ADDR_C, TLS_C)
        for _ in range(1, 10):
            self.clock.advance(1)
            self.send(a, a.protect(a.rtp()))
            self.send(c, c.protect_rtcp(c.rtcp()))          # RTCP counts as talking
            self.send(b, b"\x80\x60" + os.urandom(50))      # garbage from B does not
        self.assertIsNotNone(self.relay.endpoint(b.association_id))
        self.assertEqual(self.tunnel.disconnects, [])
        self.clock.advance(1)  # t = 10: B silent for endpoint_timeout
        self.assertIsNone(self.relay.endpoint(b.association_id))
        self.assertEqual(self.tunnel.disconnects, [b.association_id])
        self.assertIn(b.association_id, self.tunnel.forgotten)
        self.assertIsNotNone(self.relay.endpoint(a.association_id))
        self.assertIsNotNone(self.relay.endpoint(c.association_id))
        # B is no longer sent anything, nor accepted from.
        written = self.send(a, a.protect(a.rtp()))
        self.assertEqual([address for _, address in written], [ADDR_C])
        self.assertEqual(self.send(b, b.protect(b.rtp())), [])
        self.assertEqual(self.counted("dropped-srtp-unknown-source"), 1)
        # A falls silent in turn (last heard at t=10).
        self.clock.advance(9)
        self.assertIsNotNone(self.relay.endpoint(a.association_id))
        self.clock.advance(1)
        self.assertIsNone(self.relay.endpoint(a.association_id))
        self.assertEqual(self.tunnel.disconnects[-1], a.association_id)

    def test_handshake_timeout(self):
        pending = self.open(ADDR_A, TLS_A)
        self.clock.advance(1)
        keyed = self.join("B", ADDR_B, TLS_B)
        self.clock.advance(3)
        self.assertIsNotNone(self.relay.endpoint(pending))
        # Handshake traffic does not extend the deadline.
        self.relay.datagramReceived(dtls_application_data(), ADDR_A)
        self.clock.advance(1)  # t = 5
        self.assertIsNone(self.relay.endpoint(pending))
        self.assertEqual(self.tunnel.disconnects, [pending])
        self.assertIsNotNone(self.relay.endpoint(keyed.association_id))
        # The endpoint may start again.
        self.open(ADDR_A, TLS_A)

    def test_sweep_stops_with_protocol(self):
        (call,) = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), self.limits.sweep_interval)
        self.relay.doStop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.relay.doStart()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)


class TunnelDownTests(RelayTestCase):
    def test_pending_dropped_keyed_keep_forwarding(self):
        other = FakeTunnel("kd-2")
        a = self.join("A", ADDR_A, TLS_A)
        b = self.join("B", ADDR_B, TLS_B)
        pending = self.open(ADDR_C, TLS_C)
        self.pool.tunnel = other
        elsewhere = self.open(ADDR_D, TLS_D, tunnel=other)

        self.relay.tunnelDown(self.tunnel, None)

        self.assertIsNone(self.relay.endpoint(pending))
        self.assertEqual(self.tunnel.disconnects, [])
        self.assertIn(pending, self.tunnel.forgotten)
        self.assertIsNotNone(self.relay.endpoint(elsewhere))
        self.assertEqual(other.disconnects, [])
        # Media keeps flowing between the keyed endpoints.
        plain = a.rtp()
        written = self.send(a, a.protect(plain))
        self.assertEqual([address for _, address in written], [ADDR_B])
        self.assertEqual(b.receiver.unprotect(written[0][0]), plain)
        plain = b.rtcp()
        written = self.send(b, b.protect_rtcp(plain))
        self.assertEqual(a.receiver.unprotect_rtcp(written[0][0]), plain)
        # Their DTLS has nowhere to go now; counted.
        self.relay.datagramReceived(dtls_application_data(), ADDR_A)
        self.assertEqual(self.counted("dropped-dtls-tunnel-down"), 1)
        self.assertEqual([aid for aid, _ in self.tunnel.sent].count(a.association_id), 1)
        # C starts over through the other tunnel.
        again = self.open(ADDR_C, TLS_C, tunnel=other)
        self.assertNotEqual(again, pending)

    def test_keyed_without_tunnel_still_time_out(self):
        a = self.join("A", ADDR_A, TLS_A)
        self.relay.tunnelDown(self.tunnel, None)
        self.clock.advance(self.limits.endpoint_timeout)
        self.assertIsNone(self.relay.endpoint(a.association_id))
        self.assertEqual(self.tunnel.disconnects, [])
        self.assertEqual(self.relay.status()["associations"], 0)


class SpoofedHelloTests(RelayTestCase):
    limits = RelayLimits(handshake_timeout=5.0, endpoint_timeout=30.0)

    def test_new_hello_does_not_interrupt_media(self):
        a = self.join("A", ADDR_A, TLS_A)
        b = self.join("B", ADDR_B, TLS_B)
        self.memberships.put("conf", TLS_STRANGER)
        for _ in range(2):  # the spoofed ClientHello and a retransmission of it
            self.relay.datagramReceived(client_hello(TLS_STRANGER), ADDR_A)
        (new_id, _), (again, _) = self.tunnel.sent[-2:]
        self.assertEqual(again, new_id)
        self.assertNotEqual(new_id, a.association_id)
        self.assertEqual(self.relay.status()["associations"], 3)
        # A keeps sending and receiving with its keys.
        for _ in range(3):
            plain = a.rtp()
            written = self.send(a, a.protect(plain))
            self.assertEqual([address for _, address in written], [ADDR_B])
            self.assertEqual(b.receiver.unprotect(written[0][0]), plain)
            plain = b.rtp()
            written = self.send(b, b.protect(plain))
            self.assertEqual([address for _, address in written], [ADDR_A])
            self.assertEqual(a.receiver.unprotect(written[0][0]), plain)
        self.assertEqual(self.tunnel.disconnects, [])
        # A handshake that never finishes leaves A alone.
        self.clock.advance(5)
        self.assertIsNone(self.relay.endpoint(new_id))
        self.assertEqual(self.tunnel.disconnects, [new_id])
        self.send(a, a.protect(a.rtp()))
        self.send(b, b.protect(b.rtp()))
        self.assertIsNotNone(self.relay.endpoint(a.association_id))

    def test_new_association_replaces_old_once_keyed(self):
        a = self.join("A", ADDR_A, TLS_A)
        b = self.join("B", ADDR_B, TLS_B)
        new_id = self.open(ADDR_A, TLS_A)
        self.assertEqual(len(self.send(a, a.protect(a.rtp()))), 1)
        renewed = self.key(new_id, ADDR_A, "A2")
        self.assertIsNone(self.relay.endpoint(a.association_id))
        self.assertEqual(self.tunnel.disconnects, [a.association_id])
        self.assertEqual(self.relay.status()["conferences"], {"conf": 2})
        # Old keys are no longer accepted; the new ones are, both ways.
        self.assertEqual(self.send(a, a.protect(a.rtp())), [])
        plain = renewed.rtp()
        written = self.send(renewed, renewed.protect(plain))
        self.assertEqual(b.receiver.unprotect(written[0][0]), plain)
        plain = b.rtp()
        written = self.send(b, b.protect(plain))
        self.assertEqual([address for _, address in written], [ADDR_A])
        self.assertEqual(renewed.receiver.unprotect(written[0][0]), plain)


class PendingHelloTests(RelayTestCase):
    """ClientHellos from an address whose handshake is under way."""

    def setUp(self):
        super().setUp()
        self.a = self.join("A", ADDR_A, TLS_A)
        self.evil = self.join("E", ADDR_D, TLS_D, conference="evil")
        self.memberships.put("evil", TLS_STRANGER)

    def test_other_tls_id_gets_its_own_association(self):
        """
        A first ClientHello (spoofed, or from an earlier process at the same
        address) does not decide the conference of the endpoint that then
        handshakes from that address.
        """
        first = self.open(ADDR_C, TLS_STRANGER, conference=None)
        self.assertEqual(self.relay.endpoint(first).conference, "evil")
        second = self.open(ADDR_C, TLS_C, "conf")
        self.assertNotEqual(second, first)
        self.assertIsNone(self.relay.endpoint(first))
        self.assertEqual(self.tunnel.disconnects, [first])
        self.assertEqual(self.relay.endpoint(second).conference, "conf")
        # The rest of the handshake follows the new association.
        record = dtls_application_data()
        self.relay.datagramReceived(record, ADDR_C)
        self.assertEqual(self.tunnel.sent[-1], (second, record))
        c = self.key(second, ADDR_C, "C")
        plain = c.rtp()
        written = self.send(c, c.protect(plain))
        self.assertEqual([address for _, address in written], [ADDR_A])
        self.assertEqual(self.a.receiver.unprotect(written[0][0]), plain)
        self.assertEqual(self.send(self.evil, self.evil.protect(self.evil.rtp())), [])

    def test_refused_hello_leaves_handshake_alone(self):
        pending = self.open(ADDR_C, TLS_C, "conf")
        sent = len(self.tunnel.sent)
        self.relay.datagramReceived(malformed_tls_id_hello(), ADDR_C)
        self.relay.datagramReceived(client_hello(TLS_B), ADDR_C)  # in no conference
        self.assertEqual(self.counted("refused-malformed-tls-id"), 1)
        self.assertEqual(self.counted("refused-no-conference"), 1)
        self.assertEqual(len(self.tunnel.sent), sent)
        self.assertEqual(self.tunnel.disconnects, [])
        self.assertEqual(self.relay.endpoint(pending).conference, "conf")
        self.relay.datagramReceived(client_hello(TLS_C), ADDR_C)
        self.assertEqual(self.tunnel.sent[-1], (pending, client_hello(TLS_C)))

    def test_restarted_handshake_gets_a_new_association(self):
        """
        The same endpoint giving up on its handshake and starting again (a
        new first ClientHello: new random, no cookie) gets a new association;
        the ClientHello that returns the cookie stays in the first one.
        """
        self.memberships.put("conf", TLS_C)
        client = dtls.ClientAssociation(_credentials(), [by_id(DOUBLE_128)],
                                        tls_id=TLS_C.encode("ascii"))
        first = client.start(0.0).datagrams[0]
        self.relay.datagramReceived(first, ADDR_C)
        pending, _ = self.tunnel.sent[-1]
        listener = dtls.ServerListener(_credentials(), [by_id(DOUBLE_128)])
        [verify_request], _ = listener.listen(pending.bytes, first, 0.0)
        [with_cookie] = client.receive(verify_request, 0.0).datagrams
        self.assertFalse(hello.parse_client_hello(with_cookie).cookie_empty)
        self.relay.datagramReceived(with_cookie, ADDR_C)
        self.relay.datagramReceived(first, ADDR_C)  # a late retransmission
        self.assertEqual(self.tunnel.sent[-2:], [(pending, with_cookie), (pending, first)])
        self.assertEqual(self.tunnel.disconnects, [])
        # Timed out; a new handshake from the same address and tls-id.
        again = client_hello(TLS_C)
        self.relay.datagramReceived(again, ADDR_C)
        restarted, data = self.tunnel.sent[-1]
        self.assertEqual(data, again)
        self.assertNotEqual(restarted, pending)
        self.assertIsNone(self.relay.endpoint(pending))
        self.assertEqual(self.tunnel.disconnects, [pending])
        self.assertEqual(self.relay.endpoint(restarted).conference, "conf")

    def test_malformed_dtls_from_pending_address_dropped(self):
        """
        Broken record framing (truncated, or a length past the datagram) from
        an address mid-handshake is no handshake: dropped and counted, not
        tunnelled, and the handshake goes on.
        """
        pending = self.open(ADDR_C, TLS_C, "conf")
        sent = len(self.tunnel.sent)
        first = client_hello(TLS_C)
        record = dtls_application_data()
        broken = [first[:n] for n in range(1, len(first))] + [
            record[:-1], record[:12], record[:11] + b"\xff\xff" + record[13:],
            record + record[:20]]
        for datagram in broken:
            self.relay.datagramReceived(datagram, ADDR_C)
        self.assertEqual(len(self.tunnel.sent), sent)
        self.assertEqual(self.counted("dropped-malformed-hello"), len(broken))
        self.assertEqual(self.tunnel.disconnects, [])
        self.relay.datagramReceived(record, ADDR_C)
        self.assertEqual(self.tunnel.sent[-1], (pending, record))


class MembershipRemovalTests(RelayTestCase):
    def test_delete_ends_associations(self):
        a = self.join("A", ADDR_A, TLS_A)
        b = self.join("B", ADDR_B, TLS_B)
        c = self.join("C", ADDR_C, TLS_C)
        pending = self.open(("192.0.2.1", 6001), TLS_A)
        self.assertTrue(self.memberships.delete("conf", TLS_A))
        self.assertIsNone(self.relay.endpoint(a.association_id))
        self.assertIsNone(self.relay.endpoint(pending))
        self.assertEqual(sorted(self.tunnel.disconnects), sorted([a.association_id, pending]))
        self.assertEqual(self.send(a, a.protect(a.rtp())), [])
        written = self.send(b, b.protect(b.rtp()))
        self.assertEqual([address for _, address in written], [ADDR_C])
        self.assertIsNotNone(self.relay.endpoint(c.association_id))
        # A fresh ClientHello with that tls-id is now refused.
        self.relay.datagramReceived(client_hello(TLS_A), ("192.0.2.1", 6002))
        self.assertEqual(self.counted("refused-no-conference"), 1)

    def test_delete_elsewhere_or_other_tls_id_changes_nothing(self):
        a = self.join("A", ADDR_A, TLS_A)
        self.memberships.put("conf", TLS_B)
        self.assertFalse(self.memberships.delete("other", TLS_A))
        self.assertTrue(self.memberships.delete("conf", TLS_B))
        self.assertIsNotNone(self.relay.endpoint(a.association_id))
        self.assertEqual(self.tunnel.disconnects, [])

    def test_moving_to_another_conference_ends_associations(self):
        a = self.join("A", ADDR_A, TLS_A)
        self.assertFalse(self.memberships.put("conf", TLS_A))   # same place: nothing happens
        self.assertIsNotNone(self.relay.endpoint(a.association_id))
        self.assertFalse(self.memberships.put("other", TLS_A))
        self.assertIsNone(self.relay.endpoint(a.association_id))
        self.assertEqual(self.tunnel.disconnects, [a.association_id])
        self.assertEqual(self.relay.endpoint(self.open(ADDR_A, TLS_A, None)).conference, "other")


class DefaultConferenceTests(RelayTestCase):
    default_conference = "lobby"

    def test_unregistered_and_absent_tls_id_go_to_default(self):
        unregistered = self.open(ADDR_A, TLS_STRANGER, conference=None)
        absent = self.open(ADDR_B, None, conference=None)
        registered = self.open(ADDR_C, TLS_C, "conf")
        self.assertEqual(self.relay.endpoint(unregistered).conference, "lobby")
        self.assertEqual(self.relay.endpoint(absent).conference, "lobby")
        self.assertIsNone(self.relay.endpoint(absent).tls_id)
        self.assertEqual(self.relay.endpoint(registered).conference, "conf")

    def test_malformed_tls_id_refused_even_with_default(self):
        self.relay.datagramReceived(malformed_tls_id_hello(), ADDR_A)
        self.assertEqual(self.relay.counters, {"refused-malformed-tls-id": 1})
        self.assertEqual(self.relay.status()["associations"], 0)


class StopTests(RelayTestCase):
    def test_stop_forgets_everything_silently(self):
        self.join("A", ADDR_A, TLS_A)
        self.open(ADDR_B, TLS_B)
        self.relay.stop()
        self.assertEqual(self.relay.status()["associations"], 0)
        self.assertEqual(self.relay.status()["conferences"], {})
        self.assertEqual(self.tunnel.disconnects, [])
        self.assertEqual(len(self.tunnel.forgotten), 2)


class FragmentedClientHelloTests(RelayTestCase):
    def test_placed_once_whole_and_forwarded_whole(self):
        from tests.test_hello import fragmented_client_hello
        first, second = fragmented_client_hello()
        self.memberships.put("conf", "F" * 255)
        self.relay.datagramReceived(first, ADDR_A)
        self.assertEqual(self.tunnel.sent, [])
        self.relay.datagramReceived(second, ADDR_A)
        [(association_id, data)] = self.tunnel.sent
        self.assertEqual(hello.parse_client_hello(data).tls_id, b"F" * 255)
        self.assertEqual(self.relay.endpoint(association_id).tls_id, "F" * 255)
        self.assertEqual(self.counted("hello-reassembled"), 1)

    def test_refused_pieces_counted(self):
        from tests.test_hello import fragmented_client_hello
        first, second = fragmented_client_hello()
        self.memberships.put("conf", "F" * 255)
        self.relay.datagramReceived(first, ADDR_A)
        self.relay.datagramReceived(first[:-1] + bytes([first[-1] ^ 1]), ADDR_A)
        self.relay.datagramReceived(second, ADDR_A)
        self.assertEqual(self.tunnel.sent, [])
        self.assertEqual(self.counted("hello-fragments-inconsistent"), 1)


class IdentifiedTunnel(FakeTunnel):
    """A tunnel to a Key Distributor with a certificate identity, counting its associations."""

    def __init__(self, name: str, identity: str = "kd.test"):
        super().__init__(name)
        self.identity = identity
        self.associations: set = set()

    def sendDtls(self, association_id, data):
        self.associations.add(association_id)
        return super().sendDtls(association_id, data)

    def forgetAssociation(self, association_id):
        self.associations.discard(association_id)
        super().forgetAssociation(association_id)


class IdentityPool(FakePool):
    """``current(identity)``: the newest usable tunnel in ``up`` with that identity."""

    def __init__(self, tunnel):
        super().__init__(tunnel)
        self.up = [tunnel]

    def current(self, identity):
        for tunnel in reversed(self.up):
            if tunnel.identity == identity and tunnel.usable:
                return tunnel
        return None


class PeerIdentityTests(RelayTestCase):
    """
    Associations belong to the Key Distributor's certificate identity
    (issue 13): they survive a tunnel loss, move to its next tunnel, and
    what the Media Distributor has to tell it meanwhile waits.
    """

    limits = RelayLimits(waiting_max_messages=2)

    def setUp(self):
        super().setUp()
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.tunnel = IdentifiedTunnel("kd-1")
        self.pool = IdentityPool(self.tunnel)
        self.relay.pool = self.pool

    def logged(self, prefix):
        return [e for e in self.events if e.get("log_format", "").startswith(prefix)]

    def lose(self, tunnel):
        tunnel.usable = False
        self.pool.up.remove(tunnel)
        self.relay.tunnelDown(tunnel, "reset")

    def reconnect(self, name="kd-1-again", identity="kd.test"):
        tunnel = IdentifiedTunnel(name, identity)
        self.pool.up.append(tunnel)
        self.pool.tunnel = tunnel
        self.relay.tunnelUp(tunnel)
        return tunnel

    def test_keyed_and_handshaking_move_to_the_new_tunnel(self):
        a = self.join("A", ADDR_A, TLS_A)
        pending = self.open(ADDR_C, TLS_C)
        self.lose(self.tunnel)
        self.assertIsNotNone(self.relay.endpoint(pending))
        self.assertEqual(self.tunnel.associations, set())
        # The keyed endpoint's DTLS waits for the next tunnel.
        record = dtls_application_data()
        self.relay.datagramReceived(record, ADDR_A)
        self.assertEqual(self.counted("dropped-dtls-tunnel-down"), 0)
        new = self.reconnect()
        self.assertEqual(new.sent, [(a.association_id, record)])
        self.assertEqual(new.associations, {a.association_id, pending})
        # The Key Distributor answers the handshake through the new tunnel.
        flight = server_hello(None)
        self.relay.tunneledDtlsReceived(new, pending, flight)
        self.assertEqual(self.transport.to(ADDR_C), [flight])
        self.relay.mediaKeysReceived(new, self.media_keys(pending))
        self.assertTrue(self.relay.endpoint(pending).established)

    def test_another_tunnel_of_the_identity_coming_up_takes_nothing_carried(self):
        # A second Key Distributor with the same certificate: its own tunnel.
        a = self.join("A", ADDR_A, TLS_A)
        second = self.reconnect("kd-2")
        self.assertIs(self.relay.endpoint(a.association_id).tunnel, self.tunnel)
        self.assertEqual(second.associations, set())
        record = dtls_application_data()
        self.relay.datagramReceived(record, ADDR_A)
        self.assertEqual(second.sent, [])
        self.assertEqual(self.tunnel.sent[-1], (a.association_id, record))
        # Its own tunnel lost: at once through the other.
        self.lose(self.tunnel)
        self.assertEqual(second.associations, {a.association_id})
        self.relay.datagramReceived(record, ADDR_A)
        self.assertEqual(second.sent, [(a.association_id, record)])

    def test_sweep_disconnect_waits_for_the_key_distributor(self):
        a = self.join("A", ADDR_A, TLS_A)
        self.lose(self.tunnel)
        self.clock.advance(self.limits.endpoint_timeout + self.limits.sweep_interval)
        self.assertIsNone(self.relay.endpoint(a.association_id))
        self.assertEqual(self.tunnel.disconnects, [])
        new = self.reconnect()
        self.assertEqual(new.disconnects, [a.association_id])
        self.assertEqual(self.relay.status()["waiting_messages"], 0)

    def test_waiting_bounded_and_given_up_in_time(self):
        a = self.join("A", ADDR_A, TLS_A)
        self.lose(self.tunnel)
        for _ in range(3):
            self.relay.datagramReceived(dtls_application_data(), ADDR_A)
        self.assertEqual(self.counted("dropped-waiting-full"), 1)
        self.assertEqual(len(self.logged("Dropping tunnel messages for")), 1)
        self.clock.advance(self.limits.waiting_seconds)
        self.assertEqual(self.counted("dropped-waited-too-long"), 2)
        self.assertEqual(len(self.logged("Dropped {count} tunnel messages that waited")), 1)
        new = self.reconnect()
        self.assertEqual(new.sent, [])
        self.assertIsNotNone(self.relay.endpoint(a.association_id))

    def test_another_identity_cannot_steer(self):
        a = self.join("A", ADDR_A, TLS_A)
        self.lose(self.tunnel)
        other = self.reconnect("kd-2", identity="kd-other.test")
        self.relay.tunneledDtlsReceived(other, a.association_id, b"\x16abc")
        self.relay.endpointDisconnectReceived(other, a.association_id)
        self.assertEqual(self.counted("tunnel-foreign-association"), 2)
        self.assertIsNotNone(self.relay.endpoint(a.association_id))
        self.assertIsNone(self.relay.endpoint(a.association_id).tunnel)
        self.assertEqual(other.associations, set())

    def test_unknown_association_answered_with_disconnect(self):
        stranger = uuid.uuid4()
        self.relay.tunneledDtlsReceived(self.tunnel, stranger, b"\x16abc")
        self.relay.endpointDisconnectReceived(self.tunnel, stranger)
        self.assertEqual(self.tunnel.disconnects, [stranger])
        self.assertEqual(self.counted("tunnel-unknown-association"), 2)

    def test_stop_tells_nothing_but_disconnect_all_tells_the_key_distributor(self):
        a = self.join("A", ADDR_A, TLS_A)
        self.relay.disconnectAll("stopping")
        self.assertEqual(self.tunnel.disconnects, [a.association_id])
        self.assertEqual(self.relay.status()["associations"], 0)


# --------------------------------------------------------------------------
# RTCP routing (issue 16 item 4)


class RtcpRoutingTests(RelayTestCase):
    """
    Feedback reaches only the member that sends the media SSRC it names;
    everything else goes to every other member; the relay learns who sends
    an SSRC from authenticated SRTP only.  Real SRTCP both ways: what each
    receiver gets is unprotected with its own session.
    """

    def setUp(self):
        super().setUp()
        self.a = self.join("A", ADDR_A, TLS_A)
        self.b = self.join("B", ADDR_B, TLS_B)
        self.c = self.join("C", ADDR_C, TLS_C)
        self.d = self.join("D", ADDR_D, TLS_D, conference="other")
        self.transport.clear()

    def media(self, peer: Peer, ssrc: int | None = None) -> list:
        """``peer`` sends one authenticated SRTP packet with ``ssrc`` (its own by default)."""
        plain = peer.rtp()
        if ssrc is not None:
            plain = plain[:8] + struct.pack("!I", ssrc) + plain[12:]
        return self.send(peer, peer.protect(plain))

    def rtcp(self, sender: Peer, plain: bytes) -> dict:
        """``sender`` sends ``plain`` as SRTCP; returns {receiver name: what it decrypts}."""
        peers = {peer.address: peer for peer in (self.a, self.b, self.c, self.d)}
        received = {}
        for data, address in self.send(sender, sender.protect_rtcp(plain)):
            peer = peers[address]
            self.assertNotIn(peer.name, received)
            received[peer.name] = peer.receiver.unprotect_rtcp(data)
        return received

    def pli(self, sender: Peer, media_ssrc: int) -> bytes:
        return feedback(206, 1, sender.ssrc, media_ssrc)

    def test_pli_reaches_the_sender_of_the_media_only(self):
        self.media(self.a)
        self.media(self.c)
        pli = self.pli(self.b, self.a.ssrc)
        self.assertEqual(self.rtcp(self.b, pli), {"A": pli})
        pli = self.pli(self.a, self.c.ssrc)
        self.assertEqual(self.rtcp(self.a, pli), {"C": pli})
        self.assertEqual(self.counted("forwarded-rtcp"), 2)

    def test_reports_reach_every_other_member(self):
        self.media(self.a)
        sr = self.b.rtcp()
        self.assertEqual(self.rtcp(self.b, sr), {"A": sr, "C": sr})
        rr = rtcp_part(201, 1, struct.pack("!I", self.c.ssrc) + struct.pack(
            "!IIIIII", self.a.ssrc, 0, 1000, 0, 0, 0))
        for plain in (rr, rr + SDES, sr + SDES + BYE, rtcp_part(204, 0, b"\0\0\0\1name")):
            self.assertEqual(self.rtcp(self.c, plain), {"A": plain, "B": plain})

    def test_nack_and_fir_routed_by_media_ssrc(self):
        self.media(self.a)
        self.media(self.c)
        nack = feedback(205, 1, self.b.ssrc, self.c.ssrc, struct.pack("!HH", 7, 0))
        self.assertEqual(self.rtcp(self.b, nack), {"C": nack})
        # FIR names its media in the FCI (RFC 5104): one entry, or one per sender.
        fir = feedback(206, 4, self.b.ssrc, 0, struct.pack("!IB3x", self.a.ssrc, 1))
        self.assertEqual(self.rtcp(self.b, fir), {"A": fir})
        fir = feedback(206, 4, self.b.ssrc, 0, struct.pack("!IB3x", self.a.ssrc, 2)
                       + struct.pack("!IB3x", self.c.ssrc, 2))
        self.assertEqual(self.rtcp(self.b, fir), {"A": fir, "C": fir})

    def test_feedback_that_cannot_be_placed_is_counted(self):
        self.media(self.a)
        self.media(self.d)  # another conference
        for media_ssrc in (0x0BADC0DE, self.d.ssrc, self.b.ssrc):
            self.assertEqual(self.rtcp(self.b, self.pli(self.b, media_ssrc)), {})
        # Feedback about its own media goes nowhere either.
        self.assertEqual(self.rtcp(self.a, self.pli(self.a, self.a.ssrc)), {})
        self.assertEqual(self.relay.status()["counters"]["dropped-rtcp-feedback-unknown-media-ssrc"], 4)
        self.assertEqual(self.counted("forwarded-rtcp"), 0)

    def test_compound_split_by_destination(self):
        """
        Each receiver gets the packets of the compound meant for it, in
        order, in one SRTCP packet: the target of the feedback all of it,
        the others the reports alone.
        """
        self.media(self.a)
        sr = self.b.rtcp()
        pli = self.pli(self.b, self.a.ssrc)
        self.assertEqual(self.rtcp(self.b, sr + SDES + pli), {"A": sr + SDES + pli, "C": sr + SDES})
        self.assertEqual(self.rtcp(self.b, sr + pli + BYE), {"A": sr + pli + BYE, "C": sr + BYE})
        unknown = self.pli(self.b, 0x0BADC0DE)
        self.assertEqual(self.rtcp(self.b, sr + unknown), {"A": sr, "C": sr})
        self.assertEqual(self.counted("dropped-rtcp-feedback-unknown-media-ssrc"), 1)

    def test_malformed_compound_dropped_and_counted(self):
        self.media(self.a)
        sr = self.b.rtcp()
        for plain in (sr + b"\x80\xc9", sr[:4] + sr[4:] + b"\0\0\0\0",
                      sr + rtcp_part(206, 1, struct.pack("!I", self.b.ssrc)),
                      sr + b"\x40" + SDES[1:]):
            self.assertEqual(self.rtcp(self.b, plain), {})
        self.assertEqual(self.counted("dropped-rtcp-malformed"), 4)
        # The endpoint is still served.
        self.assertEqual(self.rtcp(self.b, sr), {"A": sr, "C": sr})

    def test_rtcp_does_not_claim_an_ssrc(self):
        taken = 0x5EC2E7
        # B says, in RTCP, that it sends `taken`: an SR from it, feedback about it.
        sr = struct.pack("!BBHIQIII", 0x80, 200, 6, taken, 1 << 32, 0, 1, 1)
        self.assertEqual(self.rtcp(self.b, sr), {"A": sr, "C": sr})
        self.assertEqual(self.rtcp(self.c, self.pli(self.c, taken)), {})
        # A sends media with it: A's from now, whatever B says afterwards.
        self.media(self.a, taken)
        self.assertEqual(self.rtcp(self.b, sr), {"A": sr, "C": sr})
        pli = self.pli(self.c, taken)
        self.assertEqual(self.rtcp(self.c, pli), {"A": pli})

    def test_unauthenticated_srtp_does_not_claim_an_ssrc(self):
        self.media(self.a)
        fresh = 0x0F0E5
        for ssrc in (self.a.ssrc, fresh):
            plain = self.b.rtp()
            plain = plain[:8] + struct.pack("!I", ssrc) + plain[12:]
            # Protected with keys the relay does not hold for B, and with a flipped tag bit.
            stranger = srtp_session(os.urandom(16), os.urandom(12),
                                    pylibsrtp.Policy.SSRC_ANY_OUTBOUND)
            damaged = bytearray(self.b.protect(plain))
            damaged[-1] ^= 1
            for datagram in (stranger.protect(plain), bytes(damaged)):
                self.assertEqual(self.send(self.b, datagram), [])
        self.assertEqual(self.counted("dropped-srtp-unprotect-failed"), 4)
        pli = self.pli(self.c, self.a.ssrc)
        self.assertEqual(self.rtcp(self.c, pli), {"A": pli})
        self.assertEqual(self.rtcp(self.c, self.pli(self.c, fresh)), {})
        # Authenticated media from B with A's SSRC is forwarded, but A keeps it.
        self.assertEqual(len(self.media(self.b, self.a.ssrc)), 2)
        self.assertEqual(self.counted("ssrc-sent-by-another-member"), 1)
        self.assertEqual(self.rtcp(self.c, pli), {"A": pli})

    def test_same_ssrc_in_two_conferences(self):
        self.media(self.a, 0x1234)
        self.media(self.d, 0x1234)
        self.assertEqual(self.counted("ssrc-sent-by-another-member"), 0)
        pli = self.pli(self.b, 0x1234)
        self.assertEqual(self.rtcp(self.b, pli), {"A": pli})

    def test_leaving_forgets_its_ssrcs(self):
        self.media(self.a, 0x1111)
        self.media(self.a, 0x2222)
        self.assertTrue(self.memberships.delete("conf", TLS_A))
        for ssrc in (0x1111, 0x2222):
            self.assertEqual(self.rtcp(self.b, self.pli(self.b, ssrc)), {})
        # Another member may send that SSRC now.
        self.media(self.c, 0x1111)
        pli = self.pli(self.b, 0x1111)
        self.assertEqual(self.rtcp(self.b, pli), {"C": pli})
        self.assertEqual(self.counted("ssrc-sent-by-another-member"), 0)
        # Timing out forgets too, and so does shutting down.
        self.clock.advance(self.limits.endpoint_timeout)
        self.assertIsNone(self.relay.endpoint(self.c.association_id))
        self.assertEqual(self.relay._ssrc_owners, {})
        self.assertEqual(self.relay._ssrc_total, 0)


class RtcpTableBoundTests(RelayTestCase):
    limits = RelayLimits(max_ssrcs_per_endpoint=3, max_ssrcs=5)

    def test_bounded_per_endpoint_and_in_all(self):
        a = self.join("A", ADDR_A, TLS_A)
        b = self.join("B", ADDR_B, TLS_B)
        c = self.join("C", ADDR_C, TLS_C)

        def placed(ssrc):
            written = self.send(c, c.protect_rtcp(feedback(206, 1, c.ssrc, ssrc)))
            return [address for _, address in written]

        def media(peer, ssrc):
            plain = peer.rtp()
            self.send(peer, peer.protect(plain[:8] + struct.pack("!I", ssrc) + plain[12:]))

        for ssrc in (0xA1, 0xA2, 0xA3, 0xA4):
            media(a, ssrc)
        # A's oldest made room for its newest.
        self.assertEqual(self.counted("ssrc-forgotten-endpoint-limit"), 1)
        self.assertEqual(placed(0xA1), [])
        self.assertEqual([placed(s) for s in (0xA2, 0xA3, 0xA4)], [[ADDR_A]] * 3)
        for ssrc in (0xB1, 0xB2, 0xB3):
            media(b, ssrc)
        # Five in all: B's third is not learnt (and counted per packet).
        self.assertEqual(self.counted("ssrc-not-learnt-table-full"), 1)
        self.assertEqual([placed(s) for s in (0xB1, 0xB2, 0xB3)], [[ADDR_B], [ADDR_B], []])
        self.assertEqual(self.relay._ssrc_total, 5)
        # A leaving makes room.
        self.relay.disconnect(TLS_A, "test")
        self.assertEqual(self.relay._ssrc_total, 2)
        media(b, 0xB3)
        self.assertEqual(placed(0xB3), [ADDR_B])


# --------------------------------------------------------------------------
# Every test above again, through the batched path


class RecordingBatchSocket(BatchSocket):
    """
    A real BatchSocket (its slots filled and protected in place by the
    relay's SrtpSendBatch) whose ``sendmmsg`` is replaced by recording each
    queued datagram, read back from its slot, into ``transport``: the test
    addresses are not ours to send to.
    """

    def __init__(self, transport: RecordingTransport):
        self._unused = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        super().__init__(self._unused.fileno(), socket.AF_INET, batch=8,
                         send_slot=8192 + srtpbatch.SLOT_EXTRA)
        self.transport = transport

    def send_queued(self, count, result):
        addresses = {name: address for address, name in self.names.items()}
        for index in range(count):
            start = index * self.send_slot
            self.transport.written.append(
                (bytes(self.send_view[start:start + self.send_lengths[index]]),
                 addresses[self.send_names[index]]))
        result.sent += count
        return True

    def close(self):
        self._unused.close()


class BatchedRelayMixin:
    """
    The relay gets each datagram as a batch of one (``datagramsReceived``)
    and queues what it forwards in an SrtpSendBatch (8 slots, so that the
    largest fan-outs fill them more than once).
    """

    def setUp(self):
        super().setUp()
        sock = RecordingBatchSocket(self.transport)
        self.addCleanup(sock.close)
        self.transport.srtpBatch = srtpbatch.SrtpSendBatch(sock)
        self.relay.datagramReceived = lambda data, address: self.relay.datagramsReceived(
            [(data, address)])


class BatchErrorTests(BatchedRelayMixin, RelayTestCase):
    def test_error_in_one_datagram_does_not_lose_the_batch(self):
        """It is logged as Twisted's port logs it; the rest of the batch is forwarded."""
        a = self.join("A", ADDR_A, TLS_A)
        b = self.join("B", ADDR_B, TLS_B)

        def broken(association_id, data):
            raise RuntimeError("the tunnel broke")

        self.tunnel.sendDtls = broken
        self.memberships.put("conf", TLS_C)
        self.transport.clear()
        plains = [a.rtp(), a.rtp()]
        self.relay.datagramsReceived([(a.protect(plains[0]), ADDR_A),
                                      (client_hello(TLS_C), ADDR_C),
                                      (a.protect(plains[1]), ADDR_A)])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual([b.receiver.unprotect(data) for data in self.transport.to(ADDR_B)],
                         plains)


def _skip_hypothesis(self):
    raise SkipTest("a hypothesis test runs on the portable path only")


if mmsg.available() and srtpbatch.available():
    for _name, _case in list(globals().items()):
        if (isinstance(_case, type) and issubclass(_case, RelayTestCase)
                and _case is not RelayTestCase and not issubclass(_case, BatchedRelayMixin)):
            # Hypothesis refuses one test method run by two classes: those
            # stay on the portable path (test_md_batchport covers batches).
            _skips = {attribute: _skip_hypothesis for attribute in dir(_case)
                      if attribute.startswith("test_")
                      and hasattr(getattr(_case, attribute), "hypothesis")}
            globals()["Batched" + _name] = type("Batched" + _name, (BatchedRelayMixin, _case),
                                               dict(_skips, __module__=__name__))
    del _name, _case, _skips
