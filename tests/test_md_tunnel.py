"""
The Media Distributor's side of the tunnel: protocol rules with
StringTransport and MemoryReactorClock, reconnection through ClientService
with a hand-driven endpoint, the pool, and real TLS over loopback.
"""

from __future__ import annotations

import json
import os
import uuid

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, globalLogPublisher
from twisted.trial.unittest import TestCase

from perc import pki, wire
from perc.md.tunnel import (
    ITunnelEvents,
    ITunnelOwner,
    MediaDistributorTunnel,
    MediaDistributorTunnelFactory,
    TunnelManager,
    TunnelPool,
)
from perc.netutil import tls_client_endpoint, tls_server_factory
from perc.tls import TlsCredentials

from tests import tlshelpers
from tests.mdtunnelhelpers import (
    ClosingTransport,
    FakeTlsTransport,
    ManualEndpoint,
    RecordingOwner,
    RecordingServerFactory,
    connect,
    split_messages,
)
from tests.waits import eventually

PROFILES = (0x0009, 0x000A)
HELLO = wire.SupportedProfiles(0, PROFILES).encode()
A1 = uuid.UUID("6f1c2b1e-0d5b-4c1f-9a57-3f8e0a1b2c3d")
A2 = uuid.UUID("0b7e5c9a-2f4d-4e8b-8c1a-9d2e3f4a5b6c")
KEYS = wire.MediaKeys(A1, 0x0009, b"", b"k" * 16, b"K" * 16, b"s" * 12, b"S" * 12)


def retry_policy(attempt: int) -> float:
    """Deterministic backoff: 2, 4, 8, ... seconds."""
    return 2.0 ** attempt


