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
from perc.demo import run_demo
from perc.endpoint import ReferenceEndpoint
from perc.profiles import by_id

from tests.test_md_e2e import CONFERENCE, WAIT, DistributorsMixin, eventually


def sleep(seconds):
    return deferLater(reactor, seconds, lambda: None)


class ReferenceEndpointTests(DistributorsMixin, TestCase):
    timeout = 120

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

    @defer.inlineCallbacks
    def test_three_endpoints_with_rekey(self):
        members = []
        for name in ("alice", "bob", "carol"):
            member = yield self.member(name)
            yield member.joined.addTimeout(WAIT, reactor)
            members.append(member)
        for member in members:
            member.startSending()
        yield sleep(0.5)
        key, count = self.kd.distributor.rekey(CONFERENCE)
        self.assertEqual(count, 3)
        yield sleep(0.5)
        for member in members:
            member.stopSending()
        yield sleep(0.3)
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
        yield sleep(0.5)  # well past alice's first FullEKTFields
        bob = yield self.member("bob")
        yield bob.joined.addTimeout(WAIT, reactor)
        yield eventually(lambda: alice.ssrc in bob.stats and bob.stats[alice.ssrc].verified > 5)
        alice.stopSending()
        stats = bob.stats[alice.ssrc]
        self.assertEqual(stats.failed, 0)
        # Bob could decrypt once a FullEKTField (at most 100 ms apart) arrived.
        self.assertGreater(stats.verified, 5)


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
