"""
The Media Distributor's side of a tunnel (RFC 9185 sections 5.3, 5.6, 6).

Three layers, each the next one's owner:

- :class:`MediaDistributorTunnel`: one TLS connection to a Key
  Distributor, whichever side opened it.  It sends SupportedProfiles first,
  recognises UnsupportedVersion from the first four octets, enforces the
  message rules, and hands what the Key Distributor sends to its owner
  (:class:`ITunnelOwner`).
- :class:`TunnelManager`: keeps one configured Key Distributor tunnel up
  with a ``ClientService`` (backoff between attempts, growing while the Key
  Distributor answers UnsupportedVersion).
- :class:`TunnelPool`: every manager (one per ``--kd``) plus the tunnels Key
  Distributors dial in to ``--tunnel-listen``; :meth:`TunnelPool.pick`
  chooses the tunnel for a new association.

Closing: a tunnel registers itself with its transport as a streaming
producer (that is how it learns about write backpressure, see
:mod:`perc.backpressure`).  A TLS transport (``TLSMemoryBIOProtocol``) with
a registered producer does not shut down on ``loseConnection()`` until the
producer is unregistered, so always close a tunnel with
:meth:`MediaDistributorTunnel.close` or :meth:`MediaDistributorTunnel.abort`,
never through its transport.  The manager and the pool do so before their
``ClientService`` or listener would.
"""

from __future__ import annotations

import collections
import uuid

from OpenSSL import SSL
from twisted.application import internet, service
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IHandshakeListener, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from perc import tls, wire
from perc.backpressure import DEFAULT_MAX_PAUSED_OCTETS, DEFAULT_MAX_PAUSED_SECONDS
from perc.tunnelconnection import TunnelConnection

__all__ = [
    "ITunnelEvents",
    "ITunnelOwner",
    "MediaDistributorTunnel",
    "MediaDistributorTunnelFactory",
    "TunnelManager",
    "TunnelPool",
    "DEFAULT_MAX_PAUSED_OCTETS",
    "DEFAULT_MAX_PAUSED_SECONDS",
]

#: Octets that identify UnsupportedVersion whatever follows them (RFC 9185
#: section 5.6): type (1), length (2), highest_version (1).
_UNSUPPORTED_VERSION_PREFIX = 4


class ITunnelEvents(Interface):
    """
    What a Key Distributor tunnel reports to the Media Distributor: the
    events the relay (the owner of a :class:`TunnelPool`) implements.
    Every method receives the :class:`MediaDistributorTunnel` concerned.
    An exception raised by a method is logged and does not close the tunnel.
    """

    def tunnelUp(tunnel):
        """
        ``tunnel`` may carry associations: SupportedProfiles has been
        written, and on TLS the handshake finished and the Key Distributor
        was authorised.  (The Key Distributor never acknowledges
        SupportedProfiles; it may still answer UnsupportedVersion and close.)
        """

    def tunnelDown(tunnel, reason):
        """
        The connection of ``tunnel`` has ended; ``reason`` is a short
        string.  Its ``associations`` are still listed for the receiver to
        move or end.  A :class:`TunnelPool` reports this only for tunnels it
        reported up.
        """

    def mediaKeysReceived(tunnel, message):
        """The Key Distributor sent ``message``, a :class:`perc.wire.MediaKeys`."""

    def tunneledDtlsReceived(tunnel, association_id, data):
        """The Key Distributor sent DTLS records ``data`` (bytes) for ``association_id``."""

    def endpointDisconnectReceived(tunnel, association_id):
        """
        The Key Distributor ended ``association_id`` (already removed from
        ``tunnel.associations``).
        """


class ITunnelOwner(ITunnelEvents):
    """
    The direct owner of a :class:`MediaDistributorTunnel` (a
    :class:`TunnelManager` or a :class:`TunnelPool`).  ``tunnelDown`` is
    called exactly once for every connection whose ``connectionMade`` ran,
    whether or not it was ever up.
    """

    def versionRejected(tunnel, version):
        """
        The Key Distributor answered UnsupportedVersion: it speaks at most
        ``version``.  The tunnel is already closing.  (This Media
        Distributor implements version 0 only, so it cannot switch.)
        """


