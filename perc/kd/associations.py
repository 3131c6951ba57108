"""
The Key Distributor's association table (RFC 9185 sections 5.4, 5.5).

:class:`KeyDistributor` owns every endpoint association, whichever tunnel
its messages arrive on.  It drives the sans-I/O DTLS engine
(:mod:`perc.dtls`), decides identities against the registration roster,
sends MediaKeys before the server's final flight, and keeps every table
bounded.  Time comes from an injected ``IReactorTime``.

Failover (issue 14): :meth:`KeyDistributor.exportAssociation` gives an
:class:`AssociationRecord` for an established association (its engine state,
see :mod:`perc.dtls.state`, secret: the store seals it), and another Key
Distributor of the same identity continues it with
:meth:`KeyDistributor.adoptAssociation`, with no handshake and no MediaKeys
resent.  Write sequence numbers are reserved through ``write_reservation``
(see :mod:`perc.dtls.records` for the rule that no nonce is used twice).
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.logger import Logger

from perc import dtls, hello, wire
from perc.backpressure import DEFAULT_MAX_PAUSED_OCTETS, DEFAULT_MAX_PAUSED_SECONDS
from perc.dtls.constants import ALERT_HANDSHAKE_FAILURE, ALERT_INTERNAL_ERROR
from perc.dtls.state import AssociationState
from perc.profiles import Profile
from perc.waitingroom import WaitingRoom

__all__ = ["AssociationRecord", "KeyDistributor", "Limits"]


@dataclass(frozen=True)
class Limits:
    """Bounds on what tunnels and endpoints can make the Key Distributor hold."""

    max_associations: int = 10000
    max_associations_per_tunnel: int = 5000
    handshake_timeout: float = 30.0
    tunnel_grace: float = 10.0
    #: What waits for a Media Distributor that has no tunnel up (per
    #: certificate identity): messages and their octets, until
    #: ``tunnel_grace`` runs out; EndpointDisconnects until it comes back.
    waiting_max_messages: int = 1000
    waiting_max_octets: int = 1 << 20
    waiting_max_disconnects: int = 10000
    first_message_timeout: float = 10.0
    #: Octets written to a tunnel whose Media Distributor stopped reading,
    #: and seconds it may stay so, before the tunnel is dropped.
    tunnel_max_paused_octets: int = DEFAULT_MAX_PAUSED_OCTETS
    tunnel_max_paused_seconds: float = DEFAULT_MAX_PAUSED_SECONDS
    #: EKTKey requests (application data 0x01) answered per association: a
    #: burst of this many, then this many per second.  The endpoint asks when
    #: it has no EKTKey yet and, as a liveness probe, every few seconds
    #: for the association's whole life; beyond the rate it is ignored.
    ekt_key_request_burst: int = 10
    ekt_key_requests_per_second: float = 1.0
    #: Write sequence numbers an association reserves at a time (see
    #: KeyDistributor's ``write_reservation``).
    write_sequence_block: int = 1024


@dataclass(frozen=True, repr=False)
class AssociationRecord:
    """
    What a store keeps so that a Key Distributor of the same identity can
    adopt an established association (:meth:`KeyDistributor.adoptAssociation`).
    ``state`` is :meth:`perc.dtls.state.AssociationState.to_bytes`: secret,
    to be sealed; its write limit is where the adopter continues.
    """

    association_id: uuid.UUID
    state: bytes
    tls_id: str
    conference: str
    #: The Media Distributor's certificate identity (the tunnel's).
    media_distributor: str
    ekt: bool

    def __repr__(self) -> str:
        return "<AssociationRecord {} tls-id {} in {} via {}>".format(
            self.association_id, self.tls_id, self.conference, self.media_distributor)


class _AdoptedOrigin:
    """
    The origin of an adopted association whose Media Distributor has no
    tunnel here yet: only its identity (what decides which tunnels may
    carry the association).
    """

    media_distributor_profiles = ()

    def __init__(self, identity: str) -> None:
        self.identity = identity

    def peerDescription(self) -> str:
        return "Media Distributor {}".format(self.identity)


@dataclass(eq=False)
class _Association:
    id: uuid.UUID
    engine: dtls.ServerAssociation
    origin: object  # the tunnel whose SupportedProfiles bounded the profiles
    #: Where its messages go: the Media Distributor's newest tunnel, or the
    #: one its latest message came from; None while that peer has none up.
    tunnel: object | None
    profiles: tuple
    registration: object | None = None
    established: bool = False
    ekt: bool = False
    ekt_tokens: float = 0.0  # EKTKey requests it may still have answered
    ekt_tokens_at: float | None = None
    timer: object | None = None
    counted_on: object | None = field(default=None)
    #: SRTP profile ids the ClientHello offered, in its order.
    offered: tuple = ()
    #: The conference whose SRTP profile this association holds (see
    #: KeyDistributor._holdConferenceProfile), or None.
    holds_profile_of: str | None = None
    #: The conference whose EKTKey rollover this association keeps going
    #: (see KeyDistributor._joinEktConference), or None.
    ekt_member_of: str | None = None
    #: When (the clock's seconds) the ClientHello with the cookie came.
    started: float = 0.0


class KeyDistributor:
    """
    Terminates endpoints' DTLS associations that arrive through tunnels.

    ``roster`` answers "who is this tls-id" synchronously; ``credentials``
    (a :class:`perc.dtls.Credentials`) is the certificate endpoints see.
    """

    log = Logger()

    def __init__(self, *, roster, credentials: dtls.Credentials, profiles: tuple,
                 clock, limits: Limits = Limits(), allow_missing_tls_id: bool = False,
                 conference_keys=None, observe_handshake=None, write_reservation=None):
        """
        ``conference_keys`` (a :class:`perc.kd.conference_keys.ConferenceKeys`)
        enables EKT: extension 39 is negotiated with endpoints that offer it
        and they get their conference's EKTKey after the handshake.
        ``observe_handshake(seconds)`` is told how long each completed
        handshake took, on ``clock`` (ClientHello with the cookie to
        HandshakeComplete).  ``write_reservation(association_id, start, end)``
        returns True once write sequence numbers ``[start, end)`` of that
        association are reserved for this Key Distributor (a cluster's
        store); None: each association grants itself its blocks.
        """
        self.write_reservation = write_reservation
        self.observe_handshake = observe_handshake
        self.roster = roster
        self.credentials = credentials
        self.profiles = tuple(profiles)
        self.clock = clock
        self.limits = limits
        self.allow_missing_tls_id = allow_missing_tls_id
        self.first_message_timeout = limits.first_message_timeout
        self.tunnels: set = set()
        #: Peer (see _peerKey) -> its tunnels that are up, oldest first.
        self._peerTunnels: dict[object, list] = {}
        #: Peer -> the timer that releases its associations (tunnel_grace).
        self._graceTimers: dict[object, object] = {}
        self._waiting = WaitingRoom(
            peer_kind="Media Distributor", max_messages=limits.waiting_max_messages,
            max_octets=limits.waiting_max_octets, max_owed=limits.waiting_max_disconnects)
        self._associations: dict[uuid.UUID, _Association] = {}
        self.conference_keys = conference_keys
        self._listener = dtls.ServerListener(
            credentials, self.profiles, handshake_timeout=limits.handshake_timeout,
            ekt_ciphers=None if conference_keys is None else (int(conference_keys.cipher),))
        #: Counters by reason, for status and tests.
        self.counters: dict[str, int] = {}
        # OpenSSL's cookie exchange needs the whole ClientHello in one record.
        self._helloFragments = hello.ClientHelloReassembler(count=self._count)
        #: profilesFor's answers by the Media Distributor's profile list.
        self._commonProfiles: dict[tuple, tuple] = {}
        #: conference -> [its SRTP profile, live associations holding it].
        #: The first member fixes the profile; it is forgotten once no live
        #: association (handshaking or established) holds it.
        self._conferenceProfiles: dict[str, list] = {}
        #: conference -> [live EKT members, the timer of its next rollover].
        #: Only conferences with members have an entry (and a timer).
        self._ektConferences: dict[str, list] = {}
        #: Conferences whose key is being stored (see _issueKey).
        self._issuing: set[str] = set()
        #: tls-id -> its established associations (what _supersede looks
        #: at), so that a join does not walk the whole table.
        self._establishedByTlsId: dict[str, list] = {}
        roster.add_removal_observer(self._registrationRemoved)
        #: A cluster's ownership rows (perc.kd.cluster.AssociationOwnership):
        #: told of each association that is established and that ends.
        self.ownership = None
        if conference_keys is not None:
            conference_keys.add_observer(self._keyReplacedElsewhere)

    def useCredentials(self, credentials: dtls.Credentials) -> None:
        """New associations present ``credentials``; live ones keep the ones they began with."""
        self.credentials = credentials
        self._listener.credentials = credentials

    # -- queries --------------------------------------------------------

    def __len__(self) -> int:
        return len(self._associations)

    def association(self, association_id: uuid.UUID):
        """The live association record with this id, or None (for tests and status)."""
        return self._associations.get(association_id)

    def status(self) -> dict:
        """Association and tunnel counts and counters (``GET /v1/status``)."""
        return {
            "associations": len(self._associations),
            "established": sum(1 for a in self._associations.values() if a.established),
            "tunnels": len(self.tunnels),
            "waiting_messages": len(self._waiting),
            "counters": dict(self.counters),
            # Conferences whose EKTKey rollover is scheduled (one timer each).
            "ekt_conferences": len(self._ektConferences),
            # OpenSSL objects the DTLS callbacks know: associations plus
            # any listen() in progress, so flat when nothing is kept.
            "dtls_objects": dtls.callback_registry_size(),
        }

    def profilesFor(self, tunnel) -> tuple[Profile, ...]:
        """This Key Distributor's profiles that the tunnel's Media Distributor supports."""
        key = tuple(tunnel.media_distributor_profiles or ())
        common = self._commonProfiles.get(key)
        if common is None:
            offered = set(key)
            common = tuple(p for p in self.profiles if p.id in offered)
            if len(self._commonProfiles) < 64:
                self._commonProfiles[key] = common
        return common

    def _count(self, reason: str) -> None:
        self.counters[reason] = self.counters.get(reason, 0) + 1

    def conferenceProfile(self, conference: str) -> Profile | None:
        """The SRTP profile the live members of ``conference`` use, or None."""
        held = self._conferenceProfiles.get(conference)
        return None if held is None else held[0]

    def _holdConferenceProfile(self, association: _Association, conference: str,
                               profile: Profile) -> None:
        """``association`` uses ``profile`` in ``conference``: fix it there while it lives."""
        if association.holds_profile_of is not None:
            return
        held = self._conferenceProfiles.get(conference)
        if held is None:
            held = self._conferenceProfiles[conference] = [profile, 0]
        held[1] += 1
        association.holds_profile_of = conference

    def _releaseConferenceProfile(self, association: _Association) -> None:
        conference = association.holds_profile_of
        if conference is None:
            return
        association.holds_profile_of = None
        held = self._conferenceProfiles.get(conference)
        if held is not None:
            held[1] -= 1
            if held[1] <= 0:
                del self._conferenceProfiles[conference]

    def _profileFor(self, conference: str, offered: tuple, profiles: tuple) -> Profile | None:
        """
        The profile an association into ``conference`` must use: the
        conference's own if it has one, else the first of ``profiles`` (this
        Key Distributor's, bounded by the Media Distributor's) the endpoint
        offered; None when it offers none of those.
        """
        fixed = self.conferenceProfile(conference)
        if fixed is not None:
            return fixed
        for profile in profiles:
            if profile.id in offered:
                return profile
        return None

    # -- tunnel events --------------------------------------------------

    @staticmethod
    def _peerKey(tunnel):
        """
        Who is at the other end: the Media Distributor's certificate
        identity, or (a tunnel without one, plain TCP in tests) that one
        connection.
        """
        return tunnel.identity if tunnel.identity is not None else tunnel

    def tunnelUp(self, tunnel) -> None:
        """
        A tunnel of a Media Distributor that has associations here becomes
        where they go (its newest), and what waited for it is sent.
        """
        self.tunnels.add(tunnel)
        key = self._peerKey(tunnel)
        self._peerTunnels.setdefault(key, []).append(tunnel)
        timer = self._graceTimers.pop(key, None)
        if timer is not None and timer.active():
            timer.cancel()
        if tunnel.identity is None:
            return
        moved = 0
        for association in self._associations.values():
            if association.tunnel is not tunnel and self._sameMediaDistributor(association, tunnel):
                self._moveTo(association, tunnel)
                moved += 1
        waiting = self._waiting.drain(tunnel.identity)
        for message in waiting:
            tunnel.sendMessage(message)
        if moved or waiting:
            self.log.info(
                "Tunnel with {peer} now carries the {count} associations of that Media "
                "Distributor; {waiting} messages that waited for it sent",
                peer=tunnel.peerDescription(), count=moved, waiting=len(waiting))

    def tunnelLost(self, tunnel) -> None:
        """
        The tunnel's associations move to another tunnel of the same Media
        Distributor if one is up.  Otherwise their messages wait, and they
        wait ``tunnel_grace`` seconds for it to reconnect, then are released
        (and reported to it with EndpointDisconnect once it is back).
        """
        self.tunnels.discard(tunnel)
        key = self._peerKey(tunnel)
        live = self._peerTunnels.get(key, [])
        if tunnel in live:
            live.remove(tunnel)
        if not live:
            self._peerTunnels.pop(key, None)
        current = live[-1] if live else None
        orphaned = 0
        for association in self._associations.values():
            if association.tunnel is tunnel:
                self._moveTo(association, current)
                orphaned += current is None
        if current is not None:
            for message in self._waiting.drain(tunnel.identity):
                current.sendMessage(message)
        elif orphaned and key not in self._graceTimers:
            self._graceTimers[key] = self.clock.callLater(
                self.limits.tunnel_grace, self._graceExpired, key)

    def _graceExpired(self, key) -> None:
        """No tunnel of this Media Distributor came back in time."""
        del self._graceTimers[key]
        identity = key if isinstance(key, str) else None
        for association in list(self._associations.values()):
            if association.tunnel is None and self._peerKey(association.origin) == key:
                self.log.info(
                    "Association {association_id} released: its Media Distributor did not "
                    "come back within {grace} seconds", association_id=association.id,
                    grace=self.limits.tunnel_grace)
                if not association.established:
                    self._count("handshake-abandoned")
                association.engine.close(self.clock.seconds(), "tunnel lost")
                self._forget(association)
                if identity is not None:
                    # Told once it is back: it may still forward the endpoint.
                    self._waiting.put(identity, wire.EndpointDisconnect(association.id))
        if identity is not None:
            self._waiting.expire(identity, self.limits.tunnel_grace)

    def endpointDisconnectReceived(self, tunnel, association_id: uuid.UUID) -> None:
        association = self._associations.get(association_id)
        if association is None:
            self._count("disconnect-unknown-association")
            return
        if not self._sameMediaDistributor(association, tunnel):
            self._foreign(tunnel, association_id)
            return
        self.log.info(
            "Association {association_id} ended by the Media Distributor {peer}",
            association_id=association_id, peer=tunnel.peerDescription(),
            conference=self._conference(association))
        if not association.established:
            self._count("handshake-abandoned")
        # The Media Distributor asked: end silently (no EndpointDisconnect back).
        association.engine.close(self.clock.seconds(), "EndpointDisconnect")
        self._forget(association)

    def tunneledDtlsReceived(self, tunnel, association_id: uuid.UUID, data: bytes) -> None:
        try:
            self._tunneledDtls(tunnel, association_id, data)
        except Exception:
            # A bug met by one association must not end the tunnel, and
            # with it every other association it carries.
            self._internalError(tunnel, association_id)

    def _tunneledDtls(self, tunnel, association_id: uuid.UUID, data: bytes) -> None:
        now = self.clock.seconds()
        association = self._associations.get(association_id)
        if association is not None:
            if not self._sameMediaDistributor(association, tunnel):
                self._foreign(tunnel, association_id)
                return
            self._attach(association, tunnel)
            self._process(association, association.engine.receive(data, now))
            return
        self._newAssociation(tunnel, association_id, data, now)

    def _internalError(self, tunnel, association_id: uuid.UUID) -> None:
        """Log the failure, then end only that association (the tunnel stays)."""
        self._count("internal-error")
        self.log.failure("Internal error handling association {association_id} from {peer}; "
                         "ending that association", association_id=association_id,
                         peer=tunnel.peerDescription())
        association = self._associations.get(association_id)
        if association is None or not self._sameMediaDistributor(association, tunnel):
            return
        if not association.established:
            self._count("handshake-failed")
        try:
            association.engine.close(self.clock.seconds(), "internal error")
        except Exception:
            pass  # already failing: forgetting it below is what matters
        self._forget(association)
        self._send(association, wire.EndpointDisconnect(association_id))

    def _sameMediaDistributor(self, association: _Association, tunnel) -> bool:
        """
        Any tunnel of the Media Distributor that started an association may
        carry it (RFC 9185 lets it switch tunnels); another Media
        Distributor may not touch it.
        """
        origin = association.origin
        return tunnel is origin or (origin.identity is not None
                                    and tunnel.identity == origin.identity)

    def _foreign(self, tunnel, association_id: uuid.UUID) -> None:
        self._count("foreign-association")
        self.log.warn(
            "Ignoring a message for association {association_id} from {peer}, which did "
            "not start it", association_id=association_id, peer=tunnel.peerDescription())

    # -- association life -----------------------------------------------

    def _attach(self, association: _Association, tunnel) -> None:
        """A message came through ``tunnel`` (of the same Media Distributor): answer there."""
        if association.tunnel is not tunnel:
            self._moveTo(association, tunnel)

    def _moveTo(self, association: _Association, tunnel) -> None:
        """Send through ``tunnel`` (None: wait) and count the association on it."""
        if association.counted_on is not None:
            association.counted_on.associations.discard(association.id)
        association.tunnel = association.counted_on = tunnel
        if tunnel is not None:
            tunnel.associations.add(association.id)

    def _send(self, association: _Association, message: wire.Message) -> None:
        """
        Through the association's tunnel; if it has none (or it is
        closing), the message waits for its Media Distributor's next tunnel.
        A tunnel without an identity has no next tunnel: dropped.
        """
        tunnel = association.tunnel
        if tunnel is not None and tunnel.sendMessage(message):
            return
        identity = association.origin.identity
        if identity is None:
            self._count("dropped-no-tunnel")
        elif not self._waiting.put(identity, message):
            self._count("dropped-waiting-full")

    def _newAssociation(self, tunnel, association_id: uuid.UUID, data: bytes, now: float) -> None:
        data = self._helloFragments.feed(association_id, data, now)
        if data is None:
            return  # a piece of a ClientHello, kept (or refused and counted)
        if len(self._associations) >= self.limits.max_associations:
            self._refuseNew(tunnel, association_id, "total association limit reached")
            return
        if len(tunnel.associations) >= self.limits.max_associations_per_tunnel:
            self._refuseNew(tunnel, association_id, "per-tunnel association limit reached")
            return
        profiles = self.profilesFor(tunnel)
        if not profiles:
            self._refuseNew(tunnel, association_id, "no SRTP profile in common with the tunnel")
            return
        verify = self._listener.hello_verify_request(association_id.bytes, data)
        if verify is not None:
            # HelloVerifyRequest: no state is kept until the cookie returns,
            # and nothing else is needed to answer (the ClientHello is read
            # below once it returns with its cookie).
            tunnel.sendMessage(wire.TunneledDtls(association_id, verify))
            return
        # OpenSSL picks the SRTP profile before it hands us extension 56, so
        # the conference (and with it the profile its members use) is
        # learnt from the cleartext ClientHello first.
        try:
            client_hello = hello.parse_client_hello(data)
        except hello.HelloError:
            client_hello = None
        offered = () if client_hello is None else client_hello.srtp_profiles
        registration = None
        if client_hello is not None and client_hello.tls_id is not None:
            registration = self.roster.lookup(client_hello.tls_id.decode("ascii"))
        profile = None
        if registration is not None:
            profile = self._profileFor(registration.conference, offered, profiles)
            fixed = self.conferenceProfile(registration.conference)
            if fixed is not None and fixed not in profiles:
                self._refuseNew(tunnel, association_id, "conference {} uses SRTP profile {}, "
                                "which this Media Distributor does not support".format(
                                    registration.conference, fixed.name))
                return
        listen_profiles = (profile,) if profile is not None else profiles
        # The hook finds the association by id: holding the record itself
        # would make a reference cycle through the engine.
        replies, engine = self._listener.listen(
            association_id.bytes, data, now,
            # The listener's own profiles need no second normalisation.
            profiles=None if listen_profiles == self.profiles else listen_profiles,
            identity_hook=functools.partial(self._decide, association_id))
        for datagram in replies:
            tunnel.sendMessage(wire.TunneledDtls(association_id, datagram))
        if engine is None:
            if not replies:
                self._count("dtls-not-client-hello")
            return
        self._useReservation(engine, association_id)
        association = _Association(association_id, engine, tunnel, tunnel, listen_profiles,
                                   offered=offered, started=now)
        self._associations[association_id] = association
        tunnel.associations.add(association_id)
        association.counted_on = tunnel
        if profile is not None:
            if profile.id in offered:
                # Held from now, mid-handshake: a member joining meanwhile
                # gets the same profile.
                self._holdConferenceProfile(association, registration.conference, profile)
            else:
                self._count("conference-profile-not-offered")
                self.log.warn(
                    "Refusing association {association_id} from {peer}: tls-id {tls_id} does "
                    "not offer SRTP profile {profile}, which conference {conference} uses",
                    association_id=association_id, peer=tunnel.peerDescription(),
                    tls_id=registration.tls_id, profile=profile.name,
                    conference=registration.conference)
        self._process(association, engine.start(now))

    def _refuseNew(self, tunnel, association_id: uuid.UUID, reason: str) -> None:
        self._count(reason)
        self._count("handshake-refused")
        self.log.warn(
            "Refusing new association {association_id} from {peer}: {reason}",
            association_id=association_id, peer=tunnel.peerDescription(), reason=reason)
        tunnel.sendMessage(wire.EndpointDisconnect(association_id))

    def _decide(self, association_id: uuid.UUID, query: dtls.IdentityQuery):
        """
        The identity check of RFC 9185 section 5.4: the tls-id from extension
        56 must be registered, and the certificate must have the registered
        fingerprint.  Runs synchronously inside OpenSSL's callbacks.
        """
        association = self._associations.get(association_id)
        if association is None:
            return dtls.Reject("association no longer exists", alert=ALERT_INTERNAL_ERROR)
        if query.stage == dtls.STAGE_HELLO:
            if query.peer_tls_id is None:
                if self.allow_missing_tls_id:
                    return dtls.Accept()
                return dtls.Reject("no tls-id (extension 56) in the ClientHello")
            try:
                tls_id = query.peer_tls_id.decode("ascii")
            except UnicodeDecodeError:
                return dtls.Reject("tls-id is not ASCII")
            registration = self.roster.lookup(tls_id)
            if registration is None:
                return dtls.Reject("tls-id {} is not registered".format(tls_id))
            association.registration = registration
            return dtls.Accept(tls_id=registration.kd_tls_id.encode("ascii"))
        # Certificate stage.
        certificate = query.peer_certificate
        registration = association.registration
        if registration is None:
            matches = self.roster.lookup_by_certificate(certificate)
            if len(matches) != 1:
                return dtls.Reject(
                    "no tls-id, and the certificate fingerprint matches {} registrations".format(
                        len(matches)))
            registration = association.registration = matches[0]
            # Without a tls-id the conference is known only now, after
            # OpenSSL chose the profile (the first of ours the client offered).
            chosen = next((p for p in association.profiles if p.id in association.offered), None)
            fixed = self.conferenceProfile(registration.conference)
            if fixed is not None and chosen != fixed:
                return dtls.Reject(
                    "conference {} uses SRTP profile {}, not {}".format(
                        registration.conference, fixed.name,
                        chosen.name if chosen is not None else "(none)"),
                    alert=ALERT_HANDSHAKE_FAILURE)
            if chosen is not None:
                self._holdConferenceProfile(association, registration.conference, chosen)
            return dtls.Accept()
        if query.peer_fingerprint is not None and registration.fingerprint.startswith("sha-256 "):
            # The engine's sha-256 fingerprint of this very certificate, in
            # the canonical form the roster stores: no need to hash again.
            matches = registration.fingerprint == query.peer_fingerprint
        else:
            matches = registration.matches_certificate(certificate)
        if not matches:
            return dtls.Reject("certificate fingerprint {} is not the one registered for "
                               "tls-id {}".format(query.peer_fingerprint, registration.tls_id))
        return dtls.Accept()

    def _process(self, association: _Association, output: dtls.Output) -> None:
        """
        Act on one engine output.  MediaKeys goes out before the datagrams
        of the same output, which carry the server's final flight; a Closed
        event's EndpointDisconnect goes after them (they may hold an alert).
        """
        closed = None
        after = ()
        for event in output.events:
            if isinstance(event, dtls.HandshakeComplete):
                after = self._handshakeComplete(association, event)
            elif isinstance(event, dtls.Closed):
                closed = event
            elif isinstance(event, dtls.ApplicationData):
                after = after + self._applicationData(association, event.data)
        # The ekt_key message follows the server's final flight.
        for datagram in output.datagrams + after:
            self._send(association, wire.TunneledDtls(association.id, datagram))
        if closed is not None:
            self._closed(association, closed)
            return
        self._schedule(association)

    def _handshakeComplete(self, association: _Association,
                           event: dtls.HandshakeComplete) -> tuple:
        """Send MediaKeys; returns the datagrams of the ekt_key message, if any."""
        association.established = True
        self._count("handshake-completed")
        if self.observe_handshake is not None:
            self.observe_handshake(self.clock.seconds() - association.started)
        registration = association.registration
        profile = event.profile
        hbh = profile.hbh_keys(event.keys)
        self._send(association, wire.MediaKeys(
            association.id, profile.id, b"", hbh.client_key, hbh.server_key,
            hbh.client_salt, hbh.server_salt))
        self._supersede(association)
        if event.ekt_cipher is None or self.conference_keys is None:
            if self.ownership is not None:
                self.ownership.established(self, association)
            self.log.info(
                "Association {association_id} accepted: tls-id {tls_id} in conference "
                "{conference}, profile {profile}; hop-by-hop keys sent to {peer}",
                association_id=association.id, tls_id=registration.tls_id,
                conference=registration.conference, profile=profile.name,
                peer=self._peer(association))
            return ()
        key = self._currentKey(registration.conference)
        association.ekt = True
        self._joinEktConference(association, registration.conference)
        if key is None:
            if self.ownership is not None:
                self.ownership.established(self, association)
            # No usable key in memory yet: it is stored first, then sent to
            # every member (this one included).
            self.log.info(
                "Association {association_id} accepted: tls-id {tls_id} in conference "
                "{conference}, profile {profile}; hop-by-hop keys sent to {peer}; EKTKey "
                "follows once stored", association_id=association.id,
                tls_id=registration.tls_id, conference=registration.conference,
                profile=profile.name, peer=self._peer(association))
            self._issueKey(registration.conference)
            return ()
        # One log line for both (a log event costs as much as a good part
        # of the handshake's own Python work): resends and rekeys log theirs.
        self.log.info(
            "Association {association_id} accepted: tls-id {tls_id} in conference "
            "{conference}, profile {profile}; hop-by-hop keys sent to {peer}; "
            "EKTKey SPI {spi} sent", association_id=association.id,
            tls_id=registration.tls_id, conference=registration.conference,
            profile=profile.name, peer=self._peer(association), spi=key.ekt_spi)
        output = self._sendEktKey(association, key, log=False, record=False)
        if self.ownership is not None:
            # Its row holds the ekt_key message just sent (an adopter goes on with it).
            self.ownership.established(self, association)
        return output.datagrams

    def _supersede(self, association: _Association) -> None:
        """
        The endpoint joined again through the same Media Distributor (a
        restarted one cannot say what it forgot): its older established
        associations there are dead, and end (EndpointDisconnect) rather
        than stay with that Media Distributor's identity for ever.
        """
        tls_id = association.registration.tls_id
        for other in list(self._establishedByTlsId.get(tls_id, ())):
            if (other is not association and other.established
                    and other.registration is not None and other.registration.tls_id == tls_id
                    and self._sameMediaDistributor(other, association.origin)):
                self._count("superseded")
                reason = "superseded by association {}".format(association.id)
                self._process(other, other.engine.close(self.clock.seconds(), reason))
                if self._associations.get(other.id) is other:
                    self._closed(other, dtls.Closed(reason))
        self._establishedByTlsId.setdefault(tls_id, []).append(association)

    #: An endpoint that has its keys but no EKTKey (the ekt_key message is
    #: retransmitted until acknowledged, but only a few times) asks again
    #: with this one octet of application data; the reference endpoint also
    #: asks every few seconds to learn that its association still reaches
    #: this Key Distributor (README, "liveness").  The answer is the current
    #: ekt_key message again.
    EKT_KEY_REQUEST = b"\x01"
    #: Seconds before a rollover whose key could not be stored is tried again.
    ROLLOVER_RETRY = 5.0

    def _applicationData(self, association: _Association, data: bytes) -> tuple:
        if data != self.EKT_KEY_REQUEST or not association.ekt:
            self._count("endpoint-application-data-ignored")
            return ()
        if not self._takeEktToken(association):
            self._count("ekt-key-request-rate-limited")
            return ()
        conference = association.registration.conference
        key = self._currentKey(conference)
        if key is None:
            # Being stored (sent to every member once it is), or the store
            # failed: the request tries again.
            self._issueKey(conference)
            return ()
        self._count("ekt-key-resent")
        return self._sendEktKey(association, key, log=False).datagrams

    def _takeEktToken(self, association: _Association) -> bool:
        """
        A token bucket per association (``ekt_key_request_burst`` tokens,
        refilled at ``ekt_key_requests_per_second``): True if this request
        may be answered.
        """
        now = self.clock.seconds()
        burst = self.limits.ekt_key_request_burst
        if association.ekt_tokens_at is None:
            tokens = float(burst)
        else:
            tokens = min(float(burst), association.ekt_tokens + (
                now - association.ekt_tokens_at) * self.limits.ekt_key_requests_per_second)
        association.ekt_tokens_at = now
        if tokens < 1.0:
            association.ekt_tokens = tokens
            return False
        association.ekt_tokens = tokens - 1.0
        return True

    def _sendEktKey(self, association: _Association, key, log: bool = True,
                    record: bool = True) -> dtls.Output:
        """
        The EKTKey as RFC 8870's ekt_key handshake message; the engine
        retransmits it until the endpoint's ACK (its timer is scheduled by
        :meth:`_process`).  With ``record``, a cluster's ownership row gets
        the new state (its message_seq and key: an adopter continues them).
        """
        output = association.engine.send_ekt_key(key, self.clock.seconds())
        if record and self.ownership is not None and association.established:
            self.ownership.updated(self, association)
        if log:
            self.log.info(
                "EKTKey SPI {spi} sent to association {association_id} ({conference})",
                spi=key.ekt_spi, association_id=association.id,
                conference=association.registration.conference)
        return output

    def rekey(self, conference: str) -> defer.Deferred:
        """
        Give the conference a new EKTKey and send it to every live endpoint
        of it that negotiated EKT; its lifetime (and rollover) starts now.
        Fires with (key, number of endpoints) once the key is stored; fails
        (nothing sent) when it could not be.
        """
        if self.conference_keys is None:
            raise ValueError("EKT is not enabled on this Key Distributor")

        def replaced(result):
            key, sent = result
            self._count("rekey-api")
            self.log.info("Conference {conference} rekeyed: EKTKey SPI {spi} sent to {count} "
                          "endpoints", conference=conference, spi=key.ekt_spi, count=sent)
            return result

        return self._replaceKey(conference, log=True).addCallback(replaced)

    def _replaceKey(self, conference: str, log: bool, rollover: bool = False) -> defer.Deferred:
        d = self.conference_keys.rekey(conference, self.clock.seconds(), rollover=rollover)
        d.addCallback(lambda key: (key, self._sendToMembers(conference, key, log)))
        return d

    def _sendToMembers(self, conference: str, key, log: bool) -> int:
        """Send ``key`` to every established EKT association of ``conference``; how many."""
        sent = 0
        for association in list(self._associations.values()):
            registration = association.registration
            if (association.established and association.ekt and registration is not None
                    and registration.conference == conference):
                self._process(association, self._sendEktKey(association, key, log=log))
                sent += 1
        if conference in self._ektConferences:
            self._scheduleRollover(conference)
        return sent

    def _issueKey(self, conference: str) -> None:
        """
        Store the conference's key if it has none usable, then send it to
        its members.  One store at a time per conference: the members that
        join while it is written get the key from its one send to all
        (one store per joiner sent each key to every member once per
        joiner, quadratic in a burst of joins).
        """
        if conference in self._issuing:
            return

        def stored(key):
            self._issuing.discard(conference)
            self._sendToMembers(conference, key, log=False)

        def failed(failure):
            self._issuing.discard(conference)
            self._count("ekt-key-store-failed")
            self.log.failure("EKTKey of conference {conference} could not be stored; its "
                             "members ask again", failure, conference=conference)

        self._issuing.add(conference)
        d = self.conference_keys.ensure(conference, self.clock.seconds())
        d.addCallback(stored)
        d.addErrback(failed)

    def _currentKey(self, conference: str):
        """
        The EKTKey to hand out now, with the TTL it has left.  A conference
        without members has no rollover timer: a key of it past its rollover
        point is replaced first (nobody else needs to hear of it).
        """
        now = self.clock.seconds()
        due = self.conference_keys.rollover_at(conference)
        if due is not None and now >= due and conference not in self._ektConferences:
            self._rollOver(conference)
        return self.conference_keys.key_for(conference, now)

    def _rollOver(self, conference: str) -> None:
        """The conference's EKTKey reached its rollover point: replace it (RFC 8870 TTL)."""
        entry = self._ektConferences.get(conference)
        if entry is not None:
            entry[1] = None

        def rolled(result):
            key, sent = result
            self._count("ekt-rollover")
            self.log.info(
                "Conference {conference} EKTKey rolled over: SPI {spi}, TTL {ttl} s, sent to "
                "{count} endpoints", conference=conference, spi=key.ekt_spi, ttl=key.ekt_ttl,
                count=sent)

        def failed(failure):
            # The current key stays valid until its TTL: try again shortly.
            self._count("ekt-rollover-failed")
            self.log.failure("EKTKey rollover of conference {conference} failed; retrying",
                             failure, conference=conference)
            entry = self._ektConferences.get(conference)
            if entry is not None and entry[1] is None:
                entry[1] = self.clock.callLater(self.ROLLOVER_RETRY, self._rollOver, conference)

        self._replaceKey(conference, log=False, rollover=True).addCallbacks(rolled, failed)

    def _keyReplacedElsewhere(self, conference: str) -> None:
        """
        Another Key Distributor of the cluster rekeyed or rolled the
        conference over (its key reached ours by NOTIFY): send it to this
        one's members of the conference.
        """
        if conference not in self._ektConferences:
            return  # no members here; a joiner gets the key in memory
        key = self.conference_keys.key_for(conference, self.clock.seconds())
        if key is None:
            return
        self._count("ekt-key-from-cluster")
        sent = self._sendToMembers(conference, key, log=False)
        self.log.info("Conference {conference}: EKTKey SPI {spi} from another Key Distributor "
                      "sent to {count} endpoints", conference=conference, spi=key.ekt_spi,
                      count=sent)

    def _scheduleRollover(self, conference: str) -> None:
        entry = self._ektConferences[conference]
        if entry[1] is not None and entry[1].active():
            entry[1].cancel()
        entry[1] = None
        due = self.conference_keys.rollover_at(conference)
        if due is not None:
            entry[1] = self.clock.callLater(max(0.0, due - self.clock.seconds()),
                                            self._rollOver, conference)

    def _joinEktConference(self, association: _Association, conference: str) -> None:
        """``association`` holds the conference's EKTKey: keep its rollover going while it lives."""
        if association.ekt_member_of is not None:
            return
        entry = self._ektConferences.get(conference)
        if entry is None:
            entry = self._ektConferences[conference] = [0, None]
            self._scheduleRollover(conference)
        entry[0] += 1
        association.ekt_member_of = conference

    def _leaveEktConference(self, association: _Association) -> None:
        conference = association.ekt_member_of
        if conference is None:
            return
        association.ekt_member_of = None
        entry = self._ektConferences.get(conference)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] <= 0:
            # No members, no timer: the next member's join replaces a key
            # past its rollover point (see _currentKey).
            if entry[1] is not None and entry[1].active():
                entry[1].cancel()
            del self._ektConferences[conference]

    def _closed(self, association: _Association, event: dtls.Closed) -> None:
        self._count("rejected" if event.rejected else "closed")
        if not association.established:
            if event.rejected:
                self._count("handshake-refused")
            elif event.timed_out:
                # --handshake-timeout, or the retransmissions ran out.
                self._count("handshake-timeout")
            else:
                self._count("handshake-failed")
        log = self.log.warn if event.rejected else self.log.info
        log("Association {association_id} ended ({conference}, via {peer}): {reason}",
            association_id=association.id, conference=self._conference(association),
            peer=self._peer(association), reason=event.reason, rejected=event.rejected)
        self._send(association, wire.EndpointDisconnect(association.id))
        self._forget(association)

    def _schedule(self, association: _Association) -> None:
        timer = association.timer
        now = self.clock.seconds()
        due = association.engine.next_timeout(now)
        if timer is not None and timer.active():
            if due is not None and due >= timer.getTime():
                # Postponing a pending call is cheap; moving one sooner is
                # not; leaving one that is due then already costs nothing.
                if due != timer.getTime():
                    timer.reset(max(0.0, due - now))
                return
            timer.cancel()
        association.timer = None
        if due is not None:
            association.timer = self.clock.callLater(max(0.0, due - now), self._timerFired,
                                                     association)

    def _timerFired(self, association: _Association) -> None:
        association.timer = None
        if self._associations.get(association.id) is association:
            self._process(association, association.engine.handle_timeout(self.clock.seconds()))

    def _forget(self, association: _Association) -> None:
        if self.ownership is not None and association.established:
            self.ownership.ended(association)
        self._unindex(association)
        self._releaseConferenceProfile(association)
        self._leaveEktConference(association)
        timer = association.timer
        if timer is not None and timer.active():
            timer.cancel()
        association.timer = None
        if self._associations.get(association.id) is association:
            del self._associations[association.id]
        if association.counted_on is not None:
            association.counted_on.associations.discard(association.id)
            association.counted_on = None

    def _unindex(self, association: _Association) -> None:
        """Take ``association`` out of the tls-id index (see _supersede)."""
        registration = association.registration
        if registration is None:
            return
        established = self._establishedByTlsId.get(registration.tls_id)
        if established is None:
            return
        try:
            established.remove(association)
        except ValueError:
            return
        if not established:
            del self._establishedByTlsId[registration.tls_id]

    @staticmethod
    def _peer(association: _Association) -> str:
        tunnel = association.tunnel or association.origin
        return tunnel.peerDescription() if tunnel is not None else "(no tunnel)"

    def _conference(self, association: _Association) -> str:
        registration = association.registration
        return registration.conference if registration is not None else "(unidentified)"

    # -- failover --------------------------------------------------------

    def _useReservation(self, engine: dtls.ServerAssociation,
                        association_id: uuid.UUID) -> None:
        reserve = self.write_reservation
        engine.use_write_reservation(
            None if reserve is None else functools.partial(reserve, association_id),
            self.limits.write_sequence_block)

    def exportAssociation(self, association_id: uuid.UUID) -> AssociationRecord:
        """
        What a store must seal and keep so that another Key Distributor of
        this identity can adopt the association.  ValueError unless it is
        established, on the own record layer, and came through a tunnel
        with a certificate identity.
        """
        association = self._associations.get(association_id)
        if association is None or not association.established or \
                not association.engine.compacted or association.registration is None:
            raise ValueError("association {} is not established here on the own record "
                             "layer".format(association_id))
        identity = association.origin.identity
        if identity is None:
            raise ValueError("association {} came through a tunnel without a certificate "
                             "identity".format(association_id))
        registration = association.registration
        return AssociationRecord(
            association_id=association.id,
            state=association.engine.export_state().to_bytes(),
            tls_id=registration.tls_id, conference=registration.conference,
            media_distributor=identity, ekt=association.ekt)

    def adoptAssociation(self, record: AssociationRecord, tunnel_or_identity, now: float):
        """
        Continue an association another Key Distributor of this identity
        established (``record`` from its :meth:`exportAssociation`): live at
        once, with no handshake and no MediaKeys (the Media Distributor has
        them), carried by that Media Distributor's current tunnel here
        (``tunnel_or_identity``: a tunnel of it, or its identity; with none
        up its messages wait as after a tunnel loss).  It then answers
        EKTKey requests, gets rekeys and rollovers, and ends with
        EndpointDisconnect as any other.  Its registration must still be
        there (same conference and fingerprint): if not, the Media
        Distributor is told EndpointDisconnect and None is returned.
        Otherwise returns the association's id; ValueError for an unusable
        record, one already here, or beyond ``max_associations``.
        """
        if isinstance(tunnel_or_identity, str):
            identity, tunnel = tunnel_or_identity, None
        else:
            identity, tunnel = tunnel_or_identity.identity, tunnel_or_identity
        if identity is None or identity != record.media_distributor:
            raise ValueError("association {} belongs to Media Distributor {}".format(
                record.association_id, record.media_distributor))
        if record.association_id in self._associations:
            raise ValueError("association {} is already here".format(record.association_id))
        if len(self._associations) >= self.limits.max_associations:
            self._count("adoption-refused")
            raise ValueError("total association limit reached")
        state = AssociationState.from_bytes(record.state)
        if tunnel is None:
            live = self._peerTunnels.get(identity)
            tunnel = live[-1] if live else None
        origin = tunnel if tunnel is not None else _AdoptedOrigin(identity)
        registration = self.roster.lookup(record.tls_id)
        if registration is None or registration.conference != record.conference or (
                state.peer_fingerprint is not None and
                registration.fingerprint.startswith("sha-256 ") and
                registration.fingerprint != state.peer_fingerprint):
            self._count("adoption-refused")
            self.log.info("Association {association_id} not adopted: tls-id {tls_id} is no "
                          "longer registered in {conference} with that certificate",
                          association_id=record.association_id, tls_id=record.tls_id,
                          conference=record.conference)
            message = wire.EndpointDisconnect(record.association_id)
            if (tunnel is None or not tunnel.sendMessage(message)) and \
                    not self._waiting.put(identity, message):
                self._count("dropped-waiting-full")
            return None
        engine = dtls.ServerAssociation.restore(
            state, now, reserve=None if self.write_reservation is None else
            functools.partial(self.write_reservation, record.association_id),
            sequence_block=self.limits.write_sequence_block)
        association = _Association(record.association_id, engine, origin, None,
                                   (engine.profile,), registration=registration,
                                   established=True, ekt=record.ekt, started=now)
        self._associations[association.id] = association
        self._moveTo(association, tunnel)
        self._holdConferenceProfile(association, registration.conference, engine.profile)
        self._establishedByTlsId.setdefault(registration.tls_id, []).append(association)
        if association.ekt and self.conference_keys is not None:
            self._joinEktConference(association, registration.conference)
        if tunnel is None and identity not in self._graceTimers:
            self._graceTimers[identity] = self.clock.callLater(
                self.limits.tunnel_grace, self._graceExpired, identity)
        self._count("adopted")
        self.log.info("Association {association_id} adopted: tls-id {tls_id} in conference "
                      "{conference}, via {peer}", association_id=association.id,
                      tls_id=registration.tls_id, conference=registration.conference,
                      peer=self._peer(association))
        sent = engine.ekt_key_sent
        key = self._currentKey(registration.conference) if association.ekt and \
            self.conference_keys is not None else None
        if key is not None and (sent is None or not sent.same_key(key)):
            # Rekeyed (or rolled over) while nobody served the association.
            self._process(association, self._sendEktKey(association, key))
        else:
            # An ekt_key message that awaited its ACK goes again now.
            self._process(association, engine.handle_timeout(now))
        return association.id

    # -- registration changes -------------------------------------------

    def _registrationRemoved(self, registration, reason: str) -> None:
        """A deleted (or re-keyed) registration ends its live associations."""
        now = self.clock.seconds()
        for association in list(self._associations.values()):
            current = association.registration
            if current is not None and current.tls_id == registration.tls_id:
                output = association.engine.close(now, "registration " + reason)
                self._process(association, output)
                if self._associations.get(association.id) is association:
                    self._closed(association, dtls.Closed("registration " + reason))

    def stop(self) -> None:
        """Forget everything (service shutdown); cancels every timer."""
        # Their ownership rows stay: another Key Distributor may adopt them.
        ownership, self.ownership = self.ownership, None
        for association in list(self._associations.values()):
            self._forget(association)
        self.ownership = ownership
        for timer in self._graceTimers.values():
            if timer.active():
                timer.cancel()
        self._graceTimers.clear()
        self._peerTunnels.clear()
        self._waiting.clear()
