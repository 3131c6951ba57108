"""
Tests for perc.md.api: the Media Distributor's membership and status API,
over real HTTP on loopback, in front of real Memberships and a real
MediaRelay (with the fake clock, UDP transport and tunnel of the relay's
own tests).
"""

from __future__ import annotations

import json
import os

from twisted.internet import defer, reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from perc import wire
from perc.httpapi import MAX_BODY
from perc.md.api import make_api_site
from perc.md.conference import Memberships
from perc.md.relay import MediaRelay
from perc.profiles import DEFAULT_PROFILES

from tests.test_kd_api import APIClient, endpoint_path, serve_site
from tests.test_md_relay import FakePool, FakeTunnel, RecordingTransport, client_hello, hbh_keys

TOKEN = "md-test-token-0123456789abcdefghijklmnopqrs"
TLS_A = "endpoint-a-tls-id-0123456789"
TLS_B = "endpoint-b-tls-id-0123456789"
TLS_SLASH = "endpoint/c+tls_id-0123456789"
ADDR_A = ("192.0.2.1", 5001)
ADDR_B = ("192.0.2.2", 5002)


class APITestsBase(APIClient, TestCase):
    max_entries = 100
    apiToken = TOKEN

    def setUp(self):
        self.memberships = Memberships(max_entries=self.max_entries)
        self.clock = MemoryReactorClock()
        self.tunnel = FakeTunnel()
        self.transport = RecordingTransport()
        self.relay = MediaRelay(pool=FakePool(self.tunnel), memberships=self.memberships,
                                profiles=DEFAULT_PROFILES, clock=self.clock)
        self.relay.makeConnection(self.transport)
        self.addCleanup(self.relay.doStop)
        self.serve()
        self.agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def serve(self):
        """Listen on loopback; on cleanup stop and wait for every connection to close."""
        site = make_api_site(self.memberships, self.relay.status, TOKEN)
        self.base, _ = serve_site(self, site)


    def put(self, conference, tls_id, body=None, **kwargs):
        return self.request(b"PUT", endpoint_path(conference, tls_id),
                            {} if body is None else body, **kwargs)

    def stored(self):
        return len(self.memberships), {c: self.memberships.members(c) for c in ("conf", "other")}

    def assertError(self, response, answer, code):
        self.assertEqual(response.code, code, answer)
        self.assertIsInstance(answer, dict)
        self.assertEqual(set(answer), {"error"})
        self.assertIsInstance(answer["error"], str)

    def live_association(self, tls_id, address):
        """A keyed association of ``tls_id`` from ``address``; returns its id."""
        self.relay.datagramReceived(client_hello(tls_id), address)
        association_id, _ = self.tunnel.sent[-1]
        keys = hbh_keys()
        self.relay.mediaKeysReceived(self.tunnel, wire.MediaKeys(
            association_id, 0x0009, b"", keys["client_key"], keys["server_key"],
            keys["client_salt"], keys["server_salt"]))
        self.assertTrue(self.relay.endpoint(association_id).established)
        return association_id