class TunnelTestCase(TestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.owner = RecordingOwner()

    def tunnel(self, transport_class=ClosingTransport, owner=None, **kwargs):
        """A connected tunnel; its log events are in ``tunnel.logged``."""
        tunnel = MediaDistributorTunnel(owner or self.owner, PROFILES, clock=self.clock, **kwargs)
        tunnel.logged = []
        tunnel.log = Logger(observer=tunnel.logged.append)
        connect(tunnel, transport_class(self.clock))
        return tunnel

    def protocolErrors(self, tunnel) -> list:
        return [event for event in tunnel.logged
                if event["log_format"].startswith("Closing tunnel with")]


class FirstMessageTests(TunnelTestCase):
    def test_supported_profiles_is_the_first_thing_written(self):
        tunnel = self.tunnel()
        # The test vector of draft -05 and RFC 9185.
        self.assertEqual(tunnel.transport.value(), bytes.fromhex("0100070000040009000A"))
        self.assertEqual(HELLO, bytes.fromhex("0100070000040009000A"))

    def test_configured_profiles(self):
        tunnel = MediaDistributorTunnel(self.owner, (0x0001, 0x0007, 0x0009), clock=self.clock)
        transport = connect(tunnel, ClosingTransport(self.clock))
        self.assertEqual(split_messages(transport.value()),
                         [wire.SupportedProfiles(0, (0x0001, 0x0007, 0x0009))])

    def test_profile_objects_accepted(self):
        from perc.profiles import by_id
        tunnel = MediaDistributorTunnel(self.owner, [by_id(0x000A)], clock=self.clock)
        transport = connect(tunnel, ClosingTransport(self.clock))
        self.assertEqual(split_messages(transport.value()), [wire.SupportedProfiles(0, (0x000A,))])

    def test_empty_profile_list_refused_at_construction(self):
        self.assertRaises(wire.WireError, MediaDistributorTunnel, self.owner, (), clock=self.clock)

    def test_up_at_once_on_a_plain_transport(self):
        tunnel = self.tunnel()
        self.assertEqual(self.owner.names(), ["tunnelUp"])
        self.assertTrue(tunnel.up)
        self.assertEqual(tunnel.connectedSince, self.clock.seconds())


class UnsupportedVersionTests(TunnelTestCase):
    def assertVersionRejected(self, tunnel, version):
        self.assertEqual(self.owner.of("versionRejected"), [(tunnel, version)])
        self.assertEqual(tunnel.rejectedVersion, version)
        self.assertTrue(tunnel.transport.disconnecting)
        self.assertFalse(tunnel.transport.aborted)
        self.assertEqual(self.protocolErrors(tunnel), [])
        # Only the 4 octets were examined: nothing else reached the owner.
        self.assertEqual(self.owner.names(), ["tunnelUp", "versionRejected"])

    def test_followed_by_garbage(self):
        tunnel = self.tunnel()
        tunnel.dataReceived(wire.UnsupportedVersion(3).encode() + b"\xff\x00\x10garbage" * 5)
        self.assertVersionRejected(tunnel, 3)
        self.clock.advance(0)
        self.assertEqual(self.owner.of("tunnelDown"),
                         [(tunnel, "Key Distributor answered UnsupportedVersion(3)")])

    def test_split_across_two_reads(self):
        tunnel = self.tunnel()
        tunnel.dataReceived(b"\x02\x00")
        self.assertFalse(tunnel.transport.disconnecting)
        self.assertEqual(self.owner.of("versionRejected"), [])
        tunnel.dataReceived(b"\x01\x03")
        self.assertVersionRejected(tunnel, 3)

    def test_one_octet_at_a_time(self):
        tunnel = self.tunnel()
        for octet in b"\x02\x00\x01\x09":
            self.assertEqual(self.owner.of("versionRejected"), [])
            tunnel.dataReceived(bytes([octet]))
        self.assertVersionRejected(tunnel, 9)

    def test_newer_format_with_a_longer_body(self):
        # A body of 300 octets that never arrives: only the first 4 count.
        tunnel = self.tunnel()
        tunnel.dataReceived(b"\x02\x01\x2c\x07" + b"\x01\x02")
        self.assertVersionRejected(tunnel, 7)

    def test_empty_body_is_a_protocol_error(self):
        tunnel = self.tunnel()
        tunnel.dataReceived(b"\x02\x00\x00\x05")
        self.assertEqual(self.owner.of("versionRejected"), [])
        self.assertTrue(tunnel.transport.disconnecting)
        self.assertEqual(len(self.protocolErrors(tunnel)), 1)

    def test_only_valid_as_first_message(self):
        tunnel = self.tunnel()
        tunnel.dataReceived(wire.TunneledDtls(A1, b"\x16").encode()
                            + wire.UnsupportedVersion(3).encode())
        self.assertEqual(self.owner.of("versionRejected"), [])
        self.assertEqual(len(self.protocolErrors(tunnel)), 1)
        self.assertIn("UnsupportedVersion", tunnel.closeReason)
        self.assertTrue(tunnel.transport.disconnecting)


class MessageRuleTests(TunnelTestCase):
    def test_messages_delivered_to_owner(self):
        tunnel = self.tunnel()
        tunnel.sendDtls(A1, b"\x16hello")
        tunnel.dataReceived(KEYS.encode() + wire.TunneledDtls(A1, b"\x16\xfe\xfd").encode()
                            + wire.EndpointDisconnect(A1).encode())
        self.assertEqual(self.owner.events[1:], [
            ("mediaKeysReceived", tunnel, KEYS),
            ("tunneledDtlsReceived", tunnel, A1, b"\x16\xfe\xfd"),
            ("endpointDisconnectReceived", tunnel, A1),
        ])
        self.assertEqual(tunnel.associations, set())
        self.assertFalse(tunnel.transport.disconnecting)
        self.assertEqual(tunnel.messagesReceived,
                         {"MediaKeys": 1, "TunneledDtls": 1, "EndpointDisconnect": 1})

    def test_supported_profiles_from_key_distributor_is_a_protocol_error(self):
        tunnel = self.tunnel()
        tunnel.dataReceived(wire.SupportedProfiles(0, PROFILES).encode() + KEYS.encode())
        self.assertTrue(tunnel.transport.disconnecting)
        self.assertEqual(len(self.protocolErrors(tunnel)), 1)
        self.assertIn("SupportedProfiles is never sent by a Key Distributor", tunnel.closeReason)
        self.assertEqual(self.owner.names(), ["tunnelUp"])  # MediaKeys after it not delivered

    def test_supported_profiles_later_is_a_protocol_error(self):
        tunnel = self.tunnel()
        tunnel.dataReceived(KEYS.encode() + wire.SupportedProfiles(0, PROFILES).encode())
        self.assertTrue(tunnel.transport.disconnecting)
        self.assertEqual(self.owner.names(), ["tunnelUp", "mediaKeysReceived"])

    def test_reserved_first_type_is_a_protocol_error(self):
        tunnel = self.tunnel()
        tunnel.dataReceived(b"\x06\x00\x01\x00")
        self.assertTrue(tunnel.transport.disconnecting)
        self.assertIn("0x06", tunnel.closeReason)

    def test_decoding_error_closes_only_that_tunnel(self):
        broken = self.tunnel()
        healthy = self.tunnel()
        # MediaKeys whose body ends inside the association id.
        broken.dataReceived(b"\x03\x00\x04abcd")
        healthy.dataReceived(KEYS.encode())
        self.assertTrue(broken.transport.disconnecting)
        self.assertFalse(healthy.transport.disconnecting)
        self.assertEqual(self.owner.of("mediaKeysReceived"), [(healthy, KEYS)])
        self.clock.advance(0)
        downs = self.owner.of("tunnelDown")
        self.assertEqual([tunnel for tunnel, _ in downs], [broken])
        self.assertIn("MediaKeys", downs[0][1])

    def test_owner_failure_does_not_close_the_tunnel(self):
        class Failing(RecordingOwner):
            def mediaKeysReceived(self, tunnel, message):
                raise ZeroDivisionError("owner bug")

        owner = Failing()
        tunnel = self.tunnel(owner=owner)
        tunnel.dataReceived(KEYS.encode() + wire.TunneledDtls(A1, b"\x16").encode())
        self.assertFalse(tunnel.transport.disconnecting)
        self.assertEqual(owner.of("tunneledDtlsReceived"), [(tunnel, A1, b"\x16")])
        failures = [event["log_failure"] for event in tunnel.logged if "log_failure" in event]
        self.assertEqual([failure.type for failure in failures], [ZeroDivisionError])

    def test_send_helpers(self):
        tunnel = self.tunnel()
        tunnel.transport.clear()
        self.assertTrue(tunnel.sendDtls(A1, b"\x16abc"))
        self.assertTrue(tunnel.sendDtls(A2, b"\x16def"))
        self.assertEqual(tunnel.associations, {A1, A2})
        self.assertTrue(tunnel.sendDisconnect(A1))
        self.assertEqual(tunnel.associations, {A2})
        self.assertEqual(split_messages(tunnel.transport.value()), [
            wire.TunneledDtls(A1, b"\x16abc"), wire.TunneledDtls(A2, b"\x16def"),
            wire.EndpointDisconnect(A1)])
        self.assertEqual(tunnel.messagesSent,
                         {"SupportedProfiles": 1, "TunneledDtls": 2, "EndpointDisconnect": 1})

    def test_nothing_sent_or_delivered_after_close(self):
        tunnel = self.tunnel()
        tunnel.close("test")
        tunnel.transport.clear()
        self.assertFalse(tunnel.sendDtls(A1, b"\x16"))
        self.assertEqual(tunnel.transport.value(), b"")
        self.assertEqual(tunnel.associations, set())
        tunnel.dataReceived(KEYS.encode())
        self.assertEqual(self.owner.names(), ["tunnelUp"])

    def test_oversized_dtls_refused(self):
        tunnel = self.tunnel()
        self.assertRaises(wire.WireError, tunnel.sendDtls, A1,
                          b"x" * (wire.MAX_DTLS_MESSAGE_LENGTH + 1))
        self.assertEqual(tunnel.associations, set())


class AuthorisationTests(TunnelTestCase):
    def test_not_up_before_handshake(self):
        tunnel = self.tunnel(FakeTlsTransport)
        # SupportedProfiles goes once TLS is up, ahead of all else (see
        # LoopbackTlsTests.test_supported_profiles_first_when_up_writes_at_once).
        self.assertEqual(tunnel.transport.value(), b"")
        self.assertFalse(tunnel.up)
        self.assertEqual(self.owner.events, [])
        tunnel.handshakeCompleted()
        self.assertEqual(split_messages(tunnel.transport.value()),
                         [wire.SupportedProfiles(0, PROFILES)])
        self.assertTrue(tunnel.up)

    def test_authorised(self):
        tunnel = self.tunnel(FakeTlsTransport,
                             authorise=lambda transport: (True, "kd.test", "allowed"))
        tunnel.handshakeCompleted()
        self.assertEqual(self.owner.names(), ["tunnelUp"])
        self.assertEqual(tunnel.identity, "kd.test")
        self.assertIn("kd.test", tunnel.peerDescription())
        self.assertIn("kd.test", tunnel.status()["peer"])

    def test_refused(self):
        seen = []

        def authorise(transport):
            seen.append(transport)
            return False, "kd.evil", "not in the allow-list"

        tunnel = self.tunnel(FakeTlsTransport, authorise=authorise)
        tunnel.handshakeCompleted()
        self.assertEqual(seen, [tunnel.transport])
        self.assertTrue(tunnel.transport.aborted)
        self.assertFalse(tunnel.up)
        self.assertIn("not in the allow-list", tunnel.closeReason)
        self.clock.advance(0)
        self.assertEqual(self.owner.names(), ["tunnelDown"])

    def test_identity_without_authoriser(self):
        tunnel = self.tunnel(FakeTlsTransport)
        tunnel.handshakeCompleted()
        self.assertEqual(tunnel.identity, "(no certificate)")
        self.assertTrue(tunnel.up)


class BackpressureTests(TunnelTestCase):
    # A TunneledDtls of 40 octets of DTLS is 3 + 16 + 2 + 40 = 61 octets.
    DTLS = b"\x16" * 40

    def test_registered_as_streaming_producer(self):
        tunnel = self.tunnel()
        self.assertIs(tunnel.transport.producer, tunnel)
        self.assertTrue(tunnel.transport.streaming)

    def test_octets_written_while_paused_bounded(self):
        tunnel = self.tunnel(maxPausedOctets=100)
        tunnel.transport.producer.pauseProducing()
        tunnel.sendDtls(A1, self.DTLS)
        self.assertFalse(tunnel.transport.disconnecting)
        tunnel.sendDtls(A1, self.DTLS)
        self.assertTrue(tunnel.transport.aborted)
        self.assertIn("not reading", tunnel.closeReason)
        self.assertIsNone(tunnel.transport.producer)
        self.assertFalse(tunnel.usable)
        self.clock.advance(0)
        self.assertEqual(self.owner.of("tunnelDown"), [(tunnel, tunnel.closeReason)])

    def test_writes_while_not_paused_unbounded(self):
        tunnel = self.tunnel(maxPausedOctets=100)
        for _ in range(10):
            tunnel.sendDtls(A1, self.DTLS)
        self.assertFalse(tunnel.transport.disconnecting)

    def test_resume_resets_the_count(self):
        tunnel = self.tunnel(maxPausedOctets=100)
        tunnel.pauseProducing()
        tunnel.sendDtls(A1, self.DTLS)
        tunnel.resumeProducing()
        tunnel.pauseProducing()
        tunnel.sendDtls(A1, self.DTLS)
        self.assertFalse(tunnel.transport.disconnecting)

    def test_paused_too_long(self):
        tunnel = self.tunnel(maxPausedSeconds=10)
        tunnel.pauseProducing()
        self.clock.advance(9)
        self.assertFalse(tunnel.transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(tunnel.transport.aborted)
        self.assertIn("10 seconds", tunnel.closeReason)

    def test_resumed_in_time(self):
        tunnel = self.tunnel(maxPausedSeconds=10)
        tunnel.pauseProducing()
        self.clock.advance(9)
        tunnel.resumeProducing()
        self.clock.advance(60)
        self.assertFalse(tunnel.transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close_unregisters_the_producer(self):
        # Otherwise a TLS transport would hold back its shutdown for ever.
        tunnel = self.tunnel()
        tunnel.pauseProducing()
        tunnel.close()
        self.assertIsNone(tunnel.transport.producer)
        self.assertTrue(tunnel.transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls()[0].func, tunnel.transport.protocol.connectionLost)
        self.clock.advance(0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_protocol_error_unregisters_the_producer(self):
        tunnel = self.tunnel()
        tunnel.dataReceived(wire.SupportedProfiles(0, PROFILES).encode())
        self.assertIsNone(tunnel.transport.producer)
        self.assertTrue(tunnel.transport.disconnecting)


class ManagerTestCase(TestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.owner = RecordingOwner()
        self.endpoint = ManualEndpoint(self.clock)
        self.manager = TunnelManager(self.endpoint, PROFILES, self.owner, name="kd-1",
                                     clock=self.clock, retryPolicy=retry_policy)

    def tearDown(self):
        if self.manager.running:
            self.manager.stopService()
            self.clock.advance(0)


class ManagerTests(ManagerTestCase):
    def test_provides_owner_interfaces(self):
        self.assertTrue(ITunnelOwner.providedBy(self.manager))
        self.assertTrue(ITunnelEvents.providedBy(TunnelPool(PROFILES, clock=self.clock)))

    def test_reconnects_with_backoff_and_says_supported_profiles_again(self):
        self.assertEqual(self.manager.state, "down")
        self.manager.startService()
        self.assertEqual(self.manager.state, "connecting")
        self.assertEqual(len(self.endpoint.attempts), 1)
        first = self.endpoint.succeed()
        self.assertEqual(first.value(), HELLO)
        self.assertEqual(self.manager.state, "up")
        self.assertEqual([e[0] for e in self.owner.events], ["tunnelUp"])

        self.clock.advance(5)
        first.peerCloses()
        self.assertEqual(self.manager.state, "connecting")
        self.assertEqual(self.owner.names(), ["tunnelUp", "tunnelDown"])
        # After a lost connection ClientService waits retryPolicy(1) = 2 s.
        self.clock.advance(1.9)
        self.assertEqual(len(self.endpoint.attempts), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.endpoint.attempts), 2)
        second = self.endpoint.succeed()
        self.assertEqual(second.value(), HELLO)
        self.assertEqual(self.manager.state, "up")
        self.assertEqual(self.manager.status()["connected_since"], self.clock.seconds())

    def test_backoff_grows_while_connecting_fails(self):
        self.manager.startService()
        self.endpoint.fail()
        self.clock.advance(1.9)
        self.assertEqual(len(self.endpoint.attempts), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.endpoint.attempts), 2)
        self.endpoint.fail()
        self.clock.advance(3.9)
        self.assertEqual(len(self.endpoint.attempts), 2)
        self.clock.advance(0.1)
        self.assertEqual(len(self.endpoint.attempts), 3)
        status = self.manager.status()
        self.assertEqual(status["connect_failures"], 2)
        self.assertEqual(status["connection_attempts"], 3)
        self.assertIn("refused", status["last_error"])
        self.assertEqual(status["state"], "connecting")

    def recordLog(self) -> list:
        events = []
        self.manager.log = Logger(observer=events.append)
        return events

    def errors(self, events) -> list:
        return [e for e in events if e["log_level"].name == "error"]

    def _rejectAndReconnect(self, *chunks):
        events = self.recordLog()
        self.manager.startService()
        first = self.endpoint.succeed()
        for chunk in chunks:
            first.protocol.dataReceived(chunk)
        self.assertTrue(first.disconnecting)
        self.clock.advance(0)  # the connection ends
        self.assertEqual(self.manager.state, "connecting")
        self.clock.advance(retry_policy(1))
        second = self.endpoint.succeed()
        # Still version 0, the only one implemented: never a version-0 body
        # under the number the Key Distributor named.
        self.assertEqual(second.value(), HELLO)
        status = self.manager.status()
        self.assertEqual((status["version"], status["rejected_version"]), (0, 3))
        [error] = self.errors(events)
        self.assertEqual((error["version"], error["ours"]), (3, 0))
        self.assertIn("UnsupportedVersion", error["log_format"])

    def test_unsupported_version_keeps_version_0(self):
        self._rejectAndReconnect(wire.UnsupportedVersion(3).encode() + b"\xff\xfe garbage")

    def test_unsupported_version_split_keeps_version_0(self):
        self._rejectAndReconnect(b"\x02\x00", b"\x01\x03")

    def rejectNext(self, version: int = 3):
        transport = self.endpoint.succeed()
        self.assertEqual(transport.value(), HELLO)
        transport.protocol.dataReceived(wire.UnsupportedVersion(version).encode())
        self.clock.advance(0)
        return transport

    def assertNextAttemptAfter(self, delay: float) -> None:
        attempts = len(self.endpoint.attempts)
        self.clock.advance(delay - 0.1)
        self.assertEqual(len(self.endpoint.attempts), attempts)
        self.clock.advance(0.1)
        self.assertEqual(len(self.endpoint.attempts), attempts + 1)

    def test_refused_version_retried_with_growing_backoff_and_one_error(self):
        events = self.recordLog()
        self.manager.startService()
        # ClientService alone would wait retry_policy(1) after each of these
        # connections, which were all made.
        for delay in (2, 4, 8, 16):
            self.rejectNext()
            self.assertNextAttemptAfter(delay)
        self.assertEqual(len(self.errors(events)), 1)
        self.assertEqual(self.manager.status()["rejected_version"], 3)
        # Another version named: a new error.
        self.rejectNext(version=1)
        self.assertNextAttemptAfter(32)
        self.assertEqual([e["version"] for e in self.errors(events)], [3, 1])
        # A Key Distributor that takes version 0 again (upgraded or
        # replaced): the next loss starts the backoff afresh.
        transport = self.endpoint.succeed()
        self.assertEqual(self.manager.state, "up")
        transport.peerCloses()
        self.assertNextAttemptAfter(2)
        self.assertIsNone(self.manager.status()["rejected_version"])

    def test_messages_forwarded_to_owner(self):
        self.manager.startService()
        transport = self.endpoint.succeed()
        transport.protocol.dataReceived(KEYS.encode() + wire.TunneledDtls(A1, b"\x16").encode()
                                        + wire.EndpointDisconnect(A2).encode())
        tunnel = self.manager.tunnel
        self.assertEqual(self.owner.events, [
            ("tunnelUp", tunnel), ("mediaKeysReceived", tunnel, KEYS),
            ("tunneledDtlsReceived", tunnel, A1, b"\x16"),
            ("endpointDisconnectReceived", tunnel, A2)])

    def test_stop_closes_the_tunnel(self):
        self.manager.startService()
        transport = self.endpoint.succeed()
        stopped = self.manager.stopService()
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(transport.producer)
        self.assertNoResult(stopped)
        self.clock.advance(0)
        self.successResultOf(stopped)
        self.assertEqual(self.manager.state, "down")
        self.assertEqual(self.owner.names(), ["tunnelUp", "tunnelDown"])
        self.clock.advance(1000)
        self.assertEqual(len(self.endpoint.attempts), 1)

    def test_status(self):
        self.assertEqual(self.manager.status()["state"], "down")
        self.manager.startService()
        transport = self.endpoint.succeed()
        self.manager.tunnel.sendDtls(A1, b"\x16")
        transport.protocol.dataReceived(KEYS.encode())
        transport.peerCloses()
        self.clock.advance(retry_policy(1))
        transport = self.endpoint.succeed()
        transport.protocol.dataReceived(wire.TunneledDtls(A1, b"\x16").encode())
        status = self.manager.status()
        self.assertEqual(json.loads(json.dumps(status)), status)
        self.assertEqual(set(status), {
            "name", "endpoint", "identity", "up", "state", "version", "rejected_version", "connected_since", "peer", "associations",
            "connection_attempts", "connect_failures", "connections", "last_error",
            "last_close_reason", "messages_sent", "messages_received"})
        self.assertEqual(status["name"], "kd-1")
        self.assertEqual(status["state"], "up")
        self.assertIs(status["up"], True)
        self.assertEqual(status["version"], 0)
        self.assertEqual(status["connections"], 2)
        self.assertEqual(status["associations"], 0)
        self.assertEqual(status["messages_sent"], {"SupportedProfiles": 2, "TunneledDtls": 1})
        self.assertEqual(status["messages_received"], {"MediaKeys": 1, "TunneledDtls": 1})
        self.assertIn("peer closed", status["last_close_reason"])


class PoolTests(TestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.owner = RecordingOwner()
        self.pool = TunnelPool(PROFILES, self.owner, clock=self.clock, retryPolicy=retry_policy)

    def accept(self, transport_class=ClosingTransport):
        tunnel = self.pool.listenFactory.buildProtocol(None)
        connect(tunnel, transport_class(self.clock))
        return tunnel

    def test_listen_factory_builds_media_distributor_tunnels(self):
        self.assertIsInstance(self.pool.listenFactory, MediaDistributorTunnelFactory)
        tunnel = self.accept()
        self.assertIsInstance(tunnel, MediaDistributorTunnel)
        self.assertEqual(tunnel.transport.value(), HELLO)

    def test_pick_none_when_nothing_up(self):
        self.assertIsNone(self.pool.pick())
        tunnel = self.accept(FakeTlsTransport)  # handshake not done
        self.assertIsNone(self.pool.pick())
        tunnel.handshakeCompleted()
        self.assertIs(self.pool.pick(), tunnel)

    def test_pick_prefers_fewest_associations(self):
        first, second = self.accept(), self.accept()
        first.sendDtls(A1, b"\x16")
        first.sendDtls(A2, b"\x16")
        self.assertEqual([self.pool.pick() for _ in range(3)], [second] * 3)
        second.sendDtls(uuid.uuid4(), b"\x16")
        second.sendDtls(uuid.uuid4(), b"\x16")
        second.sendDtls(uuid.uuid4(), b"\x16")
        self.assertIs(self.pool.pick(), first)

    def test_pick_takes_turns_among_equals(self):
        first, second = self.accept(), self.accept()
        self.assertEqual([self.pool.pick() for _ in range(4)], [first, second, first, second])

    def test_pick_skips_closing_and_lost_tunnels(self):
        first, second = self.accept(), self.accept()
        first.close()
        self.assertEqual([self.pool.pick() for _ in range(2)], [second, second])
        self.clock.advance(0)
        self.assertEqual(self.pool.tunnels, [second])
        second.transport.peerCloses()
        self.assertIsNone(self.pool.pick())

    def test_current_is_the_least_loaded_usable_tunnel_of_that_identity(self):
        # Two Key Distributors with one certificate, and one with another.
        first, second, other = self.accept(), self.accept(), self.accept()
        first.identity = second.identity = "kd.test"
        other.identity = "kd-other.test"
        first.sendDtls(A1, b"\x16")
        self.assertIs(self.pool.current("kd.test"), second)
        for _ in range(2):
            second.sendDtls(uuid.uuid4(), b"\x16")
        self.assertIs(self.pool.current("kd.test"), first)
        first.close()
        self.assertIs(self.pool.current("kd.test"), second)
        self.assertIs(self.pool.current("kd-other.test"), other)
        self.assertIsNone(self.pool.current("kd-unknown.test"))

    def test_events_forwarded_in_pairs(self):
        refused = self.accept(FakeTlsTransport)
        refused.abort("test refusal")
        accepted = self.accept()
        accepted.dataReceived(KEYS.encode())
        self.clock.advance(0)
        accepted.transport.peerCloses()
        self.assertEqual(self.owner.names(), ["tunnelUp", "mediaKeysReceived", "tunnelDown"])
        self.assertTrue(all(event[1] is accepted for event in self.owner.events))

    def test_accepted_tunnels_keep_version_0(self):
        events = []
        self.pool.log = Logger(observer=events.append)
        for _ in range(2):
            rejected = self.accept()
            rejected.dataReceived(wire.UnsupportedVersion(4).encode())
            self.assertTrue(rejected.transport.disconnecting)
        self.assertEqual([e["version"] for e in events if e["log_level"].name == "error"], [4])
        self.assertEqual(self.pool.status()["listen_rejected_version"], 4)
        second = self.accept()
        self.assertEqual(second.transport.value(), HELLO)

    def test_managers_and_accepted_tunnels_together(self):
        endpoint = ManualEndpoint(self.clock)
        manager = self.pool.addKeyDistributor(endpoint, "tcp:kd.test:4000")
        self.pool.startService()
        endpoint.succeed()
        outgoing = manager.tunnel
        incoming = self.accept()
        self.assertEqual(self.pool.tunnels, [outgoing, incoming])
        self.assertEqual({self.pool.pick(), self.pool.pick()}, {outgoing, incoming})
        status = self.pool.status()
        self.assertEqual(json.loads(json.dumps(status)), status)
        self.assertEqual(status["up"], 2)
        self.assertEqual([kd["name"] for kd in status["key_distributors"]], ["tcp:kd.test:4000"])
        self.assertEqual(status["key_distributors"][0]["state"], "up")
        self.assertEqual(len(status["accepted"]), 1)
        self.assertTrue(status["accepted"][0]["up"])

    def test_stop_closes_every_tunnel(self):
        endpoint = ManualEndpoint(self.clock)
        manager = self.pool.addKeyDistributor(endpoint)
        self.pool.startService()
        outgoing = endpoint.succeed()
        incoming = self.accept()
        stopped = self.pool.stopService()
        self.assertTrue(outgoing.disconnecting)
        self.assertTrue(incoming.transport.disconnecting)
        self.assertNoResult(stopped)
        self.clock.advance(0)
        self.successResultOf(stopped)
        self.assertEqual(manager.state, "down")
        self.assertEqual(self.pool.tunnels, [])
        self.assertEqual(self.owner.names().count("tunnelDown"), 2)


class LoopbackTlsTests(TestCase):
    """A TunnelManager against a TLS server, over real loopback sockets."""

    # A tunnel whose close is held back by TLS would hang: fail quickly.
    timeout = 30

    def setUp(self):
        directory = self.mktemp()
        pki.create_dev_pki(directory)
        self.kd_credentials = TlsCredentials.from_pki_dir(directory, "kd")
        self.md_credentials = TlsCredentials.from_pki_dir(directory, "md")

    def serve(self, server) -> str:
        port = reactor.listenTCP(0, tls_server_factory(self.kd_credentials, server),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return "tcp:127.0.0.1:{}".format(port.getHost().port)

    def manager(self, description, owner, **kwargs) -> TunnelManager:
        endpoint = tls_client_endpoint(reactor, description, self.md_credentials, "--kd")
        manager = TunnelManager(endpoint, PROFILES, owner, clock=reactor, **kwargs)
        manager.startService()

        def stop():
            if manager.running:
                return manager.stopService()
        self.addCleanup(stop)
        return manager

    @defer.inlineCallbacks
    def test_server_receives_supported_profiles(self):
        server = RecordingServerFactory(expected=len(HELLO))
        up = defer.Deferred()

        class Owner(RecordingOwner):
            def tunnelUp(self, tunnel):
                super().tunnelUp(tunnel)
                up.callback(tunnel)

        owner = Owner()
        manager = self.manager(self.serve(server), owner)
        connection = yield server.whenReceived(0)
        tunnel = yield up
        self.assertEqual(connection.received, HELLO)
        self.assertEqual(manager.state, "up")
        self.assertIs(manager.tunnel, tunnel)
        # The Key Distributor's certificate names localhost first.
        self.assertEqual(tunnel.identity, "localhost")
        yield manager.stopService()
        yield connection.lost
        self.assertEqual(connection.received, HELLO)
        self.assertEqual(manager.state, "down")
        self.assertEqual(owner.names(), ["tunnelUp", "tunnelDown"])

    @defer.inlineCallbacks
    def test_supported_profiles_first_when_up_writes_at_once(self):
        """
        What the owner sends from ``tunnelUp`` (the messages that waited for
        a tunnel) follows SupportedProfiles on the wire.  TLS calls
        handshakeCompleted before it flushes what was written before the
        handshake: a SupportedProfiles written then was overtaken by such a
        burst, and the Key Distributor closed the tunnel (RFC 9185:
        SupportedProfiles first).
        """
        # As many as the waiting room hands over once a tunnel is back.
        steered = [wire.TunneledDtls(uuid.uuid4(), b"\x16\xfe\xfd" + bytes(250))
                   for _ in range(1000)]
        expected = HELLO + b"".join(message.encode() for message in steered)
        server = RecordingServerFactory(expected=len(expected))

        class Owner(RecordingOwner):
            def tunnelUp(self, tunnel):
                super().tunnelUp(tunnel)
                for message in steered:
                    tunnel.sendMessage(message)

        endpoint = tls_client_endpoint(reactor, self.serve(server), self.md_credentials, "--kd")
        tunnel = yield endpoint.connect(MediaDistributorTunnelFactory(Owner(), PROFILES,
                                                                      clock=reactor))
        connection = yield server.whenReceived(0)

        @defer.inlineCallbacks
        def close():
            tunnel.close()
            yield connection.lost
        self.addCleanup(close)
        self.assertEqual(connection.received[:len(HELLO)], HELLO)
        self.assertEqual(connection.received, expected)

    @defer.inlineCallbacks
    def test_unsupported_version_over_tls(self):
        refusal = wire.UnsupportedVersion(5).encode() + b"\xee\xff newer format"
        server = RecordingServerFactory(expected=len(HELLO), replies={0: refusal, 1: refusal})
        events = []
        manager = self.manager(self.serve(server), RecordingOwner(),
                               retryPolicy=lambda attempt: 0.01)
        manager.log = Logger(observer=events.append)
        connections = []
        for index in range(3):
            connection = yield server.whenReceived(index)
            connections.append(connection)
        # Every attempt says version 0, the only version implemented.
        for connection in connections:
            self.assertEqual(connection.received, HELLO)
        self.assertEqual(manager.version, 0)
        self.assertEqual(manager.status()["rejected_version"], 5)
        self.assertEqual(len([e for e in events if e["log_level"].name == "error"]), 1)
        yield connections[0].lost
        yield connections[1].lost
        yield manager.stopService()
        yield connections[2].lost


class ListenRefusalTests(TestCase):
    """
    Key Distributors dialling in to ``--tunnel-listen`` (the pool's listen
    factory behind the TLS a Media Distributor service puts in front of it)
    with certificates it must refuse: refused in the TLS handshake, one log
    event with the reason, and nothing kept.  (This port has no allow-list:
    any certificate from the trusted CA is a Key Distributor.)
    """

    timeout = 60

    def setUp(self):
        directory = self.mktemp()
        self.pki = pki.create_dev_pki(os.path.join(directory, "pki"))
        self.other = pki.create_dev_pki(os.path.join(directory, "other-pki"))
        self.owner = RecordingOwner()
        self.pool = TunnelPool(PROFILES, self.owner, clock=reactor)
        credentials = TlsCredentials.from_pki_dir(self.pki.directory, "md")
        self.built = []
        build = self.pool.listenFactory.buildProtocol

        def recording(address):
            tunnel = build(address)
            self.built.append(tunnel)
            return tunnel
        self.pool.listenFactory.buildProtocol = recording
        port = reactor.listenTCP(0, tls_server_factory(credentials, self.pool.listenFactory),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    @defer.inlineCallbacks
    def assertRefused(self, credentials, reason):
        peer = yield tlshelpers.connect_with(self.port, credentials, self.pki)
        yield peer.lost.addTimeout(tlshelpers.WAIT, reactor)
        yield eventually(lambda: not self.pool.listenFactory.tunnels
                         and tlshelpers.reasoned(self.events))
        yield deferLater(reactor, 0.2, lambda: None)  # time for anything else to be logged
        [event] = tlshelpers.reasoned(self.events)
        self.assertEqual(event["log_format"], "Tunnel with {peer} refused: {reason}")
        self.assertIn(reason, event["reason"])
        self.assertNotIn("\n", event["reason"])
        [tunnel] = self.built
        self.assertEqual(tunnel.closeReason, None)
        self.assertFalse(tunnel.up)
        self.assertIsNone(tunnel._pausedTimer)
        self.assertFalse(tunnel._producerRegistered)
        self.assertEqual(self.pool.listenFactory.tunnels, set())
        self.assertEqual(self.pool.tunnels, [])
        self.assertIsNone(self.pool.pick())
        self.assertEqual(self.owner.events, [])

    def test_no_certificate(self):
        return self.assertRefused(None, "peer did not return a certificate")

    def test_certificate_from_another_ca(self):
        return self.assertRefused(
            tlshelpers.issued(self.other, ["kd.test", "127.0.0.1"], trust=self.pki),
            "certificate verify failed (unable to get local issuer certificate)")

    def test_expired_certificate(self):
        return self.assertRefused(tlshelpers.expired(self.pki, ["kd.test"]),
                                  "certificate verify failed (certificate has expired)")

    def test_certificate_not_yet_valid(self):
        return self.assertRefused(tlshelpers.not_yet_valid(self.pki, ["kd.test"]),
                                  "certificate verify failed (certificate is not yet valid")

    @defer.inlineCallbacks
    def test_key_distributor_certificate_accepted(self):
        peer = yield tlshelpers.connect_with(
            self.port, TlsCredentials.from_pki_dir(self.pki.directory, "kd"), self.pki)
        yield eventually(lambda: self.pool.tunnels)
        self.assertEqual(tlshelpers.reasoned(self.events), [])
        self.assertEqual(self.owner.names(), ["tunnelUp"])
        yield self.pool.stopService()
        yield peer.lost
