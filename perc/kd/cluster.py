"""
One Key Distributor's membership of a cluster (README, "Key Distributor
cluster"): its node identity, its lease in the ``nodes`` table, the
``associations`` rows it owns, and the orphans of dead nodes it claims.

The lease is written on the database's clock and judged on it by the
other nodes; this node judges it on its own clock from the moment it
*sent* each renewal, which is never later than the moment the database
wrote it, so it stops serving (``lost``) before any other node can see its
lease as expired, whatever the two clocks read.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import socket
import uuid
from collections.abc import Callable

from twisted.internet import defer
from twisted.logger import Logger

from perc.dtls.state import AssociationState
from perc.kd import associations
from perc.kd.store import AssociationRecord, Store

__all__ = ["DEFAULT_LEASE_SECONDS", "AssociationOwnership", "ClusterNode", "OrphanAdoption",
           "WriteSequences", "default_node_id"]

#: Seconds a node's lease lasts; renewed every third of it.
DEFAULT_LEASE_SECONDS = 10.0


def default_node_id(listen: str | None = None) -> str:
    """``HOST:PORT`` of a fixed tunnel port, else ``HOST:`` and random hex."""
    host = socket.gethostname() or "kd"
    port = None
    if listen:
        fields = listen.split(":")
        if len(fields) > 1 and fields[1].isdigit() and fields[1] != "0":
            port = fields[1]
    return "{}:{}".format(host, port if port is not None else secrets.token_hex(6))


class ClusterNode:
    """
    ``start()`` takes the lease (fires once held; fails if the database
    does not answer), then renews it every ``lease_seconds / 3``.  When a
    renewal has not succeeded by ``STOP_AT`` of the lease, ``lost()`` is
    called (stop serving: close tunnels, drop association state) and the
    node keeps trying; once a renewal succeeds again, ``regained()``.

    Ownership rows: :meth:`recordAssociation` (a new established
    association), :meth:`updateAssociation`, :meth:`forgetAssociation`,
    :meth:`reserveBlock`; adoption: :meth:`claimOrphans`.  The association
    state is opaque here (``KeyDistributor.exportAssociation`` makes it).
    """

    log = Logger()

    #: The fraction of the lease after the last renewal was sent at which
    #: a node that could not renew stops serving: well before other nodes
    #: see the lease expire, after two renewals have failed.
    STOP_AT = 5 / 6

    def __init__(self, *, store: Store, node_id: str, lease_seconds: float = DEFAULT_LEASE_SECONDS,
                 clock, lost: Callable[[], object] = lambda: None,
                 regained: Callable[[], object] = lambda: None,
                 listen_address: str | None = None, api_address: str | None = None):
        if not lease_seconds > 0:
            raise ValueError("a lease lasts a positive number of seconds")
        self.store = store
        self.node_id = node_id
        self.lease_seconds = float(lease_seconds)
        self.clock = clock
        self._lost = lost
        self._regained = regained
        self._addresses = (listen_address, api_address)
        #: Whether this node holds its lease (may serve).
        self.serving = False
        #: On ``clock``: when this node stops serving unless it renews.
        self.deadline: float | None = None
        self._deadlineTimer = None
        self._renewTimer = None
        self._renewing = False
        self._stopped = False
        self._failing = False
        #: Rows this node owned when it (re)gained its lease: their state
        #: is not in memory (a restart, or a lapse that dropped it), so
        #: they are orphans too, returned by the next claimOrphans.
        self._ownOrphans: set[str] = set()

    # -- the lease -----------------------------------------------------------

    def start(self) -> defer.Deferred:
        """Take the lease; fires once held (then renews it), fails with the store's error."""
        self._stopped = False
        return self._renew(first=True)

    def _renew(self, first: bool = False) -> defer.Deferred:
        if self._renewTimer is not None and self._renewTimer.active():
            self._renewTimer.cancel()  # called early
        self._renewTimer = None
        if self._stopped or self._renewing:
            return defer.succeed(None)
        self._renewing = True
        sent = self.clock.seconds()
        d = self.store.renew_lease(self.node_id, self.lease_seconds, *self._addresses)

        def renewed(_):
            self._renewing = False
            if self._stopped:
                return
            self._failing = False
            self._armDeadline(sent + self.lease_seconds * self.STOP_AT)
            self._scheduleRenewal(sent)
            if not self.serving:
                return self.store.owned_associations(self.node_id).addCallbacks(
                    serve, notYet)

        def serve(owned):
            if self._stopped or self.serving:
                return
            self._ownOrphans = set(owned)
            self.serving = True
            if not first:
                self.log.info("Node {node} holds its lease again: serving", node=self.node_id)
                self._regained()

        def notYet(failure):
            if first:
                return failure
            # Not serving yet: the next renewal tries again.
            self.log.warn("Node {node} could not read its rows: {error}", node=self.node_id,
                          error=failure.getErrorMessage())

        def failed(failure):
            self._renewing = False
            if first:
                return failure
            if not self._failing:
                self._failing = True
                self.log.warn("Node {node} could not renew its lease: {error}",
                              node=self.node_id, error=failure.getErrorMessage())
            self._scheduleRenewal(sent)

        return d.addCallbacks(renewed, failed)

    def _scheduleRenewal(self, sent: float) -> None:
        if self._stopped:
            return
        interval = self.lease_seconds / 3
        self._renewTimer = self.clock.callLater(
            max(0.0, sent + interval - self.clock.seconds()), self._renew)

    def _armDeadline(self, deadline: float) -> None:
        self.deadline = deadline
        if self._deadlineTimer is not None and self._deadlineTimer.active():
            self._deadlineTimer.cancel()
        self._deadlineTimer = self.clock.callLater(
            max(0.0, deadline - self.clock.seconds()), self._expire)

    def _expire(self) -> None:
        if self._deadlineTimer is not None and self._deadlineTimer.active():
            self._deadlineTimer.cancel()
        self._deadlineTimer = None
        if not self.serving:
            return
        self.serving = False
        self.log.error("Node {node} could not renew its lease for {seconds} s: it stops serving "
                       "before the lease expires (tunnels closed, associations dropped; other "
                       "nodes may adopt them)", node=self.node_id,
                       seconds=round(self.lease_seconds * self.STOP_AT, 1))
        self._lost()

    def stop(self, release: bool = True) -> defer.Deferred:
        """Stop renewing; with ``release``, expire the lease now so others adopt at once."""
        self._stopped = True
        self.serving = False
        for timer in (self._renewTimer, self._deadlineTimer):
            if timer is not None and timer.active():
                timer.cancel()
        self._renewTimer = self._deadlineTimer = None
        if not release:
            return defer.succeed(None)
        d = self.store.release_lease(self.node_id)
        d.addErrback(lambda failure: self.log.warn(
            "Node {node} could not release its lease (it expires by itself): {error}",
            node=self.node_id, error=failure.getErrorMessage()))
        return d

    # -- ownership rows ------------------------------------------------------

    def recordAssociation(self, association_id: str, md_identity: str, state: bytes,
                          sequence_reserved: int) -> defer.Deferred:
        """This node owns a newly established association: write its row (state sealed)."""
        return self.store.put_association(AssociationRecord(
            association_id, self.node_id, md_identity, state, sequence_reserved))

    def updateAssociation(self, association_id: str, md_identity: str, state: bytes,
                          sequence_reserved: int) -> defer.Deferred:
        """New state a survivor needs (an EKTKey message sent); fires False if no longer ours."""
        return self.store.update_association(AssociationRecord(
            association_id, self.node_id, md_identity, state, sequence_reserved))

    def forgetAssociation(self, association_id: str) -> defer.Deferred:
        """The association ended: its row goes."""
        return self.store.delete_association(association_id)

    def reserveBlock(self, association_id: str, size: int) -> defer.Deferred:
        """The next write-sequence block ``(start, limit)`` of an association this node owns, or None."""
        return self.store.reserve_block(association_id, size, self.node_id)

    def claimOrphans(self) -> defer.Deferred:
        """
        Claim the rows of every node whose lease expired; fires with the
        sealed records (opened) this node now owns and must adopt
        (``KeyDistributor.adoptAssociation``): those, and its own rows from
        before it (re)gained its lease (once).  Nothing while not serving.
        """
        if not self.serving:
            return defer.succeed([])
        own, self._ownOrphans = sorted(self._ownOrphans), set()
        d = self.store.claim_orphans(self.node_id)
        d.addCallback(lambda claimed: self.store.owned_records(self.node_id, own).addCallback(
            lambda mine: mine + claimed))
        return d