def _profile_ids(profiles) -> tuple[int, ...]:
    """Profile ids from ids or :class:`perc.profiles.Profile` objects."""
    return tuple(int(getattr(profile, "id", profile)) for profile in profiles)


def _default_clock(clock):
    if clock is not None:
        return clock
    from twisted.internet import reactor
    return reactor


@implementer(IHandshakeListener)
class MediaDistributorTunnel(TunnelConnection):
    """
    One tunnel to a Key Distributor, whichever side opened the TLS connection.

    On connection it registers itself with the transport as a streaming
    producer and writes SupportedProfiles(0, ``profiles``): version 0 is the
    only one this implementation speaks, whatever a Key Distributor asks for.  It is
    *up* at once on a plain transport, or on TLS (a transport with
    ``getPeerCertificate``) once the handshake is done and ``authorise``,
    if given, accepted the Key Distributor.

    The first message from the Key Distributor is examined by its first four
    octets alone: ``0x02 · length · highest_version`` is UnsupportedVersion,
    whatever follows (a newer version may use another format); the version
    goes to ``owner.versionRejected`` and the connection is closed.  After
    that, MediaKeys, TunneledDtls and EndpointDisconnect go to the owner; a
    SupportedProfiles or a later UnsupportedVersion is a protocol error.

    Backpressure (:class:`perc.backpressure.BoundedWrites`): while the
    transport has paused this producer, at most ``maxPausedOctets`` may be
    written and the pause may last at most ``maxPausedSeconds``; past either
    the tunnel is aborted.
    """

    closedLocally = "closed by the Media Distributor"

    log = Logger()
    silentPeer = "the Key Distributor"
    _refusalLogged = False

    #: The tunnel version sent: the only one implemented.
    version = wire.PROTOCOL_VERSION

    def __init__(self, owner, profiles, *, authorise=None, clock=None,
                 maxPausedOctets: int = DEFAULT_MAX_PAUSED_OCTETS,
                 maxPausedSeconds: float = DEFAULT_MAX_PAUSED_SECONDS):
        """
        ``owner`` provides :class:`ITunnelOwner`.  ``profiles`` are profile
        ids (or :class:`perc.profiles.Profile`), sent in SupportedProfiles.  ``authorise``, if given, is called with the TLS
        transport once the handshake is done and returns ``(authorised,
        identity, reason)``.  ``clock`` is an ``IReactorTime`` (default: the
        global reactor).
        """
        self.owner = owner
        self.profiles = _profile_ids(profiles)
        # Refuse an unrepresentable list now, not on connection.
        wire.SupportedProfiles(self.version, self.profiles)
        self._authorise = authorise
        self.clock = _default_clock(clock)
        self.maxPausedOctets = maxPausedOctets
        self.maxPausedSeconds = maxPausedSeconds
        #: The Key Distributor's certificate identity, once TLS told it.
        self.identity: str | None = None
        #: Association ids this tunnel carries (added by :meth:`sendDtls`, or
        #: by the relay when an association moves here from another tunnel
        #: to the same Key Distributor).
        self.associations: set[uuid.UUID] = set()
        #: Messages written and received on this connection, by type name.
        self.messagesSent: collections.Counter = collections.Counter()
        self.messagesReceived: collections.Counter = collections.Counter()
        #: ``clock.seconds()`` when the tunnel came up; None until then.
        self.connectedSince: float | None = None
        #: The version from the Key Distributor's UnsupportedVersion, if any.
        self.rejectedVersion: int | None = None
        self._up = False
        self._sniffing = True
        self._sniffed = bytearray()
        self._closedWaiters: list[defer.Deferred] | None = []

    # Connection life

    def connectionMade(self) -> None:
        factory = getattr(self, "factory", None)
        if factory is not None and hasattr(factory, "tunnels"):
            factory.tunnels.add(self)
        self.connectionStarted()
        if not self._isTls():
            self.sendMessage(wire.SupportedProfiles(self.version, self.profiles))
            self._becomeUp()

    def _isTls(self) -> bool:
        return callable(getattr(self.transport, "getPeerCertificate", None))

    def handshakeCompleted(self) -> None:
        if self._closing:
            return
        if self._authorise is not None:
            authorised, identity, reason = self._authorise(self.transport)
        else:
            authorised, identity, reason = True, tls.peer_identity(self.transport), ""
        self.identity = identity
        if not authorised:
            self.log.warn("Refusing tunnel with Key Distributor {peer}: {reason}",
                          peer=self.peerDescription(), reason=reason)
            self._refusalLogged = True
            self.abort("Key Distributor not authorised: " + reason, log=False)
            return
        if not self._up:
            # Written now, not before the handshake: TLS calls this before it
            # flushes what was written earlier, so what the owner sends once
            # the tunnel is up (the messages that waited for it) could
            # overtake SupportedProfiles, which must come first (RFC 9185).
            self.sendMessage(wire.SupportedProfiles(self.version, self.profiles))
            self._becomeUp()

    def _becomeUp(self) -> None:
        self._up = True
        self.connectedSince = self.clock.seconds()
        self.log.info("Tunnel with {peer} up: sent SupportedProfiles version {version}, "
                      "profiles {profiles}",
                      peer=self.peerDescription(), version=self.version,
                      profiles=", ".join("0x{:04X}".format(p) for p in self.profiles))
        self._tell("tunnelUp", self)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.connectionEnded()
        factory = getattr(self, "factory", None)
        if factory is not None and hasattr(factory, "tunnels"):
            factory.tunnels.discard(self)
        why = self.closeReason
        was_up, self._up = self._up, False
        tls_failure = why is None and isinstance(reason, Failure) and reason.check(SSL.Error)
        if tls_failure:
            # OpenSSL's reason as one line, not the repr of its error queue.
            why = "TLS handshake failed: " + tls.handshake_failure_reason(
                self.transport, reason.value)
        if tls_failure and not was_up:
            # Refused in the TLS handshake, by either side (no or an expired
            # certificate, another CA, a wrong name): one line.
            self.log.warn("Tunnel with {peer} refused: {reason}",
                          peer=self.peerDescription(), reason=why)
        elif not self._refusalLogged:
            if why is None:
                why = reason.getErrorMessage() if isinstance(reason, Failure) else str(reason)
            self.log.info(
                "Tunnel with {peer} closed: {reason} ({associations} associations, "
                "was up: {wasUp})", peer=self.peerDescription(), reason=why,
                associations=len(self.associations), wasUp=was_up)
        self._tell("tunnelDown", self, why)
        waiters, self._closedWaiters = self._closedWaiters, None
        for waiter in waiters or ():
            waiter.callback(None)

    def whenClosed(self) -> defer.Deferred:
        """A Deferred that fires (with None) once the connection is lost."""
        if self._closedWaiters is None:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._closedWaiters.append(waiter)
        return waiter

    @property
    def up(self) -> bool:
        """True from :meth:`ITunnelEvents.tunnelUp` until the connection ends."""
        return self._up

    @property
    def usable(self) -> bool:
        """Up and not closing: fit for a new association."""
        return self._up and not self._closing

    def peerDescription(self) -> str:
        address = super().peerDescription()
        return "{} ({})".format(self.identity, address) if self.identity else address

    # Receiving

    def dataReceived(self, data: bytes) -> None:
        if not self._sniffing:
            super().dataReceived(data)
            return
        if self._failed:
            return
        sniffed = self._sniffed
        sniffed += data
        if not sniffed:
            return
        if sniffed[0] != wire.MessageType.UNSUPPORTED_VERSION:
            # Not UnsupportedVersion: the ordinary framing decides.
            self._sniffing = False
            data = bytes(sniffed)
            del sniffed[:]
            super().dataReceived(data)
            return
        if len(sniffed) < _UNSUPPORTED_VERSION_PREFIX:
            return
        self._sniffing = False
        length = int.from_bytes(sniffed[1:3], "big")
        version = sniffed[3]
        trailing = len(sniffed) - _UNSUPPORTED_VERSION_PREFIX
        del sniffed[:]
        if length < 1:
            self.protocolError("UnsupportedVersion with an empty body")
            return
        self._versionRejected(version, length, trailing)

    def _versionRejected(self, version: int, length: int, trailing: int) -> None:
        self._failed = True  # deliver nothing more from this connection
        self.rejectedVersion = version
        self.messagesReceived["UnsupportedVersion"] += 1
        self.closeReason = "Key Distributor answered UnsupportedVersion({})".format(version)
        # The owner logs the error, once; this is the detail.
        self.log.debug(
            "UnsupportedVersion({version}) from {peer} (body length {length}, {trailing} "
            "octets ignored)", peer=self.peerDescription(), version=version,
            length=length, trailing=trailing)
        self._tell("versionRejected", self, version)
        self.close(self.closeReason)

    def messageReceived(self, message: wire.Message) -> None:
        self.messagesReceived[type(message).__name__] += 1
        if isinstance(message, wire.TunneledDtls):
            self._tell("tunneledDtlsReceived", self, message.association_id, message.dtls_message)
        elif isinstance(message, wire.MediaKeys):
            self._tell("mediaKeysReceived", self, message)
        elif isinstance(message, wire.EndpointDisconnect):
            self.associations.discard(message.association_id)
            self._tell("endpointDisconnectReceived", self, message.association_id)
        elif isinstance(message, wire.UnsupportedVersion):
            self.protocolError("UnsupportedVersion is only valid as the Key Distributor's "
                               "first message")
        else:
            self.protocolError("{} is never sent by a Key Distributor".format(
                type(message).__name__))

    def _tell(self, method: str, *args) -> None:
        owner = self.owner
        if owner is None:
            return
        try:
            getattr(owner, method)(*args)
        except Exception:
            self.log.failure("Tunnel owner {owner!r} failed in {method} for {peer}",
                             owner=owner, method=method, peer=self.peerDescription())

    # Sending

    def sendMessage(self, message: wire.Message) -> bool:
        """
        Write one message; False (nothing written) if the tunnel is
        closing.  Aborts the tunnel when the backpressure bound is passed.
        """
        if self._closing or not self._connected:
            return False
        data = message.encode()
        self.transport.write(data)
        self.messagesSent[type(message).__name__] += 1
        self.countWrite(len(data))
        return True

    def sendDtls(self, association_id: uuid.UUID, data: bytes) -> bool:
        """
        Forward an endpoint's DTLS records; the association is then carried
        by this tunnel.  Returns False if the tunnel is closing.  Raises
        WireError for data that cannot be tunnelled (empty or over 65517
        octets).
        """
        message = wire.TunneledDtls(association_id, data)
        if not self.sendMessage(message):
            return False
        self.associations.add(association_id)
        return True

    def sendDisconnect(self, association_id: uuid.UUID) -> bool:
        """Tell the Key Distributor the association ended, and forget it."""
        self.associations.discard(association_id)
        return self.sendMessage(wire.EndpointDisconnect(association_id))

    def forgetAssociation(self, association_id: uuid.UUID) -> None:
        """Stop counting ``association_id`` against this tunnel, silently."""
        self.associations.discard(association_id)

    def status(self) -> dict:
        """A JSON-serialisable summary."""
        return {
            "peer": self.peerDescription(),
            "identity": self.identity,
            "up": self._up,
            "version": self.version,
            "connected_since": self.connectedSince,
            "associations": len(self.associations),
            "messages_sent": dict(self.messagesSent),
            "messages_received": dict(self.messagesReceived),
        }


