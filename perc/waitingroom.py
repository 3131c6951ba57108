"""
Tunnel messages waiting for a peer that has no tunnel up.

An association belongs to the peer's authenticated identity, not to one TLS
connection (RFC 9185 lets its messages use any tunnel between the two), so
what either distributor has to tell a peer while none of its tunnels is up
waits here, per identity, for the next tunnel of that identity.  Both
distributors use it; their timers decide when queued messages are given up
(:meth:`WaitingRoom.expire`).  Sans-I/O: nothing here reads a clock.
"""

from __future__ import annotations

import collections
import uuid

from twisted.logger import Logger

from perc import wire

__all__ = ["WaitingRoom"]


class _Waiting:
    """One peer's queue (oldest first) and the association ids owed an EndpointDisconnect."""

    __slots__ = ("messages", "octets", "owed", "dropped")

    def __init__(self):
        self.messages: collections.deque = collections.deque()
        self.octets = 0
        self.owed: dict[uuid.UUID, None] = {}
        self.dropped = 0  # since the peer was last reached


class WaitingRoom:
    """
    identity -> what waits for it.  Bounded: per identity ``max_messages``
    messages and ``max_octets`` encoded octets, ``max_owed`` EndpointDisconnects,
    and at most ``max_peers`` identities (a new one evicts the oldest).
    Whatever a bound refuses is dropped, counted, and logged (one line per
    peer until it is reached again, then a total).

    An EndpointDisconnect is kept apart from the queue: it is the last word
    on an association and must reach the peer whenever it comes back, so
    :meth:`expire` gives up the queue but keeps those.
    """

    log = Logger()

    def __init__(self, *, peer_kind: str, max_messages: int, max_octets: int,
                 max_owed: int, max_peers: int = 64):
        """``peer_kind`` names the peer in log lines ("Media Distributor")."""
        self.peer_kind = peer_kind
        self.max_messages = max_messages
        self.max_octets = max_octets
        self.max_owed = max_owed
        self.max_peers = max_peers
        self._peers: dict[str, _Waiting] = {}
        #: Messages refused by a bound or given up by :meth:`expire`.
        self.dropped = 0

    def __len__(self) -> int:
        """Messages waiting, EndpointDisconnects included, over every peer."""
        return sum(len(w.messages) + len(w.owed) for w in self._peers.values())

    def waiting(self, identity: str) -> int:
        """Messages waiting for ``identity``."""
        peer = self._peers.get(identity)
        return 0 if peer is None else len(peer.messages) + len(peer.owed)

    def put(self, identity: str, message: wire.Message) -> bool:
        """Keep ``message`` for ``identity``; False if a bound refused it (dropped)."""
        peer = self._peers.get(identity)
        if peer is None:
            if len(self._peers) >= self.max_peers:
                self._evictOldest()
            peer = self._peers[identity] = _Waiting()
        if isinstance(message, wire.EndpointDisconnect):
            if message.association_id in peer.owed:
                return True
            if len(peer.owed) < self.max_owed:
                peer.owed[message.association_id] = None
                return True
            return self._refused(identity, peer, "{} EndpointDisconnects already wait".format(
                self.max_owed))
        size = len(message.encode())
        if len(peer.messages) >= self.max_messages:
            return self._refused(identity, peer, "{} messages already wait".format(
                self.max_messages))
        if peer.octets + size > self.max_octets:
            return self._refused(identity, peer, "{} octets already wait".format(peer.octets))
        peer.messages.append((message, size))
        peer.octets += size
        return True

    def drain(self, identity: str) -> list:
        """Everything waiting for ``identity``, in order, EndpointDisconnects last; forgets it."""
        peer = self._peers.pop(identity, None)
        if peer is None:
            return []
        if peer.dropped:
            self.log.warn(
                "{count} tunnel messages for {kind} {peer} were dropped while it had no tunnel",
                count=peer.dropped, kind=self.peer_kind, peer=identity)
        messages = [message for message, _ in peer.messages]
        messages.extend(wire.EndpointDisconnect(aid) for aid in peer.owed)
        return messages

    def expire(self, identity: str, seconds: float) -> int:
        """
        ``identity`` had no tunnel for ``seconds``: give up its queued
        messages (logged), keep its EndpointDisconnects.  Returns how many
        were dropped.
        """
        peer = self._peers.get(identity)
        if peer is None:
            return 0
        count = len(peer.messages)
        if count:
            self.dropped += count
            self.log.warn(
                "Dropped {count} tunnel messages that waited for {kind} {peer}: no tunnel "
                "to it for {seconds} seconds ({owed} EndpointDisconnects still wait)",
                count=count, kind=self.peer_kind, peer=identity, seconds=seconds,
                owed=len(peer.owed))
        peer.messages.clear()
        peer.octets = 0
        if not peer.owed:
            del self._peers[identity]
        return count

    def clear(self) -> None:
        self._peers.clear()

    def _refused(self, identity: str, peer: _Waiting, why: str) -> bool:
        self.dropped += 1
        peer.dropped += 1
        if peer.dropped == 1:
            self.log.warn(
                "Dropping tunnel messages for {kind} {peer}, which has no tunnel up: {why} "
                "(a total follows once it is back)", kind=self.peer_kind, peer=identity, why=why)
        return False

    def _evictOldest(self) -> None:
        identity, peer = next(iter(self._peers.items()))
        del self._peers[identity]
        count = len(peer.messages) + len(peer.owed)
        self.dropped += count
        self.log.warn(
            "Dropped {count} tunnel messages that waited for {kind} {peer}: more than "
            "{limit} peers had messages waiting", count=count, kind=self.peer_kind,
            peer=identity, limit=self.max_peers)
