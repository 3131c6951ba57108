"""
The Key Distributor's HTTP/JSON control API, through which signalling
registers endpoints in conferences.

Every request (but the three operations paths below) carries
``Authorization: Bearer <token>`` (see :mod:`perc.apitoken`).  Routes (path
segments are percent-decoded, so a tls-id containing ``/`` is sent as ``%2F``):

``PUT /v1/conferences/{conference}/endpoints/{tls_id}``
    Body ``{"fingerprint": "sha-256 AB:CD:..."}`` (a JSON object with exactly
    that member; any content type).  201 when created, 200 when replaced;
    the body is the registration:
    ``{"conference", "tls_id", "fingerprint", "kd_tls_id"}``.
``GET /v1/conferences/{conference}/endpoints/{tls_id}``
    200 with the registration, 404 if that tls-id is not in that conference.
``DELETE /v1/conferences/{conference}/endpoints/{tls_id}``
    204, or 404.
``POST /v1/conferences/{conference}/rekey``
    A new EKTKey (new SPI) for the conference, sent to each of its live
    endpoints; 200 with ``{"conference", "ekt_spi", "endpoints"}``.
``GET /v1/conferences/{conference}/endpoints``
    200 with ``{"conference": ..., "endpoints": [registration, ...]}``
    ordered by tls-id; an empty list for a conference nobody registered in.
``GET /v1/status``
    200 with ``{"associations", "established", "tunnels", "counters",
    "dtls_objects", "registrations", "store_writes"}``: what the Key
    Distributor holds now (``store_writes``: association writes waiting for
    their group commit, in flight, transactions and writes so far, refused,
    sent again).
``GET /metrics``, ``GET /healthz``, ``GET /readyz``
    Without a token: see :class:`perc.httpapi.OperationsResource`.

Errors have a JSON body ``{"error": "<one line>"}``:

- 400: malformed conference, tls-id or fingerprint, unknown hash function,
  body not UTF-8 JSON, not an object, missing or extra members;
- 401 (with ``WWW-Authenticate: Bearer``): token missing or wrong — checked
  before anything else, so unauthenticated clients learn nothing about paths;
- 404: unknown path or registration;  405 (with ``Allow``): wrong method;
- 409: the tls-id is already registered in another conference;
- 413: body larger than :data:`MAX_BODY` octets (not even buffered);
- 507: the roster holds its maximum number of registrations (the store is
  full; retrying will not help until something is deleted);
- 500: the database failed.

Nothing is stored in any error case.
"""

from __future__ import annotations

from urllib.parse import quote

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import http, server

from perc.httpapi import (
    MAX_BODY,
    BodyError,
    error_response,
    json_response,
    make_site,
    not_allowed,
    parse_json_object,
    peer,
    TokenAPI,
)
from perc.kd.roster import (
    InvalidRegistration,
    RegistrationConflict,
    RosterFull,
    StorageError,
    validate_conference,
    validate_tls_id,
)

__all__ = ["MAX_BODY", "ControlAPI", "make_api_site"]

log = Logger()

#: Status for a full roster (RFC 4918 "Insufficient Storage").
INSUFFICIENT_STORAGE = http.INSUFFICIENT_STORAGE_SPACE


def _parse_put_body(data: bytes) -> str:
    """The fingerprint member of a PUT body; raises InvalidRegistration."""
    try:
        body = parse_json_object(data, {"fingerprint": str}, '{"fingerprint": "..."}')
    except BodyError as error:
        raise InvalidRegistration(str(error)) from None
    return body["fingerprint"]


def _endpoint_path(conference: str, tls_id: str) -> bytes:
    return "/v1/conferences/{}/endpoints/{}".format(
        quote(conference, safe=""), quote(tls_id, safe="")
    ).encode("ascii")


