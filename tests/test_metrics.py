"""
Prometheus metrics and health endpoints of both daemons (perc.metrics,
perc.httpapi.OperationsResource): real services on loopback, real HTTP,
real tunnels, DTLS handshakes and SRTP; the exposition is parsed with
prometheus_client's own parser.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import types
import uuid

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

import perc
from perc import dtls, pki, wire
from perc.kd import tap as kd_tap
from perc.kd.service import KeyDistributorService
from perc.kd.store import AssociationRecord
from perc.md import tap as md_tap
from perc.md.service import MediaDistributorService
from perc.metrics import CONTENT_TYPE, HANDSHAKE_RESULTS, KeyDistributorMetrics, exposition
from perc.profiles import by_id
from perc.tls import TlsCredentials

from tests import test_kd
from tests.endpointhelpers import rtp_packet
from tests.kdhelpers import MediaDistributorStandIn
from tests.test_kd_service import CONFERENCE, TLS_ID, KeyDistributorServiceMixin
from tests.test_md_e2e import DistributorsMixin, eventually

WAIT = 20


def parse(text: str) -> dict:
    """Every sample of an exposition: {(name, sorted label items): value}."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def spellings(secret: bytes) -> list[str]:
    """How a key could leak into text: hex either case, base64, colon-separated hex."""
    return [secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode("ascii"),
            ":".join("{:02X}".format(octet) for octet in secret)]


class HttpMixin:
    @defer.inlineCallbacks
    def get(self, url, token=None, method=b"GET"):
        """(response, body) of a real HTTP request; ``token`` adds the bearer header."""
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        headers = Headers({})
        if token is not None:
            headers.addRawHeader(b"authorization", b"Bearer " + token.encode())
        response = yield agent.request(method, url.encode("ascii"), headers)
        body = yield readBody(response)
        return response, body

    @defer.inlineCallbacks
    def scrape(self, base):
        response, body = yield self.get(base + "/metrics")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [CONTENT_TYPE])
        return body

    @defer.inlineCallbacks
    def ready(self, base):
        response, body = yield self.get(base + "/readyz")
        return response.code, json.loads(body)

    def assertNoSecret(self, body: bytes, secrets):
        text = body.decode("latin-1")
        for secret in secrets:
            self.assertNotIn(secret, body)
            for spelling in spellings(secret):
                self.assertNotIn(spelling, text)


# -- Key Distributor ---------------------------------------------------------


