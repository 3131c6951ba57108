"""
What the two distributors' HTTP/JSON control APIs share: a request class
that bounds bodies, bearer-token checking, JSON bodies and responses, and
the paths served without a token (metrics and health).
"""

from __future__ import annotations

import json
from io import BytesIO

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import http, resource, server

from perc.apitoken import bearer_token_matches
from perc.metrics import CONTENT_TYPE, exposition

__all__ = ["MAX_BODY", "APIRequest", "BodyError", "json_response", "error_response",
           "not_allowed", "refuse_unauthenticated", "parse_json_object", "peer", "make_site",
           "OperationsResource", "TokenAPI"]

log = Logger()

#: Largest request body accepted, in octets.
MAX_BODY = 64 * 1024

_JSON = b"application/json"


class APIRequest(server.Request):
    """
    A request whose body is kept in memory up to :attr:`maxBody` octets;
    anything beyond is discarded as it arrives and the request is marked
    :attr:`bodyTooLarge`, so an oversized body costs neither memory nor disk.
    """

    maxBody = MAX_BODY
    bodyTooLarge = False

    def gotLength(self, length):
        if length is not None and length > self.maxBody:
            self.bodyTooLarge = True
        self.content = BytesIO()

    def handleContentChunk(self, data):
        if self.bodyTooLarge:
            return
        if self.content.tell() + len(data) > self.maxBody:
            self.bodyTooLarge = True
            self.content = BytesIO()
            return
        self.content.write(data)


class BodyError(ValueError):
    """A request body that is not the JSON object a route expects."""


def json_response(request, code: int, body) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", _JSON)
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, sort_keys=True).encode("utf-8") + b"\n"


def error_response(request, code: int, message: str) -> bytes:
    return json_response(request, code, {"error": message})


def not_allowed(request, allowed: bytes) -> bytes:
    request.setHeader(b"allow", allowed)
    return error_response(
        request, http.NOT_ALLOWED, "method {} not allowed here; allowed: {}".format(
            request.method.decode("ascii", "replace"), allowed.decode("ascii")))


def peer(request) -> str:
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    return "{}:{}".format(host, getattr(address, "port", "")) if host else str(address)


def refuse_unauthenticated(request, token: str) -> bytes | None:
    """
    None when the request carries ``Authorization: Bearer <token>``;
    otherwise the 401 response body to return (logged, never the token).
    """
    if bearer_token_matches(request.requestHeaders.getRawHeaders(b"authorization"), token):
        return None
    presented = request.requestHeaders.hasHeader(b"authorization")
    log.warn("control API request refused: {problem} from {peer}",
             problem="wrong token" if presented else "no token", peer=peer(request))
    challenge = b'Bearer realm="perc"'
    if presented:
        challenge += b', error="invalid_token"'
    request.setHeader(b"www-authenticate", challenge)
    return error_response(request, http.UNAUTHORIZED, "a valid bearer token is required")


def _reject_duplicates(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError("duplicate member {!r}".format(key))
        result[key] = value
    return result


def parse_json_object(data: bytes, members: dict[str, type], example: str) -> dict:
    """
    Parse a body that must be a JSON object with exactly ``members`` (name ->
    type); raises BodyError with a message fit for a 400 response.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BodyError("request body is not UTF-8") from None
    try:
        body = json.loads(text, object_pairs_hook=_reject_duplicates)
    except ValueError as error:
        raise BodyError("request body is not valid JSON: {}".format(
            str(error).splitlines()[0])) from None
    if not isinstance(body, dict):
        raise BodyError("request body must be a JSON object {}".format(example))
    extra = sorted(set(body) - set(members))
    if extra:
        raise BodyError("unexpected member{} in request body: {}".format(
            "s" if len(extra) > 1 else "", ", ".join(extra)))
    for name, kind in members.items():
        if name not in body:
            raise BodyError('request body lacks the "{}" member'.format(name))
        if not isinstance(body[name], kind):
            raise BodyError('"{}" must be a {}'.format(name, kind.__name__.replace("str", "string")))
    return body


def make_site(root) -> server.Site:
    """A quiet ``Site`` for an API resource, with bounded request bodies."""
    site = server.Site(root, requestFactory=APIRequest, parsePOSTFormSubmission=False,
                       timeout=60)
    site.displayTracebacks = False
    site.noisy = False
    return site


class TokenAPI(resource.Resource):
    """
    A control API as one leaf resource: :class:`OperationsResource`'s paths
    go to ``operations`` with no token; every other request must present
    ``token`` and is routed by :meth:`route` on its percent-decoded path
    segments (so a tls-id holding ``/`` travels as ``%2F``).
    """

    isLeaf = True

    def __init__(self, token: str, operations=None):
        super().__init__()
        self._token = token
        self._operations = operations

    def render(self, request):
        if self._operations is not None and self._operations.serves(request):
            return self._operations.render(request)
        refusal = refuse_unauthenticated(request, self._token)
        if refusal is not None:
            return refusal
        try:
            segments = [s.decode("utf-8") for s in request.postpath]
        except UnicodeDecodeError:
            return error_response(request, http.BAD_REQUEST, "path is not UTF-8")
        return self.route(request, segments)

    def route(self, request, segments: list[str]):
        """The answer (bytes or ``NOT_DONE_YET``) to an authenticated request."""
        raise NotImplementedError


class OperationsResource(resource.Resource):
    """
    ``GET /metrics`` (Prometheus text format), ``GET /healthz`` (200 while
    the process serves) and ``GET /readyz`` (200 or 503 with the reason),
    with no token: they carry no secrets.  The root of a ``--metrics``
    site, and what each control API hands these three paths to
    (:meth:`serves`) before it checks the token.

    ``readiness()`` returns ``(ready, reason)`` or a Deferred firing with it.
    """

    isLeaf = True
    PATHS = ([b"metrics"], [b"healthz"], [b"readyz"])

    def __init__(self, registry, readiness):
        super().__init__()
        self._registry = registry
        self._readiness = readiness

    def serves(self, request) -> bool:
        return request.postpath in self.PATHS

    def render(self, request):
        if not self.serves(request):
            return error_response(request, http.NOT_FOUND, "no such resource")
        if request.method not in (b"GET", b"HEAD"):
            return not_allowed(request, b"GET, HEAD")
        path = request.postpath[0]
        if path == b"metrics":
            request.setHeader(b"content-type", CONTENT_TYPE)
            request.setHeader(b"cache-control", b"no-store")
            return exposition(self._registry)
        if path == b"healthz":
            return json_response(request, http.OK, {"status": "serving"})
        return self._ready(request)

    def _ready(self, request):
        gone = []
        request.notifyFinish().addErrback(gone.append)

        def answer(result):
            ready, reason = result
            return json_response(request, http.OK if ready else http.SERVICE_UNAVAILABLE,
                                 {"ready": ready, "reason": reason})

        def failed(failure):
            log.failure("readiness check failed", failure=failure)
            return json_response(request, http.SERVICE_UNAVAILABLE,
                                 {"ready": False, "reason": "the readiness check failed"})

        def finish(body):
            if not gone:
                request.write(body)
                request.finish()

        d = defer.maybeDeferred(self._readiness)
        d.addCallbacks(answer, failed)
        d.addCallback(finish)
        d.addErrback(lambda failure: log.failure("readiness response failed", failure=failure))
        return server.NOT_DONE_YET
