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
from tests.storehelpers import SqliteDatabase
from tests.test_kd_cluster import TwoKeyDistributorsTests
from tests.test_kd_service import CONFERENCE, TLS_ID, eventually

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
        yield self.node.recordAssociation(str(self.aid), "md.test", b"state", 5 + BLOCK)
        # Used up before the row is known written: refused, nothing asked yet.
        self.assertFalse(self.sequences.reserve(self.aid, 5 + BLOCK, 5 + 2 * BLOCK))
        self.sequences.recorded(str(self.aid))
        yield eventually(lambda: not self.sequences._pending)
        self.assertEqual((yield self.row()), 5 + 3 * BLOCK)
        # Granted from the reserved block; its second half reserves the next.
        self.assertTrue(self.sequences.reserve(self.aid, 5 + BLOCK, 5 + 2 * BLOCK))
        self.assertTrue(self.sequences.reserve(self.aid, 5 + 2 * BLOCK, 5 + 3 * BLOCK))
        yield eventually(lambda: self.sequences.reservations == 2)
        self.assertEqual((yield self.row()), 5 + 5 * BLOCK)

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
