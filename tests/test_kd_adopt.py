"""
Failover without a handshake: an established association exported by one
KeyDistributor and adopted by another of the same identity (sharing the
roster and the conference keys, as a cluster's database would), driven over
the real tunnel protocol with a real client-role DTLS engine.
"""

from __future__ import annotations

import os
import uuid

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import TestCase

from perc import dtls, wire
from perc.dtls.state import AssociationState
from perc.kd.associations import AssociationRecord, KeyDistributor, Limits
from perc.kd.conference_keys import ConferenceKeys
from perc.kd.roster import Roster
from perc.profiles import DEFAULT_PROFILES
from tests.kdhelpers import MediaDistributorStandIn, relay_handshake

CONFERENCE = "conf-1"
TLS_ID = "EndpointTlsId-0123456789"
MD = "md.test"

_KD_CREDENTIALS = dtls.Credentials.self_signed("kd.test")
_ENDPOINT = dtls.Credentials.self_signed("endpoint")


class AdoptionTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        directory = self.mktemp()
        os.makedirs(directory)
        self.roster = yield Roster.open(os.path.join(directory, "kd.sqlite3"))
        self.addCleanup(self.roster.close)
        self.registration, _ = yield self.roster.put(CONFERENCE, TLS_ID, _ENDPOINT.fingerprint)
        self.clock = MemoryReactorClock()
        self.keys = ConferenceKeys()
        self.reserved = []  # (KD, association id, start, end)
        self.kd1 = self.distributor("kd1")
        self.kd2 = self.distributor("kd2")

    def distributor(self, name):
        def reserve(association_id, start, end):
            self.reserved.append((name, association_id, start, end))
            return True
        kd = KeyDistributor(roster=self.roster, credentials=_KD_CREDENTIALS,
                            profiles=DEFAULT_PROFILES, clock=self.clock,
                            limits=Limits(write_sequence_block=16),
                            conference_keys=self.keys, write_reservation=reserve)
        self.addCleanup(kd.stop)
        return kd

    def client(self):
        return dtls.ClientAssociation(
            _ENDPOINT, DEFAULT_PROFILES, tls_id=TLS_ID.encode(),
            expected_peer_tls_id=self.registration.kd_tls_id.encode(),
            expected_peer_fingerprint=_KD_CREDENTIALS.fingerprint, ekt_ciphers=(1,))

    def deliver(self, md, client, aid):
        """The Key Distributor's datagrams to the client, its answers back; the client's events."""
        events = []
        for message in md.received():
            if isinstance(message, wire.TunneledDtls):
                output = client.receive(message.dtls_message, self.clock.seconds())
                events.extend(output.events)
                for datagram in output.datagrams:
                    md.send(wire.TunneledDtls(aid, datagram))
        return events

    def send(self, md, client, aid, data):
        for datagram in client.send_application_data(data).datagrams:
            md.send(wire.TunneledDtls(aid, datagram))

    def established_on_kd1(self):
        """A handshake through KD1, its EKTKey read; then KD1 exports it and dies."""
        md1 = MediaDistributorStandIn(self.kd1, identity=MD)
        aid = uuid.uuid4()
        client = self.client()
        events = relay_handshake(md1, client, aid, self.clock)
        self.assertEqual(len([e for e in events if isinstance(e, dtls.HandshakeComplete)]), 1)
        [key] = [e.key for e in events if isinstance(e, dtls.EktKeyReceived)]
        self.assertTrue(self.kd1.association(aid).engine.ekt_key_acknowledged)
        record = self.kd1.exportAssociation(aid)
        self.kd1.stop()  # KD1 is gone; its tunnel with it
        return client, aid, key, record

    def test_adopted_association_gets_rekeys_and_requests_with_no_handshake(self):
        client, aid, key, record = self.established_on_kd1()
        md2 = MediaDistributorStandIn(self.kd2, identity=MD)
        self.clock.advance(3)
        self.assertEqual(self.kd2.adoptAssociation(record, md2.tunnel, self.clock.seconds()),
                         aid)
        # No MediaKeys again (the Media Distributor has them), nothing at all.
        self.assertEqual(md2.received(), [])
        adopted = self.kd2.association(aid)
        self.assertTrue(adopted.established)
        self.assertIs(adopted.tunnel, md2.tunnel)
        self.assertIn(aid, md2.tunnel.associations)
        # An EKTKey request through KD2's tunnel is answered with the conference's key.
        self.send(md2, client, aid, b"\x01")
        [event] = self.deliver(md2, client, aid)
        self.assertTrue(event.key.same_key(key))
        # A rekey on KD2 reaches the endpoint, which reads and acknowledges it.
        new, count = self.successResultOf(self.kd2.rekey(CONFERENCE))
        self.assertEqual(count, 1)
        events = self.deliver(md2, client, aid)
        self.assertEqual([(e.key, e.repeated) for e in events], [(new, False)])
        self.assertTrue(adopted.engine.ekt_key_acknowledged)
        # KD2 continued after KD1's reserved limit, a block at a time.
        state = AssociationState.from_bytes(record.state)
        self.assertEqual([r[1:] for r in self.reserved if r[0] == "kd2"],
                         [(aid, state.write_limit, state.write_limit + 16)])
        self.assertFalse(any(isinstance(m, wire.MediaKeys) for m in md2.log))
        self.assertEqual(self.kd2.counters.get("handshake-completed"), None)
        self.assertEqual(self.kd2.counters["adopted"], 1)

    @defer.inlineCallbacks
    def test_deleted_registration_ends_an_adopted_association(self):
        client, aid, _, record = self.established_on_kd1()
        md2 = MediaDistributorStandIn(self.kd2, identity=MD)
        self.kd2.adoptAssociation(record, MD, self.clock.seconds())
        self.assertIs(self.kd2.association(aid).tunnel, md2.tunnel)
        yield self.roster.delete(CONFERENCE, TLS_ID)
        messages = md2.received()
        self.assertEqual(messages[-1], wire.EndpointDisconnect(aid))
        # The endpoint heard close_notify.
        [closed] = [m for m in messages if isinstance(m, wire.TunneledDtls)]
        [event] = client.receive(closed.dtls_message, self.clock.seconds()).events
        self.assertIsInstance(event, dtls.Closed)
        self.assertIsNone(self.kd2.association(aid))

    @defer.inlineCallbacks
    def test_registration_gone_before_adoption(self):
        _, aid, _, record = self.established_on_kd1()
        md2 = MediaDistributorStandIn(self.kd2, identity=MD)
        yield self.roster.delete(CONFERENCE, TLS_ID)
        self.assertIsNone(self.kd2.adoptAssociation(record, md2.tunnel, self.clock.seconds()))
        self.assertEqual(md2.received(), [wire.EndpointDisconnect(aid)])
        self.assertEqual(len(self.kd2), 0)
        self.assertEqual(self.kd2.counters["adoption-refused"], 1)

    def test_adopted_before_the_tunnel_comes_up(self):
        """Its messages wait for that Media Distributor's tunnel, which then carries it."""
        client, aid, _, record = self.established_on_kd1()
        self.kd2.adoptAssociation(record, MD, self.clock.seconds())
        self.assertIsNone(self.kd2.association(aid).tunnel)
        new, _ = self.successResultOf(self.kd2.rekey(CONFERENCE))
        md2 = MediaDistributorStandIn(self.kd2, identity=MD)
        self.assertIs(self.kd2.association(aid).tunnel, md2.tunnel)
        events = self.deliver(md2, client, aid)
        self.assertEqual([e.key for e in events], [new])

    def test_only_the_same_media_distributor_and_once(self):
        _, _, _, record = self.established_on_kd1()
        other = MediaDistributorStandIn(self.kd2, identity="other.md")
        self.assertRaises(ValueError, self.kd2.adoptAssociation, record, other.tunnel, 0.0)
        self.kd2.adoptAssociation(record, MD, 0.0)
        self.assertRaises(ValueError, self.kd2.adoptAssociation, record, MD, 0.0)
        # A tunnel of another Media Distributor cannot touch it.
        other.send(wire.EndpointDisconnect(record.association_id))
        self.assertIsNotNone(self.kd2.association(record.association_id))

    def test_export_refused_unless_established(self):
        self.assertRaises(ValueError, self.kd1.exportAssociation, uuid.uuid4())
        md = MediaDistributorStandIn(self.kd1, identity=None)
        aid = uuid.uuid4()
        relay_handshake(md, self.client(), aid, self.clock)
        # A tunnel without a certificate identity: nobody else could carry it.
        self.assertRaises(ValueError, self.kd1.exportAssociation, aid)

    def test_record_repr_hides_the_state(self):
        _, _, _, record = self.established_on_kd1()
        self.assertIsInstance(record, AssociationRecord)
        self.assertNotIn(record.state.decode("ascii")[:40], repr(record))
        self.assertNotIn("state", repr(record))

    def test_rekeyed_while_nobody_served_it(self):
        """A rekey between KD1's death and the adoption reaches the endpoint at adoption."""
        client, aid, key, record = self.established_on_kd1()
        md2 = MediaDistributorStandIn(self.kd2, identity=MD)
        new, count = self.successResultOf(self.kd2.rekey(CONFERENCE))
        self.assertEqual(count, 0)
        self.kd2.adoptAssociation(record, md2.tunnel, self.clock.seconds())
        events = self.deliver(md2, client, aid)
        self.assertEqual([e.key for e in events], [new])
        self.assertTrue(self.kd2.association(aid).engine.ekt_key_acknowledged)

    def test_adoption_bounded_by_max_associations(self):
        _, aid, _, record = self.established_on_kd1()
        self.kd2.limits = Limits(max_associations=0)
        self.assertRaises(ValueError, self.kd2.adoptAssociation, record, MD, 0.0)
        self.assertIsNone(self.kd2.association(aid))
