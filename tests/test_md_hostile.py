"""
Hostile datagrams at the Media Distributor's endpoint port while a real
conference of reference endpoints (double encryption, EKT) runs through real
``perc-md`` and ``perc-kd`` services on loopback: every hostile datagram is
dropped and counted under its reason (except well-formed DTLS records from a
live endpoint's address, which only its Key Distributor can judge, and
ClientHellos under a registered tls-id, which start an association of their
own), and every endpoint verifies every media packet of every other.

Datagrams "spoofing a live endpoint" are sent from that endpoint's own UDP
socket: the Media Distributor sees exactly the source address a spoofer
would forge, without raw sockets.
"""

from __future__ import annotations

import collections
import random
import struct

from twisted.internet import defer, protocol, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from perc import dtls, hello, rtp
from perc.endpoint import ReferenceEndpoint
from perc.profiles import by_id

from tests.test_md_e2e import CONFERENCE, WAIT, DistributorsMixin
from tests.test_md_relay import malformed_tls_id_hello

#: What the Media Distributor's UDP port reads of a datagram (Twisted's
#: ``udp.Port.maxPacketSize``); the rest of a longer one is cut off.
READ_SIZE = 8192

#: Not an outcome the relay counts: DTLS from a keyed endpoint's address
#: goes to its Key Distributor (which discards what does not authenticate).
TUNNELLED = "tunnelled"
#: Nor is a ClientHello that starts an association.
NEW_ASSOCIATION = "new association"


def sleep(seconds):
    return deferLater(reactor, seconds, lambda: None)


def expected_outcome(datagram: bytes, keyed_ekt: bool | None) -> str:
    """
    The relay's counter for ``datagram`` (as read from the socket) from an
    address with no association (``keyed_ekt`` None) or from a keyed
    endpoint that negotiated EKT or not.  Not for ClientHellos.
    """
    datagram = datagram[:READ_SIZE]
    kind = rtp.classify(datagram)
    if kind is rtp.Kind.RTP or kind is rtp.Kind.RTCP:
        if keyed_ekt is None:
            return "dropped-srtp-unknown-source"
        if kind is rtp.Kind.RTP and keyed_ekt:
            try:
                rtp.split_ekt_field(datagram)
            except rtp.EktFieldError:
                return "dropped-malformed-ekt"
        return "dropped-srtp-unprotect-failed"
    if kind is rtp.Kind.DTLS:
        try:
            client_hello = hello.parse_client_hello(datagram)
        except hello.HelloError:
            return "dropped-malformed-hello"
        assert client_hello is None, "a random datagram parsed as a ClientHello"
        return "dropped-dtls-no-association" if keyed_ekt is None else TUNNELLED
    return "dropped-" + kind.name.lower()


def dtls_record(content_type: int, epoch: int, body: bytes, length: int | None = None) -> bytes:
    """A DTLS 1.2 record; ``length`` overrides the header's length field."""
    return (struct.pack("!BHH", content_type, 0xFEFD, epoch) + (7).to_bytes(6, "big")
            + struct.pack("!H", len(body) if length is None else length) + body)


@defer.inlineCallbacks
def settle(predicate, timeout=2.0):
    """Wait until ``predicate()`` holds, or ``timeout`` seconds (then carry on)."""
    deadline = reactor.seconds() + timeout
    while not predicate() and reactor.seconds() < deadline:
        yield sleep(0.001)


class Hostile(protocol.DatagramProtocol):
    """A sender on its own socket (a stranger's address) that ignores what comes back."""

    def datagramReceived(self, data, address):
        pass