class KeyDistributorMetricsTests(HttpMixin, KeyDistributorServiceMixin, TestCase):
    """perc-kd with --api and --metrics on loopback, and a real tunnel."""

    timeout = 90

    def options(self, *extra):
        return super().options("--metrics", "tcp:0:interface=127.0.0.1", *extra)

    @defer.inlineCallbacks
    def start(self, *extra):
        if self.service is not None:
            yield self.service.stopService()
        service = self.service = KeyDistributorService.fromOptions(self.options(*extra), reactor)
        service.privilegedStartService()
        self.addCleanup(self.stopService, service)
        tunnel_port, api_port, metrics_port = service._ports
        self.tunnel_port = tunnel_port.getHost().port
        self.api_url = "http://127.0.0.1:{}".format(api_port.getHost().port)
        self.metrics_url = "http://127.0.0.1:{}".format(metrics_port.getHost().port)
        # The --metrics port answers before the roster is open: alive, not ready.
        response, _ = yield self.get(self.metrics_url + "/healthz")
        self.assertEqual(response.code, 200)
        code, answer = yield self.ready(self.metrics_url)
        self.assertEqual((code, answer["ready"]), (503, False))
        self.assertIn("registration database", answer["reason"])
        service.startService()
        yield service.ready
        with open(os.path.join(self.dir, "token")) as f:
            self.token = f.read().strip()

    @defer.inlineCallbacks
    def handshake(self, credentials, tls_id, kd_tls_id=None):
        """A real endpoint handshake through a new tunnel; returns (events, messages)."""
        md = yield self.tunnel()
        client = dtls.ClientAssociation(
            credentials, [by_id(0x0009)], tls_id=tls_id.encode(),
            expected_peer_tls_id=None if kd_tls_id is None else kd_tls_id.encode(),
            expected_peer_fingerprint=pki.fingerprint(
                TlsCredentials.from_pki_dir(self.pki.directory, "kd").certificate),
            ekt_ciphers=(1,))
        result = yield self.relay(md, client, uuid.uuid4())
        return result

    @defer.inlineCallbacks
    def test_metrics_follow_real_handshakes(self):
        for base in (self.api_url, self.metrics_url):
            samples = parse((yield self.scrape(base)).decode())
            self.assertEqual(value(samples, "perc_build_info", version=perc.__version__), 1)
            self.assertEqual(value(samples, "perc_kd_associations"), 0)
            self.assertEqual(value(samples, "perc_kd_tunnels_up"), 0)
            self.assertEqual(value(samples, "perc_kd_handshake_seconds_count"), 0)
            for result in HANDSHAKE_RESULTS:
                self.assertEqual(value(samples, "perc_kd_handshakes_total", result=result), 0)

        endpoint = dtls.Credentials.self_signed("endpoint")
        kd_tls_id = yield self.register(endpoint.fingerprint)
        events, messages = yield self.handshake(endpoint, TLS_ID, kd_tls_id)
        self.assertTrue([e for e in events if isinstance(e, dtls.HandshakeComplete)])
        # An endpoint nobody registered: refused by the identity check.
        yield self.handshake(dtls.Credentials.self_signed("x"), "NobodyRegisteredThis-42")
        response, _ = yield self.get(
            self.api_url + "/v1/conferences/{}/rekey".format(CONFERENCE), self.token, b"POST")
        self.assertEqual(response.code, 200)

        for base in (self.api_url, self.metrics_url):
            body = yield self.scrape(base)
            samples = parse(body.decode())
            self.assertEqual(value(samples, "perc_kd_associations"), 1)
            self.assertEqual(value(samples, "perc_kd_established_associations"), 1)
            self.assertEqual(value(samples, "perc_kd_registrations"), 1)
            self.assertEqual(value(samples, "perc_kd_tunnels_up"), 2)
            self.assertEqual(value(samples, "perc_kd_handshakes_total", result="completed"), 1)
            self.assertEqual(value(samples, "perc_kd_handshakes_total", result="refused"), 1)
            self.assertEqual(value(samples, "perc_kd_handshakes_total", result="timeout"), 0)
            self.assertEqual(value(samples, "perc_kd_handshake_seconds_count"), 1)
            self.assertEqual(value(samples, "perc_kd_handshake_seconds_bucket", le="+Inf"), 1)
            self.assertEqual(value(samples, "perc_kd_rekeys_total", cause="api"), 1)
            self.assertEqual(value(samples, "perc_kd_rekeys_total", cause="rollover"), 0)
            # No key material, nor the API token, anywhere in the exposition.
            [keys] = [m for m in messages if isinstance(m, wire.MediaKeys)]
            ekt = self.service.distributor.conference_keys.key_for(CONFERENCE, reactor.seconds())
            self.assertNoSecret(body, [
                keys.client_key, keys.server_key, keys.client_salt, keys.server_salt,
                ekt.ekt_key_value, ekt.srtp_master_salt, self.token.encode()])

    @defer.inlineCallbacks
    def test_store_group_commits_in_status_and_metrics(self):
        """The store's group-committed writes: counted in /v1/status and /metrics."""
        yield self.start()

        def figures():
            d = self.get(self.api_url + "/v1/status", self.token)
            d.addCallback(lambda result: json.loads(result[1])["store_writes"])
            return d

        self.assertEqual((yield figures()), {"queued": 0, "in_flight": False, "batches": 0,
                                             "writes": 0, "refused": 0, "retried": 0})
        store = self.service.store
        yield defer.gatherResults([
            store.put_association(AssociationRecord("aid-{}".format(n), "node", "md.test",
                                                    b"state", 0)) for n in range(3)])
        # Three writes of one reactor turn: one transaction.
        self.assertEqual((yield figures()), {"queued": 0, "in_flight": False, "batches": 1,
                                             "writes": 3, "refused": 0, "retried": 0})
        for base in (self.api_url, self.metrics_url):
            samples = parse((yield self.scrape(base)).decode())
            self.assertEqual(value(samples, "perc_kd_store_write_transactions_total"), 1)
            self.assertEqual(value(samples, "perc_kd_store_writes_queued"), 0)
            self.assertEqual(value(samples, "perc_kd_store_writes_refused_total"), 0)

    @defer.inlineCallbacks
    def test_health_without_token_everything_else_with_it(self):
        for base in (self.api_url, self.metrics_url):
            response, body = yield self.get(base + "/healthz")
            self.assertEqual((response.code, json.loads(body)), (200, {"status": "serving"}))
            code, answer = yield self.ready(base)
            self.assertEqual((code, answer["ready"]), (200, True))
        for path in ("/v1/status", "/metrics/", "/metrics/extra", "/healthz/x", "/readyz2",
                     "/v1/conferences/{}/endpoints".format(CONFERENCE)):
            response, _ = yield self.get(self.api_url + path)
            self.assertEqual(response.code, 401, path)
            response, _ = yield self.get(self.api_url + path, self.token)
            self.assertNotEqual(response.code, 401, path)
        # The --metrics port serves only the three paths.
        response, _ = yield self.get(self.metrics_url + "/v1/status", self.token)
        self.assertEqual(response.code, 404)
        response, _ = yield self.get(self.metrics_url + "/metrics", method=b"POST")
        self.assertEqual(response.code, 405)

    @defer.inlineCallbacks
    def test_not_ready_while_the_database_does_not_answer(self):
        code, _ = yield self.ready(self.api_url)
        self.assertEqual(code, 200)
        yield self.service.roster.close()
        for base in (self.api_url, self.metrics_url):
            code, answer = yield self.ready(base)
            self.assertEqual((code, answer["ready"]), (503, False))
            self.assertIn("registration database does not answer", answer["reason"])
            response, _ = yield self.get(base + "/healthz")
            self.assertEqual(response.code, 200)


