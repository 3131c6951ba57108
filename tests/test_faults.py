"""
Faults with real services on loopback (real TLS tunnels, real UDP, real
DTLS, the reference endpoint): a Key Distributor restarted while endpoints
are in the middle of their handshakes and others send media, and a Media
Distributor restarted under its endpoints.  Nothing established elsewhere
is lost, and every endpoint ends up verifying everyone else again.
"""

from __future__ import annotations

from twisted.internet import defer, protocol, reactor
from twisted.trial.unittest import TestCase

from perc import dtls, hello
from perc.endpoint import ReferenceEndpoint, backoff
from perc.md import tap as md_tap
from perc.md.service import MediaDistributorService
from perc.profiles import by_id

from tests.test_md_e2e import CONFERENCE, WAIT, DistributorsMixin, eventually

#: Short timers for the endpoints, so that faults are noticed in seconds.
FAST = dict(handshake_timeout=3.0, retry_policy=backoff(initial=0.2, maximum=1.0),
            keepalive=0.5, keepalive_timeout=1.0)


class Gate(protocol.DatagramProtocol):
    """
    Between one endpoint and the Media Distributor.  While ``closed``, only
    the endpoint's ClientHellos get through: its handshake gets as far as
    the Key Distributor's flight and then waits, its next flight dropped
    here (``held`` counts them).
    """

    def __init__(self, target):
        self.target = target
        self.client = None
        self.closed = True
        self.held = 0

    def datagramReceived(self, data, address):
        if address == self.target:
            if self.client is not None:
                self.transport.write(data, self.client)
            return
        self.client = address
        if self.closed and hello.parse_client_hello(data) is None:
            self.held += 1
            return
        self.transport.write(data, self.target)


