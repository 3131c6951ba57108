"""
Tests for exporting an established association's state and restoring it
elsewhere (perc.dtls.state, ServerAssociation.restore), and for write
sequence numbers used in reserved blocks: real handshakes with a real
ClientAssociation, in memory.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from perc import dtls
from perc.dtls.records import CONTENT_APPLICATION_DATA, RecordProtection
from perc.dtls.state import AssociationState
from tests.test_dtls_records import (
    KEY,
    REKEY,
    ekt_established,
    only_record,
    sequence_of,
)


def moved(server, now=0.0, **kwargs):
    """``server`` exported, serialised, parsed back and restored as a new engine object."""
    state = AssociationState.from_bytes(server.export_state().to_bytes())
    return dtls.ServerAssociation.restore(state, now, **kwargs)


def to(association, datagrams, now=0.0):
    """Feed ``datagrams`` to ``association``; returns (its datagrams, its events)."""
    out, events = [], []
    for datagram in datagrams:
        output = association.receive(datagram, now)
        out.extend(output.datagrams)
        events.extend(output.events)
    return out, events


def acknowledged(harness):
    """The handshake's ekt_key message read and ACKed (the usual state to export)."""
    output = harness.server.send_ekt_key(KEY, 0.0)
    acks, _ = to(harness.client, output.datagrams)
    to(harness.server, acks)
    assert harness.server.ekt_key_acknowledged
    return harness


class ExportRestoreTests(SynchronousTestCase):
    def test_the_client_carries_on_with_the_restored_association(self):
        """
        Data both ways, a rekey read and ACKed, the EKTKey request answered
        and close_notify, all with the association restored in a new engine
        object and no handshake.
        """
        harness = acknowledged(ekt_established())
        old_message_seq = harness.server.export_state().next_message_seq
        server = moved(harness.server)
        self.assertIsNot(server, harness.server)
        self.assertTrue(server.established and server.compacted)
        self.assertEqual((server.profile, server.peer_tls_id, server.peer_fingerprint,
                          server.ekt_cipher, server.association_id),
                         (harness.server.profile, harness.server.peer_tls_id,
                          harness.server.peer_fingerprint, harness.server.ekt_cipher,
                          harness.server.association_id))
        # Application data, both ways.
        _, events = to(server, harness.client.send_application_data(b"to the new one").datagrams)
        self.assertEqual(events, [dtls.ApplicationData(b"to the new one")])
        _, events = to(harness.client, server.send_application_data(b"from it").datagrams)
        self.assertEqual(events, [dtls.ApplicationData(b"from it")])
        # A rekey: the next message_seq, read and acknowledged.
        acks, events = to(harness.client, server.send_ekt_key(REKEY, 1.0).datagrams)
        [event] = events
        self.assertEqual((event.key, event.repeated, event.message_seq),
                         (REKEY, False, old_message_seq))
        self.assertFalse(server.ekt_key_acknowledged)
        self.assertEqual(to(server, acks), ([], []))
        self.assertTrue(server.ekt_key_acknowledged)
        # close_notify, answered with close_notify.
        replies, events = to(server, harness.client.close(2.0).datagrams)
        [closed] = events
        self.assertIsInstance(closed, dtls.Closed)
        self.assertIn("close_notify", closed.reason)
        self.assertEqual(len(replies), 1)

    def test_replays_of_what_the_exporter_saw_refused(self):
        harness = acknowledged(ekt_established())
        seen, _ = harness.client.send_application_data(b"seen by the old one"), None
        _, events = to(harness.server, seen.datagrams)
        self.assertEqual(len(events), 1)
        server = moved(harness.server)
        self.assertEqual(to(server, seen.datagrams), ([], []))
        # Records the client sends next still open.
        _, events = to(server, harness.client.send_application_data(b"next").datagrams)
        self.assertEqual(events, [dtls.ApplicationData(b"next")])

    def test_ekt_key_awaiting_its_ack_goes_again(self):
        harness = ekt_established()
        harness.server.send_ekt_key(KEY, 0.0)  # lost
        server = moved(harness.server, now=5.0)
        self.assertEqual(server.next_timeout(5.0), 5.0)
        again = only_record(server.handle_timeout(5.0))
        acks, events = to(harness.client, [again])
        [event] = events
        self.assertEqual((event.key, event.repeated), (KEY, False))
        to(server, acks)
        self.assertTrue(server.ekt_key_acknowledged)
        self.assertIsNone(server.next_timeout(6.0))

    def test_ack_of_the_exporters_record_counts(self):
        """The client's ACK of the dead node's ekt_key record reaches the adopter instead."""
        harness = ekt_established()
        sent = harness.server.send_ekt_key(KEY, 0.0)
        server = moved(harness.server, now=0.5)
        acks, _ = to(harness.client, sent.datagrams)
        self.assertEqual(to(server, acks), ([], []))
        self.assertTrue(server.ekt_key_acknowledged)

    def test_state_round_trips_and_hides_its_secrets(self):
        harness = acknowledged(ekt_established())
        state = harness.server.export_state()
        self.assertEqual(AssociationState.from_bytes(state.to_bytes()), state)
        text = repr(state)
        for secret in (state.records["write_key"], state.records["read_key"],
                       state.records["write_iv"], state.ekt_message):
            self.assertNotIn(secret.hex(), text)
            self.assertNotIn(repr(secret), text)
        self.assertIn("write limit", text)

    def test_unusable_state_refused(self):
        harness = acknowledged(ekt_established())
        data = harness.server.export_state().to_bytes()
        for bad in (b"", b"[]", b"{}", data.replace(b'"version":1', b'"version":2'),
                    data.replace(b'"role":"server"', b'"role":"other"'), b"\xff" * 10,
                    data[:-5], b"x" * 100000):
            self.assertRaises(ValueError, AssociationState.from_bytes, bad)
        state = AssociationState.from_bytes(data)
        # A client's state is not a server's.
        self.assertRaises(ValueError, dtls.ClientAssociation.restore, state, 0.0)

    def test_only_established_associations_on_the_own_layer(self):
        harness = ekt_established(compact=False)
        self.assertRaises(dtls.DtlsStateError, harness.client.export_state)
        harness.server.close(0.0)
        self.assertRaises(dtls.DtlsStateError, harness.server.export_state)