class RouteTests(APITestsBase):
    @defer.inlineCallbacks
    def test_put_creates_then_replaces(self):
        response, answer = yield self.put("conf", TLS_A)
        self.assertEqual(response.code, 201)
        self.assertEqual(answer, {"conference": "conf", "tls_id": TLS_A})
        self.assertTrue(self.memberships.get("conf", TLS_A))
        self.assertEqual(self.memberships.conference_for(TLS_A), "conf")
        response, again = yield self.put("conf", TLS_A)
        self.assertEqual(response.code, 200)
        self.assertEqual(again, answer)
        # Moving to another conference replaces the membership.
        response, moved = yield self.put("other", TLS_A)
        self.assertEqual(response.code, 200)
        self.assertEqual(moved, {"conference": "other", "tls_id": TLS_A})
        self.assertEqual(self.stored(), (1, {"conf": [], "other": [TLS_A]}))

    @defer.inlineCallbacks
    def test_get(self):
        yield self.put("conf", TLS_A)
        response, answer = yield self.request(b"GET", endpoint_path("conf", TLS_A))
        self.assertEqual(response.code, 200)
        self.assertEqual(answer, {"conference": "conf", "tls_id": TLS_A})
        for conference, tls_id in (("conf", TLS_B), ("other", TLS_A)):
            response, answer = yield self.request(b"GET", endpoint_path(conference, tls_id))
            self.assertError(response, answer, 404)

    @defer.inlineCallbacks
    def test_list(self):
        response, answer = yield self.request(b"GET", "/v1/conferences/conf/endpoints")
        self.assertEqual(response.code, 200)
        self.assertEqual(answer, {"conference": "conf", "endpoints": []})
        yield self.put("conf", TLS_B)
        yield self.put("conf", TLS_A)
        yield self.put("other", TLS_SLASH)
        response, answer = yield self.request(b"GET", "/v1/conferences/conf/endpoints")
        self.assertEqual(answer, {"conference": "conf", "endpoints": [
            {"conference": "conf", "tls_id": TLS_A}, {"conference": "conf", "tls_id": TLS_B}]})

    @defer.inlineCallbacks
    def test_tls_id_with_slash_and_plus(self):
        response, answer = yield self.put("conf", TLS_SLASH)
        self.assertEqual(response.code, 201)
        self.assertEqual(answer["tls_id"], TLS_SLASH)
        response, _ = yield self.request(b"GET", endpoint_path("conf", TLS_SLASH))
        self.assertEqual(response.code, 200)
        response, _ = yield self.request(b"DELETE", endpoint_path("conf", TLS_SLASH))
        self.assertEqual(response.code, 204)
        self.assertEqual(len(self.memberships), 0)

    @defer.inlineCallbacks
    def test_delete(self):
        yield self.put("conf", TLS_A)
        yield self.put("conf", TLS_B)
        response, answer = yield self.request(b"DELETE", endpoint_path("other", TLS_A))
        self.assertError(response, answer, 404)
        self.assertTrue(self.memberships.get("conf", TLS_A))
        response, answer = yield self.request(b"DELETE", endpoint_path("conf", TLS_A))
        self.assertEqual(response.code, 204)
        self.assertIsNone(answer)
        self.assertEqual(self.stored(), (1, {"conf": [TLS_B], "other": []}))
        response, answer = yield self.request(b"DELETE", endpoint_path("conf", TLS_A))
        self.assertError(response, answer, 404)

    @defer.inlineCallbacks
    def test_delete_ends_live_association(self):
        yield self.put("conf", TLS_A)
        yield self.put("conf", TLS_B)
        a = self.live_association(TLS_A, ADDR_A)
        b = self.live_association(TLS_B, ADDR_B)
        response, _ = yield self.request(b"DELETE", endpoint_path("conf", TLS_A))
        self.assertEqual(response.code, 204)
        self.assertIsNone(self.relay.endpoint(a))
        self.assertEqual(self.tunnel.disconnects, [a])
        self.assertIsNotNone(self.relay.endpoint(b))
        response, status = yield self.request(b"GET", "/v1/status")
        self.assertEqual(status["associations"], 1)
        self.assertEqual(status["conferences"], {"conf": 1})

    @defer.inlineCallbacks
    def test_move_ends_live_association(self):
        yield self.put("conf", TLS_A)
        a = self.live_association(TLS_A, ADDR_A)
        response, _ = yield self.put("conf", TLS_A)
        self.assertEqual(response.code, 200)
        self.assertIsNotNone(self.relay.endpoint(a))
        response, _ = yield self.put("other", TLS_A)
        self.assertEqual(response.code, 200)
        self.assertIsNone(self.relay.endpoint(a))
        self.assertEqual(self.tunnel.disconnects, [a])

    @defer.inlineCallbacks
    def test_status(self):
        response, status = yield self.request(b"GET", "/v1/status")
        self.assertEqual(response.code, 200)
        self.assertEqual(status, {"associations": 0, "established": 0, "waiting_messages": 0,
                                  "conferences": {},
                                  "counters": {}})
        yield self.put("conf", TLS_A)
        self.live_association(TLS_A, ADDR_A)
        self.relay.datagramReceived(b"\x00\x01" + os.urandom(20), ("198.51.100.1", 9))
        self.relay.datagramReceived(b"\x80\x60" + os.urandom(40), ("198.51.100.1", 9))
        self.relay.datagramReceived(b"\x80\x60" + os.urandom(40), ("198.51.100.1", 9))
        response, status = yield self.request(b"GET", "/v1/status")
        self.assertEqual(response.code, 200)
        self.assertEqual(status, {"associations": 1, "established": 1, "waiting_messages": 0,
                                  "conferences": {"conf": 1},
                                  "counters": {"dropped-stun": 1,
                                               "dropped-srtp-unknown-source": 2}})

    @defer.inlineCallbacks
    def test_changes_logged_without_token(self):
        yield self.put("conf", TLS_A)
        yield self.put("conf", TLS_A)
        yield self.request(b"DELETE", endpoint_path("conf", TLS_A))
        yield self.request(b"GET", "/v1/status", token=TOKEN + "x")
        changes = [(e["action"], e["conference"], e["tls_id"]) for e in self.events
                   if "action" in e]
        self.assertEqual(changes, [("created", "conf", TLS_A), ("replaced", "conf", TLS_A),
                                   ("deleted", "conf", TLS_A)])
        for event in self.events:
            self.assertNotIn(TOKEN, repr(event))
            self.assertNotIn(TOKEN, formatEvent(event))


