"""
Mutual TLS for the tunnels between Media and Key Distributors.

Either distributor may open a tunnel, so each side holds one
:class:`TlsCredentials` (its certificate and key, and the CA certificates
it trusts) and can make both the server options (which *require* a client
certificate issued by one of those CAs) and the client options (which
verify the server against those CAs and an expected DNS name or IP
address, and present the client's own certificate).  TLS 1.2 is the
minimum; TLS 1.3 is offered and chosen whenever both sides support it.

Beyond "issued by a trusted CA", the Key Distributor may restrict which
peers it talks to with an allow-list of subjectAltName DNS names:
:class:`Authoriser` (or :func:`authorise_peer`) decides, and
:class:`PeerAuthorisationMixin` applies the decision when the handshake
completes.

Loading problems raise :class:`perc.errors.ConfigError` with one line of
the form ``<option> <path>: <what is wrong>``.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
from collections.abc import Iterable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.logger import Logger
from zope.interface import implementer

from perc import pki
from perc.errors import ConfigError

__all__ = [
    "MINIMUM_TLS_VERSION",
    "DEFAULT_LABELS",
    "TlsCredentials",
    "ReloadableCredentials",
    "load_certificates",
    "load_private_key",
    "peer_certificate",
    "certificate_dns_names",
    "certificate_identity",
    "peer_identity",
    "authorise_peer",
    "Authoriser",
    "PeerAuthorisationMixin",
    "handshake_failure_reason",
]

log = Logger()

#: Oldest TLS version either side accepts.  The newest the library offers
#: (TLS 1.3) is always allowed, so it is negotiated when both sides have it.
MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2

_PEM_LABEL = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")

#: Option names used in error messages by :meth:`TlsCredentials.from_files`.
DEFAULT_LABELS = ("--cert", "--key", "--ca")


# Loading PEM files

def _read(label: str, path: str) -> bytes:
    try:
        with open(path, "rb") as source:
            return source.read()
    except FileNotFoundError:
        raise ConfigError("{} {}: no such file".format(label, path)) from None
    except IsADirectoryError:
        raise ConfigError("{} {}: is a directory, not a file".format(label, path)) from None
    except OSError as error:
        raise ConfigError("{} {}: cannot read: {}".format(
            label, path, error.strerror or error)) from None


def _pem_labels(label: str, path: str, data: bytes, wanted: str) -> list[str]:
    """The PEM block labels in ``data``; refuses a file that is not PEM at all."""
    if not data.strip():
        raise ConfigError("{} {}: file is empty; expected {}".format(label, path, wanted))
    labels = [found.decode("ascii") for found in _PEM_LABEL.findall(data)]
    if not labels:
        hint = " (it looks like DER; convert it to PEM)" if data[:1] == b"\x30" else ""
        raise ConfigError("{} {}: not a PEM file{}; expected {}".format(label, path, hint, wanted))
    return labels


def _describe(certificate: x509.Certificate) -> str:
    return certificate.subject.rfc4514_string() or "(empty subject)"


def _check_validity(label: str, path: str, certificate: x509.Certificate, what: str,
                    now: datetime.datetime) -> None:
    not_before = certificate.not_valid_before_utc
    not_after = certificate.not_valid_after_utc
    if now > not_after:
        raise ConfigError("{} {}: {} '{}' expired on {}".format(
            label, path, what, _describe(certificate), _when(not_after)))
    if now < not_before:
        raise ConfigError("{} {}: {} '{}' is not valid until {}".format(
            label, path, what, _describe(certificate), _when(not_before)))


def _when(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _now(now: datetime.datetime | None) -> datetime.datetime:
    return now if now is not None else datetime.datetime.now(datetime.timezone.utc)


def load_certificates(path: str | os.PathLike, label: str = "--cert", what: str = "certificate",
                      now: datetime.datetime | None = None) -> list[x509.Certificate]:
    """
    Every certificate in the PEM file ``path``, in file order (at least
    one), each valid at ``now`` (default: the current time).  Other PEM
    blocks are ignored.  Raises ConfigError naming ``label`` and ``path``.
    """
    path = os.fspath(path)
    data = _read(label, path)
    labels = _pem_labels(label, path, data, "a PEM " + what)
    if "CERTIFICATE" not in labels:
        raise ConfigError("{} {}: no certificate in this PEM file (it holds: {}); expected a PEM {}".format(
            label, path, ", ".join(sorted(set(labels))), what))
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as error:
        raise ConfigError("{} {}: a certificate in it cannot be parsed ({})".format(
            label, path, str(error).splitlines()[0] if str(error) else "malformed")) from None
    moment = _now(now)
    for certificate in certificates:
        _check_validity(label, path, certificate, what, moment)
    return certificates


def load_private_key(path: str | os.PathLike, label: str = "--key"):
    """
    The (unencrypted) private key in the PEM file ``path``.  Raises
    ConfigError naming ``label`` and ``path``.
    """
    path = os.fspath(path)
    data = _read(label, path)
    labels = _pem_labels(label, path, data, "a PEM private key")
    if not any(found.endswith("PRIVATE KEY") for found in labels):
        raise ConfigError("{} {}: no private key in this PEM file (it holds: {})".format(
            label, path, ", ".join(sorted(set(labels)))))
    if "ENCRYPTED PRIVATE KEY" in labels or b"Proc-Type: 4,ENCRYPTED" in data:
        raise ConfigError("{} {}: the private key is encrypted; perc needs an unencrypted key".format(
            label, path))
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise ConfigError("{} {}: the private key cannot be loaded ({})".format(
            label, path, str(error).splitlines()[0] if str(error) else "malformed")) from None
    except Exception as error:  # e.g. UnsupportedAlgorithm
        raise ConfigError("{} {}: the private key cannot be used ({})".format(
            label, path, error)) from None


def _public_bytes(public_key) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _is_not_a_ca(certificate: x509.Certificate) -> bool:
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        # A v1 certificate has no extensions; OpenSSL may still accept it
        # as a trust anchor, so do not refuse it here.
        return False
    return not constraints.value.ca


@dataclasses.dataclass(frozen=True)
class TlsCredentials:
    """
    One distributor's TLS identity and trust: its ``certificate`` (and any
    intermediate ``chain`` sent with it), its ``private_key``, and the CA
    certificates (``authorities``) its peers' certificates must chain to.
    Build it with :meth:`from_files` or :meth:`from_pki_dir`.
    """

    certificate: x509.Certificate
    private_key: object
    authorities: tuple[x509.Certificate, ...]
    chain: tuple[x509.Certificate, ...] = ()

    @classmethod
    def from_files(cls, cert: str | os.PathLike, key: str | os.PathLike, ca: str | os.PathLike,
                   *, now: datetime.datetime | None = None,
                   labels: tuple[str, ...] = DEFAULT_LABELS) -> TlsCredentials:
        """
        Load from PEM files: ``cert`` (own certificate first, then any
        intermediates), ``key`` (its unencrypted private key), ``ca`` (one or
        more CA certificates).  Every certificate must be valid at ``now``
        (default: the current time), the key must match the certificate, and
        each CA certificate with a basicConstraints extension must be a CA.

        Raises ConfigError, one line naming the option (``labels``, by
        default ``--cert``, ``--key``, ``--ca``), the file and the problem.
        """
        cert_label, key_label, ca_label = labels
        cert, key, ca = os.fspath(cert), os.fspath(key), os.fspath(ca)
        certificates = load_certificates(cert, cert_label, "certificate", now)
        private_key = load_private_key(key, key_label)
        if _public_bytes(private_key.public_key()) != _public_bytes(certificates[0].public_key()):
            raise ConfigError("{} {}: does not match the certificate in {} {}".format(
                key_label, key, cert_label, cert))
        authorities = load_certificates(ca, ca_label, "CA certificate", now)
        for authority in authorities:
            if _is_not_a_ca(authority):
                raise ConfigError("{} {}: '{}' is not a CA certificate (basicConstraints CA:FALSE)".format(
                    ca_label, ca, _describe(authority)))
        try:
            # pyOpenSSL must accept the key type too (e.g. not DSA).
            crypto.PKey.from_cryptography_key(private_key)
        except (TypeError, ValueError) as error:
            raise ConfigError("{} {}: key type unusable for TLS ({})".format(
                key_label, key, error)) from None
        return cls(certificates[0], private_key, tuple(authorities), tuple(certificates[1:]))

    @classmethod
    def from_pki_dir(cls, directory: str | os.PathLike, role: str,
                     *, now: datetime.datetime | None = None) -> TlsCredentials:
        """
        Load the ``role`` ("kd" or "md") credentials from a ``perc pki
        init`` directory: ``ROLE.pem``, ``ROLE.key`` and ``ca.pem``.
        Errors name ``--pki`` and the file.
        """
        return cls.from_options(role, pki_dir=directory, now=now)

    @classmethod
    def from_options(cls, role: str, cert: str | None = None, key: str | None = None,
                     ca: str | None = None, pki_dir: str | os.PathLike | None = None,
                     *, now: datetime.datetime | None = None) -> TlsCredentials:
        """
        Resolve a daemon's ``--cert/--key/--ca`` and ``--pki DIR`` options:
        each file given explicitly wins, any other comes from the ``perc pki
        init`` directory (``ROLE.pem``, ``ROLE.key``, ``ca.pem``).  Errors
        name the option each file came from; a file given by neither raises
        ``ConfigError("--cert is required (or --pki DIR)")`` and the like.
        """
        if role not in ("kd", "md"):
            raise ValueError("role must be 'kd' or 'md', not {!r}".format(role))
        explicit = {"--cert": cert, "--key": key, "--ca": ca}
        if pki_dir is not None and None in explicit.values():
            pki_dir = os.fspath(pki_dir)
            if not os.path.exists(pki_dir):
                raise ConfigError("--pki {}: no such directory".format(pki_dir))
            if not os.path.isdir(pki_dir):
                raise ConfigError("--pki {}: not a directory".format(pki_dir))
            paths = pki.dev_pki_paths(pki_dir)
            fallback = {"--cert": paths.certificate(role), "--key": paths.key(role),
                        "--ca": paths.ca_certificate}
        else:
            fallback = {}
        files, labels = [], []
        for option, given in explicit.items():
            if given is not None:
                files.append(os.fspath(given))
                labels.append(option)
            elif option in fallback:
                files.append(fallback[option])
                labels.append("--pki")
            else:
                raise ConfigError("{} is required (or --pki DIR)".format(option))
        return cls.from_files(*files, now=now, labels=tuple(labels))

    @property
    def identity(self) -> str:
        """This side's identity as peers see it (see :func:`certificate_identity`)."""
        return certificate_identity(self.certificate)

    def _trust_root(self):
        return ssl.trustRootFromCertificates(
            [ssl.Certificate(crypto.X509.from_cryptography(authority))
             for authority in self.authorities])

    def _own_certificate(self) -> dict:
        # cryptography objects, not pyOpenSSL ones: pyOpenSSL deprecates
        # passing its own X509/PKey to a context.
        return dict(privateKey=self.private_key, certificate=self.certificate,
                    extraCertChain=list(self.chain))

    def server_options(self) -> IOpenSSLServerConnectionCreator:
        """
        Options for accepting tunnels (``SSL4ServerEndpoint``,
        ``listenSSL``, ``TLSMemoryBIOFactory``): present our certificate and
        require a client certificate chaining to one of ``authorities``.
        """
        return ssl.CertificateOptions(
            trustRoot=self._trust_root(),
            raiseMinimumTo=MINIMUM_TLS_VERSION,
            **self._own_certificate(),
        )

    def client_options(self, expected: str) -> IOpenSSLClientConnectionCreator:
        """
        Options for opening a tunnel to a server that must present a
        certificate chaining to ``authorities`` and naming ``expected``: a
        DNS name (matched against subjectAltName dNSName entries; SNI is
        sent) or an IPv4/IPv6 address (matched against iPAddress entries).
        Our certificate is presented as the client certificate.
        """
        if not isinstance(expected, str) or not expected.strip():
            raise ConfigError("expected TLS server name must be a DNS name or IP address, got {!r}".format(
                expected))
        expected = expected.strip()
        if expected.startswith("[") and expected.endswith("]"):
            expected = expected[1:-1]  # "[::1]" as written in URLs
        try:
            return ssl.optionsForClientTLS(
                expected,
                trustRoot=self._trust_root(),
                extraCertificateOptions=dict(raiseMinimumTo=MINIMUM_TLS_VERSION,
                                             **self._own_certificate()),
            )
        except (ValueError, UnicodeError) as error:
            raise ConfigError("expected TLS server name {!r} is not usable: {}".format(
                expected, error)) from None


