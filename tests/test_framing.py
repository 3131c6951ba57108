"""
Tests for perc.framing: splitting a byte stream into tunnel messages.
"""

import uuid

from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from perc import wire
from perc.framing import TunnelFramingProtocol

AID = uuid.UUID(int=42)


class RecordingTunnel(TunnelFramingProtocol):
    def __init__(self):
        self.received = []

    def messageReceived(self, message):
        self.received.append(message)


class ClosingTunnel(RecordingTunnel):
    """Closes the connection on the first message it gets."""

    def messageReceived(self, message):
        super().messageReceived(message)
        self.transport.loseConnection()


SAMPLE = [
    wire.SupportedProfiles(0, (9, 10)),
    wire.TunneledDtls(AID, b"\x16\xfe\xfd" + b"\x00" * 40),
    wire.MediaKeys(AID, 9, b"", b"k" * 16, b"K" * 16, b"s" * 12, b"S" * 12),
    wire.EndpointDisconnect(AID),
    wire.UnsupportedVersion(0),
]
STREAM = b"".join(message.encode() for message in SAMPLE)


class FramingTests(SynchronousTestCase):
    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def connect(self, protocol_class=RecordingTunnel):
        tunnel = protocol_class()
        transport = StringTransport()
        tunnel.makeConnection(transport)
        return tunnel, transport

    def warnings(self):
        return [e for e in self.events if e.get("log_level") == LogLevel.warn
                and "reason" in e]

    def test_many_messages_in_one_chunk(self):
        tunnel, transport = self.connect()
        tunnel.dataReceived(STREAM)
        self.assertEqual(tunnel.received, SAMPLE)
        self.assertFalse(transport.disconnecting)

    def test_one_octet_at_a_time(self):
        tunnel, transport = self.connect()
        for index in range(len(STREAM)):
            tunnel.dataReceived(STREAM[index:index + 1])
        self.assertEqual(tunnel.received, SAMPLE)
        self.assertFalse(transport.disconnecting)

    def test_split_inside_header(self):
        """A message whose 3-octet header arrives in two pieces."""
        tunnel, _ = self.connect()
        encoded = SAMPLE[0].encode()
        tunnel.dataReceived(encoded[:2])
        self.assertEqual(tunnel.received, [])
        tunnel.dataReceived(encoded[2:] + SAMPLE[3].encode()[:1])
        self.assertEqual(tunnel.received, [SAMPLE[0]])
        tunnel.dataReceived(SAMPLE[3].encode()[1:])
        self.assertEqual(tunnel.received, [SAMPLE[0], SAMPLE[3]])

    def test_every_split_point(self):
        for cut in range(len(STREAM) + 1):
            tunnel, _ = self.connect()
            tunnel.dataReceived(STREAM[:cut])
            tunnel.dataReceived(STREAM[cut:])
            self.assertEqual(tunnel.received, SAMPLE, "split at {}".format(cut))

    def test_largest_message(self):
        message = wire.TunneledDtls(AID, b"\x17" * wire.MAX_DTLS_MESSAGE_LENGTH)
        tunnel, transport = self.connect()
        encoded = message.encode()
        for start in range(0, len(encoded), 1000):
            tunnel.dataReceived(encoded[start:start + 1000])
        self.assertEqual(tunnel.received, [message])
        self.assertFalse(transport.disconnecting)

    def test_oversize_rejected_from_header(self):
        """A body over the limit is refused as soon as its header is seen."""
        tunnel, transport = self.connect()
        tunnel.maxBodyLength = 100
        tunnel.dataReceived(SAMPLE[0].encode() + b"\x04\x00\x65")
        self.assertEqual(tunnel.received, [SAMPLE[0]])
        self.assertTrue(transport.disconnecting)
        [event] = self.warnings()
        self.assertIn("101 octets exceeds the maximum of 100", event["reason"])

    def test_reserved_type_rejected_from_header(self):
        for msg_type in (0x00, 0x06, 0xFF):
            tunnel, transport = self.connect()
            tunnel.dataReceived(bytes([msg_type]) + b"\xff")
            self.assertFalse(transport.disconnecting)
            tunnel.dataReceived(b"\xff")
            self.assertTrue(transport.disconnecting)
            self.assertEqual(tunnel.received, [])
        self.assertEqual(len(self.warnings()), 3)

    def test_garbage_closes_and_stops_delivery(self):
        tunnel, transport = self.connect()
        bad = bytes.fromhex("0500020000")  # EndpointDisconnect with a 2-octet body
        tunnel.dataReceived(SAMPLE[0].encode() + bad + SAMPLE[3].encode())
        self.assertEqual(tunnel.received, [SAMPLE[0]])
        self.assertTrue(transport.disconnecting)
        tunnel.dataReceived(SAMPLE[3].encode())
        self.assertEqual(tunnel.received, [SAMPLE[0]])
        [event] = self.warnings()
        self.assertEqual(event["reason"], "EndpointDisconnect: body ends inside association_id "
                                          "(needs 16 octets, has 2)")
        self.assertEqual(event["peer"], "192.168.1.1:54321")

    def test_nothing_delivered_after_handler_closes(self):
        tunnel, transport = self.connect(ClosingTunnel)
        tunnel.dataReceived(STREAM)
        self.assertEqual(tunnel.received, SAMPLE[:1])
        self.assertTrue(transport.disconnecting)

    def test_send_message(self):
        tunnel, transport = self.connect()
        for message in SAMPLE:
            tunnel.sendMessage(message)
        self.assertEqual(transport.value(), STREAM)