class WriteReservationTests(SynchronousTestCase):
    def test_adopter_starts_at_the_exporters_limit(self):
        """
        Even records the exporter sealed after its export (up to its limit)
        are never sealed again with the same sequence number.
        """
        harness = ekt_established()
        harness.server.use_write_reservation(None, block=8)
        first = only_record(harness.server.send_application_data(b"a"))
        state = harness.server.export_state()
        self.assertGreater(state.write_limit, sequence_of(first))
        # The exporter goes on sealing after the export, up to its limit...
        late = []
        while not harness.server.needs_write_sequences or not late:
            output = harness.server.send_application_data(b"late")
            if not output.datagrams:
                break
            late.append(sequence_of(only_record(output)))
        self.assertEqual(max(late), state.write_limit - 1)
        self.assertTrue(harness.server.needs_write_sequences or
                        harness.server.write_sequence_limit > state.write_limit)
        # ... and the adopter's first record comes after all of them.
        adopter = dtls.ServerAssociation.restore(
            AssociationState.from_bytes(state.to_bytes()), 0.0)
        record = only_record(adopter.send_application_data(b"b"))
        self.assertGreaterEqual(sequence_of(record), state.write_limit)
        self.assertGreater(sequence_of(record), max(late))
        _, events = to(harness.client, [record])
        self.assertEqual(events, [dtls.ApplicationData(b"b")])

    def test_blocks_asked_for_in_order(self):
        harness = ekt_established()
        asked = []
        server = moved(harness.server, reserve=lambda start, end: asked.append((start, end))
                       or True, sequence_block=2)
        limit = harness.server.export_state().write_limit
        sequences = [sequence_of(only_record(server.send_application_data(b"x")))
                     for _ in range(5)]
        self.assertEqual(sequences, list(range(limit, limit + 5)))
        self.assertEqual(asked, [(limit, limit + 2), (limit + 2, limit + 4),
                                 (limit + 4, limit + 6)])

    def test_exhausted_block_seals_nothing_until_granted(self):
        harness = ekt_established()
        allowed = [True]
        server = moved(harness.server, reserve=lambda start, end: allowed[0], sequence_block=1)
        self.assertEqual(len(server.send_application_data(b"one").datagrams), 1)
        allowed[0] = False
        # Nothing sealed, nothing raised: data is not sent, the ekt_key message waits.
        self.assertEqual(server.send_application_data(b"two"), dtls.Output())
        self.assertEqual(server.send_ekt_key(REKEY, 1.0), dtls.Output())
        self.assertTrue(server.needs_write_sequences)
        self.assertEqual(server.reservation_refusals, 2)
        self.assertTrue(server.established)
        # The peer's records are still read (no ACK or answer can be sealed).
        _, events = to(server, harness.client.send_application_data(b"still").datagrams)
        self.assertEqual(events, [dtls.ApplicationData(b"still")])
        # A reservation made outside the callback: the message goes at its timer.
        server.grant_write_sequences(server.write_sequence_limit + 4)
        self.assertFalse(server.needs_write_sequences)
        _, events = to(harness.client, server.handle_timeout(server.next_timeout(1.0)).datagrams)
        [event] = events
        self.assertEqual(event.key, REKEY)

    def test_failing_reservation_is_a_refusal(self):
        harness = ekt_established()

        def broken(start, end):
            raise OSError("the store is down")
        server = moved(harness.server, reserve=broken)
        self.assertEqual(server.send_application_data(b"x"), dtls.Output())
        self.assertEqual(server.close(0.0).datagrams, ())  # no close_notify can be sealed
        self.assertTrue(server.closed)

    def test_record_protection_refuses_past_its_limit(self):
        secrets = dict(master_secret=bytes(48), client_random=b"c" * 32,
                       server_random=b"s" * 32, epoch=1, next_write_sequence=5)
        protection = RecordProtection.from_master_secret(
            dtls.records.suite_for("ECDHE-ECDSA-AES128-GCM-SHA256"), server=True,
            write_limit=6, **secrets)
        protection.seal(CONTENT_APPLICATION_DATA, b"x")
        self.assertTrue(protection.needs_reservation)
        self.assertRaises(dtls.records.ReservationNeeded, protection.seal,
                          CONTENT_APPLICATION_DATA, b"y")
        self.assertRaises(ValueError, protection.reserve, 5)
        protection.reserve(7)
        self.assertEqual(sequence_of(protection.seal(CONTENT_APPLICATION_DATA, b"y")), 6)
