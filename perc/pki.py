"""
Certificates: fingerprints in RFC 8122 form, and the development PKI.

Everything above "Files" is sans-I/O (objects in, objects out).  The file
helpers below it write the layout ``perc pki init`` and ``perc pki endpoint``
produce; :mod:`perc.tls` reads it back.

Development PKI layout (``create_dev_pki``)::

    ca.pem  ca.key      the CA (basicConstraints CA:TRUE)
    kd.pem  kd.key      Key Distributor   } leaf certificates, CA:FALSE,
    md.pem  md.key      Media Distributor } EKU serverAuth + clientAuth

Private keys are written with mode 0600 from the moment they exist.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import ipaddress
import os
import re
import tempfile
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from perc.errors import ConfigError

__all__ = [
    "FINGERPRINT_HASHES",
    "FingerprintError",
    "fingerprint",
    "der_fingerprint",
    "parse_fingerprint",
    "normalise_fingerprint",
    "generate_key",
    "self_signed_certificate",
    "certificate_pem",
    "private_key_pem",
    "PkiError",
    "DEFAULT_DEV_DAYS",
    "DEFAULT_ENDPOINT_DAYS",
    "DEFAULT_ENDPOINT_NAME",
    "DEFAULT_SUBJECT_ALT_NAMES",
    "DEV_PKI_FILES",
    "DevPki",
    "EndpointFiles",
    "subject_alt_names",
    "certificate_authority",
    "issue_certificate",
    "dev_pki_paths",
    "create_dev_pki",
    "create_endpoint_certificate",
    "write_certificate",
    "write_private_key",
]

#: RFC 8122 hash function names (RFC 4572 registry) this project can compute.
FINGERPRINT_HASHES = {
    "sha-1": hashes.SHA1,
    "sha-224": hashes.SHA224,
    "sha-256": hashes.SHA256,
    "sha-384": hashes.SHA384,
    "sha-512": hashes.SHA512,
}

#: The same hashes as :data:`FINGERPRINT_HASHES`, from hashlib (for DER octets).
_HASHLIB_HASHES = {
    "sha-1": hashlib.sha1,
    "sha-224": hashlib.sha224,
    "sha-256": hashlib.sha256,
    "sha-384": hashlib.sha384,
    "sha-512": hashlib.sha512,
}

_HEX_PAIRS = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2})*$")


class FingerprintError(ValueError):
    """A certificate fingerprint that is not in RFC 8122 form."""


def fingerprint(certificate: x509.Certificate, hash_name: str = "sha-256") -> str:
    """
    The RFC 8122 fingerprint of ``certificate``: ``sha-256 AB:CD:...``
    (hash name in lower case, upper-case hex pairs).
    """
    algorithm = FINGERPRINT_HASHES.get(hash_name.lower())
    if algorithm is None:
        raise FingerprintError("unknown fingerprint hash {!r}".format(hash_name))
    digest = certificate.fingerprint(algorithm())  # type: ignore[abstract]  # concrete classes
    return _formatted(hash_name, digest)


def der_fingerprint(der: bytes, hash_name: str = "sha-256") -> str:
    """
    :func:`fingerprint` of the certificate whose DER encoding is ``der``,
    hashed as it is (no certificate object: the DTLS handshake has the
    octets already, and hashlib is several times faster here).
    """
    hash_function = _HASHLIB_HASHES.get(hash_name.lower())
    if hash_function is None:
        raise FingerprintError("unknown fingerprint hash {!r}".format(hash_name))
    return _formatted(hash_name, hash_function(der).digest())


def _formatted(hash_name: str, digest: bytes) -> str:
    return "{} {}".format(hash_name.lower(), digest.hex(":").upper())


def parse_fingerprint(text: str) -> tuple[str, bytes]:
    """
    Parse ``hash-name HEX:HEX:...`` into (lower-case hash name, digest).
    The digest length must match the hash.  Raises FingerprintError.
    """
    if not isinstance(text, str):
        raise FingerprintError("fingerprint must be a string")
    parts = text.strip().split()
    if len(parts) != 2:
        raise FingerprintError(
            "fingerprint must be '<hash> <HEX:HEX:...>', e.g. 'sha-256 AB:CD:...'"
        )
    hash_name, hex_pairs = parts[0].lower(), parts[1]
    algorithm = FINGERPRINT_HASHES.get(hash_name)
    if algorithm is None:
        raise FingerprintError(
            "unknown fingerprint hash {!r}; known: {}".format(
                parts[0], ", ".join(FINGERPRINT_HASHES)
            )
        )
    if not _HEX_PAIRS.match(hex_pairs):
        raise FingerprintError("fingerprint digest must be colon-separated hex pairs")
    digest = bytes.fromhex(hex_pairs.replace(":", ""))
    if len(digest) != algorithm.digest_size:
        raise FingerprintError(
            "a {} fingerprint has {} octets, got {}".format(
                hash_name, algorithm.digest_size, len(digest)
            )
        )
    return hash_name, digest


def normalise_fingerprint(text: str) -> str:
    """The canonical spelling of a fingerprint, for comparison and storage."""
    hash_name, digest = parse_fingerprint(text)
    return "{} {}".format(hash_name, ":".join("{:02X}".format(b) for b in digest))


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A new ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def self_signed_certificate(
    common_name: str = "perc-endpoint",
    key: ec.EllipticCurvePrivateKey | None = None,
    days: int = 30,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """
    A self-signed certificate, as DTLS-SRTP endpoints use: their identity is
    the fingerprint, not a CA.
    """
    if key is None:
        key = generate_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    return certificate, key


def certificate_pem(certificate: x509.Certificate) -> bytes:
    """The PEM encoding of ``certificate``."""
    return certificate.public_bytes(serialization.Encoding.PEM)


def private_key_pem(key) -> bytes:
    """The unencrypted PKCS#8 PEM encoding of ``key``."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# Development PKI: certificates (sans-I/O)

