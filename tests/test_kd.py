"""
Key Distributor protocol rules, driven with StringTransport and
MemoryReactorClock, with real DTLS handshakes from a client-role engine.
"""

from __future__ import annotations

import os
import uuid

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, globalLogPublisher
from twisted.trial.unittest import TestCase

from perc import dtls, wire
from perc.kd.associations import KeyDistributor, Limits
from perc.kd.conference_keys import ConferenceKeys
from perc.kd.roster import Roster
from perc.profiles import DEFAULT_PROFILES, by_id

from tests.kdhelpers import MediaDistributorStandIn, relay_handshake
from tests.mdtunnelhelpers import ClosingTransport

CONFERENCE = "conf-1"
TLS_ID = "EndpointTlsId-0123456789"

_KD_CREDENTIALS = dtls.Credentials.self_signed("kd.test")
_ENDPOINT = dtls.Credentials.self_signed("endpoint")
_STRANGER = dtls.Credentials.self_signed("stranger")


class KeyDistributorTestCase(TestCase):
    """A KeyDistributor on a MemoryReactorClock with one endpoint registered."""

    limits = Limits()
    allow_missing_tls_id = False
    #: Give the Key Distributor conference EKTKeys (ConferenceKeys options).
    ekt = False
    ekt_options: dict = {}
    kd_credentials = _KD_CREDENTIALS
    endpoint_credentials = _ENDPOINT
    conference = CONFERENCE
    tls_id = TLS_ID

    @defer.inlineCallbacks
    def setUp(self):
        directory = self.mktemp()
        os.makedirs(directory)
        self.roster = yield Roster.open(os.path.join(directory, "kd.sqlite3"))
        self.addCleanup(self.roster.close)
        self.registration, _ = yield self.roster.put(
            self.conference, self.tls_id, self.endpoint_credentials.fingerprint)
        self.clock = MemoryReactorClock()
        self.kd = KeyDistributor(
            roster=self.roster, credentials=self.kd_credentials, profiles=DEFAULT_PROFILES,
            clock=self.clock, limits=self.limits,
            allow_missing_tls_id=self.allow_missing_tls_id,
            conference_keys=ConferenceKeys(**self.ekt_options) if self.ekt else None)
        self.addCleanup(self.kd.stop)

    def client(self, credentials=_ENDPOINT, tls_id=TLS_ID, expected=None, profiles=DEFAULT_PROFILES):
        return dtls.ClientAssociation(
            credentials, profiles, tls_id=None if tls_id is None else tls_id.encode(),
            # A client that sends no tls-id gets none back, so expects none.
            expected_peer_tls_id=None if tls_id is None else
            (expected or self.registration.kd_tls_id).encode(),
            expected_peer_fingerprint=_KD_CREDENTIALS.fingerprint)


