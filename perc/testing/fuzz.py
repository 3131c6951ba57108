"""
Fuzz targets for the Key Distributor and the Media Distributor with real
state behind them, so that inputs reach past the cookie exchange.

:class:`KeyDistributorTarget` holds a real :class:`KeyDistributor` (a real
:class:`Roster` with registrations, real credentials, real EKT conference
keys) behind a real tunnel on a ``StringTransport``, and real endpoints
(:class:`perc.dtls.ClientAssociation`) whose handshakes completed through
that tunnel, so the Key Distributor's side of each is on its own record
layer (the hand-off).  :class:`MediaDistributorTarget` holds a real
:class:`MediaRelay` whose endpoints were keyed by a real Key Distributor
through real tunnels (real MediaKeys; SRTP from pylibsrtp with the
endpoints' real hop-by-hop keys).

Each input is read as a short program (:class:`Input`): which operation,
on which association, with which mutation.  Operations feed mutated
TunneledDtls payloads and records of established associations, ClientHellos
(with a valid cookie) whose extension 56/39 bodies were edited, whole
handshakes with chosen identities, tunnel messages, MediaKeys,
EndpointDisconnect and SRTP/SRTCP.  The expensive state (handshakes) is
made once and restored after an input that broke it, so an execution costs
little.

A finding (:class:`FuzzFailure`) is an exception escaping a protocol, a
logged failure, or a broken invariant (a table past its bound, an
association left behind).  Used briefly by the test suite and for as long
as wanted by ``perc bench fuzz``.
"""

from __future__ import annotations

import struct
import uuid

import pylibsrtp
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher

from perc import dtls, wire
from perc.profiles import DEFAULT_PROFILES, by_id

__all__ = ["TARGETS", "FuzzFailure", "Input", "KeyDistributorTarget", "MediaDistributorTarget",
           "edit_extension", "mutate", "seed_inputs"]


class FuzzFailure(AssertionError):
    """A target raised, logged a failure, or broke an invariant, for some input."""


class Input:
    """
    The fuzzer's bytes read as choices; past the end every read gives its
    smallest value, so any input is a valid program.
    """

    def __init__(self, data: bytes):
        self.data = bytes(data)
        self.offset = 0

    def remaining(self) -> int:
        return len(self.data) - self.offset

    def byte(self) -> int:
        if self.offset >= len(self.data):
            return 0
        value = self.data[self.offset]
        self.offset += 1
        return value

    def below(self, n: int) -> int:
        """An int in [0, n)."""
        if n <= 256:
            return self.byte() % n
        return ((self.byte() << 8) | self.byte()) % n

    def choice(self, options):
        return options[self.below(len(options))]

    def bytes(self, limit: int = 255) -> bytes:
        """A length octet (capped at ``limit``), then that many octets."""
        size = min(self.byte(), limit)
        chunk = self.data[self.offset:self.offset + size]
        self.offset += len(chunk)
        return chunk


def mutate(data: bytes, source: Input, others: tuple = ()) -> bytes:
    """One mutation of ``data`` chosen by ``source`` (or none); never empty."""
    kind = source.below(10)
    data = bytearray(data)
    if kind == 0 or not data:
        return bytes(data)
    if kind == 1:  # flip one octet
        data[source.below(len(data))] ^= 1 + source.below(255)
    elif kind == 2:  # overwrite a record-header field (type, version, epoch, sequence, length)
        offset = source.choice((0, 1, 2, 3, 4, 5, 9, 10, 11, 12))
        if offset < len(data):
            data[offset] = source.byte()
    elif kind == 3:  # truncate
        del data[source.below(len(data)):]
    elif kind == 4:  # append octets
        data += source.bytes()
    elif kind == 5:  # twice the same records (a replay inside one datagram)
        data.extend(bytes(data))
    elif kind == 6 and others:  # after an older record of the same association
        data = bytearray(source.choice(others)) + data
    elif kind == 7:  # octets replaced by the fuzzer's own
        return source.bytes() or b"\x16"
    elif kind == 8:  # a run of octets set to one value
        start = source.below(len(data))
        data[start:start + 1 + source.below(32)] = bytes([source.byte()]) * (1 + source.below(32))
    else:  # flip a bit in the last 16 octets (an AEAD tag)
        data[len(data) - 1 - source.below(min(16, len(data)))] ^= 1 << source.below(8)
    return bytes(data) or b"\x16"  # never empty: a tunnel message carries one octet or more


