"""
Handshakes and media through a lossy, reordering UDP relay between the
endpoints and the Media Distributor: DTLS retransmission (and the EKTKey
request) bring every endpoint in.
"""

from __future__ import annotations

import random

from twisted.internet import defer, protocol, reactor
from twisted.trial.unittest import TestCase

from perc import dtls
from perc.endpoint import ReferenceEndpoint
from perc.profiles import by_id

from tests.test_endpoint import verified_at_least
from tests.test_md_e2e import CONFERENCE, DistributorsMixin, eventually


class LossyRelay(protocol.DatagramProtocol):
    """
    Forwards between one endpoint and the Media Distributor, dropping each
    datagram with probability ``loss`` and holding some back to reorder them.
    """

    def __init__(self, target, loss: float, seed: int):
        self.target = target
        self.loss = loss
        self.random = random.Random(seed)
        self.client = None
        self.dropped = self.passed = 0
        self._held = []

    def datagramReceived(self, data, address):
        destination = self.target if address != self.target else self.client
        if address != self.target:
            self.client = address
        if destination is None:
            return
        if self.random.random() < self.loss:
            self.dropped += 1
            return
        self.passed += 1
        if self.random.random() < 0.1:
            # Reorder: this one goes out after the next datagram.
            self._held.append((data, destination))
            return
        self.transport.write(data, destination)
        while self._held:
            self.transport.write(*self._held.pop())


class LossyNetworkTests(DistributorsMixin, TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def member(self, name, loss, seed):
        credentials = dtls.Credentials.self_signed(name)
        tls_id = "{}-Lossy-TlsId-0123456789".format(name)
        registration, _ = yield self.kd.roster.put(CONFERENCE, tls_id, credentials.fingerprint)
        self.md.memberships.put(CONFERENCE, tls_id)
        relay = LossyRelay(self.media_address, loss, seed)
        relay_port = reactor.listenUDP(0, relay, interface="127.0.0.1")
        self.addCleanup(relay_port.stopListening)
        endpoint = ReferenceEndpoint(
            name=name, credentials=credentials, tls_id=tls_id,
            server=("127.0.0.1", relay_port.getHost().port), profile=by_id(0x0009),
            clock=reactor, expected_kd_tls_id=registration.kd_tls_id,
            expected_kd_fingerprint=self.kd_fingerprint, rate=50)
        port = reactor.listenUDP(0, endpoint, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return endpoint, relay

    @defer.inlineCallbacks
    def test_handshakes_complete_through_loss(self):
        members = []
        for index, (name, loss) in enumerate((("alice", 0.1), ("bob", 0.2), ("carol", 0.3))):
            member = yield self.member(name, loss, seed=index)
            members.append(member)
        yield defer.gatherResults([m.joined.addTimeout(90, reactor) for m, _ in members])
        self.assertTrue(any(relay.dropped for _, relay in members))
        for member, _ in members:
            member.startSending()
        yield eventually(verified_at_least([m for m, _ in members], lambda r, s: 10),
                         what="10 packets verified on every stream through the loss")
        for member, _ in members:
            member.stopSending()
        for member, _ in members:
            self.assertEqual(len(member.stats), 2)
            for stats in member.stats.values():
                # Media is lost on the way, never accepted wrongly.
                self.assertEqual(stats.failed, 0)
                self.assertGreater(stats.verified, 0)
