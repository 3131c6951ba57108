"""
``perc register``: tell the Key Distributor that an endpoint (tls-id and
certificate fingerprint) may join a conference.

On success the Key Distributor's tls-id for that endpoint is printed alone on
the last line of standard output (progress goes to standard error), so that
``KD_TLS_ID=$(perc register ...)`` works; signalling puts that value in the
SDP answer (``a=tls-id:``).

Each distributor is one small function (:func:`register_with_key_distributor`)
built on :func:`put_json`; :meth:`RegisterOptions.register` calls them in turn,
so registering with the Media Distributor as well only needs its own options
and one more call there.
"""

from __future__ import annotations

import json
import math
import sys
from urllib.parse import quote, urlsplit

from twisted.internet import defer, error as ierror
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseNeverReceived,
    readBody,
)
from twisted.web.http import RESPONSES
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from perc import __version__
from perc.apitoken import read_token
from perc.errors import ConfigError
from perc.kd.roster import (
    InvalidRegistration,
    validate_conference,
    validate_fingerprint,
    validate_tls_id,
)
from perc.options import CommandOptions

__all__ = [
    "RegisterOptions",
    "check_api_url",
    "endpoint_url",
    "put_json",
    "register_with_key_distributor",
    "run_in_reactor",
]

DEFAULT_TIMEOUT = 30.0


# -- HTTP plumbing shared by every target -------------------------------------


@implementer(IBodyProducer)
class _BytesProducer:
    """A request body already in memory, written at once."""

    def __init__(self, body: bytes):
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer):
        consumer.write(self._body)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


def check_api_url(url: str, option: str) -> str:
    """
    ``url`` without trailing slashes if it is an ``http``/``https`` URL with a
    host and no query or fragment; else raise :class:`ConfigError`.
    """
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError as error:
        raise ConfigError("--{}: invalid URL {!r}: {}".format(option, url, error)) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            "--{}: {!r} is not an http:// or https:// URL with a host".format(option, url)
        )
    if parts.query or parts.fragment:
        raise ConfigError("--{}: {!r} must not have a query or fragment".format(option, url))
    return url.rstrip("/")


def endpoint_url(api_url: str, conference: str, tls_id: str) -> bytes:
    """The URL of one endpoint's registration below an API's base URL."""
    return "{}/v1/conferences/{}/endpoints/{}".format(
        api_url.rstrip("/"), quote(conference, safe=""), quote(tls_id, safe="")
    ).encode("ascii")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _connection_problem(failure: Failure) -> str:
    """A short description of why no HTTP answer came."""
    value = failure.value
    if isinstance(value, (ResponseNeverReceived, RequestTransmissionFailed)):
        reasons = [r for r in value.reasons if not r.check(ierror.ConnectionDone)]
        if reasons:
            return _connection_problem(reasons[0])
        return "the connection closed before an answer came"
    if isinstance(value, ierror.ConnectionRefusedError):
        return "connection refused"
    if isinstance(value, ierror.DNSLookupError):
        return "host name not found"
    if isinstance(value, (ierror.TimeoutError, defer.TimeoutError, defer.CancelledError)):
        return "no answer in time"
    if isinstance(value, ierror.ConnectError) and value.osError:
        return _one_line(value.osError).rstrip(".")
    return _one_line(value).rstrip(".") or type(value).__name__


@defer.inlineCallbacks
def put_json(
    agent, url: bytes, token: str, body: dict, reactor=None,
    timeout: float = DEFAULT_TIMEOUT, what: str | None = None, method: bytes = b"PUT",
):
    """
    PUT (or ``method``) ``body`` as JSON to ``url`` with ``Authorization: Bearer token``.
    Fires with ``(status code, decoded JSON answer or None)``; fails with
    :class:`ConfigError` ("cannot reach <what>: <reason>") when no answer
    comes (connection refused, timeout after ``timeout`` seconds when a
    ``reactor`` is given, ...).
    """
    headers = Headers(
        {
            b"authorization": [b"Bearer " + token.encode("ascii")],
            b"content-type": [b"application/json"],
            b"accept": [b"application/json"],
            b"user-agent": ["perc/{}".format(__version__).encode("ascii")],
        }
    )
    payload = json.dumps(body).encode("utf-8")
    where = what or url.decode("ascii")
    try:
        d = agent.request(method, url, headers, _BytesProducer(payload))
        if reactor is not None:
            d.addTimeout(timeout, reactor)
        response = yield d
        data = yield readBody(response)
    except Exception:
        raise ConfigError(
            "cannot reach {}: {}".format(where, _connection_problem(Failure()))
        ) from None
    try:
        answer = json.loads(data.decode("utf-8"))
    except ValueError:
        answer = None
    return response.code, answer


def _refusal(who: str, code: int, answer) -> ConfigError:
    reason = RESPONSES.get(code, b"").decode("ascii", "replace")
    status = "{} {}".format(code, reason).strip()
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        return ConfigError(
            "{} refused the registration ({}): {}".format(who, status, _one_line(answer["error"]))
        )
    return ConfigError("{} refused the registration ({})".format(who, status))


# -- one function per distributor ---------------------------------------------


@defer.inlineCallbacks
def register_with_key_distributor(
    agent, api_url: str, token: str, conference: str, tls_id: str, fingerprint: str,
    reactor=None, timeout: float = DEFAULT_TIMEOUT,
):
    """
    Register an endpoint with the Key Distributor's control API at
    ``api_url``.  Fires with ``(registration, created)``, ``registration``
    being the API's JSON object (with ``kd_tls_id``); fails with
    :class:`ConfigError` carrying one line for the user.
    """
    who = "the Key Distributor"
    url = endpoint_url(api_url, conference, tls_id)
    code, answer = yield put_json(
        agent, url, token, {"fingerprint": fingerprint}, reactor=reactor,
        timeout=timeout, what="{} API at {}".format(who, api_url),
    )
    if code not in (200, 201):
        raise _refusal(who, code, answer)
    try:
        if not isinstance(answer, dict):
            raise InvalidRegistration("not a JSON object")
        validate_tls_id(answer.get("kd_tls_id"))
    except InvalidRegistration as error:
        raise ConfigError(
            "{} at {} gave an unusable answer: {}".format(who, api_url, error)
        ) from None
    return answer, code == 201