class MediaDistributorTunnelFactory(protocol.Factory):
    """
    Builds :class:`MediaDistributorTunnel` for an owner: the factory a
    :class:`TunnelManager` connects with, and the one for
    ``--tunnel-listen`` (wrap it with :func:`perc.netutil.tls_server_factory`).
    ``tunnels`` holds the tunnels whose connection is live.
    """

    noisy = False

    def __init__(self, owner, profiles, *, authorise=None, clock=None,
                 maxPausedOctets: int = DEFAULT_MAX_PAUSED_OCTETS,
                 maxPausedSeconds: float = DEFAULT_MAX_PAUSED_SECONDS):
        self.owner = owner
        self.profiles = _profile_ids(profiles)
        wire.SupportedProfiles(wire.PROTOCOL_VERSION, self.profiles)
        self.authorise = authorise
        self.clock = _default_clock(clock)
        self.maxPausedOctets = maxPausedOctets
        self.maxPausedSeconds = maxPausedSeconds
        self.tunnels: set[MediaDistributorTunnel] = set()

    def buildProtocol(self, addr):
        tunnel = MediaDistributorTunnel(
            self.owner, self.profiles, authorise=self.authorise,
            clock=self.clock, maxPausedOctets=self.maxPausedOctets,
            maxPausedSeconds=self.maxPausedSeconds)
        tunnel.factory = self
        return tunnel