#: Version of :func:`encode_association_record`'s format.
RECORD_FORMAT = 1


def encode_association_record(record: associations.AssociationRecord) -> bytes:
    """
    An :class:`perc.kd.associations.AssociationRecord` as the octets an
    ownership row keeps (sealed by the store): JSON of primitives, the
    engine state in hex.  Secret: never log it.
    """
    return json.dumps({
        "format": RECORD_FORMAT, "association_id": str(record.association_id),
        "state": record.state.hex(), "tls_id": record.tls_id,
        "conference": record.conference, "media_distributor": record.media_distributor,
        "ekt": bool(record.ekt)}, sort_keys=True).encode("ascii")


def decode_association_record(data: bytes) -> associations.AssociationRecord:
    """Inverse of :func:`encode_association_record`; ValueError for anything else."""
    try:
        fields = json.loads(bytes(data).decode("ascii"))
        if not isinstance(fields, dict) or fields.get("format") != RECORD_FORMAT:
            raise ValueError("not an association record of format {}".format(RECORD_FORMAT))
        return associations.AssociationRecord(
            association_id=uuid.UUID(fields["association_id"]),
            state=bytes.fromhex(fields["state"]), tls_id=str(fields["tls_id"]),
            conference=str(fields["conference"]),
            media_distributor=str(fields["media_distributor"]), ekt=bool(fields["ekt"]))
    except (KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError("malformed association record: {}".format(error)) from None


def export_association_state(distributor, association):
    """
    ``(record octets, reserved write limit)`` of an established association
    (:meth:`KeyDistributor.exportAssociation`, encoded by
    :func:`encode_association_record`), or None when it cannot be adopted
    (not on the own record layer, or its tunnel has no certificate
    identity): then no row is written.
    """
    try:
        record = distributor.exportAssociation(association.id)
    except ValueError:
        return None
    return (encode_association_record(record),
            AssociationState.from_bytes(record.state).write_limit)


class AssociationOwnership:
    """
    Keeps a KeyDistributor's ``associations`` rows (its ``ownership``): a
    row when an association is established, deleted when it ends, written
    in order per association.  ``export(distributor, association)`` gives
    ``(state, sequence_reserved)`` or None (see :func:`export_association_state`).
    """

    log = Logger()

    def __init__(self, node: ClusterNode, export=export_association_state,
                 sequences: WriteSequences | None = None):
        self.node = node
        self.export = export
        #: Told when a row is written (its later blocks come from it) and ends.
        self.sequences = sequences
        #: association id -> the last write of its row still under way.
        self._pending: dict[str, defer.Deferred] = {}

    def established(self, distributor, association) -> None:
        exported = self.export(distributor, association)
        if exported is None:
            return
        state, reserved = exported
        tunnel = association.origin
        md_identity = getattr(tunnel, "identity", None) or ""
        sequences = self.sequences

        if sequences is not None:
            # The row reserves the association's next block too: no
            # reservation of its own per join.
            reserved = sequences.ahead(reserved)

        def record(aid):
            d = self.node.recordAssociation(aid, md_identity, state, reserved)
            if sequences is not None:
                d.addCallback(lambda _: sequences.recorded(aid, reserved))
            return d
        self._then(str(association.id), record)

    def updated(self, distributor, association) -> None:
        """Its state changed in a way an adopter needs (an ekt_key message sent): the row follows."""
        exported = self.export(distributor, association)
        if exported is None:
            return
        state, reserved = exported
        md_identity = getattr(association.origin, "identity", None) or ""

        def update(aid):
            d = self.node.updateAssociation(aid, md_identity, state, reserved)

            def checked(ours):
                if not ours:
                    self.log.warn("Ownership row of association {association_id} is not this "
                                  "node's: not updated", association_id=aid)
            return d.addCallback(checked)
        self._then(str(association.id), update)

    def ended(self, association) -> None:
        if self.sequences is not None:
            self.sequences.forget(str(association.id))
        self._then(str(association.id), self.node.forgetAssociation)

    def _then(self, association_id: str, write) -> None:
        previous = self._pending.get(association_id)
        d = defer.Deferred()

        def run(_):
            return write(association_id)

        def failed(failure):
            self.log.warn("Ownership row of association {association_id} not written: {error}",
                          association_id=association_id, error=failure.getErrorMessage())

        def done(_):
            if self._pending.get(association_id) is d:
                del self._pending[association_id]

        d.addCallback(run)
        d.addErrback(failed)
        d.addCallback(done)
        self._pending[association_id] = d
        if previous is None:
            d.callback(None)
        else:
            previous.addBoth(lambda _: d.callback(None))

    def writing(self) -> defer.Deferred:
        """Fires once every row write begun so far has finished (tests, shutdown)."""
        return defer.DeferredList([p for p in self._pending.values()]).addCallback(
            lambda _: None)


class WriteSequences:
    """
    A cluster node's ``write_reservation`` for its KeyDistributor (README,
    "Key Distributor cluster"): no write sequence number is sealed unless
    it lies in a block the database reserved for this node (the row's
    ``sequence_reserved``), so no (key, nonce) pair is used by two nodes.

    :meth:`reserve` is synchronous (called inside seal): it grants the
    engine's block (``block`` numbers) only from what the database already
    reserved; the database is asked for ``2 * block`` at a time, and for the
    next such block as soon as its first half has been granted (half used),
    so the engine rarely waits.  With nothing ready it refuses (nothing is
    sealed; the ekt_key retransmission timer retries) and, once the
    reservation lands, grants through ``grant_write_sequences``.

    A new association's first block is granted before its row exists: the
    row is written with that block's end and the next ``2 * block``
    (:meth:`ahead`) as ``sequence_reserved``, so that the row's own write
    reserves what comes next (one database write per join, not two); an
    association without a row is never adopted.  An adopted one starts at
    its row's ``sequence_reserved`` (:meth:`adopting`).  Nothing is granted
    while the node does not hold its lease.
    """

    log = Logger()

    def __init__(self, node: ClusterNode, block: int, distributor=None):
        if block < 1:
            raise ValueError("a sequence block holds at least one number")
        self.node = node
        self.block = block
        #: The KeyDistributor whose engines are granted what lands late.
        self.distributor = distributor
        #: association id -> [floor, limit, row written]: [floor, limit) is
        #: this node's, reserved in the database (or the local first block).
        self._held: dict[str, list] = {}
        self._pending: dict[str, defer.Deferred] = {}
        #: Refusals and reservations, for status and tests.
        self.refusals = 0
        self.reservations = 0

    def __len__(self) -> int:
        return len(self._held)

    def reserve(self, association_id, start: int, end: int) -> bool:
        """``KeyDistributor(write_reservation=...)``: may ``[start, end)`` be sealed now."""
        key = str(association_id)
        if not self.node.serving:
            self.refusals += 1
            return False
        held = self._held.get(key)
        if held is None:
            if not self._isNew(association_id):
                # Established here but unknown: never grant it locally.
                self.refusals += 1
                return False
            self._held[key] = [start, end, False]
            return True
        floor, limit, recorded = held
        if start >= floor and end <= limit:
            if limit - end < self.block and recorded:
                self._fetch(key)  # the block's second half goes out: reserve the next
            return True
        self.refusals += 1
        if recorded:
            self._fetch(key)
        return False

    def _isNew(self, association_id) -> bool:
        distributor = self.distributor
        if distributor is None:
            return False
        try:
            association = distributor.association(uuid.UUID(str(association_id)))
        except ValueError:
            return False
        return association is None or not association.established

    def ahead(self, limit: int) -> int:
        """What a new row reserves: ``limit`` (its first block's end) and the next blocks."""
        return limit + 2 * self.block

    def recorded(self, association_id: str, reserved: int) -> None:
        """
        The association's row is written (committed), reserving up to
        ``reserved``: what lies below is granted; the next blocks come
        from the database.
        """
        held = self._held.get(association_id)
        if held is not None:
            held[2] = True
            held[1] = max(held[1], reserved)
            # Further blocks are reserved as the engine runs into these (reserve).
            self._grantWaiting(association_id, held)

    def adopting(self, association_id: str, floor: int) -> None:
        """This node adopts the association, its row reserved up to ``floor``: it starts there."""
        self._held[association_id] = [floor, floor, True]

    def forget(self, association_id: str) -> None:
        self._held.pop(association_id, None)

    def clear(self) -> None:
        """The node stopped serving: every association starts afresh or is adopted again."""
        self._held.clear()

    def _fetch(self, key: str) -> None:
        if key in self._pending:
            return
        d = self._pending[key] = self.node.reserveBlock(key, 2 * self.block)

        def landed(block):
            held = self._held.get(key)
            if held is None:
                return
            if block is None:
                # Not this node's row any more: it seals nothing further.
                held[2] = False
                self.log.warn("Association {association_id} is no longer this node's in the "
                              "database: its write sequence numbers are not extended",
                              association_id=key)
                return
            self.reservations += 1
            held[1] = max(held[1], block[1])
            self._grantWaiting(key, held)

        def failed(failure):
            self.log.warn("Write sequence numbers of association {association_id} not "
                          "reserved: {error}", association_id=key,
                          error=failure.getErrorMessage())

        def done(_):
            if self._pending.get(key) is d:
                del self._pending[key]

        d.addCallbacks(landed, failed)
        d.addBoth(done)

    def _grantWaiting(self, key: str, held: list) -> None:
        """An engine refused earlier gets its next block now (its ekt_key goes on its timer)."""
        if self.distributor is None or not self.node.serving:
            return
        association = self.distributor.association(uuid.UUID(key))
        if association is None:
            return
        engine = association.engine
        if not engine.needs_write_sequences:
            return
        current = engine.write_sequence_limit
        grant = min(held[1], current + self.block)
        if current >= held[0] and grant > current:
            engine.grant_write_sequences(grant)
            if held[1] - grant < self.block:
                self._fetch(key)


class OrphanAdoption:
    """
    Every ``interval`` seconds (on the node's clock), while the node holds
    its lease, claims the rows of dead nodes (:meth:`ClusterNode.claimOrphans`)
    and adopts each into ``distributor`` with no handshake; a record that
    cannot be adopted (does not decode, or is refused) has its row deleted.
    One log line per batch, counts only.
    """

    log = Logger()

    def __init__(self, node: ClusterNode, distributor, sequences: WriteSequences | None,
                 interval: float):
        self.node = node
        self.distributor = distributor
        self.sequences = sequences
        self.interval = interval
        self._timer = None
        self._running: defer.Deferred | None = None
        #: Totals, for status and tests.
        self.adopted = 0
        self._claimsFailing = False
        self.failed = 0

    def start(self) -> None:
        self._schedule()

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _schedule(self) -> None:
        self._timer = self.node.clock.callLater(self.interval, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self.run().addBoth(lambda _: self._schedule())

    def run(self) -> defer.Deferred:
        """One claim and adoption batch; fires with ``(adopted, failed)``."""
        if self._running is not None:
            return defer.succeed((0, 0))
        d = self._running = self.node.claimOrphans()
        d.addCallback(self._adopt)

        def failed(failure):
            # Once per outage, not every third of a lease while it lasts.
            if not self._claimsFailing:
                self._claimsFailing = True
                self.log.warn("Node {node} could not claim orphaned associations: {error} "
                              "(retrying every {interval} s)", node=self.node.node_id,
                              error=failure.getErrorMessage(), interval=self.interval)
            return (0, 0)

        def done(result):
            self._running = None
            return result

        def claimed(result):
            if self._claimsFailing:
                self._claimsFailing = False
                self.log.info("Node {node} claims orphaned associations again",
                              node=self.node.node_id)
            return result

        d.addCallback(claimed)

        return d.addErrback(failed).addBoth(done)

    def _adopt(self, rows) -> tuple:
        if not rows:
            return (0, 0)
        if not self.node.serving:
            # The rows are this node's: once it serves again they are its own orphans.
            return (0, 0)
        adopted = failed = 0
        now = self.node.clock.seconds()
        for row in rows:
            if self.distributor.association(uuid.UUID(row.association_id)) is not None:
                continue  # still live here (claimed twice): nothing to do
            try:
                record = self._startingAt(decode_association_record(row.state),
                                          row.sequence_reserved)
                if self.sequences is not None:
                    self.sequences.adopting(row.association_id, AssociationState.from_bytes(
                        record.state).write_limit)
                result = self.distributor.adoptAssociation(
                    record, record.media_distributor, now)
            except ValueError as error:
                result = None
                self.log.warn("Association {association_id} not adopted: {error}",
                              association_id=row.association_id, error=str(error))
            if result is None:
                failed += 1
                if self.sequences is not None:
                    self.sequences.forget(row.association_id)
                self.node.forgetAssociation(row.association_id).addErrback(
                    lambda failure: self.log.warn("Row not deleted: {error}",
                                                  error=failure.getErrorMessage()))
            else:
                adopted += 1
        self.adopted += adopted
        self.failed += failed
        self.log.info("Node {node} adopted {adopted} orphaned associations (of dead nodes, "
                      "or its own from before it held its lease; {failed} could not be "
                      "adopted, their rows deleted)",
                      node=self.node.node_id, adopted=adopted, failed=failed)
        return (adopted, failed)

    @staticmethod
    def _startingAt(record: associations.AssociationRecord,
                    sequence_reserved: int) -> associations.AssociationRecord:
        """``record`` sealing from the row's ``sequence_reserved`` on (never below it)."""
        state = AssociationState.from_bytes(record.state)
        if sequence_reserved <= state.write_limit:
            return record
        state = dataclasses.replace(
            state, records=dict(state.records, write_limit=sequence_reserved))
        return dataclasses.replace(record, state=state.to_bytes())
