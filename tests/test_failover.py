"""
Stateful failover wired end to end (issue 14 item 4): write sequence numbers
granted only from blocks the database reserved (WriteSequences, on a real
SQLite store), and two whole Key Distributor services on one PostgreSQL
database (PERC_TEST_POSTGRES) where the first crashes (its lease is not
released) and the second adopts its association and rekeys it with no new
handshake, sealing from the row's reserved limit on.
"""

from __future__ import annotations

import os
import struct
import uuid

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from perc import dtls, wire
from perc.kd.cluster import ClusterNode, WriteSequences
from perc.kd.sealing import SealingKey
from perc.kd.store import AssociationRecord, Store
from perc.profiles import DEFAULT_PROFILES
import tests.test_kd_cluster as cluster_tests
from tests.storehelpers import SqliteDatabase
from tests.test_kd_service import TLS_ID, KeyDistributorServiceMixin, eventually

BLOCK = 16


class _Engine:
    """What WriteSequences grants to late: an engine's reservation state (not under test)."""

    def __init__(self, limit):
        self.write_sequence_limit = limit
        self.needs_write_sequences = True

    def grant_write_sequences(self, limit):
        self.write_sequence_limit = limit
        self.needs_write_sequences = False


class _Association:
    def __init__(self, engine, established=True):
        self.engine = engine
        self.established = established


class _Distributor:
    def __init__(self):
        self.associations = {}

    def association(self, association_id):
        return self.associations.get(association_id)


class WriteSequencesTests(SqliteDatabase, TestCase):
    """Blocks come from the database's ``sequence_reserved``; nothing beyond it is granted."""

    @defer.inlineCallbacks
    def setUp(self):
        self.store = yield Store.open(self.makeDatabase(), SealingKey.generate(), reactor)
        self.addCleanup(self.store.close)
        self.node = ClusterNode(store=self.store, node_id="kd-1", clock=reactor,
                                lease_seconds=30)
        yield self.node.start()
        self.addCleanup(self.node.stop, False)
        self.distributor = _Distributor()
        self.sequences = WriteSequences(self.node, BLOCK, self.distributor)
        self.aid = uuid.uuid4()

    def row(self):
        return self.store.get_association(str(self.aid)).addCallback(
            lambda record: record.sequence_reserved)

    @defer.inlineCallbacks
    def test_new_association_then_database_blocks(self):
        self.distributor.associations[self.aid] = _Association(_Engine(5), established=False)
        self.assertTrue(self.sequences.reserve(self.aid, 5, 5 + BLOCK))  # before its row
        # Its row reserves the next two blocks too (no reservation of its own).
        reserved = self.sequences.ahead(5 + BLOCK)
        self.assertEqual(reserved, 5 + 3 * BLOCK)
        yield self.node.recordAssociation(str(self.aid), "md.test", b"state", reserved)
        # Used up before the row is known written: refused, nothing asked.
        self.assertFalse(self.sequences.reserve(self.aid, 5 + BLOCK, 5 + 2 * BLOCK))
        self.assertEqual(self.sequences._pending, {})
        self.sequences.recorded(str(self.aid), reserved)
        self.assertEqual(self.sequences._pending, {})
        # Granted from the row's reservation; its second half reserves the next.
        self.assertTrue(self.sequences.reserve(self.aid, 5 + BLOCK, 5 + 2 * BLOCK))
        self.assertEqual(self.sequences._pending, {})
        self.assertTrue(self.sequences.reserve(self.aid, 5 + 2 * BLOCK, 5 + 3 * BLOCK))
        yield eventually(lambda: self.sequences.reservations == 1)
        self.assertEqual((yield self.row()), 5 + 5 * BLOCK)
        self.assertFalse(self.sequences.reserve(self.aid, 5 + 5 * BLOCK, 5 + 6 * BLOCK))

    @defer.inlineCallbacks
    def test_adopter_starts_at_the_row_and_waits_for_the_database(self):
        engine = _Engine(100)
        self.distributor.associations[self.aid] = _Association(engine)
        yield self.node.recordAssociation(str(self.aid), "md.test", b"state", 100)
        self.sequences.adopting(str(self.aid), 100)
        self.assertFalse(self.sequences.reserve(self.aid, 100, 100 + BLOCK))
        yield eventually(lambda: not engine.needs_write_sequences)
        self.assertEqual(engine.write_sequence_limit, 100 + BLOCK)
        self.assertEqual((yield self.row()), 100 + 2 * BLOCK)

    def test_established_but_unknown_is_never_granted_locally(self):
        self.distributor.associations[self.aid] = _Association(_Engine(0))
        self.assertFalse(self.sequences.reserve(self.aid, 0, BLOCK))

    @defer.inlineCallbacks
    def test_not_this_nodes_row_or_no_lease(self):
        yield self.store.put_association(AssociationRecord(
            str(self.aid), "kd-2", "md.test", b"state", 100))
        self.sequences.adopting(str(self.aid), 100)
        self.assertFalse(self.sequences.reserve(self.aid, 100, 100 + BLOCK))
        yield eventually(lambda: not self.sequences._pending)
        self.assertFalse(self.sequences.reserve(self.aid, 100, 100 + BLOCK))
        self.assertEqual((yield self.row()), 100)  # another node's: never moved
        self.node._expire()
        self.assertFalse(self.sequences.reserve(uuid.uuid4(), 0, BLOCK))