class HostileTrafficTests(DistributorsMixin, TestCase):
    timeout = 120
    RATE = 50  # media packets per second per endpoint
    BATCH = 100  # hostile datagrams sent at once

    @defer.inlineCallbacks
    def member(self, name):
        credentials = dtls.Credentials.self_signed(name)
        tls_id = "{}-Hostile-TlsId-0123456789".format(name)
        self.tls_ids[name] = tls_id
        registration, _ = yield self.kd.roster.put(CONFERENCE, tls_id, credentials.fingerprint)
        self.md.memberships.put(CONFERENCE, tls_id)
        endpoint = ReferenceEndpoint(
            name=name, credentials=credentials, tls_id=tls_id, server=self.media_address,
            profile=by_id(0x0009), clock=reactor, expected_kd_tls_id=registration.kd_tls_id,
            expected_kd_fingerprint=self.kd_fingerprint, rate=self.RATE)
        port = reactor.listenUDP(0, endpoint, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(endpoint.stopSending)
        yield endpoint.joined.addTimeout(WAIT, reactor)
        return endpoint

    @defer.inlineCallbacks
    def test_conference_survives_every_hostile_kind(self):
        self.tls_ids = {}
        members = []
        for name in ("alice", "bob", "carol"):
            members.append((yield self.member(name)))
        alice = members[0]
        # Alice's own socket: the spoofer's source address.  Record what
        # she sends, for replays.
        spoof = alice.transport.write
        captured = []

        def recording(data, address=None):
            if rtp.classify(data) is rtp.Kind.RTP:
                captured.append(data)
            return spoof(data, address)
        alice.transport.write = recording
        stranger = Hostile()
        port = reactor.listenUDP(0, stranger, interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        for member in members:
            member.startSending()
        yield sleep(1.0)  # media flowing; replays captured by now are old
        relay = self.md.relay
        before = collections.Counter(relay.counters)
        kd_before = dict(self.kd.distributor.counters)
        associations = {key: endpoint.id for key, endpoint in relay._established.items()}

        self.assertGreater(len(captured), 20)
        plan = self.plan(random.Random(8), captured[:200], alice, members[1])
        media_before = sum(m.sent for m in members)
        sent = collections.Counter()
        expected = collections.Counter()

        def counted():
            return sum(count - before[name] for name, count in relay.counters.items()
                       if not name.startswith("forwarded-"))
        for start in range(0, len(plan), self.BATCH):
            for kind, source, datagram, outcome in plan[start:start + self.BATCH]:
                write = spoof if source == "spoofed" else stranger.transport.write
                write(datagram, self.media_address)
                sent[kind, source] += 1
                expected[outcome] += 1
            # Paced by the Media Distributor itself: loopback drops whatever
            # overflows a socket buffer, the endpoints' media included.
            uncounted = expected[TUNNELLED] + expected[NEW_ASSOCIATION]
            yield settle(lambda: counted() >= sum(expected.values()) - uncounted)
        # The conference was talking all along.
        self.assertGreater(sum(m.sent for m in members), media_before)
        yield sleep(0.2)
        for member in members:
            member.stopSending()

        # Every packet of every member verified by every other.
        pairs = [(member, other) for member in members for other in members
                 if other is not member]
        yield settle(lambda: all(other.ssrc in member.stats
                                 and member.stats[other.ssrc].verified == other.sent
                                 for member, other in pairs), timeout=5)
        for member, other in pairs:
            stats = member.stats[other.ssrc]
            self.assertEqual((stats.verified, stats.failed), (other.sent, 0),
                             "{} from {}".format(member.name, other.name))
        for member in members:
            self.assertFalse(member.failed.called)
        after = collections.Counter(relay.counters)
        delta = {name: after[name] - before[name] for name in after
                 if after[name] != before[name] and not name.startswith("forwarded-")}
        tunnelled = expected.pop(TUNNELLED, 0)
        new_associations = expected.pop(NEW_ASSOCIATION, 0)
        self.assertEqual(relay.status()["associations"], len(members) + new_associations)
        self.assertEqual(delta, dict(expected))
        self.assertEqual(after["forwarded-rtp"], 2 * sum(m.sent for m in members))
        # The associations are the same ones, at both distributors.
        self.assertEqual({key: e.id for key, e in relay._established.items()}, associations)
        for association_id in associations.values():
            self.assertTrue(self.kd.distributor.association(association_id).established)
        # The impostors' ClientHellos got only a HelloVerifyRequest: the Key
        # Distributor keeps nothing for them, and nothing else changed there.
        self.assertEqual(len(self.kd.distributor), len(members))
        self.assertEqual(tunnelled, 50)
        self.assertEqual(new_associations, 2)
        kd_after = self.kd.distributor.counters
        for name in ("closed", "rejected"):
            self.assertEqual(kd_after.get(name, 0), kd_before.get(name, 0), name)

    def plan(self, rng: random.Random, replays, alice, bob):
        """(kind, source, datagram, outcome): every hostile kind, shuffled."""
        plan = []

        def add(kind, source, datagram, outcome=None):
            if outcome is None:
                outcome = expected_outcome(datagram, None if source == "stranger" else True)
            plan.append((kind, source, datagram, outcome))

        both = ("stranger", "spoofed")
        for source, count in (("stranger", 2000), ("spoofed", 1000)):
            for _ in range(count):
                length = rng.choice((rng.randrange(0, 40), rng.randrange(0, 1501)))
                add("random", source, rng.randbytes(length))
        # Truncated DTLS: a real ClientHello and an application-data record, cut short.
        client_hello = dtls.ClientAssociation(
            dtls.Credentials.self_signed("mallory"), [by_id(0x0009)],
            tls_id=b"Mallory-TlsId-0123456789").start(0).datagrams[0]
        application = dtls_record(23, 1, rng.randbytes(120))
        for source in both:
            for whole in (client_hello, application):
                for length in range(1, len(whole)):
                    add("truncated-dtls", source, whole[:length])
        # Oversized DTLS: a record claiming more than the datagram holds,
        # and datagrams longer than the port reads.
        for source in both:
            for claimed in (0x4801, 0xFFFF):
                add("oversized-dtls", source, dtls_record(23, 1, rng.randbytes(100), claimed))
            for _ in range(5):
                add("oversized-dtls", source, dtls_record(23, 1, rng.randbytes(9000)))
                add("oversized-dtls", source, dtls_record(22, 0, rng.randbytes(9000)))
        # RTP with wrong tags: made up, and real packets with a bit flipped.
        ssrc = alice.ssrc
        for source in both:
            for sequence in range(300):
                header = struct.pack("!BBHII", 0x80, 96, sequence, sequence * 160, ssrc)
                add("wrong-tag-rtp", source, header + rng.randbytes(180) + rtp.SHORT_EKT_FIELD)
            for packet in replays[:100]:
                tampered = bytearray(packet)
                srtp_length = len(rtp.split_ekt_field(packet)[0])
                tampered[srtp_length - 1] ^= 0x01  # the last octet of the tag
                add("flipped-tag-rtp", source, bytes(tampered))
            for packet in replays:
                add("replayed-rtp", source, packet)
            for _ in range(5):
                add("oversized-rtp", source,
                    struct.pack("!BBHII", 0x80, 96, 1, 160, ssrc) + rng.randbytes(9000))
        # RTCP of every length.
        template = b"\x80\xc8" + bytes(range(256)) * 6
        for source in both:
            for length in range(0, 1501):
                add("rtcp-every-length", source, template[:length])
        # ClientHellos that must not start an association.
        nobody = dtls.ClientAssociation(
            dtls.Credentials.self_signed("nobody"), [by_id(0x0009)],
            tls_id=b"NotInAnyConference-0123456789").start(0).datagrams[0]
        for source in both:
            for _ in range(5):
                add("hello-no-conference", source, nobody, "refused-no-conference")
                add("hello-malformed-tls-id", source, malformed_tls_id_hello(),
                    "refused-malformed-tls-id")
        # ClientHellos under a live endpoint's tls-id, from its address and
        # from another: each starts an association of its own (the Key
        # Distributor answers with a stateless HelloVerifyRequest, and would
        # refuse the certificate), which leaves the live one alone.
        for member, source in ((alice, "spoofed"), (bob, "stranger")):
            impostor = dtls.ClientAssociation(
                dtls.Credentials.self_signed("impostor"), [by_id(0x0009)],
                tls_id=self.tls_ids[member.name].encode()).start(0).datagrams[0]
            add("hello-as-live-endpoint", source, impostor, NEW_ASSOCIATION)
        # Well-formed DTLS records from a live endpoint's address reach its
        # Key Distributor, which discards what does not authenticate.
        for _ in range(50):
            add("dtls-junk-to-live", "spoofed", dtls_record(23, 1, rng.randbytes(64)), TUNNELLED)
        rng.shuffle(plan)
        return plan
