"""
Group commit of the store's association writes (ownership rows, write
sequence reservations): a join's writes, and those of every other join of a
burst, cost one thread hop and one commit between them instead of one each
(a PostgreSQL interaction costs about half a millisecond of the Key
Distributor's CPU, more than the rest of its work on a join).
"""

from __future__ import annotations

import collections
from collections.abc import Callable

from twisted.internet import defer
from twisted.logger import Logger

__all__ = ["GroupCommit"]

log = Logger()


class _WriteFailed(Exception):
    """In the pool's thread: the write at ``index`` of a batch raised ``error``."""

    def __init__(self, index: int, error: Exception):
        super().__init__(index, error)
        self.index = index
        self.error = error

    def __str__(self) -> str:
        # What the pool logs when the connection turns out lost.
        return str(self.error)


def _runBatch(cursor, dialect, writes: list) -> list:
    results = []
    for index, (function, args) in enumerate(writes):
        try:
            results.append(function(cursor, dialect, *args))
        except Exception as error:
            # The transaction is rolled back (on PostgreSQL it is aborted
            # anyway): the reactor side learns which write failed.
            raise _WriteFailed(index, error) from error
    return results


class GroupCommit:
    """
    ``submit(function, *args)``: run ``function(cursor, dialect, *args)`` in
    the next batch; a Deferred that fires with its result once the batch's
    transaction has committed (so a write sequence block is never used
    before it is durable), or fails with its error.

    One batch is in flight at a time: what is submitted while it runs waits
    and goes in the next one (up to ``max_batch`` writes), so the busier the
    database the larger the batches.  Writes are applied in the order
    submitted.

    A write that fails fails alone: its batch is rolled back, its caller
    gets the error, and the other writes of the batch go again in the next
    batch (nothing of the rolled-back one was committed, so nothing is
    applied twice).  A batch whose connection fails or whose commit fails
    fails every write in it, as each alone would have failed (the pool has
    already tried once more on a new connection before its commit).

    At most ``max_queued`` writes wait: beyond that (the database far
    slower than the joins) a write is refused at once with the database's
    error, counted in :attr:`refused`, one warning while it lasts and one
    line when writes are accepted again.
    """

    def __init__(self, run: Callable[..., defer.Deferred], reactor, error: type[Exception],
                 max_batch: int = 100, max_queued: int = 10000):
        if max_batch < 1 or max_queued < max_batch:
            raise ValueError("a batch holds at least one write and the queue at least a batch")
        #: ``run(interaction, *args)``: the pool's runInteraction with the dialect bound.
        self._run = run
        self._reactor = reactor
        self._error = error
        self.max_batch = max_batch
        self.max_queued = max_queued
        self._queue: collections.deque = collections.deque()
        self._flushing = None
        self._inFlight = False
        self._closed = False
        self._refusing = False
        #: Totals, for status and tests: transactions run, writes in them,
        #: writes refused (queue full), writes sent again after another failed.
        self.batches = 0
        self.writes = 0
        self.refused = 0
        self.retried = 0

    def __len__(self) -> int:
        """Writes waiting (not yet in a transaction)."""
        return len(self._queue)

    def snapshot(self) -> dict:
        """The counts ``GET /v1/status`` shows (``store_writes``) and /metrics exports."""
        return {"queued": len(self._queue), "in_flight": self._inFlight,
                "batches": self.batches, "writes": self.writes,
                "refused": self.refused, "retried": self.retried}

    def submit(self, function, *args) -> defer.Deferred:
        if self._closed:
            return defer.fail(self._error("the database is closed"))
        if len(self._queue) >= self.max_queued:
            self.refused += 1
            if not self._refusing:
                self._refusing = True
                log.warn("Database writes refused: {queued} already wait for a slow "
                         "database (ownership rows and write sequence blocks of the joins "
                         "meanwhile are not written)", queued=len(self._queue))
            return defer.fail(self._error("database write queue full ({} waiting)".format(
                len(self._queue))))
        d: defer.Deferred = defer.Deferred()
        self._queue.append((function, args, d))
        self._schedule()
        return d

    def _schedule(self) -> None:
        # On the next reactor turn: what the rest of this turn submits joins it.
        if self._queue and not self._inFlight and self._flushing is None and not self._closed:
            self._flushing = self._reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flushing = None
        if self._inFlight or not self._queue:
            return
        batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
        if self._refusing and len(self._queue) < self.max_queued // 2:
            self._refusing = False
            log.info("Database writes accepted again ({refused} refused so far)",
                     refused=self.refused)
        self._inFlight = True
        self.batches += 1
        self.writes += len(batch)
        d = self._run(_runBatch, [(function, args) for function, args, _ in batch])
        d.addBoth(self._landed, batch)

    def _landed(self, result, batch: list) -> None:
        self._inFlight = False
        if isinstance(result, list):
            outcomes = [(d, value) for (_, _, d), value in zip(batch, result)]
            self._schedule()
            for d, value in outcomes:
                d.callback(value)
            return
        failure = result
        if failure.check(_WriteFailed):
            failed = failure.value
            rest = batch[:failed.index] + batch[failed.index + 1:]
            # The others go first in the next batch, in their order.
            self.retried += len(rest)
            self._queue.extendleft(reversed(rest))
            self._schedule()
            batch[failed.index][2].errback(failed.error)
            return
        self._schedule()
        for _, _, d in batch:
            d.errback(failure)

    def close(self) -> None:
        """Refuse what comes; fail what waits (the batch in flight ends with the pool)."""
        self._closed = True
        if self._flushing is not None and self._flushing.active():
            self._flushing.cancel()
        self._flushing = None
        waiting, self._queue = list(self._queue), collections.deque()
        for _, _, d in waiting:
            d.errback(self._error("the database is closed"))