def edit_extension(record: bytes, ext_type: int, body: bytes | None) -> bytes:
    """
    ``record`` (one DTLS record holding a whole ClientHello or ServerHello)
    with extension ``ext_type``'s body replaced by ``body`` (added if
    missing, removed if None), every length (extension, extensions,
    handshake, fragment, record) fixed.
    """
    header, message = record[:13], record[13:]
    hs_type, body_start = message[0], 12
    hello = message[body_start:]
    offset = 2 + 32  # version, random
    offset += 1 + hello[offset]  # session id
    if hs_type == 1:
        offset += 1 + hello[offset]  # cookie
        offset += 2 + int.from_bytes(hello[offset:offset + 2], "big")  # cipher suites
        offset += 1 + hello[offset]  # compression methods
    else:
        offset += 2 + 1  # cipher suite, compression method
    extensions = []
    at = offset + 2
    end = at + int.from_bytes(hello[offset:offset + 2], "big")
    while at + 4 <= end:
        kind, length = struct.unpack_from("!HH", hello, at)
        extensions.append((kind, hello[at + 4:at + 4 + length]))
        at += 4 + length
    edited = [(kind, data) for kind, data in extensions if kind != ext_type]
    if body is not None:
        edited.append((ext_type, bytes(body)))
    blob = b"".join(struct.pack("!HH", kind, len(data)) + data for kind, data in edited)
    hello = hello[:offset] + struct.pack("!H", len(blob)) + blob
    length = len(hello).to_bytes(3, "big")
    handshake = message[:1] + length + message[4:6] + b"\x00\x00\x00" + length + hello
    return header[:11] + struct.pack("!H", len(handshake)) + handshake


def _extension_body(source: Input, ext_type: int, tls_ids: tuple) -> bytes | None:
    """A fuzzed body for extension 56 (tls-id) or 39 (EKT ciphers)."""
    kind = source.below(6)
    if kind == 0:
        return None
    if kind == 1:
        return source.bytes()
    if ext_type == dtls.EXTERNAL_SESSION_ID.ext_type:
        tls_id = source.choice(tls_ids)
        if kind == 2:
            return bytes([len(tls_id)]) + tls_id
        if kind == 3:  # a wrong length octet
            return bytes([source.byte()]) + tls_id
        if kind == 4:  # one character replaced
            edited = bytearray(tls_id)
            edited[source.below(len(edited))] = source.byte()
            return bytes([len(edited)]) + bytes(edited)
        return bytes([len(tls_id) + 1]) + tls_id + b"\n"
    ciphers = bytes(source.byte() % 4 for _ in range(source.below(4)))
    if kind == 2:
        return bytes([len(ciphers)]) + ciphers
    if kind == 3:
        return bytes([source.byte()]) + ciphers
    return ciphers


class _Datagrams:
    """A UDP transport that keeps what was written, by address."""

    def __init__(self):
        self.written: list = []

    def write(self, data, address=None):
        self.written.append((data, address))

    def clear(self):
        self.written = []


def _messages(transport: StringTransport) -> list:
    """The whole tunnel messages written to ``transport``; clears it."""
    data = transport.value()
    transport.clear()
    messages, offset = [], 0
    while offset + 3 <= len(data):
        length = struct.unpack_from("!H", data, offset + 1)[0]
        try:
            messages.append(wire.decode_message(data[offset:offset + 3 + length]))
        except wire.WireError:
            pass
        offset += 3 + length
    return messages


class _Watch:
    """Logged failures (``log.failure``, Twisted's "Unhandled ...") since the last take."""

    def __init__(self):
        self.failures: list = []

    def __call__(self, event):
        if "log_failure" in event or "Unhandled" in (event.get("log_format") or ""):
            self.failures.append(event)

    def take(self):
        failures, self.failures = self.failures, []
        return failures


def _raise_failures(watch: _Watch) -> None:
    failures = watch.take()
    if failures:
        failure = failures[0].get("log_failure")
        raise FuzzFailure(failure.getTraceback() if failure is not None
                          else repr(failures[0].get("log_format")))


_CREDENTIALS: dict = {}


def _credentials(name: str) -> dtls.Credentials:
    """Self-signed credentials, made once per process and name."""
    credentials = _CREDENTIALS.get(name)
    if credentials is None:
        credentials = _CREDENTIALS[name] = dtls.Credentials.self_signed(name)
    return credentials


def _tls_id(n: int) -> str:
    return "FuzzEndpoint-{:02d}-tls-id-0123456789".format(n)