class HandshakeOutcomeTests(test_kd.KeyDistributorTestCase):
    """The KD's handshake counters and histogram on a MemoryReactorClock."""

    limits = test_kd.Limits(handshake_timeout=5.0)

    def setUp(self):
        d = super().setUp()

        def built(_):
            self.metrics = KeyDistributorMetrics(
                types.SimpleNamespace(distributor=self.kd, roster=self.roster, store=None))
            self.kd.observe_handshake = self.metrics.observe_handshake
        return d.addCallback(built)

    def samples(self):
        return parse(exposition(self.metrics.registry).decode())

    def exchange(self, md, client, aid, output):
        """Send the client's datagrams; return its output for the KD's answers."""
        for datagram in output.datagrams:
            md.send(wire.TunneledDtls(aid, datagram))
        datagrams, events = [], []
        for message in md.received():
            if isinstance(message, wire.TunneledDtls):
                answer = client.receive(message.dtls_message, self.clock.seconds())
                datagrams.extend(answer.datagrams)
                events.extend(answer.events)
        return dtls.Output(tuple(datagrams), tuple(events))

    def test_duration_is_cookie_to_complete_on_the_clock(self):
        md = MediaDistributorStandIn(self.kd)
        client, aid = self.client(), uuid.uuid4()
        output = client.start(self.clock.seconds())
        self.clock.advance(7)  # before the cookie: not part of the handshake
        output = self.exchange(md, client, aid, output)  # HelloVerifyRequest
        self.clock.advance(3)  # nor is this: no state before the cookie returns
        output = self.exchange(md, client, aid, output)  # ClientHello with the cookie
        self.assertEqual(len(self.kd), 1)
        self.clock.advance(0.25)
        output = self.exchange(md, client, aid, output)  # the client's final flight
        self.assertTrue([e for e in output.events if isinstance(e, dtls.HandshakeComplete)])
        samples = self.samples()
        self.assertEqual(value(samples, "perc_kd_handshakes_total", result="completed"), 1)
        self.assertEqual(value(samples, "perc_kd_handshake_seconds_count"), 1)
        self.assertEqual(value(samples, "perc_kd_handshake_seconds_sum"), 0.25)
        self.assertEqual(value(samples, "perc_kd_handshake_seconds_bucket", le="0.1"), 0)
        self.assertEqual(value(samples, "perc_kd_handshake_seconds_bucket", le="0.25"), 1)
        self.assertEqual(value(samples, "perc_kd_associations"), 1)

    def test_timeout_and_abandoned(self):
        md = MediaDistributorStandIn(self.kd)
        for _ in range(2):
            client, aid = self.client(), uuid.uuid4()
            output = self.exchange(md, client, aid, client.start(self.clock.seconds()))
            self.exchange(md, client, aid, output)  # the cookie: the KD keeps state
        self.assertEqual(len(self.kd), 2)
        # The Media Distributor gives up on the second one.
        md.send(wire.EndpointDisconnect(aid))
        # The first endpoint goes silent mid-handshake.
        self.clock.pump([1.0] * 10)
        samples = self.samples()
        self.assertEqual(value(samples, "perc_kd_handshakes_total", result="timeout"), 1)
        self.assertEqual(value(samples, "perc_kd_handshakes_total", result="abandoned"), 1)
        self.assertEqual(value(samples, "perc_kd_handshakes_total", result="completed"), 0)
        self.assertEqual(value(samples, "perc_kd_handshake_seconds_count"), 0)
        self.assertEqual(value(samples, "perc_kd_associations"), 0)
        self.assertEqual(self.kd.counters["handshake-timeout"], 1)


