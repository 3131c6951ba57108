"""
Tests for perc.kd.api: the Key Distributor's control API, over real HTTP on
loopback, with a real roster on an SQLite file.
"""

import json
import os
import sqlite3
from urllib.parse import quote

from twisted.internet import defer, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from perc.kd.api import MAX_BODY, make_api_site
from perc.kd.roster import Roster

TOKEN = "test-token-0123456789abcdefghijklmnopqrstuv"
TLS_A = "endpoint-a-tls-id-0123456789"
TLS_B = "endpoint-b-tls-id-0123456789"
TLS_SLASH = "endpoint/c+tls_id-0123456789"


def fp(octet: int, hash_name: str = "sha-256", size: int = 32) -> str:
    return "{} {}".format(hash_name, ":".join("{:02X}".format((octet + i) % 256) for i in range(size)))


FP1 = fp(1)
FP2 = fp(2)


def serve_site(test, site):
    """
    Listen with ``site`` on a loopback port; returns ``(base URL, stop)``.
    ``stop()`` (also run on ``test``'s cleanup) stops listening and waits for
    every connection to close, so the reactor is left clean.
    """
    closed = []
    build = site.buildProtocol

    def build_protocol(address):
        protocol = build(address)
        lost = protocol.connectionLost
        done = defer.Deferred()
        closed.append(done)

        def connection_lost(reason):
            lost(reason)
            done.callback(None)

        protocol.connectionLost = connection_lost
        return protocol

    site.buildProtocol = build_protocol
    port = reactor.listenTCP(0, site, interface="127.0.0.1")

    @defer.inlineCallbacks
    def stop():
        yield port.stopListening()
        yield defer.gatherResults(closed)

    test.addCleanup(stop)
    return "http://127.0.0.1:{}".format(port.getHost().port), stop


@implementer(IBodyProducer)
class Body:
    """A request body; ``chunked=True`` sends it without Content-Length."""

    def __init__(self, data: bytes, chunked: bool = False):
        self.data = data
        self.length = UNKNOWN_LENGTH if chunked else len(data)

    def startProducing(self, consumer):
        # Several writes, so that a chunked body really comes in pieces.
        for start in range(0, len(self.data), 16384):
            consumer.write(self.data[start:start + 16384])
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


def endpoint_path(conference, tls_id):
    return "/v1/conferences/{}/endpoints/{}".format(quote(conference, safe=""), quote(tls_id, safe=""))


_OWN_TOKEN = object()


class APIClient:
    """``request()`` to ``self.base`` through ``self.agent``, bearing ``self.apiToken``."""

    @defer.inlineCallbacks
    def request(self, method, path, body=None, token=_OWN_TOKEN, authorization=None,
                chunked=False, headers=None):
        """``token=None``: no Authorization header; ``authorization``: that header as it is."""
        if token is _OWN_TOKEN:
            token = self.apiToken
        headers = Headers(headers or {})
        if authorization is not None:
            headers.addRawHeader(b"authorization", authorization)
        elif token is not None:
            headers.addRawHeader(b"authorization", b"Bearer " + token.encode())
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        producer = Body(body, chunked) if body is not None else None
        response = yield self.agent.request(
            method, (self.base + path).encode("ascii"), headers, producer)
        data = yield readBody(response)
        answer = None
        if data:
            self.assertEqual(response.headers.getRawHeaders(b"content-type"),
                             [b"application/json"])
            answer = json.loads(data)
        return response, answer