#: Validity of ``perc pki init`` certificates unless told otherwise.
DEFAULT_DEV_DAYS = 365
#: Validity of ``perc pki endpoint`` certificates unless told otherwise.
DEFAULT_ENDPOINT_DAYS = 30
#: File-name stem of ``perc pki endpoint`` output unless told otherwise.
DEFAULT_ENDPOINT_NAME = "endpoint"
#: Names every development distributor certificate carries, after the
#: names asked for (so that the first DNS name, the identity shown in logs,
#: is the specific one when there is one).
DEFAULT_SUBJECT_ALT_NAMES = ("localhost", "127.0.0.1")

# Certificates are back-dated a little so that a peer whose clock is
# slightly behind does not see them as not yet valid.
_CLOCK_SKEW = datetime.timedelta(minutes=5)

_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(r"^(?:\*\.)?" + _DNS_LABEL + r"(?:\." + _DNS_LABEL + r")*$")
_FILE_STEM = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


class PkiError(ConfigError):
    """
    A development PKI or endpoint certificate cannot be made as asked.  The
    message is one line naming the name, file or directory at fault.
    """


def subject_alt_names(names: Iterable[str]) -> x509.SubjectAlternativeName:
    """
    A subjectAltName holding each of ``names``: an IP address (v4 or v6)
    becomes an iPAddress entry, anything else must be an ASCII DNS name
    (optionally ``*.``-prefixed) and becomes a dNSName entry.  Duplicates
    (DNS names compared case-insensitively) are dropped, order is kept.
    Raises :class:`PkiError` for a name that is neither.
    """
    entries: list[x509.GeneralName] = []
    seen: set = set()
    for raw in names:
        name = raw.strip()
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            dns = name.rstrip(".")
            if not dns or len(dns) > 253 or not _DNS_NAME.match(dns):
                raise PkiError(
                    "{!r} is neither a DNS name nor an IP address"
                    " (internationalised names must be given in xn-- form)".format(raw))
            key: tuple[str, object] = ("dns", dns.lower())
            entry: x509.GeneralName = x509.DNSName(dns)
        else:
            key = ("ip", address)
            entry = x509.IPAddress(address)
        if key not in seen:
            seen.add(key)
            entries.append(entry)
    return x509.SubjectAlternativeName(entries)


def _validity(days: int, valid_from: datetime.datetime | None):
    if not isinstance(days, int) or isinstance(days, bool) or days < 1:
        raise PkiError("validity must be a whole number of days, at least 1; got {!r}".format(days))
    if valid_from is None:
        valid_from = datetime.datetime.now(datetime.timezone.utc) - _CLOCK_SKEW
    return valid_from, valid_from + _CLOCK_SKEW + datetime.timedelta(days=days)


def certificate_authority(
    common_name: str | None = None,
    key: ec.EllipticCurvePrivateKey | None = None,
    days: int = DEFAULT_DEV_DAYS,
    valid_from: datetime.datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """
    A self-signed CA certificate (basicConstraints CA:TRUE, pathlen 0;
    keyCertSign and cRLSign) and its key, valid ``days`` days from
    ``valid_from`` (default: now, minus a few minutes of clock skew).

    The default common name carries a random suffix: two development CAs
    then never share a subject name, which keeps CA bundles holding both
    unambiguous for OpenSSL's issuer lookup.
    """
    if key is None:
        key = generate_key()
    if common_name is None:
        common_name = "perc development CA {}".format(os.urandom(4).hex())
    not_before, not_after = _validity(days, valid_from)
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "perc"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])
    public_key = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )
    return certificate, key