@defer.inlineCallbacks
def register_with_media_distributor(
    agent, api_url: str, token: str, conference: str, tls_id: str,
    reactor=None, timeout: float = DEFAULT_TIMEOUT,
):
    """
    Place an endpoint's tls-id in a conference on the Media Distributor's
    control API.  Fires with ``created``; fails with :class:`ConfigError`.
    """
    who = "the Media Distributor"
    code, answer = yield put_json(
        agent, endpoint_url(api_url, conference, tls_id), token, {}, reactor=reactor,
        timeout=timeout, what="{} API at {}".format(who, api_url),
    )
    if code not in (200, 201):
        raise _refusal(who, code, answer)
    return code == 201


# -- running it -----------------------------------------------------------------


def run_in_reactor(function):
    """
    Run ``function(reactor)`` (which may return a Deferred) in the global
    reactor, stop the reactor, and return its result or raise its exception.
    For commands run once per process; interruption raises ConfigError.
    """
    from twisted.internet import reactor

    outcome = []

    def start():
        d = defer.maybeDeferred(function, reactor)
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    if not outcome:
        raise ConfigError("interrupted")
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


class RegisterOptions(CommandOptions):
    synopsis = (
        "--kd-api URL --token-file FILE --conference NAME --tls-id TLS-ID "
        "--fingerprint 'sha-256 AB:CD:...'"
    )
    longdesc = (
        "Register an endpoint with the Key Distributor: its tls-id (RFC 8842) "
        "and certificate fingerprint (RFC 8122) may join the conference. Prints "
        "the Key Distributor's tls-id for that endpoint alone on the last line "
        "of standard output."
    )
    optParameters = [
        ["kd-api", None, None, "Base URL of the Key Distributor's control API, e.g. http://127.0.0.1:4741"],
        ["token-file", None, None, "File holding the Key Distributor's API token"],
        ["conference", None, None, "Conference name (A-Z a-z 0-9 . _ -)"],
        ["tls-id", None, None, "The endpoint's tls-id (20-255 of A-Z a-z 0-9 + / - _)"],
        ["fingerprint", None, None, "The endpoint's certificate fingerprint, e.g. 'sha-256 AB:CD:...'"],
        ["md-api", None, None,
         "Base URL of the Media Distributor's control API (optional): the tls-id is "
         "placed in the conference there too"],
        ["md-token-file", None, None, "File holding the Media Distributor's API token"],
        ["timeout", None, DEFAULT_TIMEOUT, "Seconds to wait for each answer", float],
    ]

    def postOptions(self):
        missing = [
            "--" + name
            for name in ("kd-api", "token-file", "conference", "tls-id", "fingerprint")
            if not self[name]
        ]
        if missing:
            raise usage.UsageError("missing option{}: {}".format(
                "s" if len(missing) > 1 else "", ", ".join(missing)))
        if bool(self["md-api"]) != bool(self["md-token-file"]):
            raise usage.UsageError("--md-api and --md-token-file go together")
        if not (math.isfinite(self["timeout"]) and self["timeout"] > 0):
            raise usage.UsageError("--timeout must be a positive number of seconds")

    def _checked(self):
        """The validated inputs; raises ConfigError."""
        try:
            conference = validate_conference(self["conference"])
            tls_id = validate_tls_id(self["tls-id"])
            fingerprint = validate_fingerprint(self["fingerprint"])
        except InvalidRegistration as error:
            raise ConfigError(str(error)) from None
        kd_api = check_api_url(self["kd-api"], "kd-api")
        kd_token = read_token(self["token-file"])
        md = None
        if self["md-api"]:
            md = (check_api_url(self["md-api"], "md-api"), read_token(self["md-token-file"]))
        return conference, tls_id, fingerprint, kd_api, kd_token, md

    @defer.inlineCallbacks
    def register(self, reactor, agent=None, out=None, err=None):
        """
        Do the registration; fires with the Key Distributor's tls-id for the
        endpoint after printing it.
        """
        out = sys.stdout if out is None else out
        err = sys.stderr if err is None else err
        conference, tls_id, fingerprint, kd_api, kd_token, md = self._checked()
        if agent is None:
            agent = Agent(
                reactor,
                connectTimeout=self["timeout"],
                pool=HTTPConnectionPool(reactor, persistent=False),
            )
        registration, created = yield register_with_key_distributor(
            agent, kd_api, kd_token, conference, tls_id, fingerprint,
            reactor=reactor, timeout=self["timeout"],
        )
        print(
            "perc register: Key Distributor: {} tls-id {} in conference {}".format(
                "registered" if created else "re-registered", tls_id, conference
            ),
            file=err,
        )
        if md is not None:
            md_api, md_token = md
            created = yield register_with_media_distributor(
                agent, md_api, md_token, conference, tls_id, reactor=reactor,
                timeout=self["timeout"])
            print("perc register: Media Distributor: {} tls-id {} in conference {}".format(
                "placed" if created else "re-placed", tls_id, conference), file=err)
        print(registration["kd_tls_id"], file=out)
        out.flush()
        return registration["kd_tls_id"]

    def run(self):
        # Check everything that needs no network before starting the reactor.
        self._checked()
        run_in_reactor(self.register)
        return 0
