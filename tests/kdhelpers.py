"""
Test helpers for the Key Distributor: a Media Distributor stand-in that
drives a real KeyDistributorTunnel over a StringTransport, and a relay that
carries a real client-role DTLS engine's datagrams through it.
"""

from __future__ import annotations

import struct

from twisted.internet.testing import StringTransport

from perc import dtls, wire
from perc.kd.tunnel import KeyDistributorTunnel


def split_messages(data: bytes) -> list:
    """Decode a byte stream of whole tunnel messages."""
    messages = []
    offset = 0
    while offset < len(data):
        _, length = struct.unpack_from("!BH", data, offset)
        end = offset + 3 + length
        messages.append(wire.decode_message(data[offset:end]))
        offset = end
    return messages


class MediaDistributorStandIn:
    """One tunnel to a KeyDistributor, seen from the Media Distributor's side."""

    def __init__(self, distributor, profiles=(0x0009, 0x000A), identity="md.test", hello=True,
                 transport=None):
        """``transport`` defaults to a new StringTransport."""
        self.tunnel = KeyDistributorTunnel(distributor)
        self.transport = transport if transport is not None else StringTransport()
        self.transport.protocol = self.tunnel
        self.tunnel.makeConnection(self.transport)
        self.tunnel.identity = identity
        self.log = []  # every message received, in order
        if hello:
            self.send(wire.SupportedProfiles(0, tuple(profiles)))

    def send(self, message) -> None:
        self.tunnel.dataReceived(message.encode())

    def received(self) -> list:
        """Messages the Key Distributor wrote since the last call."""
        messages = split_messages(self.transport.value())
        self.transport.clear()
        self.log.extend(messages)
        return messages

    def close(self) -> None:
        self.transport.loseConnection()
        self.tunnel.connectionLost(None)


def relay_handshake(md, client: dtls.ClientAssociation, association_id, clock, rounds=20):
    """
    Shuttle datagrams between a client engine and the Key Distributor until
    both are quiet.  Returns the client's events.
    """
    events = []
    output = client.start(clock.seconds())
    pending = list(output.datagrams)
    events.extend(output.events)
    for _ in range(rounds):
        for datagram in pending:
            md.send(wire.TunneledDtls(association_id, datagram))
        pending = []
        for message in md.received():
            if isinstance(message, wire.TunneledDtls) and message.association_id == association_id:
                output = client.receive(message.dtls_message, clock.seconds())
                pending.extend(output.datagrams)
                events.extend(output.events)
        if not pending:
            break
    return events