def record_sequences(datagram: bytes) -> list:
    """(epoch, sequence number) of each DTLS 1.2 record in ``datagram``."""
    found = []
    while len(datagram) >= 13:
        epoch, high, low, length = struct.unpack("!HHIH", datagram[3:13])
        found.append((epoch, (high << 32) | low))
        datagram = datagram[13 + length:]
    return found


class CrashedKeyDistributorTests(KeyDistributorServiceMixin, TestCase):
    """
    Two whole Key Distributor services (same PKI, sealing key, PostgreSQL
    database; 3 s leases), one Media Distributor with a tunnel to each.
    KD1 crashes (tunnels cut, lease not released); KD2 adopts the endpoint's
    association once the lease expires, and a rekey through KD2 reaches the
    endpoint with no handshake, sealed from the row's reserved limit on.
    """

    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        from tests.storehelpers import postgres_database

        self.dsn = postgres_database(self)
        yield super().setUp()
        self.first = self.service
        self.first_api, self.first_tunnel = self.api_url, self.tunnel_port
        self.service = None
        yield self.start("--api-token-file", os.path.join(self.dir, "token2"))
        self.second = self.service
        self.second_tunnel = self.tunnel_port

    def options(self, *extra):
        return super().options("--db", self.dsn, "--sealing-key",
                               os.path.join(self.dir, "cluster.sealing-key"),
                               "--lease-seconds", "3", *extra)

    rekeyThroughSecond = cluster_tests.TwoKeyDistributorsTests.rekeyThroughSecond
    untilKey = cluster_tests.TwoKeyDistributorsTests.untilKey

    def crashFirst(self):
        """What SIGKILL leaves: no tunnels, no state, no renewals, the lease not released."""
        first = self.first
        first.adoption.stop()
        first.node.stop(release=False)
        first._leaseLost()

    @defer.inlineCallbacks
    def test_survivor_adopts_and_rekeys_with_no_handshake(self):
        endpoint = dtls.Credentials.self_signed("endpoint")
        self.api_url = self.first_api
        with open(os.path.join(self.dir, "token")) as f:
            self.token = f.read().strip()
        kd_tls_id = yield self.register(endpoint.fingerprint)
        self.tunnel_port = self.first_tunnel
        md1 = yield self.tunnel()
        self.tunnel_port = self.second_tunnel
        md2 = yield self.tunnel()
        client = dtls.ClientAssociation(endpoint, DEFAULT_PROFILES[:1], tls_id=TLS_ID.encode(),
                                        expected_peer_tls_id=kd_tls_id.encode(),
                                        ekt_ciphers=(1,))
        aid = uuid.uuid4()
        yield self.relay(md1, client, aid)
        received = []
        yield self.untilKey(md1, client, aid, received, lambda key: True)
        yield self.first.distributor.ownership.writing()
        yield eventually(lambda: not self.first.writeSequences._pending)
        row = yield self.first.store.get_association(str(aid))
        self.assertEqual(row.owner_node, self.first.node_id)
        # The block ahead is reserved once the row is written.
        self.assertGreater(row.sequence_reserved,
                           self.first.distributor.association(aid).engine.write_sequence_limit)

        reserved_by_first = row.sequence_reserved
        self.crashFirst()
        yield md1.lost.addTimeout(20, reactor)
        yield eventually(lambda: self.second.distributor.association(aid) is not None,
                         timeout=30)
        self.assertEqual(self.second.adoption.adopted, 1)
        row = yield self.second.store.get_association(str(aid))
        self.assertEqual(row.owner_node, self.second.node_id)

        rekeyed = yield self.rekeyThroughSecond()
        sequences = []
        while not (received and received[-1].ekt_spi == rekeyed["ekt_spi"]):
            message = yield md2.next()
            self.assertNotIsInstance(message, wire.MediaKeys)  # no new handshake
            if not isinstance(message, wire.TunneledDtls):
                continue
            sequences.extend(record_sequences(message.dtls_message))
            output = client.receive(message.dtls_message, reactor.seconds())
            received.extend(e.key for e in output.events if isinstance(e, dtls.EktKeyReceived))
            for datagram in output.datagrams:
                md2.sendMessage(wire.TunneledDtls(aid, datagram))
        self.assertTrue(sequences)
        # Every record KD2 sealed lies beyond what KD1 may have used.
        for epoch, sequence in sequences:
            self.assertEqual(epoch, 1)
            self.assertGreaterEqual(sequence, reserved_by_first)
        self.assertEqual(self.second.distributor.counters.get("adopted"), 1)
