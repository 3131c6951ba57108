"""
The reference endpoint's retries and liveness check, on an injected clock:
real DTLS between a :class:`perc.endpoint.ReferenceEndpoint` and a real
:class:`perc.kd.associations.KeyDistributor`, carried through the Key
Distributor's real tunnel protocol by an in-memory Media Distributor that
can drop everything (a dead path) or be replaced (a restarted one).
"""

from __future__ import annotations

import random
import uuid

import pylibsrtp
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from perc import dtls, hello, pki, rtp, wire
from perc.endpoint import ReferenceEndpoint, backoff
from perc.scripts.endpoint import EndpointOptions
from perc.kd.associations import Limits
from perc.profiles import by_id

from tests.kdhelpers import MediaDistributorStandIn
from tests.test_kd import KeyDistributorTestCase

CONFERENCE = "room"
TLS_ID = "Rejoin-TlsId-0123456789abc"
SERVER = ("192.0.2.1", 5004)

_KD = dtls.Credentials.self_signed("kd.test")
_ENDPOINT = dtls.Credentials.self_signed("endpoint")


class Path:
    """
    The endpoint's UDP transport: each datagram it writes goes to the Key
    Distributor as TunneledDtls of the current association id, through the
    current Media Distributor stand-in; what comes back is queued for
    :meth:`pump`.  With ``up`` False everything is dropped both ways.
    """

    def __init__(self, kd):
        self.kd = kd
        self.up = True
        self.sent = []  # every DTLS datagram the endpoint wrote, with the time
        self.media = []  # every SRTP packet it wrote, with the time
        self.restartMediaDistributor()

    def restartMediaDistributor(self):
        """A new tunnel that knows no association (the old one is closed, if any)."""
        if getattr(self, "md", None) is not None:
            self.md.close()
        self.md = MediaDistributorStandIn(self.kd)
        self.aid = None

    def write(self, datagram, address):
        if rtp.classify(datagram) is not rtp.Kind.DTLS:
            self.media.append((self.kd.clock.seconds(), datagram))
            return
        self.sent.append((self.kd.clock.seconds(), datagram))
        if not self.up:
            return
        client_hello = hello.parse_client_hello(datagram)
        if self.aid is None or (client_hello is not None and client_hello.cookie_empty):
            # As the Media Distributor does: a new ClientHello, a new association.
            self.aid = uuid.uuid4()
        self.md.send(wire.TunneledDtls(self.aid, datagram))

    def pump(self, endpoint):
        """Deliver the Key Distributor's answers until nothing more comes."""
        for _ in range(20):
            messages = self.md.received()
            if not messages:
                return
            for message in messages:
                if self.up and isinstance(message, wire.TunneledDtls):
                    endpoint.datagramReceived(message.dtls_message, SERVER)

    def client_hellos(self):
        """(time, random) of every distinct ClientHello the endpoint sent."""
        seen = {}
        for at, datagram in self.sent:
            client_hello = hello.parse_client_hello(datagram)
            if client_hello is not None and client_hello.random not in seen:
                seen[client_hello.random] = at
        return sorted((at, rnd) for rnd, at in seen.items())


class BackoffTests(SynchronousTestCase):
    def test_exponential_capped_with_jitter(self):
        policy = backoff(initial=0.5, maximum=4.0, factor=2.0, rng=random.Random(1))
        for attempt, base in enumerate((0.5, 1.0, 2.0, 4.0, 4.0, 4.0)):
            delay = policy(attempt)
            self.assertGreaterEqual(delay, base)
            self.assertLess(delay, base + 0.5)
        self.assertLess(policy(10 ** 6), 4.5)


class RejoinTestCase(KeyDistributorTestCase):
    limits = Limits(tunnel_grace=12.0)
    ekt = True
    kd_credentials = _KD
    endpoint_credentials = _ENDPOINT
    conference = CONFERENCE
    tls_id = TLS_ID

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.path = Path(self.kd)

    def endpoint(self, **kwargs):
        kwargs.setdefault("retry_policy", lambda attempt: [0.5, 1.0, 2.0, 4.0][min(attempt, 3)])
        kwargs.setdefault("keepalive", 5.0)
        kwargs.setdefault("keepalive_timeout", 3.0)
        endpoint = ReferenceEndpoint(
            name="ep", credentials=_ENDPOINT, tls_id=TLS_ID, server=SERVER,
            profile=by_id(0x0009), clock=self.clock,
            expected_kd_tls_id=self.registration.kd_tls_id,
            expected_kd_fingerprint=_KD.fingerprint, handshake_timeout=2.0, **kwargs)
        endpoint.makeConnection(self.path)
        self.addCleanup(endpoint.doStop)
        self.path.pump(endpoint)
        return endpoint

    def advance(self, endpoint, seconds, step=0.125):
        for _ in range(round(seconds / step)):
            self.clock.advance(step)
            self.path.pump(endpoint)