class ControlAPI(TokenAPI):
    """
    The whole API as one leaf resource that routes on the decoded path
    segments.  Changes go to ``roster``; requests must present ``token``.
    """

    def __init__(self, roster, token: str, rekey=None, status=None, operations=None):
        """
        ``rekey(conference) -> Deferred of (EktKey, endpoints)`` serves the rekey route,
        ``status() -> dict`` the status route, ``operations`` (an
        OperationsResource) the paths that need no token.
        """
        super().__init__(token, operations)
        self._roster = roster
        self._rekey = rekey
        self._status = status

    _json = staticmethod(json_response)
    _error = staticmethod(error_response)
    _not_allowed = staticmethod(not_allowed)

    # -- dispatch --------------------------------------------------------

    def route(self, request, segments):
        if segments == ["v1", "status"] and self._status is not None:
            if request.method != b"GET":
                return self._not_allowed(request, b"GET")
            document = self._status()
            document["registrations"] = len(self._roster)
            return self._json(request, http.OK, document)

        if (len(segments) == 4 and segments[:2] == ["v1", "conferences"]
                and segments[3] == "rekey" and self._rekey is not None):
            if request.method != b"POST":
                return self._not_allowed(request, b"POST")
            try:
                conference = validate_conference(segments[2])
            except InvalidRegistration as error:
                return self._error(request, http.BAD_REQUEST, str(error))

            def rekeyed(result):
                key, endpoints = result
                log.info("conference {conference} rekeyed (SPI {spi}, {endpoints} endpoints)",
                         conference=conference, spi=key.ekt_spi, endpoints=endpoints,
                         peer=peer(request))
                return self._json(request, http.OK, {
                    "conference": conference, "ekt_spi": key.ekt_spi, "endpoints": endpoints})

            # The new key is stored before it is sent (perc.kd.conference_keys).
            return self._respond_later(request, defer.maybeDeferred(self._rekey, conference),
                                       rekeyed, conference, None)

        if (
            len(segments) in (4, 5)
            and segments[0] == "v1"
            and segments[1] == "conferences"
            and segments[3] == "endpoints"
            and segments[-1] != ""
        ):
            method = request.method
            if len(segments) == 4:
                if method != b"GET":
                    return self._not_allowed(request, b"GET")
            elif method not in (b"GET", b"PUT", b"DELETE"):
                return self._not_allowed(request, b"GET, PUT, DELETE")
            try:
                conference = validate_conference(segments[2])
                tls_id = validate_tls_id(segments[4]) if len(segments) == 5 else None
            except InvalidRegistration as error:
                return self._error(request, http.BAD_REQUEST, str(error))
            if tls_id is None:
                return self._list(request, conference)
            if method == b"PUT":
                return self._put(request, conference, tls_id)
            if method == b"DELETE":
                return self._delete(request, conference, tls_id)
            return self._get(request, conference, tls_id)

        return self._error(request, http.NOT_FOUND, "no such resource")

    # -- routes ----------------------------------------------------------

    def _list(self, request, conference: str) -> bytes:
        return self._json(
            request,
            http.OK,
            {
                "conference": conference,
                "endpoints": [r.to_json() for r in self._roster.list(conference)],
            },
        )

    def _get(self, request, conference: str, tls_id: str) -> bytes:
        registration = self._roster.get(conference, tls_id)
        if registration is None:
            return self._error(
                request,
                http.NOT_FOUND,
                "tls-id {} is not registered in conference {}".format(tls_id, conference),
            )
        return self._json(request, http.OK, registration.to_json())

    def _put(self, request, conference: str, tls_id: str):
        if request.bodyTooLarge:
            return self._error(
                request,
                http.REQUEST_ENTITY_TOO_LARGE,
                "request body larger than {} octets".format(MAX_BODY),
            )
        try:
            fingerprint = _parse_put_body(request.content.getvalue())
        except InvalidRegistration as error:
            return self._error(request, http.BAD_REQUEST, str(error))

        def stored(result):
            registration, created = result
            log.info(
                "registration {action}: conference={conference} tls_id={tls_id} "
                "fingerprint={fingerprint}",
                action="created" if created else "replaced",
                conference=conference,
                tls_id=tls_id,
                fingerprint=registration.fingerprint,
                kd_tls_id=registration.kd_tls_id,
                peer=peer(request),
            )
            if created:
                request.setHeader(b"location", _endpoint_path(conference, tls_id))
            return self._json(
                request, http.CREATED if created else http.OK, registration.to_json()
            )

        return self._respond_later(
            request, self._roster.put(conference, tls_id, fingerprint), stored,
            conference, tls_id,
        )

    def _delete(self, request, conference: str, tls_id: str):
        def deleted(found):
            if not found:
                return self._error(
                    request,
                    http.NOT_FOUND,
                    "tls-id {} is not registered in conference {}".format(
                        tls_id, conference
                    ),
                )
            log.info(
                "registration {action}: conference={conference} tls_id={tls_id}",
                action="deleted",
                conference=conference,
                tls_id=tls_id,
                peer=peer(request),
            )
            request.setResponseCode(http.NO_CONTENT)
            return b""

        return self._respond_later(
            request, self._roster.delete(conference, tls_id), deleted,
            conference, tls_id,
        )

    def _respond_later(self, request, d: defer.Deferred, on_success, conference, tls_id):
        """
        Finish ``request`` when the roster's Deferred ``d`` fires.  The change
        goes on even if the client disconnects meanwhile; its answer is then
        dropped.
        """
        gone = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def failed(failure):
            if failure.check(InvalidRegistration):
                return self._error(request, http.BAD_REQUEST, str(failure.value))
            if failure.check(RegistrationConflict):
                return self._error(request, http.CONFLICT, str(failure.value))
            if failure.check(RosterFull):
                return self._error(request, INSUFFICIENT_STORAGE, str(failure.value))
            if failure.check(StorageError):
                # The roster has logged the database's failure already.
                log.error(
                    "registration change failed: conference={conference} "
                    "tls_id={tls_id}: {error}",
                    conference=conference,
                    tls_id=tls_id,
                    error=str(failure.value),
                )
            else:
                log.failure(
                    "registration change failed: conference={conference} tls_id={tls_id}",
                    failure=failure,
                    conference=conference,
                    tls_id=tls_id,
                )
            return self._error(
                request,
                http.INTERNAL_SERVER_ERROR,
                "the Key Distributor could not store the change",
            )

        def finish(body):
            if gone:
                return
            if body:
                request.write(body)
            request.finish()

        d.addCallbacks(on_success, failed)
        d.addCallback(finish)
        d.addErrback(lambda failure: log.failure("control API response failed", failure=failure))
        return server.NOT_DONE_YET


def make_api_site(roster, token: str, rekey=None, status=None, operations=None) -> server.Site:
    """A ``Site`` serving the control API for ``roster``, guarded by ``token``."""
    return make_site(ControlAPI(roster, token, rekey, status, operations))