class APITestsBase(APIClient, TestCase):
    apiToken = TOKEN

    @defer.inlineCallbacks
    def setUp(self):
        directory = self.mktemp()
        os.makedirs(directory)
        self.db_path = os.path.join(directory, "roster.sqlite")
        self.roster = yield self.open_roster()
        self.serve(self.roster)
        self.agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    @defer.inlineCallbacks
    def open_roster(self, **kwargs):
        roster = yield Roster.open(self.db_path, **kwargs)
        self.addCleanup(roster.close)
        return roster

    def serve(self, roster):
        """Listen on a loopback port; stop (and wait for every connection) on cleanup."""
        site = make_api_site(roster, TOKEN)
        self.base, self.stop_serving = serve_site(self, site)


    def put(self, conference, tls_id, fingerprint, **kwargs):
        return self.request(b"PUT", endpoint_path(conference, tls_id), {"fingerprint": fingerprint}, **kwargs)

    def stored(self):
        """Everything stored: the database rows and the roster's memory."""
        connection = sqlite3.connect(self.db_path)
        try:
            rows = sorted(connection.execute(
                "SELECT conference, tls_id, fingerprint, kd_tls_id FROM registrations"))
        finally:
            connection.close()
        memory = sorted(
            (r.conference, r.tls_id, r.fingerprint, r.kd_tls_id)
            for conference in {row[0] for row in rows} | {"conf", "other"}
            for r in self.roster.list(conference))
        return rows, memory, len(self.roster)

    def assertError(self, response, answer, code):
        self.assertEqual(response.code, code, answer)
        self.assertIsInstance(answer, dict)
        self.assertEqual(set(answer), {"error"})
        self.assertIsInstance(answer["error"], str)
        self.assertNotIn("\n", answer["error"])


class RouteTests(APITestsBase):
    @defer.inlineCallbacks
    def test_put_creates(self):
        response, answer = yield self.put("conf", TLS_A, FP1.lower())
        self.assertEqual(response.code, 201)
        registration = self.roster.get("conf", TLS_A)
        self.assertEqual(answer, {"conference": "conf", "tls_id": TLS_A, "fingerprint": FP1,
                                  "kd_tls_id": registration.kd_tls_id})
        self.assertEqual(registration.fingerprint, FP1)
        self.assertEqual(response.headers.getRawHeaders(b"location"),
                         [endpoint_path("conf", TLS_A).encode()])
        self.assertEqual(self.stored()[0], [("conf", TLS_A, FP1, registration.kd_tls_id)])

    @defer.inlineCallbacks
    def test_put_replaces_keeping_kd_tls_id(self):
        _, first = yield self.put("conf", TLS_A, FP1)
        response, second = yield self.put("conf", TLS_A, FP2)
        self.assertEqual(response.code, 200)
        self.assertEqual(second["fingerprint"], FP2)
        self.assertEqual(second["kd_tls_id"], first["kd_tls_id"])
        self.assertEqual(self.roster.lookup(TLS_A).fingerprint, FP2)
        response, third = yield self.put("conf", TLS_A, FP2)
        self.assertEqual(response.code, 200)
        self.assertEqual(third, second)

    @defer.inlineCallbacks
    def test_get_endpoint(self):
        _, created = yield self.put("conf", TLS_A, FP1)
        response, answer = yield self.request(b"GET", endpoint_path("conf", TLS_A))
        self.assertEqual(response.code, 200)
        self.assertEqual(answer, created)
        response, answer = yield self.request(b"GET", endpoint_path("conf", TLS_B))
        self.assertError(response, answer, 404)
        response, answer = yield self.request(b"GET", endpoint_path("other", TLS_A))
        self.assertError(response, answer, 404)

    @defer.inlineCallbacks
    def test_tls_id_with_slash_and_plus(self):
        response, created = yield self.put("conf", TLS_SLASH, FP1)
        self.assertEqual(response.code, 201)
        self.assertEqual(created["tls_id"], TLS_SLASH)
        self.assertIsNotNone(self.roster.lookup(TLS_SLASH))
        response, answer = yield self.request(b"GET", endpoint_path("conf", TLS_SLASH))
        self.assertEqual(answer, created)
        response, _ = yield self.request(b"DELETE", endpoint_path("conf", TLS_SLASH))
        self.assertEqual(response.code, 204)
        self.assertIsNone(self.roster.lookup(TLS_SLASH))

    @defer.inlineCallbacks
    def test_list(self):
        response, answer = yield self.request(b"GET", "/v1/conferences/conf/endpoints")
        self.assertEqual(response.code, 200)
        self.assertEqual(answer, {"conference": "conf", "endpoints": []})
        _, b = yield self.put("conf", TLS_B, FP2)
        _, a = yield self.put("conf", TLS_A, FP1)
        yield self.put("other", TLS_SLASH, FP1)
        response, answer = yield self.request(b"GET", "/v1/conferences/conf/endpoints")
        self.assertEqual(response.code, 200)
        self.assertEqual(answer, {"conference": "conf", "endpoints": [a, b]})

    @defer.inlineCallbacks
    def test_delete(self):
        seen = []
        self.roster.add_removal_observer(lambda registration, reason: seen.append((registration.tls_id, reason)))
        yield self.put("conf", TLS_A, FP1)
        response, answer = yield self.request(b"DELETE", endpoint_path("other", TLS_A))
        self.assertError(response, answer, 404)
        self.assertIsNotNone(self.roster.lookup(TLS_A))
        response, answer = yield self.request(b"DELETE", endpoint_path("conf", TLS_A))
        self.assertEqual(response.code, 204)
        self.assertIsNone(answer)
        self.assertIsNone(self.roster.lookup(TLS_A))
        self.assertEqual(self.stored()[0], [])
        self.assertEqual(seen, [(TLS_A, "deleted")])
        response, answer = yield self.request(b"DELETE", endpoint_path("conf", TLS_A))
        self.assertError(response, answer, 404)

    @defer.inlineCallbacks
    def test_changes_are_logged_without_token(self):
        yield self.put("conf", TLS_A, FP1)
        yield self.put("conf", TLS_A, FP2)
        yield self.request(b"DELETE", endpoint_path("conf", TLS_A))
        yield self.request(b"GET", "/v1/conferences/conf/endpoints", token=TOKEN + "x")
        changes = [(e["action"], e["conference"], e["tls_id"]) for e in self.events if "action" in e]
        self.assertEqual(changes, [("created", "conf", TLS_A), ("replaced", "conf", TLS_A),
                                   ("deleted", "conf", TLS_A)])
        for event in self.events:
            self.assertNotIn(TOKEN, repr(event))
            self.assertNotIn(TOKEN, formatEvent(event))