class HandshakeRetryTests(RejoinTestCase):
    def test_timed_out_handshakes_retried_with_backoff(self):
        self.path.up = False
        endpoint = self.endpoint()
        self.advance(endpoint, 15.0)
        # Attempts at 0, then after each 2 s handshake 0.5, 1, 2, 4 s of backoff.
        starts = [at for at, _ in self.path.client_hellos()]
        self.assertEqual(len(starts), 4)
        for got, expected in zip(starts, (0.0, 2.5, 5.5, 9.5)):
            self.assertAlmostEqual(got, expected, delta=0.2)
        self.assertEqual(endpoint.attempts, 4)
        self.assertFalse(endpoint.joined.called)
        # The path comes back: the next attempt (at 15.5 s) joins.
        self.path.up = True
        self.advance(endpoint, 1.0)
        self.assertEqual(endpoint.attempts, 5)
        self.assertTrue(endpoint.keyed)
        self.assertGreater(self.successResultOf(endpoint.joined), 15.0)
        self.assertFalse(endpoint.failed.called)

    def test_refusal_by_the_endpoints_own_check_is_final(self):
        endpoint = self.endpoint()
        self.assertTrue(endpoint.keyed)
        other = ReferenceEndpoint(
            name="wary", credentials=_ENDPOINT, tls_id=TLS_ID, server=SERVER,
            profile=by_id(0x0009), clock=self.clock,
            expected_kd_tls_id="SomeOtherKdTlsId-0123456789",
            handshake_timeout=2.0, retry_policy=lambda attempt: 0.1)
        path = Path(self.kd)
        other.makeConnection(path)
        self.addCleanup(other.doStop)
        for _ in range(40):
            self.clock.advance(0.125)
            path.pump(other)
        self.assertIn("rejected", self.successResultOf(other.failed))
        self.failureResultOf(other.joined, RuntimeError)
        self.assertEqual(len(path.client_hellos()), 1)
        self.assertEqual(other.attempts, 1)

    def test_refusal_by_the_key_distributor_is_final(self):
        # Registered tls-id, but not the registered certificate.
        stranger = dtls.Credentials.self_signed("stranger")
        endpoint = ReferenceEndpoint(
            name="stranger", credentials=stranger, tls_id=TLS_ID, server=SERVER,
            profile=by_id(0x0009), clock=self.clock,
            expected_kd_tls_id=self.registration.kd_tls_id, handshake_timeout=2.0,
            retry_policy=lambda attempt: 0.1)
        endpoint.makeConnection(self.path)
        self.addCleanup(endpoint.doStop)
        for _ in range(40):
            self.path.pump(endpoint)
            self.clock.advance(0.125)
        # The fatal alert ended it: no second ClientHello.
        self.assertIn("alert", self.successResultOf(endpoint.failed))
        self.failureResultOf(endpoint.joined, RuntimeError)
        self.assertEqual(len(self.path.client_hellos()), 1)
        self.assertEqual(self.kd.counters.get("rejected"), 1)