@implementer(IStreamClientEndpoint)
class _ObservedEndpoint:
    """Passes connect() through, telling the manager about failures."""

    def __init__(self, endpoint, manager):
        self._endpoint = endpoint
        self._manager = manager

    def connect(self, factory):
        self._manager._attempts += 1
        connecting = self._endpoint.connect(factory)
        connecting.addErrback(self._manager._connectFailed)
        return connecting

    def __repr__(self) -> str:
        return repr(self._endpoint)


class _VersionRejections:
    """
    What an owner of tunnels does with UnsupportedVersion.  This Media
    Distributor implements version 0 only, so it never takes up the version
    a Key Distributor names (version 0 bodies under another number would
    be a lie): it logs one error per version named, counts the rejections
    in a row, and keeps trying with version 0.  A tunnel that ends without
    UnsupportedVersion clears both.
    """

    log = Logger()
    #: The version the last UnsupportedVersion named; None once a tunnel worked.
    rejectedVersion: int | None = None
    #: UnsupportedVersion answers in a row.
    versionRejections = 0

    def versionRejected(self, tunnel, version) -> None:
        self.versionRejections += 1
        if version == self.rejectedVersion:
            return
        self.rejectedVersion = version
        self.log.error(
            "Key Distributor {peer} refuses tunnel version {ours}, the only version this "
            "Media Distributor implements (it answered UnsupportedVersion({version})): no "
            "tunnel with it until one of them is upgraded; retrying with version {ours}",
            peer=tunnel.peerDescription(), ours=wire.PROTOCOL_VERSION, version=version)

    def _tunnelEnded(self, tunnel) -> None:
        if tunnel.rejectedVersion is None:
            self.rejectedVersion = None
            self.versionRejections = 0