class BadRequestTests(APITestsBase):
    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        yield self.put("conf", TLS_A, FP1)
        self.before = self.stored()
        self.assertEqual(len(self.before[0]), 1)

    @defer.inlineCallbacks
    def assertRefused(self, code, method, path, body=None, **kwargs):
        response, answer = yield self.request(method, path, body, **kwargs)
        self.assertError(response, answer, code)
        self.assertEqual(self.stored(), self.before)
        return response, answer

    @defer.inlineCallbacks
    def test_malformed_tls_id(self):
        for tls_id in ("short", "a" * 256, "bad=char-tls-id-0123456789", "spaces in tls id 0123456789"):
            for method in (b"PUT", b"GET", b"DELETE"):
                _, answer = yield self.assertRefused(
                    400, method, endpoint_path("conf", tls_id), {"fingerprint": FP2})
                self.assertIn("tls-id", answer["error"])

    @defer.inlineCallbacks
    def test_malformed_conference(self):
        for conference in ("bad conf", "-x", "x" * 256, "é"):
            _, answer = yield self.assertRefused(
                400, b"PUT", endpoint_path(conference, TLS_B), {"fingerprint": FP2})
            self.assertIn("conference", answer["error"])
            yield self.assertRefused(400, b"GET", "/v1/conferences/{}/endpoints".format(quote(conference)))

    @defer.inlineCallbacks
    def test_non_utf8_path(self):
        yield self.assertRefused(400, b"GET", "/v1/conferences/%FF/endpoints")

    @defer.inlineCallbacks
    def test_bad_fingerprint(self):
        for value in ("sha-256 AB:CD", "sha-256", "", "md5 " + fp(1, size=16)[8:],
                      "sha-999 " + FP1.split()[1], 42, None, ["sha-256", FP1]):
            _, answer = yield self.assertRefused(
                400, b"PUT", endpoint_path("conf", TLS_B), {"fingerprint": value})
            self.assertIn("fingerprint", answer["error"])
        # Replacing an existing registration with a bad one changes nothing.
        yield self.assertRefused(400, b"PUT", endpoint_path("conf", TLS_A), {"fingerprint": "sha-1 AB"})

    @defer.inlineCallbacks
    def test_unknown_hash(self):
        _, answer = yield self.assertRefused(
            400, b"PUT", endpoint_path("conf", TLS_B), {"fingerprint": "sha3-256 " + FP1.split()[1]})
        self.assertIn("unknown fingerprint hash", answer["error"])

    @defer.inlineCallbacks
    def test_bad_bodies(self):
        for body in (b"", b"{", b"not json", b'{"fingerprint": "x"', b"\xff\xfe",
                     b"[]", b'"sha-256 AB"', b"42", b"null",
                     b"{}", json.dumps({"fingerprint": FP2, "extra": 1}).encode(),
                     json.dumps({"fingerprint": FP2, "conference": "conf"}).encode(),
                     b'{"fingerprint": "' + FP2.encode() + b'", "fingerprint": "' + FP2.encode() + b'"}'):
            yield self.assertRefused(400, b"PUT", endpoint_path("conf", TLS_B), body)
            yield self.assertRefused(400, b"PUT", endpoint_path("conf", TLS_A), body)

    @defer.inlineCallbacks
    def test_body_too_large(self):
        padding = "x" * MAX_BODY
        big = json.dumps({"fingerprint": FP2, "padding": padding}).encode()
        yield self.assertRefused(413, b"PUT", endpoint_path("conf", TLS_B), big)
        yield self.assertRefused(413, b"PUT", endpoint_path("conf", TLS_B), big, chunked=True)
        # Well-formed but padded with whitespace beyond the limit: still refused.
        spaced = json.dumps({"fingerprint": FP2}).encode() + b" " * MAX_BODY
        yield self.assertRefused(413, b"PUT", endpoint_path("conf", TLS_B), spaced)
        # The limit itself is accepted.
        exact = json.dumps({"fingerprint": FP2}).encode()
        exact += b" " * (MAX_BODY - len(exact))
        response, _ = yield self.request(b"PUT", endpoint_path("conf", TLS_B), exact, chunked=True)
        self.assertEqual(response.code, 201)

    @defer.inlineCallbacks
    def test_content_type_not_checked(self):
        response, _ = yield self.request(b"PUT", endpoint_path("conf", TLS_B), {"fingerprint": FP2},
                                         headers={b"content-type": [b"text/plain"]})
        self.assertEqual(response.code, 201)
        response, _ = yield self.request(b"PUT", endpoint_path("conf", TLS_B), {"fingerprint": FP1})
        self.assertEqual(response.code, 200)
        self.assertEqual(self.roster.lookup(TLS_B).fingerprint, FP1)

    @defer.inlineCallbacks
    def test_conflict(self):
        _, answer = yield self.assertRefused(409, b"PUT", endpoint_path("other", TLS_A), {"fingerprint": FP2})
        self.assertIn(TLS_A, answer["error"])

    @defer.inlineCallbacks
    def test_unauthorised(self):
        path = endpoint_path("conf", TLS_B)
        cases = [dict(token=None), dict(token="wrong"), dict(token=TOKEN + "x"), dict(token=TOKEN[:-1]),
                 dict(authorization=b"Basic " + TOKEN.encode()), dict(authorization=TOKEN.encode()),
                 dict(authorization=b"Bearer")]
        for kwargs in cases:
            for method, target, body in ((b"PUT", path, {"fingerprint": FP2}), (b"GET", path, None),
                                         (b"DELETE", endpoint_path("conf", TLS_A), None),
                                         (b"GET", "/v1/conferences/conf/endpoints", None),
                                         (b"GET", "/nowhere", None), (b"POST", path, None)):
                response, answer = yield self.assertRefused(401, method, target, body, **kwargs)
                challenge = response.headers.getRawHeaders(b"www-authenticate")
                self.assertEqual(len(challenge), 1)
                self.assertTrue(challenge[0].startswith(b"Bearer"), challenge)
                self.assertNotIn(TLS_A, json.dumps(answer))

    @defer.inlineCallbacks
    def test_token_scheme_case_insensitive(self):
        response, _ = yield self.request(
            b"GET", endpoint_path("conf", TLS_A), authorization=b"bearer " + TOKEN.encode())
        self.assertEqual(response.code, 200)

    @defer.inlineCallbacks
    def test_unknown_paths(self):
        for path in ("/", "/v1", "/v1/conferences", "/v1/conferences/conf",
                     "/v1/conferences/conf/endpoints/", "/v1/conferences/conf/members/" + TLS_A,
                     endpoint_path("conf", TLS_A) + "/extra", "/v2/conferences/conf/endpoints",
                     "/v1/conferences/conf/endpoints/" + TLS_A + "/", "/v1//conf/endpoints"):
            for method in (b"GET", b"PUT", b"DELETE"):
                yield self.assertRefused(404, method, path, {"fingerprint": FP2})

    @defer.inlineCallbacks
    def test_wrong_methods(self):
        for method in (b"POST", b"PATCH", b"OPTIONS"):
            response, _ = yield self.assertRefused(405, method, endpoint_path("conf", TLS_A), {"fingerprint": FP2})
            self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"GET, PUT, DELETE"])
        for method in (b"POST", b"PUT", b"DELETE"):
            response, _ = yield self.assertRefused(405, method, "/v1/conferences/conf/endpoints", {"fingerprint": FP2})
            self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"GET"])

    @defer.inlineCallbacks
    def test_malformed_conference_on_every_endpoint_route(self):
        for conference in ("bad conf", "-x", "x" * 256, "\u00e9", "a\x00b", "..", "a/b"):
            for method in (b"GET", b"DELETE", b"PUT"):
                _, answer = yield self.assertRefused(
                    400, method, endpoint_path(conference, TLS_A), {"fingerprint": FP2})
                self.assertIn("conference", answer["error"])

    @defer.inlineCallbacks
    def test_malformed_tls_id_bytes(self):
        for tls_id in ("x" * 19, "endpoint-a-tls-id-01234567\x00", "endpoint-a-tls-id-\u00e9123",
                       TLS_A + " ", TLS_A + "\n", "%" + TLS_A):
            for method in (b"PUT", b"GET", b"DELETE"):
                yield self.assertRefused(400, method, endpoint_path("conf", tls_id),
                                         {"fingerprint": FP2})

    @defer.inlineCallbacks
    def test_non_utf8_path_on_every_method(self):
        for method in (b"PUT", b"GET", b"DELETE"):
            yield self.assertRefused(400, method, "/v1/conferences/conf/endpoints/%FF" + "a" * 20,
                                     {"fingerprint": FP2})
            yield self.assertRefused(400, method, "/v1/conferences/%C3%28/endpoints/" + TLS_A,
                                     {"fingerprint": FP2})

    @defer.inlineCallbacks
    def test_token_checked_before_anything_else(self):
        """Without the token every request is 401, whatever else is wrong with it."""
        big = json.dumps({"fingerprint": FP2, "padding": "x" * MAX_BODY}).encode()
        cases = [(b"PUT", endpoint_path("conf", TLS_B), big),             # too large
                 (b"PUT", endpoint_path("conf", TLS_B), b"{"),             # not JSON
                 (b"PUT", endpoint_path("conf", "short"), {"fingerprint": FP2}),
                 (b"PUT", endpoint_path("bad conf", TLS_B), {"fingerprint": FP2}),
                 (b"PUT", "/v1/conferences/%FF/endpoints/" + TLS_B, {"fingerprint": FP2}),
                 (b"PUT", endpoint_path("other", TLS_A), {"fingerprint": FP2}),  # a conflict
                 (b"PATCH", endpoint_path("conf", TLS_A), {"fingerprint": FP2}),
                 (b"DELETE", endpoint_path("conf", TLS_A), None),
                 (b"POST", "/v1/conferences/conf/rekey", None)]
        for kwargs in (dict(token=None), dict(token="wrong")):
            for method, path, body in cases:
                yield self.assertRefused(401, method, path, body, **kwargs)