class ReloadableCredentials:
    """
    The :class:`TlsCredentials` a daemon presents now (``current``), and
    how to load them again: :meth:`reload` re-reads the same files, and
    only a complete, valid set replaces ``current``.

    :meth:`server_options` and :meth:`client_options` give connection
    creators that use ``current`` as it is when each *new* connection
    starts; connections already made keep the credentials they began with.
    """

    def __init__(self, current: TlsCredentials, load=None):
        """``load()`` returns fresh TlsCredentials or raises ConfigError; None: no reload."""
        self.current = current
        self._load = load
        self._cache: dict = {}

    @classmethod
    def from_options(cls, role: str, cert: str | None = None, key: str | None = None,
                     ca: str | None = None, pki_dir: str | None = None) -> ReloadableCredentials:
        """Load as :meth:`TlsCredentials.from_options` does, and again from the same files on reload."""
        def load():
            return TlsCredentials.from_options(role, cert=cert, key=key, ca=ca, pki_dir=pki_dir)
        return cls(load(), load)

    def reload(self) -> TlsCredentials:
        """Load the files again and use them; ConfigError (one line) leaves ``current`` as it was."""
        if self._load is None:
            raise ConfigError("these credentials were not loaded from files")
        self.current = self._load()
        self._cache.clear()
        return self.current

    def _options(self, expected: str | None):
        # One set of options (and so one SSL context) per credentials and
        # server name, as a daemon would otherwise build them once.
        # The cache is emptied on reload; a daemon has a handful of names.
        options = self._cache.get(expected)
        if options is None:
            options = (self.current.server_options() if expected is None
                       else self.current.client_options(expected))
            if len(self._cache) >= 64:
                self._cache.clear()
            self._cache[expected] = options
        return options

    def server_options(self) -> IOpenSSLServerConnectionCreator:
        """Like :meth:`TlsCredentials.server_options`, with the credentials current at each accept."""
        self._options(None)
        return _CurrentServerOptions(self)

    def client_options(self, expected: str) -> IOpenSSLClientConnectionCreator:
        """Like :meth:`TlsCredentials.client_options`, with the credentials current at each dial."""
        self._options(expected)  # a ConfigError for a bad name now, not at the first dial
        return _CurrentClientOptions(self, expected)

    @property
    def identity(self) -> str:
        return self.current.identity