class FaultMixin(DistributorsMixin):
    timeout = 120

    @defer.inlineCallbacks
    def member(self, name, conference=CONFERENCE, md=None, via_gate=False, **options):
        md = md or self.md
        media = ("127.0.0.1", md.ports["media"].getHost().port)
        credentials = dtls.Credentials.self_signed(name)
        tls_id = "{}-Fault-TlsId-0123456789".format(name)
        registration, _ = yield self.kd.roster.put(conference, tls_id, credentials.fingerprint)
        md.memberships.put(conference, tls_id)
        gate = None
        server = media
        if via_gate:
            gate = Gate(media)
            gate_port = reactor.listenUDP(0, gate, interface="127.0.0.1")
            self.addCleanup(gate_port.stopListening)
            server = ("127.0.0.1", gate_port.getHost().port)
        for key, value in FAST.items():
            options.setdefault(key, value)
        endpoint = ReferenceEndpoint(
            name=name, credentials=credentials, tls_id=tls_id, server=server,
            profile=by_id(0x0009), clock=reactor, expected_kd_tls_id=registration.kd_tls_id,
            expected_kd_fingerprint=self.kd_fingerprint, rate=50, **options)
        endpoint.conference = conference
        endpoint.gate = gate
        port = reactor.listenUDP(0, endpoint, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(endpoint.stopSending)
        return endpoint

    def verified(self, receiver, sender):
        stats = receiver.stats.get(sender.ssrc)
        return 0 if stats is None else stats.verified

    @defer.inlineCallbacks
    def assertAllVerifyEachOther(self, members, more=10):
        """Every member verifies at least ``more`` new packets of every other one."""
        start = {(r.name, s.name): self.verified(r, s) for r in members for s in members}
        yield eventually(lambda: all(
            self.verified(r, s) >= start[r.name, s.name] + more
            for r in members for s in members if r is not s and r.conference == s.conference))

    def assertNothingFailed(self, members):
        for member in members:
            for stats in member.stats.values():
                self.assertEqual(stats.failed, 0, (member.name, member.summary()))


class KeyDistributorRestartTests(FaultMixin, TestCase):
    @defer.inlineCallbacks
    def test_handshakes_interrupted_by_restart_are_retried(self):
        # Carol and Dave are in the conference and talking.  Dave does not
        # probe: nothing tells him that the Key Distributor lost him, and
        # nothing needs to, since the conference keeps its EKTKey.
        carol = yield self.member("carol")
        dave = yield self.member("dave", keepalive=0)
        yield defer.gatherResults([carol.joined, dave.joined]).addTimeout(WAIT, reactor)
        carol.startSending()
        dave.startSending()
        yield self.assertAllVerifyEachOther([carol, dave])
        # Alice and Bob are half-way through their handshakes: the Key
        # Distributor holds their associations, their next flight is held back.
        alice = yield self.member("alice", via_gate=True)
        bob = yield self.member("bob", via_gate=True)
        yield eventually(lambda: alice.gate.held and bob.gate.held)
        self.assertEqual(len(self.kd.distributor), 4)
        self.assertFalse(alice.joined.called or bob.joined.called)

        yield self.kd.stopService()
        yield eventually(lambda: self.md.pool.pick() is None)
        # Media still flows between the keyed endpoints without a Key Distributor.
        yield self.assertAllVerifyEachOther([carol, dave])
        alice.gate.closed = bob.gate.closed = False
        # Same port, same SQLite roster: nobody registers again.
        yield self.startKeyDistributor("tcp:{}:interface=127.0.0.1".format(self.kd_port))

        yield defer.gatherResults([alice.joined, bob.joined]).addTimeout(WAIT, reactor)
        for member in (alice, bob):
            self.assertGreaterEqual(member.attempts, 2)
            self.assertFalse(member.failed.called)
        alice.startSending()
        bob.startSending()
        # Carol probes: she found her association gone from the restarted
        # Key Distributor and joined again, getting the same conference
        # EKTKey (kept, sealed, in its database): no rekey for anyone.
        yield eventually(lambda: carol.keyed and carol.rejoins)
        members = [alice, bob, carol, dave]
        yield self.assertAllVerifyEachOther(members)
        self.assertEqual((carol.lost, carol.rekeys), (1, 0))
        # Dave, who does not probe, never stopped understanding Carol.
        self.assertEqual((dave.lost, dave.rekeys), (0, 0))
        self.assertEqual(dave.stats[carol.ssrc].undecryptable, 0)
        self.assertNothingFailed(members)
        self.assertEqual(len(self.kd.distributor), 3)
        for member in members:
            self.assertFalse(member.failed.called)


class MediaDistributorRestartTests(FaultMixin, TestCase):
    kd_options = ("--tunnel-grace", "1.5")

    def startMediaDistributor(self, media_port=0):
        config = md_tap.Options()
        config.parseOptions([
            "--pki", self.pki.directory, "--kd", "tcp:127.0.0.1:{}".format(self.kd_port),
            "--media-port", str(media_port), "--media-interface", "127.0.0.1",
            "--api", "none"])
        md = MediaDistributorService.fromOptions(config, reactor)
        md.privilegedStartService()
        md.startService()
        self.addCleanup(lambda: md.stopService() if md.running else None)
        return md

    def associationIds(self, md, members):
        """The association id of each member's keyed association at ``md``."""
        by_address = {e.address: e.id for e in md.relay._established.values()}
        return {m.name: by_address[("127.0.0.1", m.transport.getHost().port)] for m in members}

    @defer.inlineCallbacks
    def test_endpoints_rejoin_a_restarted_media_distributor(self):
        other_md = self.startMediaDistributor()
        yield eventually(lambda: other_md.pool.pick() is not None)
        alice = yield self.member("alice")
        bob = yield self.member("bob")
        xavier = yield self.member("xavier", conference="elsewhere", md=other_md)
        yvonne = yield self.member("yvonne", conference="elsewhere", md=other_md)
        everyone = [alice, bob, xavier, yvonne]
        yield defer.gatherResults([m.joined for m in everyone]).addTimeout(WAIT, reactor)
        for member in everyone:
            member.startSending()
        yield self.assertAllVerifyEachOther(everyone)
        old = self.associationIds(self.md, [alice, bob])
        elsewhere = self.associationIds(other_md, [xavier, yvonne])
        key = alice._ekt_sender.ekt_key

        # The Media Distributor stops and tells the Key Distributor that its
        # endpoints are gone (EndpointDisconnect before its tunnel closes):
        # associations belong to its identity, which comes back.
        media_port = self.md.ports["media"].getHost().port
        yield self.md.stopService()
        yield eventually(lambda: all(self.kd.distributor.association(aid) is None
                                     for aid in old.values()))
        # A new Media Distributor on the same port, told the memberships
        # again by signalling: it knows no association.
        self.md = self.startMediaDistributor(media_port)
        for member in (alice, bob):
            self.md.memberships.put(CONFERENCE, "{}-Fault-TlsId-0123456789".format(member.name))
        yield eventually(lambda: all(self.kd.distributor.association(aid) is None
                                     for aid in old.values()))
        # Alice and Bob noticed (their probes went unanswered) and joined again.
        yield eventually(lambda: alice.keyed and bob.keyed and alice.rejoins and bob.rejoins)
        yield self.assertAllVerifyEachOther(everyone)
        self.assertEqual(set(self.associationIds(self.md, [alice, bob]).values()) & set(
            old.values()), set())
        # The same Key Distributor kept the conference's EKTKey: the
        # end-to-end layer did not change at all.
        self.assertIs(alice._ekt_sender.ekt_key, key)
        for member in (alice, bob):
            self.assertEqual(member.lost, 1)
            self.assertEqual(member.rekeys, 0)
        # Nothing established elsewhere was lost.
        self.assertEqual(self.associationIds(other_md, [xavier, yvonne]), elsewhere)
        for aid in elsewhere.values():
            self.assertIsNotNone(self.kd.distributor.association(aid))
        for member in (xavier, yvonne):
            self.assertEqual((member.attempts, member.lost, member.rejoins), (1, 0, 0))
        self.assertNothingFailed(everyone)
        for member in everyone:
            for stats in member.stats.values():
                self.assertEqual(stats.undecryptable, 0)
