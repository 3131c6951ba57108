"""
A short run of the fuzz targets (``perc bench fuzz`` runs them long, with
coverage guidance), and proof that their inputs reach past the cookie
exchange: records of handed-off associations, ClientHellos with a valid
cookie and edited extensions, keyed endpoints' SRTP at the relay.
"""

import random

from twisted.trial.unittest import SynchronousTestCase

from perc import dtls
from perc.testing import fuzz


def _program(*choices) -> bytes:
    """An input that runs one operation: ``choices`` are the Input reads in order."""
    return bytes((0,) + choices)


class KeyDistributorTargetTests(SynchronousTestCase):
    def setUp(self):
        self.target = fuzz.KeyDistributorTarget()
        self.addCleanup(self.target.close)

    def test_fixture_is_established_and_handed_off(self):
        for endpoint in self.target.endpoints:
            association = self.target.kd.association(endpoint.association_id)
            self.assertTrue(association.established)
            self.assertTrue(association.engine.compacted)
            self.assertIsNotNone(association.registration)

    def test_a_record_reaches_the_handed_off_association(self):
        """An EKTKey request record of endpoint 0 (EKT) is opened by the own record layer."""
        counters = self.target.kd.counters
        before = counters.get("ekt-key-resent", 0)
        # 1 operation: _opRecord (0), endpoint 0, an EKTKey request (0), not mutated (0).
        self.target.run(_program(0, 0, 0, 0))
        self.assertEqual(counters.get("ekt-key-resent", 0), before + 1)

    def test_a_cookie_hello_with_an_edited_tls_id_reaches_the_identity_check(self):
        counters = self.target.kd.counters
        before = counters.get("rejected", 0)
        # _opCookieHello (3), hello 0; extension 56 edited (1) to a well-formed
        # body (2) holding the unregistered tls-id (4); 39 untouched (0); not mutated.
        self.target.run(_program(3, 0, 1, 2, 4, 0, 0))
        self.assertEqual(counters.get("rejected", 0), before + 1)

    def test_edit_extension_keeps_the_hello_parseable(self):
        from perc import hello
        _, record = self.target._cookieHellos[0]
        edited = fuzz.edit_extension(record, dtls.EXTERNAL_SESSION_ID.ext_type, b"\x03abc")
        parsed = hello.parse_client_hello(edited)
        self.assertTrue(parsed.tls_id_malformed)
        removed = fuzz.edit_extension(record, dtls.EXTERNAL_SESSION_ID.ext_type, None)
        self.assertIsNone(hello.parse_client_hello(removed).tls_id)

    def test_short_run(self):
        rng = random.Random(12)
        stats = self.target.stats
        before = dict(stats)
        for _ in range(400):
            self.target.run(rng.randbytes(rng.randrange(1, 96)))
        for name in ("handshakes", "established-records", "cookie-hellos"):
            self.assertGreater(stats[name], before[name], name)


class MediaDistributorTargetTests(SynchronousTestCase):
    def setUp(self):
        self.target = fuzz.MediaDistributorTarget()
        self.addCleanup(self.target.close)

    def test_fixture_is_keyed(self):
        for endpoint in self.target.endpoints:
            live = self.target.relay.endpoint(endpoint.association_id)
            self.assertTrue(live.established)
        self.assertEqual([e.ekt for e in self.target.endpoints], [True, False, True])

    def test_srtp_from_a_keyed_endpoint_is_forwarded(self):
        counters = self.target.relay.counters
        before = counters.get("forwarded-rtp", 0)
        # _opSrtp (0), endpoint 0, RTP (1), no marker (0), 4 octets of payload,
        # a ShortEKTField (0), its own address (0), not mutated (0).
        self.target.run(_program(0, 0, 1, 0, 4, 1, 2, 3, 4, 0, 0, 0))
        self.assertEqual(counters.get("forwarded-rtp", 0), before + 2)

    def test_refused_media_keys_end_the_association_and_the_fixture_recovers(self):
        counters = self.target.relay.counters
        before = counters.get("media-keys-refused", 0)
        # _opMediaKeys (3), a second copy of endpoint 1's real MediaKeys (0).
        self.target.run(_program(3, 0, 1))
        self.assertEqual(counters.get("media-keys-refused", 0), before + 1)
        self.test_fixture_is_keyed()

    def test_short_run(self):
        rng = random.Random(12)
        stats = self.target.stats
        before = dict(stats)
        for _ in range(1000):
            self.target.run(rng.randbytes(rng.randrange(1, 96)))
        for name in ("srtp-from-keyed", "media-keys"):
            self.assertGreater(stats[name], before[name], name)