class BadRequestTests(APITestsBase):
    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        yield self.put("conf", TLS_A)
        self.association = self.live_association(TLS_A, ADDR_A)
        self.before = self.stored()
        self.assertEqual(self.before, (1, {"conf": [TLS_A], "other": []}))

    @defer.inlineCallbacks
    def assertRefused(self, code, method, path, body=None, **kwargs):
        response, answer = yield self.request(method, path, body, **kwargs)
        self.assertError(response, answer, code)
        self.assertEqual(self.stored(), self.before)
        self.assertIsNotNone(self.relay.endpoint(self.association))
        self.assertEqual(self.tunnel.disconnects, [])
        return response, answer

    @defer.inlineCallbacks
    def test_malformed_tls_id(self):
        for tls_id in ("short", "a" * 256, "bad=char-tls-id-0123456789",
                       "spaces in tls id 0123456789", "x" * 19):
            for method in (b"PUT", b"GET", b"DELETE"):
                _, answer = yield self.assertRefused(400, method, endpoint_path("conf", tls_id), {})
                self.assertIn("tls-id", answer["error"])

    @defer.inlineCallbacks
    def test_malformed_conference(self):
        for conference in ("bad conf", "-x", ".x", "x" * 256, "\u00e9", "a/b"):
            for method in (b"PUT", b"GET", b"DELETE"):
                _, answer = yield self.assertRefused(
                    400, method, endpoint_path(conference, TLS_B), {})
                self.assertIn("conference", answer["error"])
            yield self.assertRefused(
                400, b"GET", endpoint_path(conference, TLS_B).rsplit("/", 1)[0])
        # Moving TLS_A to a bad conference is refused as well.
        yield self.assertRefused(400, b"PUT", endpoint_path("bad conf", TLS_A), {})

    @defer.inlineCallbacks
    def test_non_utf8_path(self):
        yield self.assertRefused(400, b"GET", "/v1/conferences/%FF/endpoints")
        yield self.assertRefused(400, b"PUT", "/v1/conferences/conf/endpoints/%FF" + "a" * 20, {})

    @defer.inlineCallbacks
    def test_bad_bodies(self):
        for body in (b"", b"{", b"not json", b"\xff\xfe", b"[]", b"[{}]", b"42", b"null",
                     b'"{}"', b"true", b'{"extra": 1}', b'{"conference": "conf"}',
                     b'{"tls_id": "' + TLS_B.encode() + b'"}', b'{"a": 1, "a": 1}',
                     b"{}{}", b"{} x"):
            yield self.assertRefused(400, b"PUT", endpoint_path("conf", TLS_B), body)
            # Nor may a bad body move an existing membership (or end its association).
            yield self.assertRefused(400, b"PUT", endpoint_path("other", TLS_A), body)

    @defer.inlineCallbacks
    def test_unauthorised(self):
        cases = [dict(token=None), dict(token="wrong"), dict(token=TOKEN + "x"),
                 dict(token=TOKEN[:-1]), dict(authorization=b"Basic " + TOKEN.encode()),
                 dict(authorization=TOKEN.encode()), dict(authorization=b"Bearer")]
        for kwargs in cases:
            for method, path, body in ((b"PUT", endpoint_path("conf", TLS_B), {}),
                                       (b"PUT", endpoint_path("other", TLS_A), {}),
                                       (b"GET", endpoint_path("conf", TLS_A), None),
                                       (b"DELETE", endpoint_path("conf", TLS_A), None),
                                       (b"GET", "/v1/conferences/conf/endpoints", None),
                                       (b"GET", "/v1/status", None),
                                       (b"GET", "/nowhere", None),
                                       (b"POST", "/v1/status", None)):
                response, answer = yield self.assertRefused(401, method, path, body, **kwargs)
                challenge = response.headers.getRawHeaders(b"www-authenticate")
                self.assertEqual(len(challenge), 1)
                self.assertTrue(challenge[0].startswith(b"Bearer"), challenge)
                self.assertNotIn(TLS_A, json.dumps(answer))
                self.assertNotIn("associations", json.dumps(answer))

    @defer.inlineCallbacks
    def test_wrong_methods(self):
        for method in (b"POST", b"PATCH", b"OPTIONS", b"HEAD"):
            response, answer = yield self.request(method, endpoint_path("conf", TLS_A), {})
            self.assertEqual(response.code, 405)
            self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"GET, PUT, DELETE"])
            self.assertEqual(self.stored(), self.before)
        for path in ("/v1/conferences/conf/endpoints", "/v1/status"):
            for method in (b"POST", b"PUT", b"DELETE"):
                response, _ = yield self.assertRefused(405, method, path, {})
                self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"GET"])

    @defer.inlineCallbacks
    def test_unknown_paths(self):
        for path in ("/", "/v1", "/v1/", "/v1/status/", "/v1/status/x", "/v1/conferences",
                     "/v1/conferences/conf", "/v1/conferences/conf/endpoints/",
                     "/v1/conferences/conf/members/" + TLS_A,
                     endpoint_path("conf", TLS_A) + "/extra", endpoint_path("conf", TLS_A) + "/",
                     "/v2/conferences/conf/endpoints", "/v1//conf/endpoints", "/status"):
            for method in (b"GET", b"PUT", b"DELETE"):
                yield self.assertRefused(404, method, path, {})

    @defer.inlineCallbacks
    def test_body_too_large(self):
        big = json.dumps({"padding": "x" * MAX_BODY}).encode()
        for chunked in (False, True):
            yield self.assertRefused(413, b"PUT", endpoint_path("conf", TLS_B), big,
                                     chunked=chunked)
            yield self.assertRefused(413, b"PUT", endpoint_path("other", TLS_A), big,
                                     chunked=chunked)
        # ``{}`` padded with whitespace beyond the limit: refused; up to it: accepted.
        yield self.assertRefused(413, b"PUT", endpoint_path("conf", TLS_B),
                                 b"{}" + b" " * (MAX_BODY - 1))
        response, _ = yield self.request(b"PUT", endpoint_path("conf", TLS_B),
                                         b"{}" + b" " * (MAX_BODY - 2), chunked=True)
        self.assertEqual(response.code, 201)


    @defer.inlineCallbacks
    def test_token_checked_before_anything_else(self):
        """Without the token every request is 401, whatever else is wrong with it."""
        big = json.dumps({"padding": "x" * MAX_BODY}).encode()
        cases = [(b"PUT", endpoint_path("conf", TLS_B), big),              # too large
                 (b"PUT", endpoint_path("conf", TLS_B), b"{"),              # not JSON
                 (b"PUT", endpoint_path("conf", "short"), {}),
                 (b"PUT", endpoint_path("bad conf", TLS_B), {}),
                 (b"PUT", "/v1/conferences/%FF/endpoints/" + TLS_B, {}),
                 (b"PUT", endpoint_path("other", TLS_A), {}),               # a move
                 (b"PATCH", endpoint_path("conf", TLS_A), {}),
                 (b"DELETE", endpoint_path("conf", TLS_A), None),
                 (b"DELETE", endpoint_path("bad conf", TLS_A), None)]
        for kwargs in (dict(token=None), dict(token="wrong")):
            for method, path, body in cases:
                yield self.assertRefused(401, method, path, body, **kwargs)

    @defer.inlineCallbacks
    def test_malformed_tls_id_bytes(self):
        for tls_id in ("endpoint-a-tls-id-01234567\x00", "endpoint-a-tls-id-\u00e9123",
                       TLS_A + " ", TLS_A + "\n", "%" + TLS_A):
            for method in (b"PUT", b"GET", b"DELETE"):
                yield self.assertRefused(400, method, endpoint_path("conf", tls_id), {})
        for method in (b"GET", b"DELETE"):
            yield self.assertRefused(400, method, "/v1/conferences/%C3%28/endpoints/" + TLS_A)

class FullTableTests(APITestsBase):
    max_entries = 1

    @defer.inlineCallbacks
    def test_membership_table_full(self):
        yield self.put("conf", TLS_A)
        before = self.stored()
        response, answer = yield self.put("conf", TLS_B)
        self.assertError(response, answer, 507)
        self.assertEqual(self.stored(), before)
        # Replacing or moving the one there is still possible.
        response, _ = yield self.put("conf", TLS_A)
        self.assertEqual(response.code, 200)
        response, _ = yield self.put("other", TLS_A)
        self.assertEqual(response.code, 200)
        # Room again after a DELETE.
        response, _ = yield self.request(b"DELETE", endpoint_path("other", TLS_A))
        self.assertEqual(response.code, 204)
        response, _ = yield self.put("conf", TLS_B)
        self.assertEqual(response.code, 201)
