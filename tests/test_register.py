"""
Tests for ``perc register`` (perc.scripts.register) against a live control API on
loopback.
"""

import io
import os
import sys

from twisted.internet import defer, protocol, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource, server

import perc
from perc.errors import ConfigError
from perc.scripts.register import (
    RegisterOptions,
    check_api_url,
    endpoint_url,
    put_json,
    register_with_key_distributor,
)
from tests.test_kd_api import FP1, FP2, TLS_A, TLS_B, TLS_SLASH, TOKEN, APITestsBase

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(perc.__file__)))


class Fixed(resource.Resource):
    """Answers every request with a fixed status and body."""

    isLeaf = True

    def __init__(self, code, body):
        super().__init__()
        self.code, self.body = code, body

    def render(self, request):
        request.setResponseCode(self.code)
        return self.body


class Silent(protocol.Protocol):
    """Accepts a connection and never answers."""

    def connectionMade(self):
        self.factory.connections.append(self)
        self.lost = defer.Deferred()

    def connectionLost(self, reason):
        self.lost.callback(None)


class RegisterTestsBase(APITestsBase):
    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.token_file = os.path.abspath(self.mktemp())
        with open(self.token_file, "w") as handle:
            handle.write(TOKEN + "\n")

    def argv(self, **overrides):
        options = {
            "kd-api": self.base,
            "token-file": self.token_file,
            "conference": "conf",
            "tls-id": TLS_A,
            "fingerprint": FP1,
        }
        options.update(overrides)
        argv = []
        for name, value in options.items():
            if value is not None:
                argv += ["--" + name, value]
        return argv

    def options(self, **overrides):
        options = RegisterOptions()
        options.parseOptions(self.argv(**overrides))
        return options

    @defer.inlineCallbacks
    def register(self, **overrides):
        out, err = io.StringIO(), io.StringIO()
        result = yield self.options(**overrides).register(reactor, agent=self.agent, out=out, err=err)
        return result, out.getvalue(), err.getvalue()

    @defer.inlineCallbacks
    def assertRegisterFails(self, *fragments, **overrides):
        with self.assertRaises(ConfigError) as caught:
            yield self.register(**overrides)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message


class RegisterInProcessTests(RegisterTestsBase):
    @defer.inlineCallbacks
    def test_registers_and_prints_kd_tls_id(self):
        kd_tls_id, out, err = yield self.register()
        registration = self.roster.get("conf", TLS_A)
        self.assertEqual(registration.fingerprint, FP1)
        self.assertEqual(kd_tls_id, registration.kd_tls_id)
        self.assertEqual(out, registration.kd_tls_id + "\n")
        self.assertIn("registered", err)

    @defer.inlineCallbacks
    def test_reregistering_prints_same_kd_tls_id(self):
        first, _, _ = yield self.register()
        second, out, err = yield self.register(fingerprint=FP2.lower())
        self.assertEqual(second, first)
        self.assertEqual(out.splitlines()[-1], first)
        self.assertIn("re-registered", err)
        self.assertEqual(self.roster.lookup(TLS_A).fingerprint, FP2)

    @defer.inlineCallbacks
    def test_tls_id_with_slash(self):
        kd_tls_id, out, _ = yield self.register(**{"tls-id": TLS_SLASH})
        self.assertEqual(self.roster.get("conf", TLS_SLASH).kd_tls_id, kd_tls_id)

    @defer.inlineCallbacks
    def test_base_url_with_trailing_slash(self):
        kd_tls_id, _, _ = yield self.register(**{"kd-api": self.base + "/"})
        self.assertEqual(self.roster.lookup(TLS_A).kd_tls_id, kd_tls_id)

    @defer.inlineCallbacks
    def test_conflict_shows_server_error(self):
        yield self.register()
        message = yield self.assertRegisterFails("409", "already registered", conference="other")
        self.assertIsNone(self.roster.get("other", TLS_A))
        self.assertIn("Key Distributor", message)

    @defer.inlineCallbacks
    def test_wrong_token(self):
        with open(self.token_file, "w") as handle:
            handle.write("not-the-token\n")
        yield self.assertRegisterFails("401", "token")
        self.assertIsNone(self.roster.lookup(TLS_A))

    @defer.inlineCallbacks
    def test_invalid_inputs_refused_before_sending(self):
        for overrides, fragment in (({"tls-id": "short"}, "tls-id"),
                                    ({"tls-id": TLS_A + "\n"}, "tls-id"),
                                    ({"conference": "bad conf"}, "conference"),
                                    ({"fingerprint": "sha-256 AB"}, "fingerprint"),
                                    ({"kd-api": "ftp://host/"}, "--kd-api"),
                                    ({"kd-api": "http://"}, "--kd-api"),
                                    ({"kd-api": "http://host:port"}, "--kd-api"),
                                    ({"token-file": self.token_file + ".missing"}, ".missing")):
            yield self.assertRegisterFails(fragment, **overrides)
        self.assertEqual(len(self.roster), 0)

    @defer.inlineCallbacks
    def test_connection_refused(self):
        yield self.stop_serving()
        yield self.assertRegisterFails("cannot reach the Key Distributor API", self.base, "connection refused")

    @defer.inlineCallbacks
    def test_unusable_answers(self):
        for code, body, fragment in ((200, b"not json", "unusable answer"),
                                     (201, b'{"kd_tls_id": "short"}', "tls-id"),
                                     (201, b'{"kd_tls_id": "KdTlsId-0123456789abcdef\\n"}',
                                      "tls-id"),
                                     (200, b"[]", "not a JSON object"),
                                     (502, b"<html>bad gateway</html>", "502"),
                                     (400, b'{"error": "line one\\nline two"}', "line one line two")):
            yield self.stop_serving()
            site = server.Site(Fixed(code, body))
            site.noisy = False
            port = reactor.listenTCP(0, site, interface="127.0.0.1")
            self.base = "http://127.0.0.1:{}".format(port.getHost().port)
            self.stop_serving = port.stopListening
            self.addCleanup(port.stopListening)
            yield self.assertRegisterFails(fragment)

    @defer.inlineCallbacks
    def test_timeout(self):
        factory = protocol.Factory.forProtocol(Silent)
        factory.connections = []
        factory.noisy = False
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = "http://127.0.0.1:{}".format(port.getHost().port)
        with self.assertRaises(ConfigError) as caught:
            yield put_json(self.agent, endpoint_url(url, "conf", TLS_A), TOKEN,
                           {"fingerprint": FP1}, reactor=reactor, timeout=0.2,
                           what="the test server")
        self.assertEqual(str(caught.exception), "cannot reach the test server: no answer in time")
        yield defer.gatherResults([c.lost for c in factory.connections])

    @defer.inlineCallbacks
    def test_register_with_key_distributor(self):
        registration, created = yield register_with_key_distributor(
            self.agent, self.base, TOKEN, "conf", TLS_B, FP2)
        self.assertTrue(created)
        self.assertEqual(registration, self.roster.get("conf", TLS_B).to_json())
        registration, created = yield register_with_key_distributor(
            self.agent, self.base, TOKEN, "conf", TLS_B, FP2)
        self.assertFalse(created)