class StatusTests(APITestsBase):
    def serve(self, roster):
        self.status_calls = 0

        def status():
            self.status_calls += 1
            return {"associations": 0, "counters": {}}

        site = make_api_site(roster, TOKEN, status=status)
        self.base, self.stop_serving = serve_site(self, site)

    @defer.inlineCallbacks
    def test_status(self):
        yield self.put("conf", TLS_A, FP1)
        response, answer = yield self.request(b"GET", "/v1/status")
        self.assertEqual(response.code, 200)
        self.assertEqual(answer, {"associations": 0, "counters": {}, "registrations": 1})
        for method in (b"PUT", b"DELETE", b"POST"):
            response, answer = yield self.request(method, "/v1/status", {})
            self.assertError(response, answer, 405)
            self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"GET"])
        response, answer = yield self.request(b"GET", "/v1/status", token=None)
        self.assertError(response, answer, 401)
        self.assertEqual(self.status_calls, 1)

    @defer.inlineCallbacks
    def test_no_status_route_without_a_source(self):
        yield self.stop_serving()
        APITestsBase.serve(self, self.roster)
        response, answer = yield self.request(b"GET", "/v1/status")
        self.assertError(response, answer, 404)


class RekeyRouteTests(APITestsBase):
    """``POST /v1/conferences/{conference}/rekey``: refused requests rekey nothing."""

    def serve(self, roster):
        self.rekeyed = []

        def rekey(conference):
            from perc.ekt import EktKey
            self.rekeyed.append(conference)
            return EktKey(b"k" * 16, b"s" * 14, len(self.rekeyed), 3600), 0

        site = make_api_site(roster, TOKEN, rekey)
        self.base, self.stop_serving = serve_site(self, site)

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        yield self.put("conf", TLS_A, FP1)
        self.before = self.stored()

    @defer.inlineCallbacks
    def assertRefused(self, code, method, path, body=None, **kwargs):
        response, answer = yield self.request(method, path, body, **kwargs)
        self.assertError(response, answer, code)
        self.assertEqual(self.rekeyed, [])
        self.assertEqual(self.stored(), self.before)
        return response, answer

    @defer.inlineCallbacks
    def test_rekey(self):
        response, answer = yield self.request(b"POST", "/v1/conferences/conf/rekey")
        self.assertEqual(response.code, 200)
        self.assertEqual(answer, {"conference": "conf", "ekt_spi": 1, "endpoints": 0})
        self.assertEqual(self.rekeyed, ["conf"])

    @defer.inlineCallbacks
    def test_without_token(self):
        for kwargs in (dict(token=None), dict(token="wrong"), dict(authorization=b"Bearer")):
            response, _ = yield self.assertRefused(
                401, b"POST", "/v1/conferences/conf/rekey", **kwargs)
            self.assertTrue(response.headers.getRawHeaders(b"www-authenticate")[0]
                            .startswith(b"Bearer"))

    @defer.inlineCallbacks
    def test_wrong_methods(self):
        for method in (b"GET", b"PUT", b"DELETE", b"PATCH"):
            response, _ = yield self.assertRefused(405, method, "/v1/conferences/conf/rekey", {})
            self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"POST"])

    @defer.inlineCallbacks
    def test_malformed_conference(self):
        for conference in ("bad%20conf", "-x", "x" * 256, "%C3%A9", "%FF", ""):
            yield self.assertRefused(400, b"POST", "/v1/conferences/{}/rekey".format(conference))

    @defer.inlineCallbacks
    def test_unknown_paths(self):
        for path in ("/v1/conferences/conf/rekey/", "/v1/conferences/conf/rekey/x",
                     "/v1/conferences/rekey", "/v1/rekey"):
            yield self.assertRefused(404, b"POST", path)


