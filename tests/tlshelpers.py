"""
Test helpers for TLS refusals: certificates a development CA issues with any
names and validity (expired ones included, which ``TlsCredentials`` refuses
to load from files), a client that presents no certificate, and a count of
the log events that give a reason.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, protocol, reactor, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS

from perc import pki
from perc.netutil import tls_client_endpoint
from perc.tls import TlsCredentials

WAIT = 20


def _ca(dev_pki: pki.DevPki):
    with open(dev_pki.ca_certificate, "rb") as source:
        ca = x509.load_pem_x509_certificate(source.read())
    with open(dev_pki.ca_key, "rb") as source:
        ca_key = serialization.load_pem_private_key(source.read(), None)
    return ca, ca_key


def issued(dev_pki: pki.DevPki, names, *, valid_from: datetime.datetime | None = None,
           days: int = 30, common_name: str = "perc-test",
           trust: pki.DevPki | None = None) -> TlsCredentials:
    """
    Credentials with a certificate that ``dev_pki``'s CA issues for ``names``
    (subjectAltName DNS names or addresses), valid ``days`` days from
    ``valid_from``, trusting the CA of ``trust`` (default: ``dev_pki``).
    Built directly, so an expired or not yet valid certificate is possible.
    """
    ca, ca_key = _ca(dev_pki)
    certificate, key = pki.issue_certificate(ca, ca_key, common_name, names,
                                             valid_from=valid_from, days=days)
    authority = ca if trust is None else _ca(trust)[0]
    return TlsCredentials(certificate, key, (authority,))


def expired(dev_pki: pki.DevPki, names) -> TlsCredentials:
    """Issued by ``dev_pki``'s CA for ``names``; expired eight days ago."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return issued(dev_pki, names, valid_from=now - datetime.timedelta(days=10), days=2)


def not_yet_valid(dev_pki: pki.DevPki, names) -> TlsCredentials:
    """Issued by ``dev_pki``'s CA for ``names``; valid from tomorrow."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return issued(dev_pki, names, valid_from=now + datetime.timedelta(days=1), days=2)


class Peer(protocol.Protocol):
    """A TLS client that says nothing: records how its connection ended."""

    def __init__(self):
        self.lost = defer.Deferred()

    def connectionLost(self, reason=protocol.connectionDone):
        self.reason = reason
        self.lost.callback(None)


def connect_with(port: int, credentials: TlsCredentials | None, trust: pki.DevPki,
                 expected: str = "127.0.0.1") -> defer.Deferred:
    """
    Open TLS to ``127.0.0.1:port`` presenting ``credentials`` (None: no
    certificate at all) and trusting ``trust``'s CA; fires with the
    :class:`Peer` once it has connected (TLS may still fail after that).
    """
    if credentials is None:
        with open(trust.ca_certificate, "rb") as source:
            authority = ssl.Certificate.loadPEM(source.read())
        endpoint = wrapClientTLS(ssl.optionsForClientTLS(expected, trustRoot=authority),
                                 TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    else:
        endpoint = tls_client_endpoint(reactor, "tcp:127.0.0.1:{}".format(port), credentials,
                                       "--test", expected)
    return connectProtocol(endpoint, Peer())


def reasoned(events: list, namespace: str = "perc.") -> list:
    """The events logged under ``namespace`` that carry a ``reason`` field."""
    return [event for event in events if "reason" in event
            and str(event.get("log_namespace", "")).startswith(namespace)]
