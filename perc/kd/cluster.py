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

__all__ = ["DEFAULT_LEASE_SECONDS", "ClusterNode", "default_node_id"]

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

    def __init__(self, node: ClusterNode, export=export_association_state):
        self.node = node
        self.export = export
        #: association id -> the last write of its row still under way.
        self._pending: dict[str, defer.Deferred] = {}

    def established(self, distributor, association) -> None:
        exported = self.export(distributor, association)
        if exported is None:
            return
        state, reserved = exported
        tunnel = association.origin
        md_identity = getattr(tunnel, "identity", None) or ""
        self._then(str(association.id), lambda aid: self.node.recordAssociation(
            aid, md_identity, state, reserved))

    def ended(self, association) -> None:
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