class StorageLimitTests(APITestsBase):
    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        yield self.put("conf", TLS_A, FP1)
        self.before = self.stored()

    @defer.inlineCallbacks
    def test_full_roster(self):
        # A second roster on its own file, bounded to what it already holds.
        yield self.stop_serving()
        self.roster = yield self.open_roster(max_registrations=1)
        self.serve(self.roster)
        response, answer = yield self.put("conf", TLS_B, FP2)
        self.assertError(response, answer, 507)
        self.assertEqual(self.stored(), self.before)
        response, _ = yield self.put("conf", TLS_A, FP2)
        self.assertEqual(response.code, 200)

    @defer.inlineCallbacks
    def test_database_failure(self):
        connection = sqlite3.connect(self.db_path)
        for statement in ("INSERT", "UPDATE", "DELETE"):
            connection.execute(
                "CREATE TRIGGER fail_{0} BEFORE {0} ON registrations "
                "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END".format(statement))
        connection.commit()
        connection.close()
        for method, path, body in ((b"PUT", endpoint_path("conf", TLS_B), {"fingerprint": FP2}),
                                   (b"PUT", endpoint_path("conf", TLS_A), {"fingerprint": FP2}),
                                   (b"DELETE", endpoint_path("conf", TLS_A), None)):
            response, answer = yield self.request(method, path, body)
            self.assertError(response, answer, 500)
            self.assertNotIn("disk on fire", answer["error"])
            self.assertEqual(self.stored(), self.before)
        self.flushLoggedErrors(sqlite3.Error)