@implementer(IOpenSSLServerConnectionCreator)
class _CurrentServerOptions:
    def __init__(self, credentials: ReloadableCredentials):
        self._credentials = credentials

    def serverConnectionForTLS(self, tlsProtocol):
        return SSL.Connection(self._credentials._options(None).getContext(), None)


@implementer(IOpenSSLClientConnectionCreator)
class _CurrentClientOptions:
    def __init__(self, credentials: ReloadableCredentials, expected: str):
        self._credentials = credentials
        self._expected = expected

    def clientConnectionForTLS(self, tlsProtocol):
        return self._credentials._options(self._expected).clientConnectionForTLS(tlsProtocol)


# Peer identity and authorisation

def peer_certificate(peer) -> x509.Certificate | None:
    """
    The peer certificate of a connected TLS transport (anything with
    ``getPeerCertificate()``), as a cryptography certificate; ``peer`` may
    also be the certificate itself (cryptography or pyOpenSSL).  None if
    there is none (not TLS, handshake not done, or no certificate sent).
    """
    if peer is None or isinstance(peer, x509.Certificate):
        return peer
    if isinstance(peer, crypto.X509):
        return peer.to_cryptography()
    get = getattr(peer, "getPeerCertificate", None)
    if get is None:
        return None
    return peer_certificate(get())