class _Endpoint:
    """A registered endpoint with a live association (once established)."""

    def __init__(self, index: int, conference: str, ekt: bool):
        self.index = index
        self.tls_id = _tls_id(index)
        self.conference = conference
        self.credentials = _credentials("fuzz-endpoint-{}".format(index))
        self.ekt = ekt
        self.association_id = None
        self.client = None
        self.records: list = []  # valid records it sent, for replays


class KeyDistributorTarget:
    """
    A live Key Distributor with ``endpoints`` established associations;
    :meth:`run` feeds one input.  ``stats`` counts what reached the deep
    paths (handshakes completed, records for established associations,
    ClientHellos with a valid cookie and edited extensions).
    """

    conference_names = ("fuzz-a", "fuzz-b")

    def __init__(self, endpoints: int = 4, establish: bool = True):
        """``establish=False`` registers the endpoints but leaves their handshakes to the caller."""
        from perc.kd.associations import KeyDistributor, Limits
        from perc.kd.conference_keys import ConferenceKeys
        from perc.kd.roster import Roster

        self.clock = MemoryReactorClock()
        self.endpoints = [_Endpoint(i, self.conference_names[i % 2], ekt=i % 2 == 0)
                          for i in range(endpoints)]
        # A stranger's certificate, and a tls-id registered to nobody.
        self.stranger = _credentials("fuzz-stranger")
        self.unregistered = _tls_id(99)
        # The roster's database is never written (no put or delete here).
        self.roster = Roster(None, [
            (e.conference, e.tls_id, e.credentials.fingerprint, "FuzzKeyDistributor-{:02d}-id"
             .format(e.index)) for e in self.endpoints])
        self.limits = Limits(max_associations=32, max_associations_per_tunnel=24,
                             handshake_timeout=5.0, tunnel_grace=10.0)
        self.kd = KeyDistributor(
            roster=self.roster, credentials=_credentials("fuzz-kd"), profiles=DEFAULT_PROFILES,
            clock=self.clock, limits=self.limits, conference_keys=ConferenceKeys())
        self.stats = {"executions": 0, "handshakes": 0, "established-records": 0,
                      "cookie-hellos": 0, "restored": 0}
        self.watch = _Watch()
        globalLogPublisher.addObserver(self.watch)
        self.tunnel = self.other = None
        self._tunnelDirty = False
        self._extra: set = set()
        self._openTunnel()
        self._other()
        if establish:
            self._cookieHellos = [self._cookieHello(i) for i in range(3)]
            for endpoint in self.endpoints:
                self._establish(endpoint)
        self._clear()
        _raise_failures(self.watch)

    def close(self) -> None:
        globalLogPublisher.removeObserver(self.watch)
        self.kd.stop()

    # -- fixtures -------------------------------------------------------

    def _openTunnel(self) -> None:
        # The same Media Distributor again: its associations may move here.
        self.tunnel, self.transport = self._newTunnel(self.tunnel, "md.fuzz", (9, 10))

    def _other(self) -> None:
        """Another Media Distributor's tunnel, which must not touch these associations."""
        self.other, self.otherTransport = self._newTunnel(self.other, "md.other", (9,))

    def _newTunnel(self, old, identity: str, profiles: tuple):
        """A tunnel up from the Media Distributor ``identity`` (``old`` is lost first)."""
        from perc.kd.tunnel import KeyDistributorTunnel
        if old is not None:
            old.connectionLost(None)
        tunnel = KeyDistributorTunnel(self.kd)
        transport = StringTransport()
        tunnel.makeConnection(transport)
        tunnel.identity = identity
        tunnel.dataReceived(wire.SupportedProfiles(0, profiles).encode())
        return tunnel, transport

    def _send(self, message, tunnel=None) -> None:
        (tunnel or self.tunnel).dataReceived(message.encode())

    def _client(self, endpoint: _Endpoint, credentials=None, tls_id=None, ekt=None,
                profiles=DEFAULT_PROFILES) -> dtls.ClientAssociation:
        return dtls.ClientAssociation(
            credentials or endpoint.credentials, profiles,
            tls_id=(tls_id or endpoint.tls_id).encode(),
            ekt_ciphers=(1,) if (endpoint.ekt if ekt is None else ekt) else None)

    def _cookieHello(self, n: int):
        """(association id, a ClientHello carrying that id's valid cookie)."""
        association_id = uuid.UUID(int=n + 1)
        client = self._client(self.endpoints[n % len(self.endpoints)], ekt=True)
        first = client.start(self.clock.seconds()).datagrams[0]
        self._send(wire.TunneledDtls(association_id, first))
        for message in _messages(self.transport):
            if isinstance(message, wire.TunneledDtls):
                again = client.receive(message.dtls_message, self.clock.seconds())
                return association_id, again.datagrams[0]
        raise FuzzFailure("the Key Distributor sent no HelloVerifyRequest")

    def _handshake(self, client, association_id, corrupt=None) -> bool:
        """
        Carry a client's handshake through the tunnel; ``corrupt(n, datagram)``
        may replace the client's n-th datagram.  True if the client completed.
        """
        now = self.clock.seconds
        output = client.start(now())
        pending, complete, sent = list(output.datagrams), False, 0
        for _ in range(8):
            for datagram in pending:
                if corrupt is not None:
                    datagram = corrupt(sent, datagram)
                sent += 1
                self._send(wire.TunneledDtls(association_id, datagram))
            pending = []
            for message in _messages(self.transport):
                if isinstance(message, wire.TunneledDtls) and \
                        message.association_id == association_id:
                    output = client.receive(message.dtls_message, now())
                    pending.extend(output.datagrams)
                    complete = complete or any(isinstance(e, dtls.HandshakeComplete)
                                               for e in output.events)
            if not pending:
                break
        self.stats["handshakes"] += complete
        return complete

    def _establish(self, endpoint: _Endpoint) -> None:
        if endpoint.association_id is not None and self.kd.association(
                endpoint.association_id) is not None:
            self._send(wire.EndpointDisconnect(endpoint.association_id))
        endpoint.association_id = uuid.uuid4()
        endpoint.client = self._client(endpoint)
        endpoint.records = []
        if not self._handshake(endpoint.client, endpoint.association_id):
            raise FuzzFailure("a registered endpoint's handshake did not complete")

    def _clear(self) -> None:
        self.transport.clear()
        self.otherTransport.clear()

    # -- one input ------------------------------------------------------

    def run(self, data: bytes) -> None:
        source = Input(data)
        self.stats["executions"] += 1
        try:
            for _ in range(1 + source.below(4)):
                if not source.remaining():
                    break
                self._operations[source.below(len(self._operations))](self, source)
                self._clear()
        finally:
            _raise_failures(self.watch)
        self._restore()
        _raise_failures(self.watch)

    def _live(self, source: Input) -> _Endpoint:
        return source.choice(self.endpoints)

    def _opRecord(self, source: Input) -> None:
        """A record of an established (handed-off) association, mutated."""
        endpoint = self._live(source)
        if endpoint.client.closed:
            return
        kind = source.below(4)
        if kind == 0:
            payload = b"\x01"  # an EKTKey request
        elif kind == 1:
            payload = source.bytes()
        elif kind == 2:
            output = endpoint.client.close(self.clock.seconds())  # a close_notify alert
            for datagram in output.datagrams:
                self._send(wire.TunneledDtls(endpoint.association_id,
                                             mutate(datagram, source)))
            return
        else:
            payload = b"\x01" * (1 + source.below(4))
        if not payload:
            payload = b"\x00"
        for datagram in endpoint.client.send_application_data(payload).datagrams:
            record = mutate(datagram, source, tuple(endpoint.records))
            if len(endpoint.records) < 8:
                endpoint.records.append(datagram)
            self.stats["established-records"] += 1
            self._send(wire.TunneledDtls(endpoint.association_id, record))

    def _opReplay(self, source: Input) -> None:
        """An earlier record of an established association again (replay window)."""
        endpoint = self._live(source)
        if endpoint.records:
            self.stats["established-records"] += 1
            self._send(wire.TunneledDtls(endpoint.association_id,
                                         mutate(source.choice(endpoint.records), source)))

    def _opCookieHello(self, source: Input) -> None:
        """A ClientHello past the cookie check, its extension 56 and/or 39 edited."""
        association_id, hello = source.choice(self._cookieHellos)
        tls_ids = tuple(e.tls_id.encode() for e in self.endpoints) + (
            self.unregistered.encode(),)
        for ext in (dtls.EXTERNAL_SESSION_ID.ext_type, dtls.SUPPORTED_EKT_CIPHERS.ext_type):
            if source.below(2):
                hello = edit_extension(hello, ext, _extension_body(source, ext, tls_ids))
        self.stats["cookie-hellos"] += 1
        self._extra.add(association_id)
        self._send(wire.TunneledDtls(association_id, mutate(hello, source)))

    def _opHandshake(self, source: Input) -> None:
        """
        A whole handshake of a new client with a chosen identity (registered
        or not, the right certificate or a stranger's, EKT or not), one of its
        datagrams possibly mutated.
        """
        endpoint = self._live(source)
        tls_id = source.choice((endpoint.tls_id, self.unregistered, endpoint.tls_id))
        credentials = source.choice((endpoint.credentials, self.stranger))
        profiles = source.choice((DEFAULT_PROFILES, (by_id(9),), (by_id(10),)))
        client = self._client(endpoint, credentials=credentials, tls_id=tls_id,
                              ekt=source.below(2) == 1, profiles=profiles)
        target = source.below(6)

        def corrupt(n, datagram):
            return mutate(datagram, source) if n == target else datagram

        association_id = uuid.uuid4()
        self._extra.add(association_id)
        self._handshake(client, association_id, corrupt)

    def _opTunneledDtls(self, source: Input) -> None:
        """Arbitrary octets as DTLS of a live or half-open association."""
        ids = [e.association_id for e in self.endpoints] + sorted(self._extra)
        association_id = source.choice(ids) if ids else uuid.uuid4()
        self._send(wire.TunneledDtls(association_id, source.bytes() or b"\x16"))

    def _opDisconnect(self, source: Input) -> None:
        ids = [e.association_id for e in self.endpoints] + [uuid.uuid4()]
        self._send(wire.EndpointDisconnect(source.choice(ids)))

    def _opForeign(self, source: Input) -> None:
        """Another Media Distributor naming these associations."""
        association_id = self._live(source).association_id
        if source.below(2):
            self._send(wire.EndpointDisconnect(association_id), self.other)
        else:
            self._send(wire.TunneledDtls(association_id, source.bytes() or b"\x17"), self.other)

    def _opTunnelBytes(self, source: Input) -> None:
        """Raw octets on the tunnel (framing, codec, message rules)."""
        kind = source.below(3)
        if kind == 0:
            data = source.bytes()
        elif kind == 1:
            data = wire.SupportedProfiles(0, tuple(
                source.below(12) for _ in range(1 + source.below(3)))).encode()
            if source.below(2):
                # A newer Media Distributor: the same body under version 1.
                data = wire.NewerSupportedProfiles(1, data[4:]).encode()
        else:
            data = mutate(wire.MediaKeys(uuid.uuid4(), 9, b"", b"k" * 16, b"k" * 16,
                                         b"s" * 12, b"s" * 12).encode(), source)
        # A part of a message may stay in the framing's buffer: start the
        # next input on a fresh tunnel.
        self._tunnelDirty = True
        self.tunnel.dataReceived(data)

    def _opTime(self, source: Input) -> None:
        """Time passes: retransmissions, handshake timeouts, the tunnel grace."""
        self.clock.advance(source.choice((0.05, 0.5, 1.0, 3.0, 6.0, 11.0)))

    def _opTunnelLost(self, source: Input) -> None:
        """The tunnel drops and the Media Distributor reconnects (associations move)."""
        self._openTunnel()

    def _opRekey(self, source: Input) -> None:
        self.kd.rekey(source.choice(self.conference_names))

    _operations = (_opRecord, _opRecord, _opReplay, _opCookieHello, _opCookieHello,
                   _opHandshake, _opTunneledDtls, _opDisconnect, _opForeign, _opTunnelBytes,
                   _opTime, _opTunnelLost, _opRekey)

    # -- back to the fixture --------------------------------------------

    def _restore(self) -> None:
        """Undo what the input did to the fixture, then check the invariants."""
        if len(self.kd) > self.limits.max_associations:
            raise FuzzFailure("{} associations, past the bound {}".format(
                len(self.kd), self.limits.max_associations))
        if not self.tunnel.up or self.transport.disconnecting or self._tunnelDirty:
            self._tunnelDirty = False
            self._openTunnel()
        if not self.other.up or self.otherTransport.disconnecting:
            self._other()
        for association_id in self._extra:
            if self.kd.association(association_id) is not None:
                self._send(wire.EndpointDisconnect(association_id))
        self._extra.clear()
        for endpoint in self.endpoints:
            association = self.kd.association(endpoint.association_id)
            if association is None or not association.established or endpoint.client.closed:
                self.stats["restored"] += 1
                self._establish(endpoint)
        self._clear()
        if len(self.kd) != len(self.endpoints):
            raise FuzzFailure("{} associations left where the fixture has {}".format(
                len(self.kd), len(self.endpoints)))
        if len(self.tunnel.associations) > self.limits.max_associations_per_tunnel:
            raise FuzzFailure("a tunnel counts {} associations".format(
                len(self.tunnel.associations)))


