"""
The Media Distributor's endpoint port (RFC 9185 section 5.3, RFC 8723
section 5.2): one UDP socket for every endpoint.

DTLS goes to a Key Distributor through a tunnel and back; SRTP and SRTCP
from an endpoint with hop-by-hop keys is outer-decrypted with that
endpoint's inbound session and outer-encrypted for every other endpoint of
its conference with theirs.  The inner (end-to-end) layer, the OHB and any
EKT field pass through untouched: the Media Distributor cannot read media.

RTCP goes where it belongs: feedback (RTPFB, PSFB) only to the member that
sends the media SSRC it names, everything else (SR, RR, SDES, BYE, APP,
...) to every other member.  Who sends an SSRC is learnt from the
authenticated SRTP each endpoint sends, never from RTCP.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field
from errno import ECONNREFUSED, EMSGSIZE, errorcode

import pylibsrtp
from twisted.internet import error, protocol, task, udp
from twisted.logger import Logger

from perc import hello, rtp, wire
from perc.md import srtpbatch
from perc.profiles import Profile, by_id
from perc.waitingroom import WaitingRoom

__all__ = ["MediaRelay", "RelayLimits"]

# Looked up per packet: module globals are faster than attribute chains.
_classify = rtp.classify
_split_ekt_field = rtp.split_ekt_field
_EktFieldError = rtp.EktFieldError
_ssrc_of = struct.Struct("!I").unpack_from
_parse_rtcp_compound = rtp.parse_rtcp_compound
_RtpError = rtp.RtpError
_FEEDBACK = frozenset({rtp.RTCP_RTPFB, rtp.RTCP_PSFB})
_RTP = rtp.Kind.RTP
_RTCP = rtp.Kind.RTCP
_DTLS = rtp.Kind.DTLS


def _hello_verify_request(data: bytes) -> bool:
    """
    True for an epoch-0 handshake record that holds a HelloVerifyRequest:
    the Key Distributor's stateless answer to a ClientHello without a valid
    cookie (RFC 6347 section 4.2.1).
    """
    return len(data) > 13 and data[0] == 22 and data[3] == 0 and data[4] == 0 and data[13] == 3


@dataclass(frozen=True)
class RelayLimits:
    """Bounds on what endpoints can make the Media Distributor hold."""

    endpoint_timeout: float = 30.0
    handshake_timeout: float = 60.0
    max_associations: int = 10000
    new_associations_per_address_per_second: int = 5
    sweep_interval: float = 1.0
    #: What waits for a Key Distributor (per certificate identity) while
    #: none of its tunnels is up: messages and their octets, given up after
    #: ``waiting_seconds``; EndpointDisconnects, until it is back.
    waiting_max_messages: int = 1000
    waiting_max_octets: int = 1 << 20
    waiting_max_disconnects: int = 10000
    waiting_seconds: float = 10.0
    #: The media SSRCs learnt per endpoint (its oldest is forgotten for a
    #: new one beyond this) and in all (no more are learnt beyond this).
    max_ssrcs_per_endpoint: int = 16
    max_ssrcs: int = 65536


@dataclass(eq=False)
class Endpoint:
    """One endpoint-initiated DTLS association and, once keyed, its SRTP sessions."""

    id: uuid.UUID
    address: tuple
    tunnel: object | None
    conference: str
    tls_id: str | None
    created: float
    last_seen: float
    profile: Profile | None = None
    inbound: pylibsrtp.Session | None = field(default=None, repr=False)
    outbound: pylibsrtp.Session | None = field(default=None, repr=False)
    ekt: bool = False
    #: The random of the ClientHello that started it: a first ClientHello
    #: with another random is a new handshake (RFC 6347 section 4.2.1: the
    #: ClientHello that returns the cookie keeps the random).
    client_random: bytes | None = None
    #: The certificate identity of its Key Distributor: any tunnel to that
    #: peer may carry it.  None (a tunnel without one): only its own tunnel.
    peer: str | None = None
    #: The media SSRCs it has sent authenticated SRTP with, oldest first
    #: (a dict for its order): where feedback about them goes.
    ssrcs: dict = field(default_factory=dict, repr=False)

    @property
    def established(self) -> bool:
        return self.inbound is not None


def _session(key: bytes, salt: bytes, profile: Profile, direction: int) -> pylibsrtp.Session:
    policy = pylibsrtp.Policy(key=key + salt, ssrc_type=direction,
                              srtp_profile=profile.hbh_libsrtp_profile)
    return pylibsrtp.Session(policy)


def _udp_sendto(transport):
    """
    ``sendto`` of the socket under ``transport`` if it is a plain,
    unconnected Twisted UDP port whose ``write`` is Twisted's own, else None.

    ``udp.Port.write`` checks, on every call, that the address is an IP
    address of the port's family (three parses of the address string),
    then calls ``socket.sendto``.  Media goes only to addresses the same
    socket received from, which pass those checks by construction, so the
    relay calls ``sendto`` itself and handles its errors as
    :func:`_sendto_failed` describes.
    """
    if not isinstance(transport, udp.Port) or type(transport).write is not udp.Port.write:
        return None
    if "write" in vars(transport) or getattr(transport, "_connectedAddr", None):
        return None
    sock = getattr(transport, "socket", None)
    return None if sock is None else sock.sendto


def _sendto_failed(problem: OSError) -> None:
    """
    What ``udp.Port.write`` does when ``sendto`` fails (Python itself
    retries EINTR): ECONNREFUSED (an ICMP error left on the socket by an
    earlier datagram) is ignored, EMSGSIZE becomes MessageLengthError, and
    anything else propagates.
    """
    if problem.args and problem.args[0] == ECONNREFUSED:
        return
    if problem.args and problem.args[0] == EMSGSIZE:
        raise error.MessageLengthError("message too long")
    raise problem


def _tls_id(client_hello) -> str | None:
    if client_hello.tls_id is None:
        return None
    return client_hello.tls_id.decode("ascii", "replace")


class MediaRelay(protocol.DatagramProtocol):
    """
    ``pool`` picks a tunnel for a new association (``pick()``) and the
    tunnels call back into this object (``tunneledDtlsReceived``,
    ``mediaKeysReceived``, ``endpointDisconnectReceived``, ``tunnelDown``).
    ``memberships`` places a tls-id in a conference; ``clock`` is an
    ``IReactorTime``.
    """

    log = Logger()

    def __init__(self, *, pool, memberships, profiles, clock, limits: RelayLimits = RelayLimits()):
        self.pool = pool
        self.memberships = memberships
        self.profile_ids = frozenset(p.id for p in profiles)
        self.clock = clock
        self.limits = limits
        self.counters: dict[str, int] = {}
        self._by_id: dict[uuid.UUID, Endpoint] = {}
        self._established: dict[tuple, Endpoint] = {}
        self._pending: dict[tuple, Endpoint] = {}
        # Associations the Key Distributor has answered with nothing but a
        # HelloVerifyRequest so far (it keeps no state for them before the
        # cookie exchange), oldest first.  When the table is full, a new
        # ClientHello evicts the oldest of these rather than being refused:
        # a flood of ClientHellos from addresses that never return the
        # cookie cannot lock legitimate endpoints out.
        self._unverified: dict[uuid.UUID, Endpoint] = {}
        self._evicted_since_sweep = 0
        self._unplaced_since_sweep = 0
        self._conferences: dict[str, set] = {}
        # Per conference, what forwarding needs of each member, built when
        # membership changes rather than per packet: (endpoint, address,
        # its outbound protect) for RTP, and the same with protect_rtcp.
        self._fanout: dict[str, tuple[tuple, tuple]] = {}
        # Per conference, media SSRC -> the member that sends it, and the
        # number of SSRCs known in all conferences.
        self._ssrc_owners: dict[str, dict[int, Endpoint]] = {}
        self._ssrc_total = 0
        self._sendto = None
        # While a batch from datagramsReceived is handled: where forwarded
        # packets are protected and queued (the port's SrtpSendBatch).
        self._outbox: srtpbatch.SrtpSendBatch | None = None
        self._new_per_host: dict[str, int] = {}
        # A ClientHello split into fragments names its endpoint only once
        # whole; the Key Distributor then gets it whole too.
        self._helloFragments = hello.ClientHelloReassembler(count=self._count)
        self._waiting = WaitingRoom(
            peer_kind="Key Distributor", max_messages=limits.waiting_max_messages,
            max_octets=limits.waiting_max_octets, max_owed=limits.waiting_max_disconnects)
        #: Key Distributor identity -> the timer that gives up its queue.
        self._waitingTimers: dict[str, object] = {}
        self._sweeper = task.LoopingCall(self._sweep)
        self._sweeper.clock = clock
        memberships.add_removal_observer(self._membershipRemoved)

    # -- life -----------------------------------------------------------

    def startProtocol(self):
        self._sendto = _udp_sendto(self.transport)
        self._sweeper.start(self.limits.sweep_interval, now=False)

    def stopProtocol(self):
        self._sendto = None
        if self._sweeper.running:
            self._sweeper.stop()

    # -- queries --------------------------------------------------------

    def endpoint(self, association_id: uuid.UUID) -> Endpoint | None:
        return self._by_id.get(association_id)

    def status(self) -> dict:
        return {
            "associations": len(self._by_id),
            "established": len(self._established),
            "waiting_messages": len(self._waiting),
            "conferences": {name: len(members) for name, members in self._conferences.items()},
            "counters": dict(self.counters),
        }

    def _count(self, reason: str, amount: int = 1) -> None:
        self.counters[reason] = self.counters.get(reason, 0) + amount

    # -- datagrams from endpoints ----------------------------------------

    def datagramReceived(self, data: bytes, address) -> None:
        kind = _classify(data)
        if kind is _RTP:
            self._media(data, address)
        elif kind is _RTCP:
            self._control(data, address)
        elif kind is _DTLS:
            self._dtls(data, address)
        else:
            self._count("dropped-" + kind.name.lower())

    # What datagramsReceived does with each datagram of a batch.
    _handleDatagram = datagramReceived

    def datagramsReceived(self, datagrams) -> None:
        """
        A batch of ``(data, address)`` pairs read at once (a transport with
        an ``srtpBatch``, :class:`perc.md.batchport.BatchedPort`): each is
        handled as :meth:`datagramReceived` would, and the media and RTCP
        they cause go out together at the end, in the same order.  What
        the transport could not send is counted ``dropped-send-<errno>``.
        """
        outbox = self._outbox = self.transport.srtpBatch
        handle = self._handleDatagram
        try:
            for data, address in datagrams:
                try:
                    handle(data, address)
                except Exception:  # noqa: BLE001
                    # As Twisted's port does for one datagram: logged, and
                    # the rest of the batch is still handled.
                    self.log.failure("Unhandled error in a datagram from {address}",
                                     address=address)
        finally:
            self._outbox = None
            result = outbox.flush()
        if result.failed:
            for number, count in result.failed.items():
                self._count("dropped-send-" + errorcode.get(number, str(number)).lower(), count)

    def _dtls(self, data: bytes, address) -> None:
        data = self._helloFragments.feed(address, data, self.clock.seconds())
        if data is None:
            return  # a piece of a ClientHello, kept (or refused and counted)
        endpoint = self._pending.get(address)
        if endpoint is not None:
            try:
                client_hello = hello.parse_client_hello(data)
            except hello.HelloError:
                # Broken record framing (truncated, or a length past the
                # datagram) is no endpoint's handshake: a spoofer's, from an
                # address with a handshake under way.
                self._count("dropped-malformed-hello")
                return
            if client_hello is not None and (
                    client_hello.tls_id_malformed or _tls_id(client_hello) != endpoint.tls_id
                    or (client_hello.cookie_empty
                        and client_hello.random != endpoint.client_random)):
                # Another endpoint at this address (a restart, or a spoofed
                # first ClientHello), or the same one starting its handshake
                # again (it gave up on this one, which the Key Distributor's
                # engine would not restart): it gets an association in its
                # own conference, and only then is the other handshake dropped.
                replacement = self._newAssociation(address, client_hello)
                if replacement is None:
                    return
                self._drop(endpoint, notify=True,
                           reason="a new ClientHello came from its address")
                endpoint = replacement
        else:
            try:
                client_hello = hello.parse_client_hello(data)
            except hello.HelloError:
                self._count("dropped-malformed-hello")
                return
            if client_hello is not None:
                # A ClientHello from an address without a handshake under
                # way starts a new association.  An established one stays
                # until the new one has keys, so a spoofed ClientHello cannot
                # cut a live endpoint off.
                endpoint = self._newAssociation(address, client_hello)
                if endpoint is None:
                    return
            else:
                endpoint = self._established.get(address)
        if endpoint is None:
            self._count("dropped-dtls-no-association")
            return
        tunnel = self._liveTunnel(endpoint)
        if tunnel is not None:
            tunnel.sendDtls(endpoint.id, data)
        elif endpoint.peer is not None:
            self._wait(endpoint.peer, wire.TunneledDtls(endpoint.id, data))
        else:
            self._count("dropped-dtls-tunnel-down")

    def _newAssociation(self, address, client_hello) -> Endpoint | None:
        full = len(self._by_id) >= self.limits.max_associations
        if full and not self._unverified:
            self._count("refused-association-limit")
            return None
        host = address[0]
        recent = self._new_per_host.get(host, 0)
        if recent >= self.limits.new_associations_per_address_per_second:
            self._count("refused-rate-limit")
            return None
        if client_hello.tls_id_malformed:
            self._count("refused-malformed-tls-id")
            return None
        tls_id = _tls_id(client_hello)
        conference = self.memberships.conference_for(tls_id)
        if conference is None:
            self._count("refused-no-conference")
            # One line per sweep interval, and a count of the others at the
            # sweep: a flood of unknown tls-ids must not become a log flood.
            if not self._unplaced_since_sweep:
                self.log.warn(
                    "Ignoring a ClientHello from {address}: tls-id {tls_id} is in no "
                    "conference and there is no default conference",
                    address=address, tls_id=tls_id)
            self._unplaced_since_sweep += 1
            return None
        tunnel = self.pool.pick()
        if tunnel is None:
            self._count("refused-no-tunnel")
            return None
        if getattr(tunnel, "writesPaused", False):
            # The Key Distributor is not keeping up with what this tunnel
            # carries: shed new handshakes (the endpoint retransmits) rather
            # than queue them until the tunnel's write bound drops it, and
            # every handshake with it.
            self._count("refused-tunnel-busy")
            return None
        if full:
            self._evictOldestUnverified()
        self._new_per_host[host] = recent + 1
        now = self.clock.seconds()
        endpoint = Endpoint(uuid.uuid4(), address, tunnel, conference, tls_id, now, now,
                            client_random=client_hello.random,
                            peer=getattr(tunnel, "identity", None))
        self._by_id[endpoint.id] = endpoint
        self._pending[address] = endpoint
        self._unverified[endpoint.id] = endpoint
        # Logged once the Key Distributor is past the cookie exchange
        # (_verified): a line per ClientHello would let a flood fill the log.
        return endpoint

    def _media(self, data: bytes, address) -> None:
        # The hot path: one call per SRTP packet, and its loop runs once per
        # other member of the conference.
        endpoint = self._established.get(address)
        if endpoint is None:
            self._count("dropped-srtp-unknown-source")
            return
        ekt_field = b""
        packet = data
        if endpoint.ekt:
            try:
                packet, ekt_field = _split_ekt_field(data)
            except _EktFieldError:
                self._count("dropped-malformed-ekt")
                return
        try:
            plain = endpoint.inbound.unprotect(packet)
        except (pylibsrtp.Error, ValueError):
            # Bad tag, replay, or a spoofed source: never forwarded.
            # pylibsrtp raises ValueError for a packet over its 1500-octet
            # buffer (the UDP port reads up to 8192).
            self._count("dropped-srtp-unprotect-failed")
            return
        endpoint.last_seen = self.clock.seconds()
        # Authenticated with its hop-by-hop key: this endpoint sends this SSRC.
        ssrc = _ssrc_of(plain, 8)[0]
        if ssrc not in endpoint.ssrcs:
            self._learnSsrc(endpoint, ssrc)
        fanout = self._fanout.get(endpoint.conference)
        if fanout is None:
            fanout = self._buildFanout(endpoint.conference)
        members = () if fanout is None else fanout[0]
        outbox = self._outbox
        if outbox is not None:
            # Batched: protected in place into the port's send slots.
            forwarded, failed = outbox.rtp(plain, members, endpoint, ekt_field)
            if failed:
                self._count("dropped-protect-failed", failed)
            counters = self.counters
            counters["forwarded-rtp"] = counters.get("forwarded-rtp", 0) + forwarded
            return
        send = self._sendto
        if send is None:
            send = self.transport.write
        forwarded = 0
        for other, other_address, protect, other_ekt, _ in members:
            if other is endpoint:
                continue
            try:
                out = protect(plain)
            except (pylibsrtp.Error, ValueError):
                # ValueError: more than pylibsrtp can re-protect in its
                # buffer (1500 octets less the largest trailer).
                self._count("dropped-protect-failed")
                continue
            if ekt_field and other_ekt:
                # Only a receiver that negotiated EKT expects (and can
                # authenticate past) a trailing EKT field.
                out += ekt_field
            try:
                send(out, other_address)
            except OSError as problem:
                _sendto_failed(problem)
            forwarded += 1
        counters = self.counters
        counters["forwarded-rtp"] = counters.get("forwarded-rtp", 0) + forwarded

    def _control(self, data: bytes, address) -> None:
        """
        An SRTCP packet: each of its RTCP packets goes where it belongs.
        Every receiver gets, in one SRTCP packet protected for it, the
        packets of the compound meant for it in their order: the reports
        and everything else that is not feedback (every other member), and
        the feedback about media it sends.  Feedback no other member sends
        the media of is dropped and counted; a malformed compound is
        dropped whole.
        """
        endpoint = self._established.get(address)
        if endpoint is None:
            self._count("dropped-srtp-unknown-source")
            return
        try:
            plain = endpoint.inbound.unprotect_rtcp(data)
        except (pylibsrtp.Error, ValueError):
            self._count("dropped-srtp-unprotect-failed")
            return
        endpoint.last_seen = self.clock.seconds()
        try:
            parts = _parse_rtcp_compound(plain)
        except _RtpError:
            self._count("dropped-rtcp-malformed")
            return
        # Per part: None for every other member, else the members it goes to.
        routes = []
        targeted = False
        owners = self._ssrc_owners.get(endpoint.conference, {})
        for part in parts:
            if part.packet_type not in _FEEDBACK:
                routes.append(None)
                continue
            targeted = True
            targets = set()
            for ssrc in part.media_ssrcs:
                owner = owners.get(ssrc)
                if owner is not None and owner is not endpoint:
                    targets.add(owner)
            if not targets:
                self._count("dropped-rtcp-feedback-unknown-media-ssrc")
            routes.append(targets)
        fanout = self._fanout.get(endpoint.conference)
        if fanout is None:
            fanout = self._buildFanout(endpoint.conference)
        members = () if fanout is None else fanout[1]
        send = self._sendto
        if send is None:
            send = self.transport.write
        outbox = self._outbox
        forwarded = 0
        for other, other_address, protect, _, context in members:
            if other is endpoint:
                continue
            mine = plain
            if targeted:
                chosen = [plain[part.start:part.end] for part, route in zip(parts, routes)
                          if route is None or other in route]
                if not chosen:
                    continue
                if len(chosen) != len(parts):
                    mine = b"".join(chosen)
            if outbox is not None:
                if outbox.rtcp(mine, context, other_address):
                    forwarded += 1
                else:
                    self._count("dropped-protect-failed")
                continue
            try:
                out = protect(mine)
            except (pylibsrtp.Error, ValueError):
                self._count("dropped-protect-failed")
                continue
            try:
                send(out, other_address)
            except OSError as problem:
                _sendto_failed(problem)
            forwarded += 1
        self._count("forwarded-rtcp", forwarded)

    def _learnSsrc(self, endpoint: Endpoint, ssrc: int) -> None:
        """
        ``endpoint`` sent authenticated media with ``ssrc``: feedback about
        it goes there from now.  An SSRC another member sends stays that
        member's while it is in the conference (a member cannot take
        another's feedback); bounded per endpoint (its oldest SSRC is
        forgotten) and in all (nothing more is learnt).
        """
        owners = self._ssrc_owners.setdefault(endpoint.conference, {})
        owner = owners.get(ssrc)
        if owner is not None:
            self._count("ssrc-sent-by-another-member")
            return
        if len(endpoint.ssrcs) >= self.limits.max_ssrcs_per_endpoint:
            if not endpoint.ssrcs:
                return  # a limit of 0: feedback is placed nowhere
            oldest = next(iter(endpoint.ssrcs))
            del endpoint.ssrcs[oldest]
            del owners[oldest]
            self._ssrc_total -= 1
            self._count("ssrc-forgotten-endpoint-limit")
        elif self._ssrc_total >= self.limits.max_ssrcs:
            self._count("ssrc-not-learnt-table-full")
            return
        endpoint.ssrcs[ssrc] = None
        owners[ssrc] = endpoint
        self._ssrc_total += 1

    def _forgetSsrcs(self, endpoint: Endpoint) -> None:
        """``endpoint`` left: feedback about its SSRCs has nowhere to go."""
        if not endpoint.ssrcs:
            return
        owners = self._ssrc_owners.get(endpoint.conference)
        for ssrc in endpoint.ssrcs:
            del owners[ssrc]
        self._ssrc_total -= len(endpoint.ssrcs)
        endpoint.ssrcs.clear()
        if not owners:
            del self._ssrc_owners[endpoint.conference]

    def _membersChanged(self, conference: str) -> None:
        """
        Forget the forwarding table of ``conference``; the next packet
        rebuilds it.  Lazily, so that N endpoints joining one conference cost
        N, not N squared.
        """
        self._fanout.pop(conference, None)

    def _buildFanout(self, conference: str):
        """
        The (endpoint, address, protect, ekt, libsrtp context) tables for RTP
        and RTCP, or None.  The bound ``protect`` keeps the session (and so
        its context) alive while the table is.
        """
        members = self._conferences.get(conference)
        if not members:
            return None
        # Built from one iteration of the set, so media goes out in the
        # order iterating the set gives.
        ordered = tuple(members)
        fanout = self._fanout[conference] = (
            tuple((m, m.address, m.outbound.protect, m.ekt, srtpbatch.context(m.outbound))
                  for m in ordered),
            tuple((m, m.address, m.outbound.protect_rtcp, False, srtpbatch.context(m.outbound))
                  for m in ordered))
        return fanout

    # -- messages from tunnels ------------------------------------------

    def tunneledDtlsReceived(self, tunnel, association_id: uuid.UUID, data: bytes) -> None:
        endpoint = self._fromItsTunnel(tunnel, association_id)
        if endpoint is None:
            return
        if not endpoint.established:
            if endpoint.id in self._unverified and not _hello_verify_request(data):
                self._verified(endpoint, tunnel)
            try:
                server_hello = hello.parse_server_hello(data)
            except hello.HelloError:
                server_hello = None
            if server_hello is not None:
                # DTLS 1.2 ServerHellos are cleartext: extension 39 says
                # whether every SRTP packet will end with an EKT field.
                endpoint.ekt = server_hello.ekt_cipher is not None
        self.transport.write(data, endpoint.address)

    def _verified(self, endpoint: Endpoint, tunnel) -> None:
        """
        The Key Distributor answered more than a HelloVerifyRequest: the
        cookie came back and it keeps state for the association now.
        """
        del self._unverified[endpoint.id]
        self.log.info(
            "New association {association_id} from {address} (tls-id {tls_id}, conference "
            "{conference}) through {peer}: past the cookie exchange",
            association_id=endpoint.id, address=endpoint.address, tls_id=endpoint.tls_id,
            conference=endpoint.conference, peer=tunnel.peerDescription())

    def mediaKeysReceived(self, tunnel, message) -> None:
        endpoint = self._fromItsTunnel(tunnel, message.association_id)
        if endpoint is None:
            return
        profile = by_id(message.profile)
        problem = None
        if profile is None or profile.id not in self.profile_ids:
            problem = "profile 0x{:04X} was not offered".format(message.profile)
        elif (len(message.client_key) != profile.hbh_key_length
              or len(message.server_key) != profile.hbh_key_length
              or len(message.client_salt) != profile.hbh_salt_length
              or len(message.server_salt) != profile.hbh_salt_length):
            problem = "key or salt lengths do not fit {}".format(profile.name)
        elif message.mki:
            problem = "an MKI is not supported"
        elif endpoint.established:
            problem = "a second MediaKeys for the same association"
        if problem is not None:
            self._count("media-keys-refused")
            self.log.warn("Ending association {association_id}: MediaKeys refused: {reason}",
                          association_id=endpoint.id, reason=problem)
            self._drop(endpoint, notify=True, reason="MediaKeys refused")
            return
        self._unverified.pop(endpoint.id, None)
        endpoint.profile = profile
        endpoint.inbound = _session(message.client_key, message.client_salt, profile,
                                    pylibsrtp.Policy.SSRC_ANY_INBOUND)
        endpoint.outbound = _session(message.server_key, message.server_salt, profile,
                                     pylibsrtp.Policy.SSRC_ANY_OUTBOUND)
        endpoint.last_seen = self.clock.seconds()
        previous = self._established.get(endpoint.address)
        if previous is not None and previous is not endpoint:
            self._drop(previous, notify=True, reason="replaced by a new association")
        if self._pending.get(endpoint.address) is endpoint:
            del self._pending[endpoint.address]
        self._established[endpoint.address] = endpoint
        self._conferences.setdefault(endpoint.conference, set()).add(endpoint)
        self._membersChanged(endpoint.conference)
        self.log.info(
            "Association {association_id} keyed ({profile}, EKT {ekt}): forwarding media "
            "in conference {conference}", association_id=endpoint.id, profile=profile.name,
            ekt=endpoint.ekt, conference=endpoint.conference)

    def endpointDisconnectReceived(self, tunnel, association_id: uuid.UUID) -> None:
        endpoint = self._fromItsTunnel(tunnel, association_id, answer_unknown=False)
        if endpoint is None:
            return
        self._drop(endpoint, notify=False, reason="ended by the Key Distributor")

    def _fromItsTunnel(self, tunnel, association_id: uuid.UUID,
                       answer_unknown: bool = True) -> Endpoint | None:
        """
        The association, if ``tunnel`` goes to the Key Distributor that
        terminates it (its own tunnel, or any tunnel to the same certificate
        identity, which it then answers through): another Key Distributor
        must not steer (or end) an association it does not terminate.  An
        unknown one is answered with EndpointDisconnect (``answer_unknown``)
        on a tunnel with an identity.
        """
        endpoint = self._by_id.get(association_id)
        if endpoint is None:
            self._count("tunnel-unknown-association")
            if (answer_unknown and getattr(tunnel, "identity", None) is not None
                    and tunnel.usable):
                # Not here (ended, or this Media Distributor restarted): the
                # Key Distributor would otherwise keep it for this identity.
                tunnel.sendDisconnect(association_id)
            return None
        if endpoint.tunnel is not tunnel:
            if endpoint.peer is None or getattr(tunnel, "identity", None) != endpoint.peer:
                self._count("tunnel-foreign-association")
                return None
            self._moveTo(endpoint, tunnel)
        return endpoint

    def _moveTo(self, endpoint: Endpoint, tunnel) -> None:
        """Carry ``endpoint`` through ``tunnel`` (None: none up) and count it there."""
        if endpoint.tunnel is not None:
            endpoint.tunnel.forgetAssociation(endpoint.id)
        endpoint.tunnel = tunnel
        if tunnel is not None:
            tunnel.associations.add(endpoint.id)

    def _liveTunnel(self, endpoint: Endpoint):
        """The usable tunnel for ``endpoint``'s messages, or None."""
        tunnel = endpoint.tunnel
        if tunnel is not None and tunnel.usable:
            return tunnel
        if endpoint.peer is None:
            return None
        current = self.pool.current(endpoint.peer)
        if current is not None:
            self._moveTo(endpoint, current)
        return current

    def _wait(self, identity: str, message) -> None:
        """No tunnel to ``identity`` is up: ``message`` waits for the next (bounded)."""
        if not self._waiting.put(identity, message):
            self._count("dropped-waiting-full")
            return
        if identity not in self._waitingTimers:
            self._waitingTimers[identity] = self.clock.callLater(
                self.limits.waiting_seconds, self._waitedTooLong, identity)

    def _waitedTooLong(self, identity: str) -> None:
        del self._waitingTimers[identity]
        self._count("dropped-waited-too-long",
                    self._waiting.expire(identity, self.limits.waiting_seconds))

    def tunnelDown(self, tunnel, reason=None) -> None:
        """
        The associations of a tunnel to a Key Distributor with a certificate
        identity move at once to the least-loaded other usable tunnel with
        that identity (another Key Distributor with the same certificate,
        or another connection to the same one), or wait for the next one
        (handshaking ones until --handshake-timeout, keyed ones forward media
        meanwhile).  On a tunnel without one, associations still handshaking
        fail (the endpoint retries and gets a new one); keyed ones keep
        forwarding media.
        """
        identity = getattr(tunnel, "identity", None)
        for endpoint in list(self._by_id.values()):
            if endpoint.tunnel is tunnel:
                if endpoint.peer is not None:
                    # Chosen one at a time: they spread over the others.
                    self._moveTo(endpoint, self.pool.current(identity))
                elif endpoint.established:
                    endpoint.tunnel = None
                else:
                    self._drop(endpoint, notify=False, reason="tunnel lost during the handshake")
        current = self.pool.current(identity) if identity is not None else None
        if current is not None:
            self._flush(identity, current)

    def tunnelUp(self, tunnel) -> None:
        """
        A tunnel to a Key Distributor with a certificate identity carries
        that peer's associations that have no usable tunnel (their own came
        down while no other with that identity was up), and what waited for
        it is sent.  Associations on another usable tunnel stay there: with
        several Key Distributors sharing one identity, each keeps its own.
        """
        identity = getattr(tunnel, "identity", None)
        if identity is None:
            return
        moved = 0
        for endpoint in self._by_id.values():
            if (endpoint.peer == identity and endpoint.tunnel is not tunnel
                    and (endpoint.tunnel is None or not endpoint.tunnel.usable)):
                self._moveTo(endpoint, tunnel)
                moved += 1
        sent = self._flush(identity, tunnel)
        if moved or sent:
            self.log.info(
                "Tunnel with {peer} now carries {count} associations of that Key "
                "Distributor that had no tunnel; {waiting} messages that waited for it sent",
                peer=tunnel.peerDescription(), count=moved, waiting=sent)

    def _flush(self, identity: str, tunnel) -> int:
        timer = self._waitingTimers.pop(identity, None)
        if timer is not None and timer.active():
            timer.cancel()
        messages = self._waiting.drain(identity)
        for message in messages:
            if isinstance(message, wire.EndpointDisconnect):
                tunnel.sendDisconnect(message.association_id)
            else:
                tunnel.sendDtls(message.association_id, message.dtls_message)
        return len(messages)

    # -- ending associations ----------------------------------------------

    def disconnect(self, tls_id: str, reason: str) -> int:
        """End every association of this tls-id; returns how many."""
        ended = [e for e in self._by_id.values() if e.tls_id == tls_id]
        for endpoint in ended:
            self._drop(endpoint, notify=True, reason=reason)
        return len(ended)

    def disconnectAll(self, reason: str) -> None:
        """End every association, telling the Key Distributors whose tunnels are up."""
        for endpoint in list(self._by_id.values()):
            self._drop(endpoint, notify=True, reason=reason)

    def _membershipRemoved(self, tls_id: str, conference: str) -> None:
        self.disconnect(tls_id, "membership removed")

    def _evictOldestUnverified(self) -> None:
        """
        End the oldest association the Key Distributor keeps no state for
        (no EndpointDisconnect is owed).  Logged as a count at the next sweep,
        not one line each: a flood would otherwise write two lines per datagram.
        """
        endpoint = next(iter(self._unverified.values()))
        self._count("evicted-unverified")
        self._evicted_since_sweep += 1
        self._drop(endpoint, notify=False, reason="evicted", log=False)

    def _drop(self, endpoint: Endpoint, notify: bool, reason: str, log: bool = True) -> None:
        if self._by_id.pop(endpoint.id, None) is None:
            return
        self._unverified.pop(endpoint.id, None)
        if self._pending.get(endpoint.address) is endpoint:
            del self._pending[endpoint.address]
        if self._established.get(endpoint.address) is endpoint:
            del self._established[endpoint.address]
        self._forgetSsrcs(endpoint)
        members = self._conferences.get(endpoint.conference)
        if members is not None:
            members.discard(endpoint)
            if not members:
                del self._conferences[endpoint.conference]
            self._membersChanged(endpoint.conference)
        tunnel = self._liveTunnel(endpoint) if notify else endpoint.tunnel
        if notify:
            if tunnel is not None:
                tunnel.sendDisconnect(endpoint.id)
            elif endpoint.peer is not None:
                # Its Key Distributor must still learn that it ended.
                self._wait(endpoint.peer, wire.EndpointDisconnect(endpoint.id))
        if endpoint.tunnel is not None:
            endpoint.tunnel.forgetAssociation(endpoint.id)
        # Drop the sessions (and their keys) now rather than at collection.
        endpoint.inbound = endpoint.outbound = None
        if log:
            self.log.info("Association {association_id} ended: {reason}",
                          association_id=endpoint.id, reason=reason)

    def _sweep(self) -> None:
        now = self.clock.seconds()
        self._new_per_host.clear()
        if self._evicted_since_sweep:
            self.log.warn(
                "Association table full ({limit}): {count} handshakes that never returned "
                "the Key Distributor's cookie were evicted for new ClientHellos",
                limit=self.limits.max_associations, count=self._evicted_since_sweep)
            self._evicted_since_sweep = 0
        if self._unplaced_since_sweep > 1:
            self.log.warn(
                "Ignored {count} more ClientHellos whose tls-id is in no conference",
                count=self._unplaced_since_sweep - 1)
        self._unplaced_since_sweep = 0
        for endpoint in list(self._by_id.values()):
            if endpoint.established:
                if now - endpoint.last_seen >= self.limits.endpoint_timeout:
                    self._drop(endpoint, notify=True, reason="no RTP/RTCP for {} seconds".format(
                        self.limits.endpoint_timeout))
            elif now - endpoint.created >= self.limits.handshake_timeout:
                self._drop(endpoint, notify=True, reason="handshake not finished in time")

    def stop(self) -> None:
        """Forget every association (service shutdown)."""
        for endpoint in list(self._by_id.values()):
            self._drop(endpoint, notify=False, reason="shutting down")
        for timer in self._waitingTimers.values():
            if timer.active():
                timer.cancel()
        self._waitingTimers.clear()
        self._waiting.clear()