def certificate_dns_names(certificate: x509.Certificate) -> list[str]:
    """The subjectAltName dNSName entries of ``certificate``, in order."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return san.value.get_values_for_type(x509.DNSName)


def certificate_identity(certificate: x509.Certificate) -> str:
    """
    A short name for ``certificate`` in logs: its first subjectAltName DNS
    name, else its common name, else its subject, else ``(anonymous)``.
    """
    names = certificate_dns_names(certificate)
    if names:
        return names[0]
    common_names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if common_names:
        value = common_names[0].value
        return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return certificate.subject.rfc4514_string() or "(anonymous)"


def peer_identity(peer) -> str:
    """
    :func:`certificate_identity` of the peer of a TLS transport (or of a
    certificate); ``(no certificate)`` if there is none.
    """
    certificate = peer_certificate(peer)
    if certificate is None:
        return "(no certificate)"
    return certificate_identity(certificate)


def _normalise_name(name: str) -> str:
    # DNS names compare case-insensitively; a trailing dot is the same name.
    return name.strip().rstrip(".").lower()


def authorise_peer(peer, allowed: Iterable[str] | None = None) -> tuple[bool, str, str]:
    """
    Decide whether the peer of a TLS transport (or a peer certificate) may
    use the tunnel, once TLS has already checked it was issued by a trusted
    CA.  Returns ``(authorised, identity, reason)``.

    With ``allowed`` None or empty any certificate is accepted.  Otherwise
    one of the certificate's subjectAltName DNS names must equal (ignoring
    case and a trailing dot; no wildcard expansion) one of ``allowed``;
    ``identity`` is then that name.  In every other case ``identity`` is
    :func:`peer_identity`.  ``reason`` is a short sentence for logs.
    """
    certificate = peer_certificate(peer)
    if certificate is None:
        return False, "(no certificate)", "the peer presented no certificate"
    identity = certificate_identity(certificate)
    allowed_names = sorted({_normalise_name(name) for name in (allowed or ()) if name.strip()})
    if not allowed_names:
        return True, identity, "certificate issued by a trusted CA (no allow-list)"
    names = certificate_dns_names(certificate)
    for name in names:
        if _normalise_name(name) in allowed_names:
            return True, name, "{!r} is in the allow-list".format(name)
    return False, identity, "none of the peer's DNS names ({}) is in the allow-list ({})".format(
        ", ".join(names) or "none", ", ".join(allowed_names))


class Authoriser:
    """
    ``Authoriser(allowed)(transport) -> (authorised, identity, reason)``:
    :func:`authorise_peer` bound to an allow-list, in the shape the tunnel
    protocols take as their ``authorise`` argument.
    """

    def __init__(self, allowed: Iterable[str] | None = None):
        self.allowed: tuple[str, ...] = tuple(
            sorted({_normalise_name(name) for name in (allowed or ()) if name.strip()}))

    def __call__(self, peer) -> tuple[bool, str, str]:
        return authorise_peer(peer, self.allowed)

    def __repr__(self) -> str:
        return "Authoriser({!r})".format(list(self.allowed))


@implementer(IHandshakeListener)
class PeerAuthorisationMixin:
    """
    Mix into a ``Protocol`` run over TLS to authorise the peer as soon as
    the handshake completes.

    ``authorise`` (an instance attribute, or a class attribute that is not a
    plain function, e.g. an :class:`Authoriser`; default: any peer with a
    certificate) is called with the transport and returns ``(authorised,
    identity, reason)``.  The outcome is in ``peerIdentity`` and
    ``peerAuthorised``; then :meth:`peerAccepted` or :meth:`peerRefused` is
    called.  A refused connection is aborted at once, and the TLS transport
    delivers no application data to the protocol after that.  A subclass
    overriding ``handshakeCompleted`` must call this one.
    """

    authorise = None
    peerIdentity: str | None = None
    peerAuthorised = False
    transport: Any  # the TLS connection of the protocol this is mixed into

    def handshakeCompleted(self) -> None:
        authorise = self.authorise if self.authorise is not None else authorise_peer
        authorised, identity, reason = authorise(self.transport)
        self.peerIdentity = identity
        if authorised:
            self.peerAuthorised = True
            self.peerAccepted(identity, reason)
        else:
            log.warn("Refusing TLS peer {identity} at {address}: {reason}",
                     identity=identity, address=_address(self.transport), reason=reason)
            self.transport.abortConnection()
            self.peerRefused(identity, reason)

    def peerAccepted(self, identity: str, reason: str) -> None:
        """The peer passed authorisation; override to start talking."""

    def peerRefused(self, identity: str, reason: str) -> None:
        """The peer failed authorisation; the connection is already being aborted."""


def handshake_failure_reason(transport, error: SSL.Error) -> str:
    """
    One line for a TLS handshake on ``transport`` that failed with
    ``error``: OpenSSL's error queue ("peer did not return a certificate"),
    followed, when verifying the peer's certificate failed, by why
    ("certificate verify failed (certificate has expired)").
    """
    try:
        reason = "; ".join(entry[2] for entry in error.args[0] if entry[2]) or str(error)
    except (IndexError, TypeError):
        reason = str(error)
    verify = _verify_error(transport)
    if verify:
        reason = "{} ({})".format(reason, verify)
    return " ".join(reason.split())


def _verify_error(transport) -> str | None:
    """The X.509 verification error of the TLS connection under ``transport``, if any."""
    try:
        from OpenSSL._util import ffi, lib

        connection = transport.getHandle()
        if not isinstance(connection, SSL.Connection):
            return None
        code = lib.SSL_get_verify_result(connection._ssl)
        if code == lib.X509_V_OK:
            return None
        return ffi.string(lib.X509_verify_cert_error_string(code)).decode("ascii", "replace")
    except Exception:
        # Not a pyOpenSSL connection, or bindings without these calls.
        return None


def _address(transport) -> str:
    try:
        address = transport.getPeer()
    except Exception:
        return "(unknown)"
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    return "{}:{}".format(host, port) if host is not None else str(address)