class _PassMessagesOn:
    """The message events an owner-of-tunnels hands straight to its own ``owner``."""

    owner = None

    def mediaKeysReceived(self, tunnel, message) -> None:
        if self.owner is not None:
            self.owner.mediaKeysReceived(tunnel, message)

    def tunneledDtlsReceived(self, tunnel, association_id, data) -> None:
        if self.owner is not None:
            self.owner.tunneledDtlsReceived(tunnel, association_id, data)

    def endpointDisconnectReceived(self, tunnel, association_id) -> None:
        if self.owner is not None:
            self.owner.endpointDisconnectReceived(tunnel, association_id)


@implementer(ITunnelOwner)
class TunnelManager(_VersionRejections, _PassMessagesOn, service.MultiService):
    """
    Keeps one configured Key Distributor tunnel up: a ``ClientService``
    connects ``endpoint`` (normally from
    :func:`perc.netutil.tls_client_endpoint`) and reconnects after every
    failure or loss, waiting ``retryPolicy(attempt)`` seconds (default:
    ClientService's exponential backoff).  UnsupportedVersion answers in a
    row count as failed attempts, so the backoff grows against a Key
    Distributor that refuses version 0 (ClientService alone starts again
    from attempt 1 after every connection that was made).

    Events from its tunnel go on to ``owner`` (:class:`ITunnelEvents`,
    normally a :class:`TunnelPool`; may be set after construction).
    ``state`` is ``"down"`` (service stopped), ``"connecting"`` (connecting
    or waiting to retry) or ``"up"``.
    """

    log = Logger()

    def __init__(self, endpoint, profiles, owner=None, *, name: str | None = None,
                 clock=None, retryPolicy=None, authorise=None,
                 maxPausedOctets: int = DEFAULT_MAX_PAUSED_OCTETS,
                 maxPausedSeconds: float = DEFAULT_MAX_PAUSED_SECONDS):
        super().__init__()
        self.owner = owner
        self.name = name if name is not None else repr(endpoint)
        self.clock = _default_clock(clock)
        self.factory = MediaDistributorTunnelFactory(
            self, profiles, authorise=authorise, clock=self.clock,
            maxPausedOctets=maxPausedOctets, maxPausedSeconds=maxPausedSeconds)
        policy = retryPolicy if retryPolicy is not None else internet.backoffPolicy()
        self.client = internet.ClientService(
            _ObservedEndpoint(endpoint, self), self.factory,
            retryPolicy=lambda attempt: policy(attempt + max(0, self.versionRejections - 1)),
            clock=self.clock)
        self.client.setServiceParent(self)
        self._attempts = 0
        self._connectFailures = 0
        self._connections = 0
        self._lastError: str | None = None
        self._lastCloseReason: str | None = None
        # The certificate identity of the Key Distributor's last tunnel.
        self._identity: str | None = None
        # Messages of connections that have ended.
        self._sentBefore: collections.Counter = collections.Counter()
        self._receivedBefore: collections.Counter = collections.Counter()

    #: The version every connection sends.
    version = wire.PROTOCOL_VERSION

    @property
    def tunnel(self) -> MediaDistributorTunnel | None:
        """The live connection, if any (up or not yet)."""
        for tunnel in self.factory.tunnels:
            return tunnel
        return None

    @property
    def state(self) -> str:
        if not self.running:
            return "down"
        tunnel = self.tunnel
        return "up" if tunnel is not None and tunnel.usable else "connecting"

    def stopService(self):
        # Close the tunnel ourselves first: ClientService would call
        # transport.loseConnection(), which a TLS transport holds back while
        # the tunnel is registered as its producer.
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.close("Media Distributor stopping")
        return super().stopService()

    def _connectFailed(self, failure: Failure) -> Failure:
        if not failure.check(defer.CancelledError):
            self._connectFailures += 1
            self._lastError = failure.getErrorMessage()
            self.log.warn("Cannot connect to Key Distributor {name}: {error}",
                          name=self.name, error=self._lastError)
        return failure

    def status(self) -> dict:
        """A JSON-serialisable summary of this Key Distributor link."""
        tunnel = self.tunnel
        sent, received = collections.Counter(self._sentBefore), collections.Counter(self._receivedBefore)
        if tunnel is not None:
            sent.update(tunnel.messagesSent)
            received.update(tunnel.messagesReceived)
        up = tunnel is not None and tunnel.usable
        return {
            "name": self.name,
            "endpoint": self.name,
            "identity": self._identity,
            "up": up,
            "state": self.state,
            "version": self.version,
            "rejected_version": self.rejectedVersion,
            "connected_since": tunnel.connectedSince if up else None,
            "peer": tunnel.peerDescription() if tunnel is not None else None,
            "associations": len(tunnel.associations) if tunnel is not None else 0,
            "connection_attempts": self._attempts,
            "connect_failures": self._connectFailures,
            "connections": self._connections,
            "last_error": self._lastError,
            "last_close_reason": self._lastCloseReason,
            "messages_sent": dict(sent),
            "messages_received": dict(received),
        }

    # ITunnelOwner

    def tunnelUp(self, tunnel) -> None:
        self._connections += 1
        self._identity = tunnel.identity
        if self.owner is not None:
            self.owner.tunnelUp(tunnel)

    def tunnelDown(self, tunnel, reason) -> None:
        self._sentBefore.update(tunnel.messagesSent)
        self._receivedBefore.update(tunnel.messagesReceived)
        self._lastCloseReason = reason
        self._tunnelEnded(tunnel)
        if self.owner is not None:
            self.owner.tunnelDown(tunnel, reason)