# -- Media Distributor -------------------------------------------------------


class MediaDistributorMetricsTests(HttpMixin, DistributorsMixin, TestCase):
    """perc-md with --api and --metrics, a real perc-kd, real endpoints and SRTP."""

    timeout = 90

    @property
    def md_options(self):
        return ("--api", "tcp:0:interface=127.0.0.1",
                "--api-token-file", os.path.join(self.dir, "md-token"),
                "--metrics", "tcp:0:interface=127.0.0.1")

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.api_url = "http://127.0.0.1:{}".format(self.md.ports["api"].getHost().port)
        self.metrics_url = "http://127.0.0.1:{}".format(self.md.ports["metrics"].getHost().port)
        with open(os.path.join(self.dir, "md-token")) as f:
            self.token = f.read().strip()

    @defer.inlineCallbacks
    def test_forwarding_counts_after_real_srtp(self):
        a = yield self.join("alice")
        b = yield self.join("bob")
        a.send_rtp(rtp_packet(0x0A, 1, b"inner\x00"))
        yield self.receive(b)
        b.send_rtp(rtp_packet(0x0B, 1, b"inner\x00"))
        yield self.receive(a)
        a.send_rtcp(struct.pack("!BBHI", 0x80, 200, 6, 0x0A) + b"\x00" * 20)
        yield self.receive(b)
        tampered = bytearray(a.outbound.protect(rtp_packet(0x0A, 2, b"inner\x00")))
        tampered[-1] ^= 1
        a.transport.write(bytes(tampered), self.media_address)
        yield eventually(lambda: self.md.relay.counters.get("dropped-srtp-unprotect-failed"))
        for base in (self.api_url, self.metrics_url):
            body = yield self.scrape(base)
            samples = parse(body.decode())
            self.assertEqual(value(samples, "perc_build_info", version=perc.__version__), 1)
            self.assertEqual(value(samples, "perc_md_forwarded_packets_total", kind="rtp"), 2)
            self.assertEqual(value(samples, "perc_md_forwarded_packets_total", kind="rtcp"), 1)
            self.assertEqual(value(samples, "perc_md_dropped_packets_total",
                                   reason="srtp-unprotect-failed"), 1)
            self.assertEqual(value(samples, "perc_md_endpoints", state="keyed"), 2)
            self.assertEqual(value(samples, "perc_md_endpoints", state="handshaking"), 0)
            self.assertEqual(value(samples, "perc_md_tunnels_up"), 1)
            self.assertEqual(value(samples, "perc_md_conferences"), 1)
            # Neither side's hop-by-hop keys nor the API token.
            secrets = [self.token.encode()]
            for endpoint in (a, b):
                keys = endpoint.completed.profile.hbh_keys(endpoint.completed.keys)
                secrets += [keys.client_key, keys.server_key, keys.client_salt,
                            keys.server_salt]
            self.assertNoSecret(body, secrets)

    @defer.inlineCallbacks
    def test_health_without_token_everything_else_with_it(self):
        for base in (self.api_url, self.metrics_url):
            response, body = yield self.get(base + "/healthz")
            self.assertEqual((response.code, json.loads(body)), (200, {"status": "serving"}))
        for path in ("/v1/status", "/metrics/x", "/v1/conferences/room/endpoints"):
            response, _ = yield self.get(self.api_url + path)
            self.assertEqual(response.code, 401, path)
            response, _ = yield self.get(self.api_url + path, self.token)
            self.assertEqual(response.code, 200 if path != "/metrics/x" else 404, path)


