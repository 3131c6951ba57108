"""
Fuzz targets for the two tunnel protocols: whole byte streams fed to live
protocol instances (the real framing, codec, association table and DTLS
engine), as a hostile peer would send them.  Anything raised out of a
target other than through the orderly close of that tunnel is a bug.

Used briefly by the test suite and for as long as wanted by
``perc bench fuzz --seconds N``.
"""

from __future__ import annotations

import random
import uuid

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher

from perc import dtls, wire
from perc.profiles import DEFAULT_PROFILES, by_id

__all__ = ["FuzzFailure", "random_stream", "key_distributor_target", "media_distributor_target"]

_STATE: dict = {}


def _fixtures():
    """Credentials and a real ClientHello, made once per process."""
    if not _STATE:
        _STATE["kd"] = dtls.Credentials.self_signed("fuzz-kd")
        client = dtls.ClientAssociation(dtls.Credentials.self_signed("fuzz-endpoint"),
                                        [by_id(0x0009)], tls_id=b"FuzzEndpointTlsId-0123")
        _STATE["hello"] = client.start(0.0).datagrams[0]
    return _STATE


def _supported_profiles(version: int, profiles: tuple):
    """SupportedProfiles, or a newer version's with a version-0-like body."""
    message = wire.SupportedProfiles(wire.PROTOCOL_VERSION, profiles)
    if version == wire.PROTOCOL_VERSION:
        return message
    return wire.NewerSupportedProfiles(version, message.encode()[4:])


def random_stream(rng: random.Random, messages: int = 20) -> bytes:
    """
    A stream a fuzzing peer might send: mostly well-formed messages with
    random fields (a few association ids reused, real ClientHellos among the
    DTLS), some mutated, some raw garbage.
    """
    ids = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(3)]
    parts = []
    if rng.random() < 0.8:
        parts.append(_supported_profiles(rng.choice((0, 0, 0, 1)), (9, 10)).encode())
    for _ in range(rng.randrange(messages)):
        kind = rng.randrange(8)
        aid = rng.choice(ids)
        if kind == 0:
            message = _supported_profiles(rng.randrange(3), tuple(
                rng.randrange(12) for _ in range(1 + rng.randrange(4))))
        elif kind == 1:
            message = wire.UnsupportedVersion(rng.randrange(256))
        elif kind == 2:
            def key():
                return rng.randbytes(rng.choice((1, 12, 16, 32, 255)))
            message = wire.MediaKeys(aid, rng.choice((7, 9, 10, 0xFFFF)),
                                     rng.randbytes(rng.randrange(3)), key(), key(), key(), key())
        elif kind in (3, 4):
            data = _fixtures()["hello"] if kind == 3 else rng.randbytes(1 + rng.randrange(200))
            message = wire.TunneledDtls(aid, data)
        elif kind == 5:
            message = wire.EndpointDisconnect(aid)
        else:
            parts.append(rng.randbytes(rng.randrange(1, 40)))
            continue
        encoded = bytearray(message.encode())
        if rng.random() < 0.1:
            encoded[rng.randrange(len(encoded))] ^= 1 + rng.randrange(255)
        parts.append(bytes(encoded))
    return b"".join(parts)


class FuzzFailure(AssertionError):
    """A target raised, or logged a failure it caught, for some input."""


class _FailureWatch:
    """Protocols log (and survive) exceptions of their owners: those are bugs too."""

    def __enter__(self):
        self.failures = []
        globalLogPublisher.addObserver(self._observe)
        return self

    def _observe(self, event):
        if "log_failure" in event:
            self.failures.append(event["log_failure"])

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self._observe)
        if self.failures and exc[0] is None:
            raise FuzzFailure(self.failures[0].getTraceback())
        return False


def _feed(protocol, data: bytes, rng: random.Random, clock) -> None:
    offset = 0
    while offset < len(data):
        size = 1 + rng.randrange(64) if rng.random() < 0.7 else len(data)
        protocol.dataReceived(data[offset:offset + size])
        offset += size
        clock.advance(rng.random())


class _NoRegistrations:
    """A roster with nobody registered: every identity check refuses."""

    def lookup(self, tls_id):
        return None

    def lookup_by_certificate(self, certificate):
        return ()

    def add_removal_observer(self, observer):
        pass


class _Discard:
    def write(self, data, address=None):
        pass


def key_distributor_target(data: bytes, seed: int = 0) -> None:
    """Feed ``data`` to a Key Distributor's tunnel protocol."""
    from perc.kd.associations import KeyDistributor
    from perc.kd.tunnel import KeyDistributorTunnel

    rng = random.Random(seed)
    clock = MemoryReactorClock()
    distributor = KeyDistributor(roster=_NoRegistrations(), credentials=_fixtures()["kd"],
                                 profiles=DEFAULT_PROFILES, clock=clock)
    tunnel = KeyDistributorTunnel(distributor)
    transport = StringTransport()
    with _FailureWatch():
        tunnel.makeConnection(transport)
        _feed(tunnel, data, rng, clock)
        clock.advance(120)
        tunnel.connectionLost(None)
        clock.advance(120)
        distributor.stop()


def media_distributor_target(data: bytes, seed: int = 0) -> None:
    """
    Feed ``data`` to a Media Distributor's tunnel, built by the real tunnel
    pool (as for a Key Distributor that dialled in) whose owner is a real relay.
    """
    from twisted.internet.address import IPv4Address

    from perc.md.conference import Memberships
    from perc.md.relay import MediaRelay
    from perc.md.tunnel import TunnelPool

    rng = random.Random(seed)
    clock = MemoryReactorClock()
    pool = TunnelPool(DEFAULT_PROFILES, clock=clock)
    relay = MediaRelay(pool=pool, memberships=Memberships("fuzz"),
                       profiles=DEFAULT_PROFILES, clock=clock)
    relay.transport = _Discard()
    pool.owner = relay
    tunnel = pool.listenFactory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4740))
    transport = StringTransport()
    with _FailureWatch():
        tunnel.makeConnection(transport)
        # An endpoint starts an association so that tunnel messages can name it.
        relay.datagramReceived(_fixtures()["hello"], ("127.0.0.1", 40000))
        _feed(tunnel, data, rng, clock)
        clock.advance(120)
        tunnel.connectionLost(None)
        relay.stop()