class TunnelRuleTests(KeyDistributorTestCase):
    def assertVersionRefused(self, first: bytes):
        md = MediaDistributorStandIn(self.kd, hello=False)
        md.tunnel.dataReceived(first)
        self.assertEqual(md.received(), [wire.UnsupportedVersion(0)])
        self.assertTrue(md.transport.disconnecting)
        self.assertNotIn(md.tunnel, self.kd.tunnels)
        self.assertEqual(md.tunnel.closeReason, "the Media Distributor asked for version {}".format(
            first[3]))

    def test_unsupported_version(self):
        # Version 1 with a version-0 body.
        self.assertVersionRefused(bytes.fromhex("010007" "01" "00040009000A"))

    def test_newer_version_whose_body_has_more_fields(self):
        # A newer Media Distributor's body, with a field version 0 does not
        # have: it must hear UnsupportedVersion(0), not be closed unanswered.
        self.assertVersionRefused(bytes.fromhex("01000B" "02" "00040009000A" "FFEE0102"))

    def test_newer_version_with_only_the_version_octet(self):
        self.assertVersionRefused(bytes.fromhex("010001" "07"))

    def test_newer_version_split_across_reads(self):
        md = MediaDistributorStandIn(self.kd, hello=False)
        for octet in bytes.fromhex("010003" "05" "ABCD"):
            md.tunnel.dataReceived(bytes([octet]))
        self.assertEqual(md.received(), [wire.UnsupportedVersion(0)])
        self.assertTrue(md.transport.disconnecting)

    def test_empty_supported_profiles_is_malformed(self):
        md = MediaDistributorStandIn(self.kd, hello=False)
        md.tunnel.dataReceived(bytes.fromhex("010000"))
        self.assertEqual(md.received(), [])
        self.assertTrue(md.transport.disconnecting)
        self.assertIn("body ends inside version", md.tunnel.closeReason)

    def test_newer_version_after_version_0_is_a_protocol_error(self):
        md = MediaDistributorStandIn(self.kd)
        md.send(wire.NewerSupportedProfiles(1, bytes.fromhex("00040009000A")))
        self.assertEqual(md.received(), [])
        self.assertTrue(md.transport.disconnecting)
        self.assertIn("changed the profile list or version", md.tunnel.closeReason)

    def test_first_message_must_be_supported_profiles(self):
        md = MediaDistributorStandIn(self.kd, hello=False)
        md.send(wire.TunneledDtls(uuid.uuid4(), b"\x16"))
        self.assertEqual(md.received(), [])
        self.assertTrue(md.transport.disconnecting)
        self.assertEqual(len(self.kd), 0)

    def test_first_message_timeout(self):
        md = MediaDistributorStandIn(self.kd, hello=False)
        self.clock.advance(self.limits.first_message_timeout - 0.1)
        self.assertFalse(md.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(md.transport.disconnecting)

    def test_no_timeout_after_supported_profiles(self):
        md = MediaDistributorStandIn(self.kd)
        self.clock.advance(self.limits.first_message_timeout * 3)
        self.assertFalse(md.transport.disconnecting)
        self.assertIn(md.tunnel, self.kd.tunnels)

    def test_repeated_supported_profiles(self):
        md = MediaDistributorStandIn(self.kd)
        md.send(wire.SupportedProfiles(0, (9, 10)))
        self.assertFalse(md.transport.disconnecting)
        md.send(wire.SupportedProfiles(0, (9,)))
        self.assertTrue(md.transport.disconnecting)

    def test_media_keys_from_media_distributor(self):
        md = MediaDistributorStandIn(self.kd)
        md.send(wire.MediaKeys(uuid.uuid4(), 9, b"", b"k", b"k", b"s", b"s"))
        self.assertTrue(md.transport.disconnecting)

    def test_decoding_error_closes_only_that_tunnel(self):
        good = MediaDistributorStandIn(self.kd)
        bad = MediaDistributorStandIn(self.kd)
        bad.tunnel.dataReceived(b"\x05\x00\x01\x00")
        self.assertTrue(bad.transport.disconnecting)
        self.assertFalse(good.transport.disconnecting)

    def test_unknown_endpoint_disconnect_counted(self):
        md = MediaDistributorStandIn(self.kd)
        md.send(wire.EndpointDisconnect(uuid.uuid4()))
        self.assertEqual(md.received(), [])
        self.assertFalse(md.transport.disconnecting)
        self.assertEqual(self.kd.counters["disconnect-unknown-association"], 1)


class HandshakeTests(KeyDistributorTestCase):
    def test_keys_delivered_before_final_flight(self):
        md = MediaDistributorStandIn(self.kd)
        aid = uuid.uuid4()
        client = self.client()
        events = relay_handshake(md, client, aid, self.clock)
        [done] = [e for e in events if isinstance(e, dtls.HandshakeComplete)]
        self.assertEqual(done.peer_tls_id, self.registration.kd_tls_id.encode())
        self.assertEqual(done.peer_fingerprint, _KD_CREDENTIALS.fingerprint)
        # The first message is the HelloVerifyRequest (no state kept).
        self.assertIsInstance(md.log[0], wire.TunneledDtls)
        [keys_index] = [i for i, m in enumerate(md.log) if isinstance(m, wire.MediaKeys)]
        keys = md.log[keys_index]
        # MediaKeys comes right before the server's last flight, which is the
        # final message toward the endpoint.
        self.assertEqual(keys_index, len(md.log) - 2)
        self.assertIsInstance(md.log[-1], wire.TunneledDtls)
        self.assertEqual(md.log[-1].dtls_message[0], 20)  # ChangeCipherSpec first
        profile = done.profile
        self.assertEqual(profile, by_id(0x0009))
        hbh = profile.hbh_keys(done.keys)
        self.assertEqual(keys.association_id, aid)
        self.assertEqual(keys.profile, 0x0009)
        self.assertEqual(keys.mki, b"")
        self.assertEqual((keys.client_key, keys.server_key, keys.client_salt, keys.server_salt),
                         (hbh.client_key, hbh.server_key, hbh.client_salt, hbh.server_salt))
        self.assertEqual(len(keys.client_key), 16)
        self.assertEqual(len(keys.client_salt), 12)
        self.assertTrue(self.kd.association(aid).established)

    def test_profile_is_the_three_way_intersection(self):
        md = MediaDistributorStandIn(self.kd, profiles=(0x0007, 0x000A))
        aid = uuid.uuid4()
        events = relay_handshake(md, self.client(), aid, self.clock)
        [done] = [e for e in events if isinstance(e, dtls.HandshakeComplete)]
        self.assertEqual(done.profile.id, 0x000A)
        [keys] = [m for m in md.log if isinstance(m, wire.MediaKeys)]
        self.assertEqual(len(keys.client_key), 32)

    def test_no_common_profile_refused(self):
        md = MediaDistributorStandIn(self.kd, profiles=(0x0007,))
        aid = uuid.uuid4()
        relay_handshake(md, self.client(), aid, self.clock)
        self.assertEqual(md.log, [wire.EndpointDisconnect(aid)])
        self.assertEqual(len(self.kd), 0)

    def test_unregistered_tls_id_rejected(self):
        md = MediaDistributorStandIn(self.kd)
        aid = uuid.uuid4()
        events = relay_handshake(md, self.client(tls_id="Unregistered-0123456789"), aid, self.clock)
        self.assertRejected(md, aid, events)

    def test_missing_tls_id_rejected(self):
        md = MediaDistributorStandIn(self.kd)
        aid = uuid.uuid4()
        events = relay_handshake(md, self.client(tls_id=None), aid, self.clock)
        self.assertRejected(md, aid, events)

    def test_wrong_fingerprint_rejected(self):
        md = MediaDistributorStandIn(self.kd)
        aid = uuid.uuid4()
        events = relay_handshake(md, self.client(credentials=_STRANGER), aid, self.clock)
        self.assertRejected(md, aid, events)

    def assertRejected(self, md, aid, events):
        self.assertFalse([m for m in md.log if isinstance(m, wire.MediaKeys)])
        self.assertEqual(md.log[-1], wire.EndpointDisconnect(aid))
        self.assertTrue([e for e in events if isinstance(e, dtls.Closed)])
        self.assertIsNone(self.kd.association(aid))
        self.assertEqual(self.kd.counters.get("rejected"), 1)
        self.assertEqual(md.tunnel.associations, set())

    def test_client_rejects_wrong_kd_tls_id(self):
        md = MediaDistributorStandIn(self.kd)
        aid = uuid.uuid4()
        client = self.client(expected="SomethingElse-0123456789")
        events = relay_handshake(md, client, aid, self.clock)
        self.assertFalse([e for e in events if isinstance(e, dtls.HandshakeComplete)])
        self.assertTrue([e for e in events if isinstance(e, dtls.Closed) and e.rejected])

    def test_endpoint_disconnect_from_media_distributor_is_silent(self):
        md = MediaDistributorStandIn(self.kd)
        aid = uuid.uuid4()
        relay_handshake(md, self.client(), aid, self.clock)
        md.received()
        md.send(wire.EndpointDisconnect(aid))
        self.assertIsNone(self.kd.association(aid))
        self.assertEqual(md.received(), [])

    @defer.inlineCallbacks
    def test_registration_deleted_ends_association(self):
        md = MediaDistributorStandIn(self.kd)
        aid = uuid.uuid4()
        client = self.client()
        relay_handshake(md, client, aid, self.clock)
        md.received()
        yield self.roster.delete(CONFERENCE, TLS_ID)
        messages = md.received()
        self.assertEqual(messages[-1], wire.EndpointDisconnect(aid))
        # close_notify reaches the endpoint before that.
        [alert] = [m for m in messages if isinstance(m, wire.TunneledDtls)]
        events = client.receive(alert.dtls_message, self.clock.seconds()).events
        self.assertTrue([e for e in events if isinstance(e, dtls.Closed)])
        self.assertIsNone(self.kd.association(aid))

    def test_close_notify_from_endpoint_sends_disconnect(self):
        md = MediaDistributorStandIn(self.kd)
        aid = uuid.uuid4()
        client = self.client()
        relay_handshake(md, client, aid, self.clock)
        md.received()
        for datagram in client.close(self.clock.seconds()).datagrams:
            md.send(wire.TunneledDtls(aid, datagram))
        self.assertIn(wire.EndpointDisconnect(aid), md.received())
        self.assertIsNone(self.kd.association(aid))

    def test_handshake_timeout_sends_disconnect(self):
        md = MediaDistributorStandIn(self.kd)
        aid = uuid.uuid4()
        client = self.client()
        first = client.start(self.clock.seconds()).datagrams
        md.send(wire.TunneledDtls(aid, first[0]))
        [hello_verify] = md.received()
        second = client.receive(hello_verify.dtls_message, self.clock.seconds()).datagrams
        md.send(wire.TunneledDtls(aid, second[0]))
        self.assertIsNotNone(self.kd.association(aid))
        md.received()
        # The endpoint goes quiet: the engine gives up within the bound.
        for _ in range(200):
            self.clock.advance(1)
            if self.kd.association(aid) is None:
                break
        self.assertIsNone(self.kd.association(aid))
        self.assertEqual(md.received()[-1], wire.EndpointDisconnect(aid))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_tunnel_loss_releases_after_grace(self):
        md = MediaDistributorStandIn(self.kd)
        aid = uuid.uuid4()
        relay_handshake(md, self.client(), aid, self.clock)
        md.close()
        self.assertIsNotNone(self.kd.association(aid))
        self.clock.advance(self.limits.tunnel_grace + 0.1)
        self.assertIsNone(self.kd.association(aid))

    def test_internal_error_ends_only_that_association(self):
        md = MediaDistributorStandIn(self.kd)
        # The same endpoint again through another Media Distributor (through
        # the same one, its new association would supersede the first).
        elsewhere = MediaDistributorStandIn(self.kd, identity="md-2.test")
        broken, healthy = uuid.uuid4(), uuid.uuid4()
        relay_handshake(md, self.client(), broken, self.clock)
        relay_handshake(elsewhere, self.client(), healthy, self.clock)
        md.received()

        def fail(*args):
            raise RuntimeError("a bug")

        self.kd.association(broken).engine.receive = fail
        md.send(wire.TunneledDtls(broken, b"\x17\xfe\xfd" + bytes(30)))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(md.received(), [wire.EndpointDisconnect(broken)])
        self.assertIsNone(self.kd.association(broken))
        self.assertEqual(self.kd.counters["internal-error"], 1)
        # The tunnel and its other association go on; new ones still join.
        self.assertFalse(md.transport.disconnecting)
        self.assertIsNotNone(self.kd.association(healthy))
        events = relay_handshake(md, self.client(), uuid.uuid4(), self.clock)
        self.assertTrue([e for e in events if isinstance(e, dtls.HandshakeComplete)])

    def test_other_media_distributor_cannot_touch_association(self):
        md = MediaDistributorStandIn(self.kd, identity="md-a.test")
        other = MediaDistributorStandIn(self.kd, identity="md-b.test")
        aid = uuid.uuid4()
        relay_handshake(md, self.client(), aid, self.clock)
        other.send(wire.EndpointDisconnect(aid))
        self.assertIsNotNone(self.kd.association(aid))
        self.assertEqual(self.kd.counters["foreign-association"], 1)


class LimitTests(KeyDistributorTestCase):
    limits = Limits(max_associations=3, max_associations_per_tunnel=2)

    def start_association(self, md):
        aid = uuid.uuid4()
        client = self.client()
        hello = client.start(self.clock.seconds()).datagrams[0]
        md.send(wire.TunneledDtls(aid, hello))
        [verify] = md.received()
        if isinstance(verify, wire.EndpointDisconnect):
            return aid, [verify]
        md.send(wire.TunneledDtls(aid, client.receive(verify.dtls_message,
                                                      self.clock.seconds()).datagrams[0]))
        return aid, md.received()

    def test_per_tunnel_limit(self):
        md = MediaDistributorStandIn(self.kd)
        first, _ = self.start_association(md)
        second, _ = self.start_association(md)
        third, replies = self.start_association(md)
        self.assertEqual(replies, [wire.EndpointDisconnect(third)])
        self.assertIsNotNone(self.kd.association(first))
        self.assertIsNotNone(self.kd.association(second))
        self.assertIsNone(self.kd.association(third))
        self.assertEqual(self.kd.counters["per-tunnel association limit reached"], 1)

    def test_total_limit(self):
        a = MediaDistributorStandIn(self.kd, identity="a")
        b = MediaDistributorStandIn(self.kd, identity="b")
        self.start_association(a)
        self.start_association(a)
        self.start_association(b)
        aid, replies = self.start_association(b)
        self.assertEqual(replies, [wire.EndpointDisconnect(aid)])
        self.assertEqual(len(self.kd), 3)


class AllowMissingTlsIdTests(KeyDistributorTestCase):
    allow_missing_tls_id = True

    def test_matched_by_fingerprint_alone(self):
        md = MediaDistributorStandIn(self.kd)
        aid = uuid.uuid4()
        events = relay_handshake(md, self.client(tls_id=None), aid, self.clock)
        self.assertTrue([e for e in events if isinstance(e, dtls.HandshakeComplete)])
        self.assertEqual(len([m for m in md.log if isinstance(m, wire.MediaKeys)]), 1)
        self.assertEqual(self.kd.association(aid).registration, self.registration)

    def test_unknown_fingerprint_still_rejected(self):
        md = MediaDistributorStandIn(self.kd)
        aid = uuid.uuid4()
        events = relay_handshake(md, self.client(credentials=_STRANGER, tls_id=None), aid,
                                 self.clock)
        self.assertFalse([e for e in events if isinstance(e, dtls.HandshakeComplete)])
        self.assertEqual(md.log[-1], wire.EndpointDisconnect(aid))


class EktTests(KeyDistributorTestCase):
    """The conference EKTKey: after the handshake, on request, and on rekey."""

    ekt = True

    def ekt_client(self):
        return dtls.ClientAssociation(
            _ENDPOINT, DEFAULT_PROFILES, tls_id=TLS_ID.encode(),
            expected_peer_tls_id=self.registration.kd_tls_id.encode(), ekt_ciphers=(1,))

    def keys_in(self, events):
        """The EKTKeys of the ekt_key messages (new or repeated) the client read."""
        return [e.key for e in events if isinstance(e, dtls.EktKeyReceived)]

    def deliver(self, md, client, aid, drop_acks=False):
        """The Key Distributor's datagrams to the client; its ACKs back unless dropped."""
        events = []
        for message in md.received():
            if isinstance(message, wire.TunneledDtls):
                output = client.receive(message.dtls_message, self.clock.seconds())
                events.extend(output.events)
                for datagram in output.datagrams:
                    if not (drop_acks and datagram[0] == 26):
                        md.send(wire.TunneledDtls(aid, datagram))
        return events

    def test_ttl_zero_refused_where_configured(self):
        # RFC 8870: a TTL-0 EKTKey is expired on arrival; this KD never makes one.
        for ttl in (0, -1, 1 << 24, True, 1.5):
            self.assertRaises(ValueError, ConferenceKeys, ttl=ttl)
        keys = ConferenceKeys(ttl=1)
        self.assertEqual(keys.key_for(CONFERENCE, 0.0).ekt_ttl, 1)
        self.assertEqual(self.successResultOf(keys.rekey(CONFERENCE, 0.0)).ekt_ttl, 1)
        # Its last second still has a TTL of 1, not 0.
        self.assertEqual(keys.key_for(CONFERENCE, 0.9).ekt_ttl, 1)

    def test_ttl_counts_down_in_steps(self):
        """A joiner gets the TTL left, rounded down to a 64th of the TTL; one copy per step."""
        keys = ConferenceKeys(ttl=6400)
        full = keys.key_for(CONFERENCE, 0.0)
        self.assertEqual(full.ekt_ttl, 6400)
        self.assertIs(keys.key_for(CONFERENCE, 0.0), full)
        first = keys.key_for(CONFERENCE, 1.0)
        self.assertEqual(first.ekt_ttl, 6300)
        self.assertEqual((first.ekt_key_value, first.ekt_spi), (full.ekt_key_value, full.ekt_spi))
        self.assertIs(keys.key_for(CONFERENCE, 99.0), first)
        second = keys.key_for(CONFERENCE, 100.5)
        self.assertEqual(second.ekt_ttl, 6200)
        self.assertIs(keys.key_for(CONFERENCE, 199.0), second)
        self.assertEqual(keys.key_for(CONFERENCE, 6399.5).ekt_ttl, 1)
        self.assertEqual(full.ekt_ttl, 6400)

    def test_key_follows_the_final_flight_and_is_resent_on_request(self):
        md = MediaDistributorStandIn(self.kd)
        aid = uuid.uuid4()
        client = self.ekt_client()
        events = relay_handshake(md, client, aid, self.clock)
        [done] = [e for e in events if isinstance(e, dtls.HandshakeComplete)]
        self.assertEqual(done.ekt_cipher, 1)
        [key] = self.keys_in(events)
        self.assertEqual(key, self.kd.conference_keys.key_for(CONFERENCE, self.clock.seconds()))
        # The MediaKeys message never carries it: only hop-by-hop halves.
        [media_keys] = [m for m in md.log if isinstance(m, wire.MediaKeys)]
        self.assertNotIn(key.ekt_key_value, media_keys.client_key + media_keys.server_key)
        # Lost on the way? The endpoint asks again with one octet.
        for datagram in client.send_application_data(b"\x01").datagrams:
            md.send(wire.TunneledDtls(aid, datagram))
        self.assertEqual(self.keys_in(self.deliver(md, client, aid)), [key])
        self.assertEqual(self.kd.counters["ekt-key-resent"], 1)
        # Anything else is ignored.
        for datagram in client.send_application_data(b"hello").datagrams:
            md.send(wire.TunneledDtls(aid, datagram))
        self.assertEqual(md.received(), [])

    def test_requests_answered_at_a_bounded_rate_for_the_whole_life(self):
        """
        The endpoint asks for the EKTKey as a liveness probe every few
        seconds for as long as it runs: every request within the rate is
        answered, however long the association lives, and a flood of them
        gets no more than the burst and then the rate.
        """
        md = MediaDistributorStandIn(self.kd)
        aid = uuid.uuid4()
        client = self.ekt_client()
        [key] = self.keys_in(relay_handshake(md, client, aid, self.clock))

        def ask(times):
            for _ in range(times):
                for datagram in client.send_application_data(b"\x01").datagrams:
                    md.send(wire.TunneledDtls(aid, datagram))
            return self.keys_in(self.deliver(md, client, aid))

        burst = self.limits.ekt_key_request_burst
        self.assertEqual(ask(burst + 5), [key] * burst)
        self.assertEqual(self.kd.counters["ekt-key-request-rate-limited"], 5)
        self.clock.advance(3 / self.limits.ekt_key_requests_per_second)
        self.assertEqual(len(ask(5)), 3)
        # Ten minutes of probes every five seconds: each one answered, with
        # the TTL the key has left.
        for _ in range(120):
            self.clock.advance(5)
            [answer] = ask(1)
            self.assertTrue(answer.same_key(key))
            self.assertLess(answer.ekt_ttl, key.ekt_ttl - self.clock.seconds() + 1)
        self.assertEqual(self.kd.counters["ekt-key-resent"], burst + 3 + 120)
        self.assertEqual(self.kd.counters["ekt-key-request-rate-limited"], 7)

    def test_rekey_sends_a_new_spi(self):
        md = MediaDistributorStandIn(self.kd)
        aid = uuid.uuid4()
        client = self.ekt_client()
        [old] = self.keys_in(relay_handshake(md, client, aid, self.clock))
        new, count = self.successResultOf(self.kd.rekey(CONFERENCE))
        self.assertEqual(count, 1)
        self.assertEqual(new.ekt_spi, (old.ekt_spi + 1) & 0xFFFF)
        self.assertNotEqual(new.ekt_key_value, old.ekt_key_value)
        self.assertEqual(self.keys_in(self.deliver(md, client, aid)), [new])

    def test_ekt_key_retransmitted_until_acknowledged(self):
        """
        The ekt_key message goes again on the engine's timer (1 s, then 2 s,
        ...) while the endpoint's ACKs are lost, and stops once one arrives.
        """
        md = MediaDistributorStandIn(self.kd)
        aid = uuid.uuid4()
        client = self.ekt_client()
        output = client.start(self.clock.seconds())
        pending, events, acks_lost = list(output.datagrams), [], 0
        for _ in range(20):
            for datagram in pending:
                if datagram[0] == 26:
                    acks_lost += 1
                else:
                    md.send(wire.TunneledDtls(aid, datagram))
            pending = []
            for message in md.received():
                if isinstance(message, wire.TunneledDtls):
                    output = client.receive(message.dtls_message, self.clock.seconds())
                    pending.extend(output.datagrams)
                    events.extend(output.events)
            if not pending:
                break
        key = self.kd.conference_keys.key_for(CONFERENCE, self.clock.seconds())
        self.assertEqual(self.keys_in(events), [key])
        self.assertEqual(acks_lost, 1)
        engine = self.kd.association(aid).engine
        self.assertFalse(engine.ekt_key_acknowledged)
        self.clock.advance(0.9)
        self.assertEqual(md.received(), [])
        self.clock.advance(0.1)
        [event] = self.deliver(md, client, aid, drop_acks=True)
        self.assertTrue(event.repeated)
        self.clock.advance(2.0)
        # This time the ACK gets through: no more retransmissions.
        [event] = self.deliver(md, client, aid)
        self.assertTrue(event.repeated)
        self.assertTrue(engine.ekt_key_acknowledged)
        # Only the conference's rollover is left.
        self.assertEqual([c.func for c in self.clock.getDelayedCalls()], [self.kd._rollOver])
        self.clock.advance(300)
        self.assertEqual(md.received(), [])
        self.assertTrue(self.kd.association(aid).established)

    def test_no_ekt_without_extension_39(self):
        md = MediaDistributorStandIn(self.kd)
        aid = uuid.uuid4()
        events = relay_handshake(md, self.client(), aid, self.clock)
        [done] = [e for e in events if isinstance(e, dtls.HandshakeComplete)]
        self.assertIsNone(done.ekt_cipher)
        self.assertEqual(self.keys_in(events), [])


class BackpressureTests(KeyDistributorTestCase):
    """
    A Media Distributor that stops reading its tunnel: the Key Distributor
    bounds what it writes while its transport is paused, then drops that
    tunnel, whose associations go the way of any lost tunnel's.
    """

    limits = Limits(tunnel_max_paused_octets=2000, tunnel_max_paused_seconds=10.0,
                    tunnel_grace=5.0)

    def standIn(self):
        """A stand-in on a transport that reports the end of the connection on the clock."""
        md = MediaDistributorStandIn(self.kd, transport=ClosingTransport(self.clock))
        md.tunnel.logged = []
        md.tunnel.log = Logger(observer=md.tunnel.logged.append)
        return md

    def established(self, md):
        aid = uuid.uuid4()
        relay_handshake(md, self.client(), aid, self.clock)
        self.assertTrue(self.kd.association(aid).established)
        return aid

    def hello(self):
        return self.client().start(self.clock.seconds()).datagrams[0]

    def drops(self, md):
        return [event for event in md.tunnel.logged
                if event["log_format"].startswith("Dropping tunnel")]

    def assertReleasedAfterGrace(self, md, aid):
        self.clock.advance(0)  # the aborted connection ends
        self.assertNotIn(md.tunnel, self.kd.tunnels)
        association = self.kd.association(aid)
        self.assertIsNone(association.tunnel)  # waiting for the Media Distributor to come back
        self.clock.advance(self.limits.tunnel_grace + 0.1)
        self.assertIsNone(self.kd.association(aid))
        self.assertEqual(md.tunnel.associations, set())

    def test_registered_as_streaming_producer(self):
        md = self.standIn()
        self.assertIs(md.transport.producer, md.tunnel)
        self.assertTrue(md.transport.streaming)

    def test_octets_written_while_paused_bounded(self):
        md = self.standIn()
        aid = self.established(md)
        md.transport.producer.pauseProducing()
        hello = self.hello()
        # Every ClientHello gets a HelloVerifyRequest back.
        sent = 0
        while not md.transport.disconnecting and sent < 100:
            md.send(wire.TunneledDtls(uuid.uuid4(), hello))
            sent += 1
        self.assertTrue(md.transport.aborted)
        written = len(md.transport.value())
        # At most the bound plus the message that passed it.
        self.assertLessEqual(written, 2000 + 3 + 16 + 2 + 255)
        self.assertGreater(written, 2000)
        self.assertIsNone(md.transport.producer)
        [drop] = self.drops(md)
        self.assertIn("written while the Media Distributor was not reading (bound 2000)",
                      drop["reason"])
        self.assertEqual(md.tunnel.closeReason, drop["reason"])
        # Nothing more is written or delivered once it is dropped.
        md.send(wire.TunneledDtls(uuid.uuid4(), hello))
        self.assertEqual(len(md.transport.value()), written)
        self.assertReleasedAfterGrace(md, aid)
        closed = [event for event in md.tunnel.logged
                  if event["log_format"].startswith("Tunnel with")]
        self.assertEqual([event["why"] for event in closed], [drop["reason"]])

    def test_writes_while_not_paused_unbounded(self):
        md = self.standIn()
        hello = self.hello()
        for _ in range(100):
            md.send(wire.TunneledDtls(uuid.uuid4(), hello))
        self.assertGreater(len(md.transport.value()), 2000)
        self.assertFalse(md.transport.disconnecting)

    def test_resume_resets_the_count(self):
        md = self.standIn()
        hello = self.hello()
        for _ in range(10):
            md.tunnel.pauseProducing()
            for _ in range(15):
                md.send(wire.TunneledDtls(uuid.uuid4(), hello))
            md.tunnel.resumeProducing()
        self.assertGreater(len(md.transport.value()), 5 * 2000)
        self.assertFalse(md.transport.disconnecting)

    def test_paused_too_long(self):
        md = self.standIn()
        aid = self.established(md)
        md.tunnel.pauseProducing()
        self.clock.advance(9.9)
        self.assertFalse(md.transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(md.transport.aborted)
        [drop] = self.drops(md)
        self.assertEqual(drop["reason"],
                         "the Media Distributor has not read from the tunnel for 10.0 seconds")
        self.assertReleasedAfterGrace(md, aid)

    def test_resumed_in_time(self):
        md = self.standIn()
        md.tunnel.pauseProducing()
        self.clock.advance(9)
        md.tunnel.resumeProducing()
        self.clock.advance(60)
        self.assertFalse(md.transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_protocol_error_unregisters_the_producer(self):
        # Otherwise a TLS transport would hold back its shutdown for ever.
        md = self.standIn()
        md.tunnel.pauseProducing()
        md.send(wire.MediaKeys(uuid.uuid4(), 9, b"", b"k", b"k", b"s", b"s"))
        self.assertTrue(md.transport.disconnecting)
        self.assertFalse(md.transport.aborted)
        self.assertIsNone(md.transport.producer)
        self.assertEqual(self.clock.getDelayedCalls()[0].func, md.tunnel.connectionLost)
        self.clock.advance(0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unsupported_version_unregisters_the_producer(self):
        md = MediaDistributorStandIn(self.kd, hello=False, transport=ClosingTransport(self.clock))
        md.send(wire.NewerSupportedProfiles(1, bytes.fromhex("00020009")))
        self.assertEqual(md.received(), [wire.UnsupportedVersion(0)])
        self.assertTrue(md.transport.disconnecting)
        self.assertIsNone(md.transport.producer)

    def test_close_all_unregisters_the_producers(self):
        from perc.kd.tunnel import KeyDistributorTunnelFactory
        factory = KeyDistributorTunnelFactory(self.kd)
        transports = []
        for _ in range(2):
            tunnel = factory.buildProtocol(None)
            transport = ClosingTransport(self.clock)
            transport.protocol = tunnel
            tunnel.makeConnection(transport)
            transports.append(transport)
        self.assertEqual(len(factory.connections), 2)
        factory.closeAll()
        for transport in transports:
            self.assertTrue(transport.disconnecting)
            self.assertIsNone(transport.producer)
        self.clock.advance(0)
        self.assertEqual(factory.connections, set())


_SECOND = dtls.Credentials.self_signed("second")
SECOND_TLS_ID = "SecondEndpointTlsId-0123456789"
P9, P10, P7 = by_id(0x0009), by_id(0x000A), by_id(0x0007)


def wire_alerts(datagrams):
    """(level, description) of every plaintext (epoch 0) alert record in ``datagrams``."""
    found = []
    for datagram in datagrams:
        for record in dtls.split_records(datagram):
            if record[0] == 21 and record[3:5] == b"\x00\x00" and len(record) >= 15:
                found.append((record[13], record[14]))
    return found


class EktRolloverTests(KeyDistributorTestCase):
    """The conference EKTKey's lifetime: rollover, late joiners, timers (--ekt-ttl 4)."""

    ekt = True
    ekt_options = {"ttl": 4, "rollover": 0.75}

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.md = MediaDistributorStandIn(self.kd)
        self.clients = {}
        self.events = []
        self.kd.log = Logger(observer=self.events.append)
        # Each member is another endpoint: a second association of the same
        # endpoint through the same Media Distributor supersedes its first.
        second, _ = yield self.roster.put(CONFERENCE, SECOND_TLS_ID, _SECOND.fingerprint)
        self.members = [(_ENDPOINT, TLS_ID, self.registration), (_SECOND, SECOND_TLS_ID, second)]

    def join(self):
        """A new member (a real client engine); returns (association id, its first key)."""
        aid = uuid.uuid4()
        credentials, tls_id, registration = self.members[len(self.clients) % len(self.members)]
        client = self.clients[aid] = dtls.ClientAssociation(
            credentials, DEFAULT_PROFILES, tls_id=tls_id.encode(),
            expected_peer_tls_id=registration.kd_tls_id.encode(), ekt_ciphers=(1,))
        for datagram in client.start(self.clock.seconds()).datagrams:
            self.md.send(wire.TunneledDtls(aid, datagram))
        [key] = self.pump()[aid]
        return aid, key

    def pump(self):
        """Shuttle messages both ways; returns the new EKTKeys each member read, by id."""
        keys = {aid: [] for aid in self.clients}
        for _ in range(20):
            messages = self.md.received()
            if not messages:
                break
            for message in messages:
                client = self.clients.get(getattr(message, "association_id", None))
                if client is None or not isinstance(message, wire.TunneledDtls):
                    continue
                output = client.receive(message.dtls_message, self.clock.seconds())
                keys[message.association_id] += [
                    e.key for e in output.events
                    if isinstance(e, dtls.EktKeyReceived) and not e.repeated]
                for datagram in output.datagrams:
                    self.md.send(wire.TunneledDtls(message.association_id, datagram))
        return keys

    def advance(self, seconds):
        self.clock.advance(seconds)
        return self.pump()

    def rollover_calls(self):
        return [c for c in self.clock.getDelayedCalls() if c.func == self.kd._rollOver]

    def test_rollover_at_the_fraction_sends_a_new_spi_to_every_member(self):
        a, first = self.join()
        self.assertEqual(first.ekt_ttl, 4)
        b, same = self.join()
        self.assertTrue(same.same_key(first))
        self.assertEqual(self.advance(2.9), {a: [], b: []})
        keys = self.advance(0.1)  # 3/4 of 4 s
        [new] = keys[a]
        self.assertEqual(keys[b], [new])
        self.assertEqual(new.ekt_spi, (first.ekt_spi + 1) & 0xFFFF)
        self.assertNotEqual(new.ekt_key_value, first.ekt_key_value)
        self.assertNotEqual(new.srtp_master_salt, first.srtp_master_salt)
        self.assertEqual(new.ekt_ttl, 4)
        self.assertEqual(self.kd.counters["ekt-rollover"], 1)
        # One log line per rollover, named fields, no key material.
        [line] = [e for e in self.events if e["log_format"].startswith(
            "Conference {conference} EKTKey rolled over")]
        self.assertEqual((line["conference"], line["spi"], line["ttl"], line["count"]),
                         (CONFERENCE, new.ekt_spi, 4, 2))
        for event in self.events:
            text = repr(event)
            for secret in (new.ekt_key_value, new.srtp_master_salt):
                self.assertNotIn(secret.hex(), text)
                self.assertNotIn(repr(secret), text)
        # And again 3 s later: one timer for the conference all along.
        self.assertEqual(len(self.rollover_calls()), 1)
        keys = self.advance(3.0)
        self.assertEqual([k.ekt_spi for k in keys[a]], [(new.ekt_spi + 1) & 0xFFFF])
        self.assertEqual(keys[a], keys[b])
        self.assertEqual(self.kd.counters["ekt-rollover"], 2)
        self.assertEqual(self.kd.status()["ekt_conferences"], 1)

    def test_late_joiner_and_resend_get_the_ttl_left(self):
        a, first = self.join()
        self.advance(1.6)
        b, late = self.join()
        self.assertTrue(late.same_key(first))
        self.assertEqual(late.ekt_ttl, 2)  # 2.4 s left, rounded down
        self.advance(0.9)
        # The endpoint's request (0x01) is answered with what is left then.
        for datagram in self.clients[b].send_application_data(b"\x01").datagrams:
            self.md.send(wire.TunneledDtls(b, datagram))
        [resent] = self.pump()[b]
        self.assertTrue(resent.same_key(first))
        self.assertEqual(resent.ekt_ttl, 1)  # 1.5 s left
        # The rollover gives both a whole new lifetime.
        keys = self.advance(0.5)
        self.assertEqual([k.ekt_ttl for k in keys[a] + keys[b]], [4, 4])

    def test_timer_only_while_the_conference_has_members(self):
        self.assertEqual(self.rollover_calls(), [])
        a, first = self.join()
        self.assertEqual(len(self.rollover_calls()), 1)
        b, _ = self.join()
        self.assertEqual(len(self.rollover_calls()), 1)
        self.md.send(wire.EndpointDisconnect(a))
        self.assertEqual(len(self.rollover_calls()), 1)
        self.md.send(wire.EndpointDisconnect(b))
        self.assertEqual(self.rollover_calls(), [])
        self.assertEqual(self.kd.status()["ekt_conferences"], 0)
        # Long past the key's TTL, nobody there: no rollover ran...
        self.advance(60.0)
        self.assertNotIn("ekt-rollover", self.kd.counters)
        # ...and the next member gets a new key (new SPI) with a whole TTL.
        _, key = self.join()
        self.assertEqual(key.ekt_spi, (first.ekt_spi + 1) & 0xFFFF)
        self.assertEqual(key.ekt_ttl, 4)
        self.assertEqual(len(self.rollover_calls()), 1)
        self.kd.stop()
        self.assertEqual(self.rollover_calls(), [])

    def test_api_rekey_restarts_the_lifetime(self):
        a, _ = self.join()
        self.advance(2.0)
        new, count = self.successResultOf(self.kd.rekey(CONFERENCE))
        self.assertEqual(count, 1)
        self.assertEqual(self.pump()[a], [new])
        self.assertEqual(self.advance(2.9), {a: []})  # 3 s after the start, not after the rekey
        self.assertNotIn("ekt-rollover", self.kd.counters)
        [rolled] = self.advance(0.1)[a]  # 3 s after the rekey
        self.assertEqual(rolled.ekt_spi, (new.ekt_spi + 1) & 0xFFFF)
        self.assertEqual(self.kd.counters["ekt-rollover"], 1)


class EktOptionTests(TestCase):
    """``perc-kd --ekt-ttl`` and ``--ekt-rollover``."""

    def parse(self, *argv):
        from perc.kd import tap
        options = tap.Options()
        options.parseOptions(list(argv))
        return options

    def test_defaults_and_values(self):
        options = self.parse()
        self.assertEqual((options["ekt-ttl"], options["ekt-rollover"]), (86400, 0.75))
        options = self.parse("--ekt-ttl", "3", "--ekt-rollover", "0.5")
        self.assertEqual((options["ekt-ttl"], options["ekt-rollover"]), (3, 0.5))
        self.assertEqual(self.parse("--ekt-ttl", "16777215")["ekt-ttl"], 0xFFFFFF)

    def test_errors_are_one_line(self):
        from twisted.python.usage import UsageError
        for argv in (("--ekt-ttl", "0"), ("--ekt-ttl", "16777216"), ("--ekt-ttl", "-5"),
                     ("--ekt-ttl", "1.5"), ("--ekt-rollover", "0"), ("--ekt-rollover", "1"),
                     ("--ekt-rollover", "1.5"), ("--ekt-rollover", "nan")):
            with self.assertRaises(UsageError) as caught:
                self.parse(*argv)
            self.assertEqual(len(str(caught.exception).splitlines()), 1, argv)


class Shuttle:
    """One endpoint's datagrams through a MediaDistributorStandIn, a flight at a time."""

    def __init__(self, md, client, clock):
        self.md, self.client, self.clock = md, client, clock
        self.aid = uuid.uuid4()
        self.events = []
        self.sent = []      # what the endpoint sent
        self.received = []  # what the Key Distributor sent it
        self.pending = list(client.start(clock.seconds()).datagrams)

    def send(self, rewrite=None):
        for datagram in self.pending:
            if rewrite is not None:
                datagram = rewrite(datagram)
            self.sent.append(datagram)
            self.md.send(wire.TunneledDtls(self.aid, datagram))
        self.pending = []

    def deliver(self, messages):
        for message in messages:
            if isinstance(message, wire.TunneledDtls) and message.association_id == self.aid:
                self.received.append(message.dtls_message)
                output = self.client.receive(message.dtls_message, self.clock.seconds())
                self.pending.extend(output.datagrams)
                self.events.extend(output.events)

    def complete(self):
        done = [e for e in self.events if isinstance(e, dtls.HandshakeComplete)]
        return done[0] if done else None


def run(md, *shuttles, rewrite=None):
    for _ in range(20):
        if not any(s.pending for s in shuttles):
            return
        for shuttle in shuttles:
            shuttle.send(rewrite)
        messages = md.received()
        for shuttle in shuttles:
            shuttle.deliver(messages)


class AlertTests(KeyDistributorTestCase):
    """The alert each refusal puts on the wire (README, Key Distributor: alerts)."""

    def refused(self, client, rewrite=None, profiles=(0x0009, 0x000A)):
        md = MediaDistributorStandIn(self.kd, profiles=profiles)
        shuttle = Shuttle(md, client, self.clock)
        run(md, shuttle, rewrite=rewrite)
        self.assertIsNone(shuttle.complete())
        self.assertEqual(md.log[-1], wire.EndpointDisconnect(shuttle.aid))
        self.assertFalse([m for m in md.log if isinstance(m, wire.MediaKeys)])
        return shuttle

    def assertKdAlert(self, shuttle, description):
        self.assertEqual(wire_alerts(shuttle.received), [(2, description)])

    def test_unregistered_tls_id_is_handshake_failure(self):
        shuttle = self.refused(self.client(tls_id="Unregistered-0123456789"))
        self.assertKdAlert(shuttle, 40)

    def test_missing_tls_id_is_handshake_failure(self):
        self.assertKdAlert(self.refused(self.client(tls_id=None)), 40)

    def test_wrong_fingerprint_is_bad_certificate(self):
        self.assertKdAlert(self.refused(self.client(credentials=_STRANGER)), 42)

    def test_no_common_profile_is_handshake_failure(self):
        self.assertKdAlert(self.refused(self.client(profiles=(P7,))), 40)

    def test_malformed_extension_56_is_decode_error(self):
        from tests.test_hello import replacing, rewrite

        def malformed(datagram):
            # The ClientHello that returns the cookie, with a length prefix
            # that does not match its tls-id.
            if datagram[13] == 1 and datagram[13 + 12 + 2 + 32 + 1] != 0:
                return rewrite(datagram, replacing(56, b"\x05" + TLS_ID.encode()))
            return datagram

        self.assertKdAlert(self.refused(self.client(), rewrite=malformed), 50)

    def test_internal_error(self):
        def broken(association_id, query):
            raise RuntimeError("a bug in the identity check")

        self.patch(self.kd, "_decide", broken)
        self.assertKdAlert(self.refused(self.client()), 80)

    def test_client_refuses_kd_tls_id_mismatch_with_handshake_failure(self):
        md = MediaDistributorStandIn(self.kd)
        shuttle = Shuttle(md, self.client(expected="SomethingElse-0123456789"), self.clock)
        run(md, shuttle)
        self.assertIsNone(shuttle.complete())
        self.assertEqual(wire_alerts(shuttle.sent), [(2, 40)])


class ConferenceProfileTests(KeyDistributorTestCase):
    """Every member of a conference uses the SRTP profile of the first one."""

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.second, _ = yield self.roster.put(CONFERENCE, SECOND_TLS_ID, _SECOND.fingerprint)
        self.logged = []
        self.kd.log = Logger(observer=self.logged.append)

    def second_client(self, profiles):
        return dtls.ClientAssociation(
            _SECOND, profiles, tls_id=SECOND_TLS_ID.encode(),
            expected_peer_tls_id=self.second.kd_tls_id.encode(),
            expected_peer_fingerprint=_KD_CREDENTIALS.fingerprint)

    def join(self, md, client):
        shuttle = Shuttle(md, client, self.clock)
        run(md, shuttle)
        return shuttle

    def test_later_member_gets_the_conference_profile(self):
        md = MediaDistributorStandIn(self.kd)
        first = self.join(md, self.client(profiles=(P10,)))
        self.assertEqual(first.complete().profile, P10)
        # The Key Distributor prefers 0x0009, and the second member offers it first.
        second = self.join(md, self.second_client((P9, P10)))
        self.assertEqual(second.complete().profile, P10)
        [keys] = [m for m in md.log if isinstance(m, wire.MediaKeys)
                  and m.association_id == second.aid]
        self.assertEqual(keys.profile, 0x000A)

    def test_member_without_the_profile_refused(self):
        md = MediaDistributorStandIn(self.kd)
        self.join(md, self.client(profiles=(P10,)))
        second = self.join(md, self.second_client((P9,)))
        self.assertIsNone(second.complete())
        self.assertEqual(wire_alerts(second.received), [(2, 40)])
        self.assertEqual(md.log[-1], wire.EndpointDisconnect(second.aid))
        self.assertIsNone(self.kd.association(second.aid))
        self.assertEqual(self.kd.counters["conference-profile-not-offered"], 1)
        [line] = [e for e in self.logged if "does not offer" in e["log_format"]]
        self.assertEqual(line["profile"], P10.name)
        self.assertEqual(line["conference"], CONFERENCE)

    def test_members_joining_concurrently_agree(self):
        for first_offer, second_offer, expected in (((P10,), (P9, P10), P10),
                                                    ((P9, P10), (P10, P9), P9)):
            md = MediaDistributorStandIn(self.kd)
            first = Shuttle(md, self.client(profiles=first_offer), self.clock)
            second = Shuttle(md, self.second_client(second_offer), self.clock)
            # Both past the cookie exchange, then both mid-handshake at once.
            for _ in range(2):
                first.send()
                first.deliver(md.received())
                second.send()
                second.deliver(md.received())
            self.assertIsNotNone(self.kd.association(first.aid))
            self.assertIsNotNone(self.kd.association(second.aid))
            run(md, first, second)
            self.assertEqual(first.complete().profile, expected)
            self.assertEqual(second.complete().profile, expected)
            for shuttle in (first, second):
                md.send(wire.EndpointDisconnect(shuttle.aid))
            self.assertIsNone(self.kd.conferenceProfile(CONFERENCE))

    def test_profile_forgotten_when_the_conference_empties(self):
        md = MediaDistributorStandIn(self.kd)
        first = self.join(md, self.client(profiles=(P10,)))
        self.assertEqual(self.kd.conferenceProfile(CONFERENCE), P10)
        md.send(wire.EndpointDisconnect(first.aid))
        self.assertIsNone(self.kd.conferenceProfile(CONFERENCE))
        self.assertEqual(self.join(md, self.second_client((P9,))).complete().profile, P9)

    def test_refused_handshake_releases_the_profile(self):
        md = MediaDistributorStandIn(self.kd)
        refused = self.join(md, self.client(credentials=_STRANGER, profiles=(P10,)))
        self.assertIsNone(refused.complete())
        self.assertIsNone(self.kd.conferenceProfile(CONFERENCE))


class ConferenceProfileWithoutTlsIdTests(ConferenceProfileTests):
    allow_missing_tls_id = True

    def test_member_without_tls_id_must_match(self):
        md = MediaDistributorStandIn(self.kd)
        self.join(md, self.client(profiles=(P10,)))
        second = self.join(md, dtls.ClientAssociation(_SECOND, (P9,)))
        self.assertIsNone(second.complete())
        self.assertEqual(wire_alerts(second.received), [(2, 40)])
        [ended] = [e for e in self.logged if e.get("association_id") == second.aid
                   and "reason" in e]
        self.assertIn(P10.name, ended["reason"])
        # Without a tls-id OpenSSL picks before the conference is known
        # (the Key Distributor's first choice), so only an endpoint that
        # offers the conference's profile alone, or first among ours, fits.
        third = self.join(md, dtls.ClientAssociation(_SECOND, (P10,)))
        self.assertEqual(third.complete().profile, P10)


class FragmentedClientHelloTests(KeyDistributorTestCase):
    """A ClientHello split across datagrams (small MTU, long tls-id) gets through the cookie exchange."""

    tls_id = "L" * 255

    def fragmenting_client(self):
        return dtls.ClientAssociation(
            _ENDPOINT, DEFAULT_PROFILES, tls_id=self.tls_id.encode(), mtu=256,
            expected_peer_tls_id=self.registration.kd_tls_id.encode(),
            expected_peer_fingerprint=_KD_CREDENTIALS.fingerprint)

    def test_real_handshake(self):
        md = MediaDistributorStandIn(self.kd)
        shuttle = Shuttle(md, self.fragmenting_client(), self.clock)
        self.assertEqual(len(shuttle.pending), 2)
        run(md, shuttle)
        self.assertIsNotNone(shuttle.complete())
        self.assertEqual(self.kd.counters["hello-reassembled"], 2)  # with and without cookie
        self.assertEqual(len([m for m in md.log if isinstance(m, wire.MediaKeys)]), 1)

    def test_incomplete_hello_keeps_no_association(self):
        md = MediaDistributorStandIn(self.kd)
        shuttle = Shuttle(md, self.fragmenting_client(), self.clock)
        shuttle.pending = shuttle.pending[:1]
        shuttle.send()
        self.assertEqual(md.received(), [])
        self.assertEqual(len(self.kd), 0)
        self.clock.advance(10)
        # Expired on the next ClientHello piece anyone sends.
        Shuttle(md, self.fragmenting_client(), self.clock).send()
        self.assertEqual(self.kd.counters["hello-fragments-timed-out"], 1)


class PeerIdentityTests(KeyDistributorTestCase):
    """
    Associations belong to the Media Distributor's certificate identity
    (issue 13): after a reconnect its new tunnel carries them, and what the
    Key Distributor has to say while it has none waits for it.
    """

    limits = Limits(waiting_max_messages=2)
    ekt = True

    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        return super().setUp()

    def logged(self, prefix):
        return [e for e in self.events if e.get("log_format", "").startswith(prefix)]

    def established(self, md):
        aid = uuid.uuid4()
        client = self.client()
        relay_handshake(md, client, aid, self.clock)
        md.received()
        self.assertTrue(self.kd.association(aid).established)
        return aid, client

    @defer.inlineCallbacks
    def test_new_tunnel_of_the_same_identity_carries_the_association(self):
        md = MediaDistributorStandIn(self.kd)
        aid, client = self.established(md)
        md.close()
        again = MediaDistributorStandIn(self.kd)  # the same identity reconnects
        self.assertIs(self.kd.association(aid).tunnel, again.tunnel)
        self.assertEqual((md.tunnel.associations, again.tunnel.associations), (set(), {aid}))
        yield self.roster.delete(CONFERENCE, TLS_ID)
        messages = again.received()
        self.assertEqual(messages[-1], wire.EndpointDisconnect(aid))
        [alert] = [m for m in messages if isinstance(m, wire.TunneledDtls)]
        events = client.receive(alert.dtls_message, self.clock.seconds()).events
        self.assertTrue([e for e in events if isinstance(e, dtls.Closed)])
        self.assertEqual(md.received(), [])

    @defer.inlineCallbacks
    def test_association_closed_while_no_tunnel_reaches_the_md_when_back(self):
        md = MediaDistributorStandIn(self.kd)
        aid, _ = self.established(md)
        md.close()
        yield self.roster.delete(CONFERENCE, TLS_ID)
        self.assertIsNone(self.kd.association(aid))
        self.assertEqual(self.kd.status()["waiting_messages"], 2)  # alert, EndpointDisconnect
        again = MediaDistributorStandIn(self.kd)
        messages = again.received()
        self.assertEqual([type(m) for m in messages], [wire.TunneledDtls, wire.EndpointDisconnect])
        self.assertEqual(messages[-1], wire.EndpointDisconnect(aid))
        self.assertEqual(self.kd.status()["waiting_messages"], 0)
        # Told once.
        again.close()
        self.assertEqual(MediaDistributorStandIn(self.kd).received(), [])

    def test_released_at_grace_reported_when_back(self):
        md = MediaDistributorStandIn(self.kd)
        aid, _ = self.established(md)
        md.close()
        self.assertIsNone(self.kd.association(aid).tunnel)
        self.clock.advance(self.limits.tunnel_grace)
        self.assertIsNone(self.kd.association(aid))
        self.assertEqual(len(self.logged("Association {association_id} released")), 1)
        again = MediaDistributorStandIn(self.kd)
        self.assertEqual(again.received(), [wire.EndpointDisconnect(aid)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_waiting_bounded_and_given_up_at_grace(self):
        md = MediaDistributorStandIn(self.kd)
        aid = uuid.uuid4()
        client = dtls.ClientAssociation(
            _ENDPOINT, DEFAULT_PROFILES, tls_id=TLS_ID.encode(),
            expected_peer_tls_id=self.registration.kd_tls_id.encode(), ekt_ciphers=(1,))
        relay_handshake(md, client, aid, self.clock)
        md.received()
        md.close()
        for _ in range(3):  # three ekt_key messages for a bound of two
            self.successResultOf(self.kd.rekey(CONFERENCE))
        self.assertEqual(self.kd.counters["dropped-waiting-full"], 1)
        self.assertEqual(len(self.logged("Dropping tunnel messages for")), 1)
        self.assertEqual(self.kd.status()["waiting_messages"], 2)
        self.clock.advance(self.limits.tunnel_grace)
        [dropped] = self.logged("Dropped {count} tunnel messages that waited")
        self.assertEqual((dropped["count"], dropped["owed"]), (2, 1))
        # Only the release is still owed to it.
        again = MediaDistributorStandIn(self.kd)
        self.assertEqual(again.received(), [wire.EndpointDisconnect(aid)])

    def test_another_identity_still_refused_after_a_reconnect(self):
        md = MediaDistributorStandIn(self.kd, identity="md-a.test")
        aid, _ = self.established(md)
        md.close()
        other = MediaDistributorStandIn(self.kd, identity="md-b.test")
        self.assertIsNone(self.kd.association(aid).tunnel)  # not moved to another identity
        other.send(wire.EndpointDisconnect(aid))
        other.send(wire.TunneledDtls(aid, b"\x17\xfe\xfd" + bytes(30)))
        self.assertEqual(self.kd.counters["foreign-association"], 2)
        self.assertIsNotNone(self.kd.association(aid))
        self.assertEqual(other.received(), [])
        again = MediaDistributorStandIn(self.kd, identity="md-a.test")
        self.assertIs(self.kd.association(aid).tunnel, again.tunnel)

    def test_rejoin_through_the_same_media_distributor_supersedes(self):
        md = MediaDistributorStandIn(self.kd)
        old, _ = self.established(md)
        md.close()
        restarted = MediaDistributorStandIn(self.kd)  # knows nothing of ``old``
        new, _ = self.established(restarted)
        self.assertIsNone(self.kd.association(old))
        self.assertIn(wire.EndpointDisconnect(old), restarted.log)
        self.assertEqual(self.kd.counters["superseded"], 1)
        # Through another Media Distributor, both stay.
        other = MediaDistributorStandIn(self.kd, identity="md-2.test")
        self.established(other)
        self.assertIsNotNone(self.kd.association(new))

    def test_each_rejoin_supersedes_the_one_before_and_nothing_is_kept(self):
        # Superseded associations are found through a tls-id index: it must
        # follow every join and every end, and hold nothing once all ended.
        md = MediaDistributorStandIn(self.kd)
        first, _ = self.established(md)
        second, _ = self.established(md)
        third, _ = self.established(md)
        self.assertIsNone(self.kd.association(first))
        self.assertIsNone(self.kd.association(second))
        self.assertEqual(self.kd.counters["superseded"], 2)
        md.send(wire.EndpointDisconnect(third))
        self.assertIsNone(self.kd.association(third))
        self.assertEqual(self.kd._establishedByTlsId, {})
        fourth, _ = self.established(md)
        self.assertEqual(self.kd.counters["superseded"], 2)
        self.assertIsNotNone(self.kd.association(fourth))

    @defer.inlineCallbacks
    def test_tunnel_without_identity_keeps_per_connection_behaviour(self):
        md = MediaDistributorStandIn(self.kd, identity=None)
        aid, _ = self.established(md)
        md.close()
        again = MediaDistributorStandIn(self.kd, identity=None)
        self.assertIsNone(self.kd.association(aid).tunnel)
        yield self.roster.delete(CONFERENCE, TLS_ID)
        self.assertIsNone(self.kd.association(aid))
        self.assertEqual(again.received(), [])
        self.assertEqual(self.kd.status()["waiting_messages"], 0)
