"""
The reference endpoint and ``perc demo``: double encryption and EKT end to
end through real Media Distributor and Key Distributor services on loopback.
"""

from __future__ import annotations

import io

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from perc import dtls
from perc.scripts.demo import run_demo
from perc.endpoint import ReferenceEndpoint
from perc.profiles import by_id

from tests.test_md_e2e import CONFERENCE, WAIT, DistributorsMixin, eventually


def sleep(seconds):
    return deferLater(reactor, seconds, lambda: None)


def verified_at_least(members, counts):
    """
    A predicate: every member has verified at least ``counts(receiver,
    sender_ssrc)`` packets from every other member.
    """
    def predicate():
        for member in members:
            others = {m.ssrc for m in members} - {member.ssrc}
            if set(member.stats) != others:
                return False
            if any(member.stats[ssrc].verified < counts(member, ssrc) for ssrc in others):
                return False
        return True
    return predicate


def forwarded_everything(test, members):
    """A predicate: the Media Distributor forwarded every packet sent to every other member."""
    return lambda: (test.md.relay.counters.get("forwarded-rtp", 0)
                    == sum(m.sent for m in members) * (len(members) - 1))


class MembersMixin(DistributorsMixin):
    """Reference endpoints as members of the conference, through real distributors."""

    @defer.inlineCallbacks
    def member(self, name, expected_kd_tls_id=None, profile=by_id(0x0009)):
        credentials = dtls.Credentials.self_signed(name)
        tls_id = "{}-E2E-TlsId-0123456789".format(name)
        registration, _ = yield self.kd.roster.put(CONFERENCE, tls_id, credentials.fingerprint)
        self.md.memberships.put(CONFERENCE, tls_id)
        endpoint = ReferenceEndpoint(
            name=name, credentials=credentials, tls_id=tls_id, server=self.media_address,
            profile=profile, clock=reactor,
            expected_kd_tls_id=expected_kd_tls_id or registration.kd_tls_id,
            expected_kd_fingerprint=self.kd_fingerprint, rate=100)
        port = reactor.listenUDP(0, endpoint, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(endpoint.stopSending)
        return endpoint


class ReferenceEndpointTests(MembersMixin, TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_three_endpoints_with_rekey(self):
        members = []
        for name in ("alice", "bob", "carol"):
            member = yield self.member(name)
            yield member.joined.addTimeout(WAIT, reactor)
            members.append(member)
        for member in members:
            member.startSending()
        yield eventually(verified_at_least(members, lambda r, s: 30),
                         what="30 packets verified on every stream")
        key, count = yield self.kd.distributor.rekey(CONFERENCE)
        self.assertEqual(count, 3)
        yield eventually(lambda: all(m.rekeys == 1 for m in members), what="the rekey everywhere")
        # 31 more on every stream once everyone holds the new key.
        before = {(m.ssrc, ssrc): s.verified for m in members for ssrc, s in m.stats.items()}
        yield eventually(verified_at_least(members, lambda r, s: before[r.ssrc, s] + 31),
                         what="31 more packets verified on every stream after the rekey")
        for member in members:
            member.stopSending()
        yield eventually(forwarded_everything(self, members), what="every packet forwarded")
        for member in members:
            self.assertEqual(member.rekeys, 1)
            others = {m.ssrc for m in members} - {member.ssrc}
            self.assertEqual(set(member.stats), others)
            for stats in member.stats.values():
                # Nothing lost to verification across the switch-over.
                self.assertEqual(stats.failed, 0)
                self.assertGreater(stats.verified, 60)
        # The Media Distributor forwarded the packets without being able to read them.
        self.assertEqual(self.md.relay.counters.get("forwarded-rtp"),
                         sum(m.sent for m in members) * 2)

    @defer.inlineCallbacks
    def test_wrong_kd_tls_id_aborts(self):
        member = yield self.member("mallory-victim", expected_kd_tls_id="NotTheKdTlsId-0123456789")
        with self.assertRaises(RuntimeError) as caught:
            yield member.joined.addTimeout(WAIT, reactor)
        self.assertIn("rejected", str(caught.exception))
        self.assertIsNone(member.hbh_keys)

    @defer.inlineCallbacks
    def test_late_joiner_decrypts_from_next_full_ekt_field(self):
        alice = yield self.member("alice")
        yield alice.joined.addTimeout(WAIT, reactor)
        alice.startSending()
        # Well past alice's first FullEKTFields (at most 100 ms apart).
        yield eventually(lambda: alice.sent >= 50, what="alice sending for 0.5 s")
        bob = yield self.member("bob")
        yield bob.joined.addTimeout(WAIT, reactor)
        yield eventually(lambda: alice.ssrc in bob.stats and bob.stats[alice.ssrc].verified > 5)
        alice.stopSending()
        stats = bob.stats[alice.ssrc]
        self.assertEqual(stats.failed, 0)
        # Bob could decrypt once a FullEKTField (at most 100 ms apart) arrived.
        self.assertGreater(stats.verified, 5)


class RolloverTests(MembersMixin, TestCase):
    """
    A conference that lasts several EKTKey lifetimes: perc-kd --ekt-ttl 4
    --ekt-rollover 0.5 (a new key every 2 s) over 8.5 seconds.  (With the
    default rollover a 4 s TTL would leave a late joiner, whose TTL is
    rounded down, too short a view of the old key: README, "EKTKey
    lifetime".)
    """

    timeout = 120
    kd_options = ("--ekt-ttl", "4", "--ekt-rollover", "0.5")

    @defer.inlineCallbacks
    def test_every_member_moves_to_every_key_without_losing_a_packet(self):
        counters = self.kd.distributor.counters
        members, rollovers_at_join = [], {}
        for name in ("alice", "bob", "carol"):
            member = yield self.member(name)
            member.joined.addCallback(
                lambda _, m=member: rollovers_at_join.setdefault(
                    m.name, counters.get("ekt-rollover", 0)))
            members.append(member)
        yield defer.gatherResults([m.joined for m in members]).addTimeout(WAIT, reactor)
        for member in members:
            member.startSending()
        # Over two TTLs (a rollover every 2 s) and 6 s of media on every stream.
        yield eventually(lambda: counters.get("ekt-rollover", 0) >= 3, timeout=30,
                         what="three rollovers")
        yield eventually(verified_at_least(members, lambda r, s: 601), timeout=30,
                         what="601 packets verified on every stream")
        for member in members:
            member.stopSending()
        yield eventually(forwarded_everything(self, members), what="every packet forwarded")
        rollovers = counters.get("ekt-rollover", 0)
        self.assertGreaterEqual(rollovers, 3)  # over 2 TTLs
        for member in members:
            # Every rollover seen (the one in progress at the end may still
            # be in flight), never a packet held back for an expired key.
            self.assertIn(member.rekeys, (rollovers - rollovers_at_join[member.name],
                                          rollovers - rollovers_at_join[member.name] - 1))
            self.assertEqual(member.unsent_key_expired, 0)
            self.assertEqual(dict(member.ekt_discarded), {})
            self.assertEqual(member.joins, 1)
            others = {m.ssrc for m in members} - {member.ssrc}
            self.assertEqual(set(member.stats), others)
            for stats in member.stats.values():
                self.assertEqual((stats.failed, stats.undecryptable, stats.lost), (0, 0, 0))
                self.assertGreater(stats.verified, 600)


class DemoTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_demo_succeeds_and_proves_opacity(self):
        out = io.StringIO()
        status = yield run_demo(reactor, endpoints=3, seconds=1.5, out=out)
        text = out.getvalue()
        self.assertEqual(status, 0, text)
        self.assertIn("rekeyed midway", text)
        self.assertIn("does not contain the media plaintext", text)
        self.assertIn("RESULT: every endpoint verified every other endpoint's media end to end",
                      text)