@implementer(ITunnelOwner)
class TunnelPool(_VersionRejections, _PassMessagesOn, service.MultiService):
    """
    Every Key Distributor tunnel of this Media Distributor: one
    :class:`TunnelManager` per configured Key Distributor
    (:meth:`addKeyDistributor`), plus the tunnels accepted through
    :attr:`listenFactory` (Key Distributors that dial in).  Events go on to
    ``owner`` (:class:`ITunnelEvents`; may be set after construction);
    ``tunnelUp``/``tunnelDown`` only in pairs.

    UnsupportedVersion on an accepted tunnel is logged once per version
    named (:class:`_VersionRejections`); the Key Distributor that dialled in
    decides when to try again.
    """

    log = Logger()

    def __init__(self, profiles, owner=None, *, clock=None, authorise=None,
                 retryPolicy=None,
                 maxPausedOctets: int = DEFAULT_MAX_PAUSED_OCTETS,
                 maxPausedSeconds: float = DEFAULT_MAX_PAUSED_SECONDS):
        """
        ``authorise`` applies to accepted tunnels; ``retryPolicy`` is the
        default for :meth:`addKeyDistributor`.
        """
        super().__init__()
        self.owner = owner
        self.profiles = _profile_ids(profiles)
        self.clock = _default_clock(clock)
        self.retryPolicy = retryPolicy
        self._maxPausedOctets = maxPausedOctets
        self._maxPausedSeconds = maxPausedSeconds
        #: The factory for ``--tunnel-listen``: wrap it in TLS and listen.
        self.listenFactory = MediaDistributorTunnelFactory(
            self, self.profiles, authorise=authorise, clock=self.clock,
            maxPausedOctets=maxPausedOctets, maxPausedSeconds=maxPausedSeconds)
        self.managers: list[TunnelManager] = []
        self._up: list[MediaDistributorTunnel] = []
        self._turn = 0

    def addKeyDistributor(self, endpoint, name: str | None = None, *, retryPolicy=None,
                          authorise=None) -> TunnelManager:
        """Keep a tunnel to ``endpoint`` up; returns its manager."""
        manager = TunnelManager(
            endpoint, self.profiles, self, name=name, clock=self.clock,
            retryPolicy=retryPolicy if retryPolicy is not None else self.retryPolicy,
            authorise=authorise, maxPausedOctets=self._maxPausedOctets,
            maxPausedSeconds=self._maxPausedSeconds)
        self.managers.append(manager)
        manager.setServiceParent(self)
        return manager

    @property
    def tunnels(self) -> list[MediaDistributorTunnel]:
        """The tunnels that are up, in the order they came up."""
        return list(self._up)

    def pick(self) -> MediaDistributorTunnel | None:
        """
        The tunnel for a new association: among usable tunnels, one with
        the fewest associations, taking turns among equals.  None if no
        tunnel is up.
        """
        candidates = [tunnel for tunnel in self._up if tunnel.usable]
        if not candidates:
            return None
        start = self._turn % len(candidates)
        self._turn += 1
        rotated = candidates[start:] + candidates[:start]
        return min(rotated, key=lambda tunnel: len(tunnel.associations))

    def current(self, identity: str) -> MediaDistributorTunnel | None:
        """
        Where an association of Key Distributor identity ``identity`` goes
        once the tunnel it used is not usable: the usable tunnel with that
        certificate identity that carries the fewest associations (the
        newest among equals), or None.  Several Key Distributors may share
        one identity (one certificate): each has its own tunnel.
        """
        candidates = [tunnel for tunnel in reversed(self._up)
                      if tunnel.identity == identity and tunnel.usable]
        if not candidates:
            return None
        return min(candidates, key=lambda tunnel: len(tunnel.associations))

    def stopService(self):
        stopping = [super().stopService()]
        for tunnel in list(self.listenFactory.tunnels):
            stopping.append(tunnel.whenClosed())
            tunnel.close("Media Distributor stopping")
        return defer.gatherResults(stopping).addCallback(lambda _: None)

    def status(self) -> dict:
        """A JSON-serialisable summary of every tunnel."""
        return {
            "up": len(self._up),
            "listen_version": wire.PROTOCOL_VERSION,
            "listen_rejected_version": self.rejectedVersion,
            "key_distributors": [manager.status() for manager in self.managers],
            "accepted": [tunnel.status() for tunnel in
                         sorted(self.listenFactory.tunnels,
                                key=lambda t: (t.connectedSince is None, t.connectedSince or 0))],
        }

    # ITunnelOwner (from accepted tunnels) and ITunnelEvents (from managers)

    def tunnelUp(self, tunnel) -> None:
        if tunnel not in self._up:
            self._up.append(tunnel)
        if self.owner is not None:
            self.owner.tunnelUp(tunnel)

    def tunnelDown(self, tunnel, reason) -> None:
        if getattr(tunnel, "factory", None) is self.listenFactory:
            self._tunnelEnded(tunnel)
        if tunnel not in self._up:
            return
        self._up.remove(tunnel)
        if self.owner is not None:
            self.owner.tunnelDown(tunnel, reason)

