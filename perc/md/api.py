"""
The Media Distributor's HTTP/JSON control API: conference membership (which
conference an endpoint's tls-id belongs to) and status.

Every request (but the three operations paths below) carries
``Authorization: Bearer <token>``.

``PUT /v1/conferences/{conference}/endpoints/{tls_id}``
    Body ``{}``.  201 created, 200 replaced; body
    ``{"conference": ..., "tls_id": ...}``.
``GET /v1/conferences/{conference}/endpoints/{tls_id}``
    200 or 404.
``DELETE /v1/conferences/{conference}/endpoints/{tls_id}``
    204 (the endpoint's live associations end and EndpointDisconnect goes to
    the Key Distributor) or 404.
``GET /v1/conferences/{conference}/endpoints``
    200 ``{"conference": ..., "endpoints": [{"conference", "tls_id"}, ...]}``.
``GET /v1/status``
    200: tunnels (state, version, associations), endpoint counts, counters.
``GET /metrics``, ``GET /healthz``, ``GET /readyz``
    Without a token: see :class:`perc.httpapi.OperationsResource`.

Errors are ``{"error": "..."}``: 400 bad input, 401 no or wrong token, 404,
405, 413 body too large, 507 membership table full.  Nothing is stored on
error.
"""

from __future__ import annotations

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
from perc.kd.roster import InvalidRegistration, validate_conference, validate_tls_id
from perc.md.conference import MembershipsFull

__all__ = ["MediaDistributorAPI", "make_api_site"]

log = Logger()


class MediaDistributorAPI(TokenAPI):
    def __init__(self, memberships, status, token: str, operations=None):
        """
        ``status()`` returns the JSON-serialisable status document;
        ``operations`` (an OperationsResource) serves the paths that need no token.
        """
        super().__init__(token, operations)
        self._memberships = memberships
        self._status = status

    def route(self, request, segments):
        method = request.method
        if segments == ["v1", "status"]:
            if method != b"GET":
                return not_allowed(request, b"GET")
            return json_response(request, http.OK, self._status())
        if (len(segments) in (4, 5) and segments[:2] == ["v1", "conferences"]
                and segments[3] == "endpoints" and segments[-1] != ""):
            if len(segments) == 4 and method != b"GET":
                return not_allowed(request, b"GET")
            if len(segments) == 5 and method not in (b"GET", b"PUT", b"DELETE"):
                return not_allowed(request, b"GET, PUT, DELETE")
            try:
                conference = validate_conference(segments[2])
                tls_id = validate_tls_id(segments[4]) if len(segments) == 5 else None
            except InvalidRegistration as error:
                return error_response(request, http.BAD_REQUEST, str(error))
            if tls_id is None:
                return json_response(request, http.OK, {
                    "conference": conference,
                    "endpoints": [{"conference": conference, "tls_id": t}
                                  for t in self._memberships.members(conference)]})
            if method == b"PUT":
                return self._put(request, conference, tls_id)
            if method == b"DELETE":
                return self._delete(request, conference, tls_id)
            if not self._memberships.get(conference, tls_id):
                return error_response(request, http.NOT_FOUND, "tls-id {} is not in conference "
                                      "{}".format(tls_id, conference))
            return json_response(request, http.OK, {"conference": conference, "tls_id": tls_id})
        return error_response(request, http.NOT_FOUND, "no such resource")

    def _put(self, request, conference: str, tls_id: str) -> bytes:
        if request.bodyTooLarge:
            return error_response(request, http.REQUEST_ENTITY_TOO_LARGE,
                                  "request body larger than {} octets".format(MAX_BODY))
        try:
            parse_json_object(request.content.getvalue(), {}, "{}")
            created = self._memberships.put(conference, tls_id)
        except (BodyError, InvalidRegistration) as error:
            return error_response(request, http.BAD_REQUEST, str(error))
        except MembershipsFull as error:
            return error_response(request, http.INSUFFICIENT_STORAGE_SPACE, str(error))
        log.info("membership {action}: conference={conference} tls_id={tls_id}",
                 action="created" if created else "replaced", conference=conference,
                 tls_id=tls_id, peer=peer(request))
        return json_response(request, http.CREATED if created else http.OK,
                             {"conference": conference, "tls_id": tls_id})

    def _delete(self, request, conference: str, tls_id: str) -> bytes:
        if not self._memberships.delete(conference, tls_id):
            return error_response(request, http.NOT_FOUND, "tls-id {} is not in conference "
                                  "{}".format(tls_id, conference))
        log.info("membership {action}: conference={conference} tls_id={tls_id}",
                 action="deleted", conference=conference, tls_id=tls_id, peer=peer(request))
        request.setResponseCode(http.NO_CONTENT)
        return b""


def make_api_site(memberships, status, token: str, operations=None) -> server.Site:
    return make_site(MediaDistributorAPI(memberships, status, token, operations))