class LivenessTests(RejoinTestCase):
    def outer(self, hbh):
        """What the Media Distributor opens the endpoint's SRTP with."""
        return pylibsrtp.Session(pylibsrtp.Policy(
            key=hbh.client_key + hbh.client_salt, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND,
            srtp_profile=by_id(0x0009).hbh_libsrtp_profile))

    def test_probes_answered_for_a_long_life(self):
        endpoint = self.endpoint()
        self.assertTrue(endpoint.keyed)
        self.advance(endpoint, 120.0, step=0.5)
        self.assertEqual(endpoint.lost, 0)
        self.assertEqual(endpoint.attempts, 1)
        # About one request every keepalive seconds, answered every time.
        self.assertAlmostEqual(self.kd.counters["ekt-key-resent"], 120 / 5, delta=2)
        self.assertNotIn("ekt-key-request-rate-limited", self.kd.counters)

    def test_restarted_media_distributor_noticed_and_rejoined(self):
        endpoint = self.endpoint()
        endpoint.startSending()
        old = self.kd.association(self.path.aid)
        hbh = endpoint.hbh_keys
        key = endpoint._ekt_sender.ekt_key
        # The Media Distributor goes away and comes back knowing nothing.
        self.path.up = False
        self.path.restartMediaDistributor()
        self.advance(endpoint, 1.0)
        self.path.up = True
        # keepalive (5 s) + keepalive_timeout (3 s) at most, then 0.5 s of backoff.
        self.advance(endpoint, 9.0)
        self.assertEqual(endpoint.lost, 1)
        self.assertEqual(endpoint.rejoins, 1)
        self.assertEqual(endpoint.attempts, 2)
        self.assertTrue(endpoint.keyed)
        self.assertNotEqual(endpoint.hbh_keys, hbh)
        # Media never stopped (50 packets/s throughout), and now goes out
        # under the new association's hop-by-hop keys, not the old ones.
        times = [at for at, _ in self.path.media]
        self.assertLess(max(b - a for a, b in zip(times, times[1:])), 0.2)
        latest = rtp.split_ekt_field(self.path.media[-1][1])[0]
        self.assertRaises(pylibsrtp.Error, self.outer(hbh).unprotect, latest)
        self.assertEqual(self.outer(endpoint.hbh_keys).unprotect(latest)[8:12],
                         endpoint.ssrc.to_bytes(4, "big"))
        # Same Key Distributor, same EKTKey: the end-to-end side did not change.
        self.assertIs(endpoint._ekt_sender.ekt_key, key)
        self.assertEqual(endpoint.rekeys, 0)
        # The restarted Media Distributor has the same certificate identity,
        # so the old association went on with it; the endpoint's new
        # association superseded it, and the Media Distributor was told.
        self.assertIsNone(self.kd.association(old.id))
        self.assertIn(wire.EndpointDisconnect(old.id), self.path.md.log)
        self.assertEqual(self.kd.counters["superseded"], 1)
        self.assertEqual(len(self.kd), 1)
        self.assertFalse(endpoint.failed.called)

    def test_without_keepalive_a_dead_path_goes_unnoticed(self):
        """The control for the test above: the probes are what notice."""
        endpoint = self.endpoint(keepalive=0)
        self.path.up = False
        self.advance(endpoint, 30.0, step=0.5)
        # No probes: nothing noticed (the check is what notices).
        self.assertEqual(endpoint.lost, 0)
        self.assertEqual(endpoint.attempts, 1)


class EndpointOptionsTests(SynchronousTestCase):
    """``perc endpoint``'s retry and liveness options reach the endpoint."""

    def setUp(self):
        self.files = pki.create_endpoint_certificate(self.mktemp(), "ep")

    def options(self, *extra):
        config = EndpointOptions()
        config.parseOptions([
            "--media", "127.0.0.1:5004", "--cert", self.files.certificate,
            "--key", self.files.key, "--tls-id", TLS_ID, *extra])
        return config

    def test_defaults(self):
        endpoint = self.options()._endpoint(MemoryReactorClock())
        self.assertEqual((endpoint.handshake_timeout, endpoint.keepalive,
                          endpoint.keepalive_timeout), (10.0, 5.0, 5.0))
        self.assertTrue(1.0 <= endpoint.retry_policy(0) < 2.0)
        self.assertTrue(30.0 <= endpoint.retry_policy(20) < 31.0)

    def test_values(self):
        endpoint = self.options(
            "--handshake-timeout", "2", "--retry-delay", "0.25", "--retry-max-delay", "4",
            "--keepalive", "0", "--keepalive-timeout", "1.5")._endpoint(MemoryReactorClock())
        self.assertEqual((endpoint.handshake_timeout, endpoint.keepalive,
                          endpoint.keepalive_timeout), (2.0, 0.0, 1.5))
        self.assertTrue(0.25 <= endpoint.retry_policy(0) < 0.5)
        self.assertTrue(4.0 <= endpoint.retry_policy(20) < 4.25)
        self.assertEqual(endpoint._newAssociation()._handshake_timeout, 2.0)

    def test_bad_values_refused(self):
        for bad in (["--handshake-timeout", "0"], ["--retry-delay", "-1"],
                    ["--retry-delay", "5", "--retry-max-delay", "1"], ["--keepalive", "-1"],
                    ["--keepalive-timeout", "0"]):
            self.assertRaises(UsageError, self.options, *bad)