class MediaDistributorReadinessTests(HttpMixin, TestCase):
    """readyz follows the Key Distributor tunnel: 503, 200 once it is up, 503 once it is gone."""

    timeout = 60

    @defer.inlineCallbacks
    def test_ready_while_a_tunnel_is_up(self):
        directory = os.path.abspath(self.mktemp())
        dev = pki.create_dev_pki(os.path.join(directory, "pki"))
        config = md_tap.Options()
        config.parseOptions([
            "--pki", dev.directory, "--tunnel-listen", "tcp:0:interface=127.0.0.1",
            "--media-port", "0", "--media-interface", "127.0.0.1", "--api", "none",
            "--metrics", "tcp:0:interface=127.0.0.1"])
        md = MediaDistributorService.fromOptions(config, reactor)
        md.privilegedStartService()
        md.startService()
        self.addCleanup(md.stopService)
        base = "http://127.0.0.1:{}".format(md.ports["metrics"].getHost().port)
        code, answer = yield self.ready(base)
        self.assertEqual((code, answer),
                         (503, {"ready": False, "reason": "no Key Distributor tunnel is up"}))

        config = kd_tap.Options()
        config.parseOptions([
            "--pki", dev.directory, "--tunnel-listen", "none", "--api", "none",
            "--connect", "tcp:127.0.0.1:{}".format(md.ports["tunnel-listen"].getHost().port),
            "--db", os.path.join(directory, "kd.sqlite3")])
        kd = KeyDistributorService.fromOptions(config, reactor)
        kd.privilegedStartService()
        kd.startService()
        self.addCleanup(lambda: kd.stopService() if kd.running else None)
        yield kd.ready
        yield eventually(lambda: md.pool.tunnels)
        code, answer = yield self.ready(base)
        self.assertEqual((code, answer),
                         (200, {"ready": True, "reason": "1 Key Distributor tunnel up"}))
        samples = parse((yield self.scrape(base)).decode())
        self.assertEqual(value(samples, "perc_md_tunnels_up"), 1)

        yield kd.stopService()
        yield eventually(lambda: not md.pool.tunnels)
        code, answer = yield self.ready(base)
        self.assertEqual((code, answer["ready"]), (503, False))
        samples = parse((yield self.scrape(base)).decode())
        self.assertEqual(value(samples, "perc_md_tunnels_up"), 0)

