"""
Group commit of the store's association writes (perc.kd.store.batch) on both
databases (PostgreSQL with PERC_TEST_POSTGRES): the writes of one reactor
turn go in one transaction, each caller's Deferred fires once its write is
committed (another connection sees it), a write that fails fails alone and
the others of its batch are written, a full queue refuses (counted, one
warning, one line when it ends), a closed store fails what waits; on
PostgreSQL the server itself shows one transaction (the rows' xmin), and a
batch survives connections the server ended.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import capturedLogs
from twisted.trial.unittest import TestCase

from perc.kd.sealing import SealingKey
from perc.kd.store import AssociationRecord, Store
from tests.storehelpers import PostgresDatabase, SqliteDatabase

N = 20


def row(aid: str, owner: str = "kd-1", reserved: int = 100) -> AssociationRecord:
    return AssociationRecord(aid, owner, "md.test", b"state of " + aid.encode(), reserved)


class GroupCommitTestsMixin:
    def setUp(self):
        self.database = self.makeDatabase()

    @defer.inlineCallbacks
    def open(self):
        store = yield Store.open(self.database, SealingKey.generate())
        self.addCleanup(store.close)
        return store

    def visible(self, aid: str) -> list:
        """The row of ``aid`` as another connection sees it (committed)."""
        return self.execute("SELECT owner_node, sequence_reserved FROM associations"
                            " WHERE association_id = ?", (aid,))

    @defer.inlineCallbacks
    def test_writes_of_one_turn_are_one_transaction_each_fires_once_committed(self):
        store = yield self.open()
        batches = store.writes.batches
        seen = []

        def committed(_, aid):
            seen.append(self.visible(aid))
        yield defer.gatherResults([
            store.put_association(row("a{:02d}".format(i))).addCallback(
                committed, "a{:02d}".format(i)) for i in range(N)])
        self.assertEqual(store.writes.batches - batches, 1)
        self.assertEqual(seen, [[("kd-1", 100)]] * N)
        # Reservations, updates and deletes of one turn: one more transaction,
        # applied in the order submitted (two reservations of one row stack).
        results = yield defer.gatherResults(
            [store.reserve_block("a{:02d}".format(i), 10, "kd-1") for i in range(N)]
            + [store.reserve_block("a00", 10, "kd-1"),
               store.update_association(row("a01", reserved=5)),
               store.update_association(row("a02", owner="kd-2")),
               store.delete_association("a03"), store.delete_association("none")])
        self.assertEqual(store.writes.batches - batches, 2)
        self.assertEqual(results, [(100, 110)] * N + [(110, 120), True, False, True, False])
        self.assertEqual(self.visible("a00"), [("kd-1", 120)])
        self.assertEqual(self.visible("a01"), [("kd-1", 110)])  # never lowered
        self.assertEqual(self.visible("a03"), [])
        self.assertEqual(store.writes.writes, 2 * N + 5)

    @defer.inlineCallbacks
    def test_a_failing_write_fails_alone(self):
        """
        The batch is rolled back; the failing write's caller gets its error
        and the others go again in the next batch (nothing applied twice).
        """
        store = yield self.open()
        batches = store.writes.batches
        bad = AssociationRecord("bad", None, "md.test", b"x", 0)  # owner_node NOT NULL
        writes = [store.put_association(row("a")), store.reserve_block("a", 10, "kd-1"),
                  store.put_association(bad), store.put_association(row("b")),
                  store.reserve_block("b", 10, "kd-1")]
        results = yield defer.DeferredList(writes, consumeErrors=True)
        self.assertEqual([ok for ok, _ in results], [True, True, False, True, True])
        results[2][1].trap(*store.errors)
        self.assertEqual([results[i][1] for i in (1, 4)], [(100, 110), (100, 110)])
        self.assertEqual(self.visible("a"), [("kd-1", 110)])  # reserved once, not twice
        self.assertEqual(self.visible("b"), [("kd-1", 110)])
        self.assertEqual(self.visible("bad"), [])
        self.assertEqual((store.writes.batches - batches, store.writes.retried), (2, 4))

    @defer.inlineCallbacks
    def test_full_queue_refuses_counted_one_warning_then_accepts(self):
        store = yield self.open()
        store.writes.max_batch, store.writes.max_queued = 2, 4
        with capturedLogs() as events:
            writes = [store.put_association(row("a{}".format(i))) for i in range(7)]
            results = yield defer.DeferredList(writes, consumeErrors=True)
            self.assertEqual([ok for ok, _ in results], [True] * 4 + [False] * 3)
            for _, failure in results[4:]:
                failure.trap(*store.errors)
                self.assertIn("write queue full", failure.getErrorMessage())
            self.assertEqual(store.writes.refused, 3)
            yield store.put_association(row("later"))
        said = [(e["log_level"].name, e["log_format"].split(":")[0]) for e in events
                if e.get("log_namespace") == "perc.kd.store.batch"]
        self.assertEqual(said, [("warn", "Database writes refused"),
                                ("info", "Database writes accepted again ({refused} refused "
                                 "so far)")])
        self.assertEqual(len(self.visible("later")), 1)

    @defer.inlineCallbacks
    def test_closed_store_fails_waiting_writes(self):
        store = yield self.open()
        waiting = store.put_association(row("a"))
        yield store.close()
        yield self.assertFailure(waiting, *store.errors)
        yield self.assertFailure(store.reserve_block("a", 10, "kd-1"), *store.errors)


class SqliteGroupCommitTests(SqliteDatabase, GroupCommitTestsMixin, TestCase):
    pass


class PostgresGroupCommitTests(PostgresDatabase, GroupCommitTestsMixin, TestCase):
    timeout = 60

    def transactions(self) -> set:
        """The transactions that last wrote each row (PostgreSQL's xmin)."""
        return {xmin for (xmin,) in self.execute("SELECT xmin::text FROM associations")}

    @defer.inlineCallbacks
    def test_the_server_sees_one_transaction(self):
        store = yield self.open()
        aids = ["a{:02d}".format(i) for i in range(N)]
        yield defer.gatherResults([store.put_association(row(aid)) for aid in aids])
        [inserted] = self.transactions()
        yield defer.gatherResults([store.reserve_block(aid, 10, "kd-1") for aid in aids])
        [reserved] = self.transactions()
        self.assertNotEqual(inserted, reserved)

    @defer.inlineCallbacks
    def test_a_batch_on_connections_the_server_ended(self):
        """Each lost pooled connection is replaced before commit; no write fails."""
        store = yield self.open()
        yield defer.gatherResults([store.ping() for _ in range(4)])
        self.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                     " WHERE datname = current_database() AND pid <> pg_backend_pid()")
        batches = store.writes.batches
        aids = ["a{:02d}".format(i) for i in range(N)]
        yield defer.gatherResults([store.put_association(row(aid)) for aid in aids])
        self.assertEqual(store.writes.batches - batches, 1)
        self.assertEqual(len(self.transactions()), 1)