class RegisterOptionsTests(SynchronousTestCase):
    def test_missing_options(self):
        with self.assertRaises(usage.UsageError) as caught:
            RegisterOptions().parseOptions(["--kd-api", "http://127.0.0.1:1", "--conference", "c"])
        for name in ("--token-file", "--tls-id", "--fingerprint"):
            self.assertIn(name, str(caught.exception))

    def test_bad_timeout(self):
        argv = ["--kd-api", "http://h", "--token-file", "t", "--conference", "c",
                "--tls-id", TLS_A, "--fingerprint", FP1]
        for value in ("0", "-1", "nan", "inf"):
            with self.assertRaises(usage.UsageError):
                RegisterOptions().parseOptions(argv + ["--timeout", value])

    def test_check_api_url(self):
        self.assertEqual(check_api_url("http://127.0.0.1:8480/", "kd-api"), "http://127.0.0.1:8480")
        self.assertEqual(check_api_url("https://kd.example/api", "kd-api"), "https://kd.example/api")
        for bad in ("127.0.0.1:8480", "ftp://h", "http://", "http://h?x=1", "http://h#f", "http://h:99999"):
            with self.assertRaises(ConfigError, msg=bad):
                check_api_url(bad, "kd-api")

    def test_endpoint_url_quotes(self):
        self.assertEqual(endpoint_url("http://h:1/base/", "c.1", "a/b+c_d-" + "x" * 12),
                         b"http://h:1/base/v1/conferences/c.1/endpoints/a%2Fb%2Bc_d-" + b"x" * 12)


class RegisterCommandTests(RegisterTestsBase):
    """The real ``perc`` command, in a fresh process, through perc.scripts.cli.main."""

    def perc(self, *argv):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [CHECKOUT, env.get("PYTHONPATH")]))
        return getProcessOutputAndValue(
            sys.executable,
            ["-c", "import sys; from perc.scripts.cli import main; sys.exit(main(sys.argv[1:]))"] + list(argv),
            env=env, path=CHECKOUT)

    def assertOneLineError(self, result, *fragments):
        out, err, code = result
        self.assertEqual(code, 1, (out, err))
        self.assertEqual(out, b"")
        lines = err.decode().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith("perc register: "), lines)
        for fragment in fragments:
            self.assertIn(fragment, lines[0])

    @defer.inlineCallbacks
    def test_prints_kd_tls_id(self):
        out, err, code = yield self.perc("register", *self.argv())
        self.assertEqual(code, 0, err)
        registration = self.roster.get("conf", TLS_A)
        self.assertIsNotNone(registration)
        self.assertEqual(out.decode().splitlines()[-1], registration.kd_tls_id)
        # Run again: same value (the registration is replaced, not recreated).
        out, err, code = yield self.perc("register", *self.argv(fingerprint=FP2))
        self.assertEqual(code, 0, err)
        self.assertEqual(out.decode().splitlines()[-1], registration.kd_tls_id)

    @defer.inlineCallbacks
    def test_errors_are_one_line(self):
        yield self.perc("register", *self.argv())
        result = yield self.perc("register", *self.argv(conference="other"))
        self.assertOneLineError(result, "409", "already registered")
        result = yield self.perc("register", *self.argv(**{"token-file": self.token_file + ".missing"}))
        self.assertOneLineError(result, "cannot read token file", ".missing")
        result = yield self.perc("register", *self.argv(**{"tls-id": "short"}))
        self.assertOneLineError(result, "tls-id")
        yield self.stop_serving()
        result = yield self.perc("register", *self.argv(**{"tls-id": TLS_B}))
        self.assertOneLineError(result, "connection refused")
        self.assertEqual([r.tls_id for r in self.roster.list("conf")], [TLS_A])

    @defer.inlineCallbacks
    def test_missing_option_is_usage_error(self):
        out, err, code = yield self.perc("register", "--kd-api", self.base)
        self.assertEqual(code, 2)
        self.assertIn(b"missing options", err)