class RestartTests(APITestsBase):
    @defer.inlineCallbacks
    def test_persistence_across_restart(self):
        _, a = yield self.put("conf", TLS_A, FP1)
        _, b = yield self.put("conf", TLS_SLASH, FP2)
        _, c = yield self.put("other", TLS_B, FP1)
        yield self.request(b"DELETE", endpoint_path("other", TLS_B))
        yield self.stop_serving()
        yield self.roster.close()

        self.roster = yield self.open_roster()
        self.serve(self.roster)
        response, answer = yield self.request(b"GET", "/v1/conferences/conf/endpoints")
        self.assertEqual(answer["endpoints"], [a, b])
        response, _ = yield self.request(b"GET", endpoint_path("other", TLS_B))
        self.assertEqual(response.code, 404)
        response, again = yield self.put("conf", TLS_A, FP2)
        self.assertEqual(response.code, 200)
        self.assertEqual(again["kd_tls_id"], a["kd_tls_id"])


class SlowRoster:
    """A roster whose changes wait until the test lets them through."""

    def __init__(self, roster):
        self._roster = roster
        self.started = defer.Deferred()
        self.gate = defer.Deferred()

    def __getattr__(self, name):
        return getattr(self._roster, name)

    def put(self, *args):
        self.started.callback(None)
        self.pending = d = defer.Deferred()
        self.gate.addCallback(lambda _: self._roster.put(*args).chainDeferred(d))
        return d


class DisconnectTests(APITestsBase):
    @defer.inlineCallbacks
    def test_client_gone_during_write(self):
        yield self.stop_serving()
        slow = SlowRoster(self.roster)
        self.serve(slow)
        headers = Headers({b"authorization": [b"Bearer " + TOKEN.encode()]})
        body = Body(json.dumps({"fingerprint": FP1}).encode())
        request = self.agent.request(
            b"PUT", (self.base + endpoint_path("conf", TLS_A)).encode(), headers, body)
        request.addErrback(lambda failure: None)  # cancelled below
        yield slow.started
        request.cancel()
        # Let the server notice the connection is gone, then finish the write.
        yield self.stop_serving()
        slow.gate.callback(None)
        # Waiting on the roster's Deferred runs after the API's own callbacks.
        yield slow.pending
        registration = self.roster.lookup(TLS_A)
        self.assertEqual(registration.fingerprint, FP1)
        self.assertEqual(len(self.stored()[0]), 1)
        # trial fails the test if anything was logged as an error.