class MediaDistributorTarget:
    """
    A live Media Distributor with ``endpoints`` keyed associations (two of
    them with EKT), keyed once by a real Key Distributor through real
    tunnels; :meth:`run` feeds one input, as the Key Distributor's side of
    the tunnel and as endpoints on the UDP port.
    """

    def __init__(self, endpoints: int = 3):
        from perc.md.conference import Memberships
        from perc.md.relay import MediaRelay, RelayLimits
        from perc.md.tunnel import TunnelPool

        self.clock = MemoryReactorClock()
        self.watch = _Watch()
        globalLogPublisher.addObserver(self.watch)
        self.pool = TunnelPool(DEFAULT_PROFILES, clock=self.clock)
        self.limits = RelayLimits(max_associations=16)
        self.relay = MediaRelay(pool=self.pool, memberships=Memberships("fuzz"),
                                profiles=DEFAULT_PROFILES, clock=self.clock, limits=self.limits)
        self.pool.owner = self.relay
        self.udp = _Datagrams()
        self.relay.makeConnection(self.udp)
        self.tunnel = None
        self._tunnelDirty = False
        #: Tunnel messages the relay sent during the input (its new associations).
        self._sentToKeyDistributor: list = []
        self._openTunnel()
        self.stats = {"executions": 0, "srtp-from-keyed": 0, "media-keys": 0, "restored": 0}
        self.endpoints = []
        self._keyWithRealKeyDistributor(endpoints)
        self.udp.clear()
        _raise_failures(self.watch)

    def close(self) -> None:
        globalLogPublisher.removeObserver(self.watch)
        self.relay.stopProtocol()
        self.relay.stop()

    def _openTunnel(self) -> None:
        if self.tunnel is not None:
            self.tunnel.connectionLost(None)
        self.tunnel = self.pool.listenFactory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4740))
        self.transport = StringTransport()
        self.tunnel.makeConnection(self.transport)

    def _keyWithRealKeyDistributor(self, count: int) -> None:
        """Real handshakes through this relay and a real Key Distributor."""
        kd = KeyDistributorTarget(endpoints=count, establish=False)
        try:
            kdTunnel, kdTransport = kd.tunnel, kd.transport
            kdTunnel.dataReceived(self.transport.value())  # our SupportedProfiles
            self.transport.clear()
            for n in range(count):
                registered = kd.endpoints[n]
                registered.address = ("192.0.2.{}".format(n + 1), 5000 + n)
                client = kd._client(registered)
                replies = []  # what the Key Distributor sent for it, in order
                output = client.start(self.clock.seconds())
                registered.hello = output.datagrams[0]
                pending, keys = list(output.datagrams), None
                for _ in range(10):
                    for datagram in pending:
                        self.relay.datagramReceived(datagram, registered.address)
                    pending = []
                    kdTunnel.dataReceived(self.transport.value())
                    self.transport.clear()
                    data = kdTransport.value()
                    kdTransport.clear()
                    replies.extend(_messages_of(data))
                    self.tunnel.dataReceived(data)
                    for datagram, address in self.udp.written:
                        if address == registered.address:
                            output = client.receive(datagram, self.clock.seconds())
                            pending.extend(output.datagrams)
                            for event in output.events:
                                if isinstance(event, dtls.HandshakeComplete):
                                    keys = event
                    self.udp.clear()
                    if not pending:
                        break
                if keys is None:
                    raise FuzzFailure("a handshake through the Media Distributor did not complete")
                hbh = keys.profile.hbh_keys(keys.keys)
                registered.client = client
                registered.replies = [m for m in replies if not isinstance(m, wire.MediaKeys)
                                      and not _hello_verify(m)][:1] + [
                    m for m in replies if isinstance(m, wire.MediaKeys)]
                registered.srtp = pylibsrtp.Session(pylibsrtp.Policy(
                    key=hbh.client_key + hbh.client_salt,
                    ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
                    srtp_profile=keys.profile.hbh_libsrtp_profile))
                registered.sequence = 0
                registered.association_id = replies[-1].association_id
                self.endpoints.append(registered)
        finally:
            kd.close()
        for endpoint in self.endpoints:
            if not self._keyed(endpoint):
                raise FuzzFailure("an endpoint was not keyed at the Media Distributor")

    def _keyed(self, endpoint) -> bool:
        live = self.relay.endpoint(endpoint.association_id)
        return live is not None and live.established and live.address == endpoint.address

    # -- one input ------------------------------------------------------

    def run(self, data: bytes) -> None:
        source = Input(data)
        self.stats["executions"] += 1
        try:
            for _ in range(1 + source.below(4)):
                if not source.remaining():
                    break
                self._operations[source.below(len(self._operations))](self, source)
                self.udp.clear()
        finally:
            _raise_failures(self.watch)
        self._restore()
        _raise_failures(self.watch)

    def _rtp(self, endpoint, source: Input) -> bytes:
        endpoint.sequence = (endpoint.sequence + 1) & 0xFFFF
        header = struct.pack("!BBHII", 0x80, 96 | (0x80 * source.below(2)), endpoint.sequence,
                             endpoint.sequence * 960, 0x1000 + endpoint.index)
        return header + source.bytes(200)

    def _opSrtp(self, source: Input) -> None:
        """SRTP (or SRTCP) really protected with a keyed endpoint's key, mutated."""
        endpoint = source.choice(self.endpoints)
        if source.below(4) == 0:
            rtcp = struct.pack("!BBHI", 0x80, 200, 6, 0x1000 + endpoint.index) + bytes(20)
            packet = endpoint.srtp.protect_rtcp(rtcp)
        else:
            packet = endpoint.srtp.protect(self._rtp(endpoint, source))
            if endpoint.ekt:
                kind = source.below(4)
                if kind == 0:
                    packet += b"\x00"  # ShortEKTField
                elif kind == 1:  # a FullEKTField of fuzzed ciphertext
                    body = source.bytes() + struct.pack("!HH", source.below(65536),
                                                        source.below(65536))
                    packet += body + struct.pack("!H", len(body) + 3) + b"\x02"
                elif kind == 2:
                    packet += source.bytes()
        self.stats["srtp-from-keyed"] += 1
        address = ("198.51.100.9", 4000) if source.below(8) == 7 else endpoint.address
        self.relay.datagramReceived(mutate(packet, source), address)

    def _opMediaKeys(self, source: Input) -> None:
        """MediaKeys for a keyed, half-open or unknown association."""
        kind = source.below(3)
        if kind == 0:
            message = source.choice(self.endpoints).replies[-1]
        else:
            profile = source.choice((9, 10, 7, 1, source.below(65536)))
            ids = [e.association_id for e in self.endpoints] + self._pendingIds()
            message = wire.MediaKeys(
                source.choice(ids) if ids else uuid.uuid4(), profile,
                source.bytes(4), *(bytes(source.choice((1, 12, 16, 32, 64))) for _ in range(4)))
        self.stats["media-keys"] += 1
        self._tunnelDirty = self._tunnelDirty or kind == 2
        self.tunnel.dataReceived(mutate(message.encode(), source) if kind == 2
                                 else message.encode())

    def _pendingIds(self) -> list:
        return [m.association_id for m in self._sentToKeyDistributor
                if isinstance(m, wire.TunneledDtls)]

    def _opDisconnect(self, source: Input) -> None:
        ids = [e.association_id for e in self.endpoints] + self._pendingIds() + [uuid.uuid4()]
        self.tunnel.dataReceived(wire.EndpointDisconnect(source.choice(ids)).encode())

    def _opServerFlight(self, source: Input) -> None:
        """The Key Distributor's flight (ServerHello with extension 39) edited, to an endpoint."""
        endpoint = source.choice(self.endpoints)
        flight = endpoint.replies[0].dtls_message
        if source.below(2):
            flight = edit_extension(flight[:13 + int.from_bytes(flight[11:13], "big")],
                                    dtls.SUPPORTED_EKT_CIPHERS.ext_type,
                                    _extension_body(source, dtls.SUPPORTED_EKT_CIPHERS.ext_type,
                                                    ()))
        ids = [endpoint.association_id] + self._pendingIds()
        self.tunnel.dataReceived(wire.TunneledDtls(source.choice(ids),
                                                   mutate(flight, source)).encode())

    def _opClientHello(self, source: Input) -> None:
        """A ClientHello with edited extensions from a new or a keyed endpoint's address."""
        endpoint = source.choice(self.endpoints)
        hello = endpoint.hello
        tls_ids = tuple(e.tls_id.encode() for e in self.endpoints)
        for ext in (dtls.EXTERNAL_SESSION_ID.ext_type, dtls.SUPPORTED_EKT_CIPHERS.ext_type):
            if source.below(2):
                hello = edit_extension(hello, ext, _extension_body(source, ext, tls_ids))
        address = endpoint.address if source.below(4) == 0 else (
            "203.0.113.{}".format(source.below(8)), 6000)
        self.relay.datagramReceived(mutate(hello, source), address)
        self._collectSent()

    def _opDatagram(self, source: Input) -> None:
        """Arbitrary octets on the UDP port, from a keyed endpoint's address or not."""
        endpoint = source.choice(self.endpoints)
        address = endpoint.address if source.below(2) else ("203.0.113.99", 7000)
        self.relay.datagramReceived(source.bytes() or b"\x80", address)
        self._collectSent()

    def _opTunnelBytes(self, source: Input) -> None:
        kind = source.below(3)
        if kind == 0:
            data = source.bytes()
        elif kind == 1:
            data = wire.UnsupportedVersion(source.byte()).encode()
        else:
            data = wire.SupportedProfiles(0, (9, 10)).encode()
        self._tunnelDirty = True
        self.tunnel.dataReceived(data)

    def _opTime(self, source: Input) -> None:
        self.clock.advance(source.choice((0.1, 1.0, 5.0, 31.0, 61.0)))

    _operations = (_opSrtp, _opSrtp, _opSrtp, _opMediaKeys, _opDisconnect, _opServerFlight,
                   _opClientHello, _opDatagram, _opTunnelBytes, _opTime)

    def _collectSent(self) -> None:
        sent = _messages(self.transport)
        if sent:
            self._sentToKeyDistributor = (self._sentToKeyDistributor + sent)[-16:]

    # -- back to the fixture --------------------------------------------

    def _restore(self) -> None:
        """End what the input started, re-key endpoints it ended, then check the bounds."""
        status = self.relay.status()
        if status["associations"] > self.limits.max_associations:
            raise FuzzFailure("{} associations past the bound {}".format(
                status["associations"], self.limits.max_associations))
        if not self.tunnel.usable or self._tunnelDirty:
            self._tunnelDirty = False
            self._openTunnel()
        self._collectSent()
        for association_id in {m.association_id for m in self._sentToKeyDistributor
                               if isinstance(m, wire.TunneledDtls)}:
            if all(e.association_id != association_id for e in self.endpoints):
                self.tunnel.dataReceived(wire.EndpointDisconnect(association_id).encode())
        self._sentToKeyDistributor = []
        for endpoint in self.endpoints:
            if not self._keyed(endpoint):
                self._rekey(endpoint)
        self.transport.clear()
        self.udp.clear()
        if self.relay.status()["associations"] != len(self.endpoints):
            raise FuzzFailure("{} associations left where the fixture has {}".format(
                self.relay.status()["associations"], len(self.endpoints)))

    def _rekey(self, endpoint) -> None:
        """
        Key the endpoint again without a handshake: its first ClientHello,
        then the Key Distributor's recorded answer under the new id.
        """
        self.stats["restored"] += 1
        live = self.relay.endpoint(endpoint.association_id)
        if live is not None:
            self.tunnel.dataReceived(wire.EndpointDisconnect(endpoint.association_id).encode())
        for _ in range(2):
            self.transport.clear()
            self.relay.datagramReceived(endpoint.hello, endpoint.address)
            sent = [m for m in _messages(self.transport) if isinstance(m, wire.TunneledDtls)]
            if sent:
                break
            self.clock.advance(self.limits.sweep_interval)  # the per-address rate limit
        else:
            raise FuzzFailure("the relay refused a registered endpoint's ClientHello")
        association_id = sent[-1].association_id
        flight, keys = endpoint.replies
        self.tunnel.dataReceived(wire.TunneledDtls(association_id, flight.dtls_message).encode())
        self.tunnel.dataReceived(wire.MediaKeys(
            association_id, keys.profile, keys.mki, keys.client_key, keys.server_key,
            keys.client_salt, keys.server_salt).encode())
        endpoint.association_id = association_id
        # The relay's new inbound session has no replay state; the sender's continues.


def _messages_of(data: bytes) -> list:
    transport = StringTransport()
    transport.write(data)
    return _messages(transport)


def _hello_verify(message) -> bool:
    data = getattr(message, "dtls_message", b"")
    return len(data) > 13 and data[0] == 22 and data[13] == 3


#: name -> target class, as ``perc bench fuzz --target`` names them.
TARGETS = {"kd": KeyDistributorTarget, "md": MediaDistributorTarget}


def seed_inputs(count: int = 64, seed: int = 0) -> list:
    """Starting inputs: every operation, with varied choices after it."""
    import random
    rng = random.Random(seed)
    return [bytes([n % 13, n % 10]) + rng.randbytes(rng.randrange(8, 120)) for n in range(count)]