def issue_certificate(
    ca_certificate: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    names: Iterable[str] = DEFAULT_SUBJECT_ALT_NAMES,
    key: ec.EllipticCurvePrivateKey | None = None,
    days: int = DEFAULT_DEV_DAYS,
    valid_from: datetime.datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """
    A leaf certificate signed by the CA, and its (new unless given) key.

    CA:FALSE; digitalSignature; extended key usage serverAuth *and*
    clientAuth, since either distributor may open the tunnel; the
    subjectAltName holds ``names`` (see :func:`subject_alt_names`), which
    must not be empty.  Raises :class:`PkiError` for an unusable name.
    """
    if key is None:
        key = generate_key()
    san = subject_alt_names(names)
    if not list(san):
        raise PkiError("a distributor certificate needs at least one DNS name or IP address")
    not_before, not_after = _validity(days, valid_from)
    public_key = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "perc"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]))
        .issuer_name(ca_certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False),
            critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False)
        .add_extension(san, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return certificate, key


# Files

#: ``DevPki`` field -> file name inside the PKI directory.
DEV_PKI_FILES = {
    "ca_certificate": "ca.pem",
    "ca_key": "ca.key",
    "kd_certificate": "kd.pem",
    "kd_key": "kd.key",
    "md_certificate": "md.pem",
    "md_key": "md.key",
}


@dataclasses.dataclass(frozen=True)
class DevPki:
    """The paths of a development PKI (see :func:`dev_pki_paths`)."""

    directory: str
    ca_certificate: str
    ca_key: str
    kd_certificate: str
    kd_key: str
    md_certificate: str
    md_key: str

    def paths(self) -> tuple[str, ...]:
        """Every file of the PKI, CA first."""
        return tuple(getattr(self, field) for field in DEV_PKI_FILES)

    def certificate(self, role: str) -> str:
        """The certificate path of ``role`` ("kd" or "md")."""
        return getattr(self, _role(role) + "_certificate")

    def key(self, role: str) -> str:
        """The private-key path of ``role`` ("kd" or "md")."""
        return getattr(self, _role(role) + "_key")


def _role(role: str) -> str:
    if role not in ("kd", "md"):
        raise ValueError("role must be 'kd' or 'md', not {!r}".format(role))
    return role


def dev_pki_paths(directory: str | os.PathLike) -> DevPki:
    """Where the files of a development PKI in ``directory`` are; touches nothing."""
    directory = os.fspath(directory)
    return DevPki(directory=directory, **{
        field: os.path.join(directory, name) for field, name in DEV_PKI_FILES.items()})


@dataclasses.dataclass(frozen=True)
class EndpointFiles:
    """An endpoint certificate written by :func:`create_endpoint_certificate`."""

    certificate: str
    key: str
    #: RFC 8122 SHA-256 fingerprint, ``sha-256 AB:CD:...``.
    fingerprint: str


def _prepare_directory(directory: str) -> None:
    try:
        os.makedirs(directory, exist_ok=True)
    except FileExistsError:
        raise PkiError("{}: exists and is not a directory".format(directory)) from None
    except OSError as error:
        raise PkiError("{}: cannot create directory: {}".format(
            directory, error.strerror or error)) from None
    if not os.path.isdir(directory):
        raise PkiError("{}: exists and is not a directory".format(directory))


def _refuse_existing(directory: str, paths: Iterable[str]) -> None:
    # Checked for every file before anything is written, so that a refusal
    # leaves the directory exactly as it was.
    existing = [os.path.basename(p) for p in paths if os.path.lexists(p)]
    if existing:
        raise PkiError("refusing to overwrite existing {} in {}: {} (use --force to replace)".format(
            "file" if len(existing) == 1 else "files", directory, ", ".join(existing)))


def _write_file(path: str, data: bytes, mode: int, force: bool) -> None:
    """
    Write ``data`` to ``path`` with permission bits ``mode`` from creation.

    Without ``force`` the file is created exclusively (O_EXCL), so an
    existing file -- even one appearing after the check -- is never
    replaced.  With ``force`` the data goes to a new temporary file (mkstemp
    creates it 0600) renamed over ``path``: the old file's permissions are
    never reused, so a key never sits in a world-readable file.
    """
    fd: int | None  # None once os.fdopen owns it
    try:
        if force:
            fd, temporary = tempfile.mkstemp(
                dir=os.path.dirname(path) or ".", prefix="." + os.path.basename(path) + ".")
        else:
            temporary = None
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise PkiError("refusing to overwrite existing file {} (use --force to replace)".format(
            path)) from None
    except OSError as error:
        raise PkiError("{}: cannot create file: {}".format(path, error.strerror or error)) from None
    try:
        try:
            # Exact bits whatever the umask: keys 0600, certificates 0644.
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as output:
                fd = None
                output.write(data)
            if temporary is not None:
                os.replace(temporary, path)
                temporary = None
        finally:
            if fd is not None:
                os.close(fd)
            if temporary is not None:
                os.unlink(temporary)
    except OSError as error:
        raise PkiError("{}: cannot write file: {}".format(path, error.strerror or error)) from None


def write_certificate(path: str | os.PathLike, certificate: x509.Certificate, force: bool = False) -> None:
    """Write ``certificate`` as PEM, mode 0644; raises PkiError (e.g. it exists and not ``force``)."""
    _write_file(os.fspath(path), certificate_pem(certificate), 0o644, force)


def write_private_key(path: str | os.PathLike, key, force: bool = False) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM, mode 0600 from creation; raises PkiError."""
    _write_file(os.fspath(path), private_key_pem(key), 0o600, force)


def create_dev_pki(
    directory: str | os.PathLike,
    kd_names: Iterable[str] = (),
    md_names: Iterable[str] = (),
    days: int = DEFAULT_DEV_DAYS,
    force: bool = False,
) -> DevPki:
    """
    Create a development CA and a Key Distributor and a Media Distributor
    certificate signed by it in ``directory`` (created if missing), laid out
    as :data:`DEV_PKI_FILES`, and return their paths.

    Each distributor certificate names ``kd_names`` / ``md_names`` first,
    then ``localhost`` and ``127.0.0.1``.  Without ``force``, if any of the
    six files exists nothing is written and :class:`PkiError` is raised.
    """
    directory = os.fspath(directory)
    paths = dev_pki_paths(directory)
    kd_names = list(kd_names)
    md_names = list(md_names)
    # Everything that can be refused is refused before the disk is touched.
    subject_alt_names(kd_names)
    subject_alt_names(md_names)
    _validity(days, None)
    _prepare_directory(directory)
    if not force:
        _refuse_existing(directory, paths.paths())
    ca_certificate, ca_key = certificate_authority(days=days)
    kd_certificate, kd_key = issue_certificate(
        ca_certificate, ca_key, "perc-kd", kd_names + list(DEFAULT_SUBJECT_ALT_NAMES), days=days)
    md_certificate, md_key = issue_certificate(
        ca_certificate, ca_key, "perc-md", md_names + list(DEFAULT_SUBJECT_ALT_NAMES), days=days)
    write_private_key(paths.ca_key, ca_key, force)
    write_certificate(paths.ca_certificate, ca_certificate, force)
    write_private_key(paths.kd_key, kd_key, force)
    write_certificate(paths.kd_certificate, kd_certificate, force)
    write_private_key(paths.md_key, md_key, force)
    write_certificate(paths.md_certificate, md_certificate, force)
    return paths


def create_endpoint_certificate(
    directory: str | os.PathLike,
    name: str = DEFAULT_ENDPOINT_NAME,
    days: int = DEFAULT_ENDPOINT_DAYS,
    force: bool = False,
) -> EndpointFiles:
    """
    Write a self-signed endpoint certificate ``NAME.pem`` and its key
    ``NAME.key`` (common name ``NAME``) in ``directory`` (created if
    missing); return their paths and the SHA-256 fingerprint.

    ``name`` is a file-name stem: letters, digits, ``.``, ``_``, ``-``, not
    starting with ``.``.  Without ``force`` an existing file is refused
    (:class:`PkiError`) and nothing is written.
    """
    if not isinstance(name, str) or not _FILE_STEM.match(name) or len(name) > 64:
        raise PkiError(
            "endpoint name {!r} must be 1-64 letters, digits, '.', '_' or '-',"
            " not starting with '.'".format(name))
    _validity(days, None)
    directory = os.fspath(directory)
    certificate_path = os.path.join(directory, name + ".pem")
    key_path = os.path.join(directory, name + ".key")
    _prepare_directory(directory)
    if not force:
        _refuse_existing(directory, (certificate_path, key_path))
    certificate, key = self_signed_certificate(name, days=days)
    write_private_key(key_path, key, force)
    write_certificate(certificate_path, certificate, force)
    return EndpointFiles(certificate_path, key_path, fingerprint(certificate, "sha-256"))
