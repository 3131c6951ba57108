"""
Tests for the development PKI (perc.pki) and ``perc pki`` (perc.scripts.pki).
"""

from __future__ import annotations

import datetime
import io
import ipaddress
import os
import stat
from contextlib import redirect_stderr, redirect_stdout

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID
from twisted.trial.unittest import SynchronousTestCase

from perc import pki
from perc.errors import ConfigError
from perc.scripts import cli


def load_certificate(path) -> x509.Certificate:
    with open(path, "rb") as source:
        return x509.load_pem_x509_certificate(source.read())


def load_key(path):
    with open(path, "rb") as source:
        return serialization.load_pem_private_key(source.read(), None)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def extension(certificate, oid):
    return certificate.extensions.get_extension_for_oid(oid).value


def public_der(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class DevPkiTests(SynchronousTestCase):
    def setUp(self):
        # A permissive umask must not make keys readable by others.
        self.addCleanup(os.umask, os.umask(0))
        self.directory = os.path.join(self.mktemp(), "nested", "pki")

    def test_files_and_modes(self):
        """DIR is created; keys are 0600, certificates 0644; nothing else is left behind."""
        paths = pki.create_dev_pki(self.directory)
        self.assertEqual(sorted(os.listdir(self.directory)),
                         ["ca.key", "ca.pem", "kd.key", "kd.pem", "md.key", "md.pem"])
        self.assertEqual(paths, pki.dev_pki_paths(self.directory))
        for path in (paths.ca_key, paths.kd_key, paths.md_key):
            self.assertEqual(mode(path), 0o600, path)
        for path in (paths.ca_certificate, paths.kd_certificate, paths.md_certificate):
            self.assertEqual(mode(path), 0o644, path)

    def test_chain_and_extensions(self):
        paths = pki.create_dev_pki(self.directory, kd_names=["kd1.test"], md_names=["md1.test", "10.0.0.7"])
        ca = load_certificate(paths.ca_certificate)
        self.assertEqual(ca.issuer, ca.subject)
        ca.verify_directly_issued_by(ca)
        self.assertTrue(extension(ca, ExtensionOID.BASIC_CONSTRAINTS).ca)
        self.assertTrue(extension(ca, ExtensionOID.KEY_USAGE).key_cert_sign)
        self.assertEqual(public_der(load_key(paths.ca_key).public_key()), public_der(ca.public_key()))
        for role, name in (("kd", "kd1.test"), ("md", "md1.test")):
            leaf = load_certificate(paths.certificate(role))
            key = load_key(paths.key(role))
            leaf.verify_directly_issued_by(ca)
            self.assertEqual(public_der(key.public_key()), public_der(leaf.public_key()))
            self.assertIsInstance(key, ec.EllipticCurvePrivateKey)
            self.assertIsInstance(key.curve, ec.SECP256R1)
            self.assertFalse(extension(leaf, ExtensionOID.BASIC_CONSTRAINTS).ca)
            usage = extension(leaf, ExtensionOID.KEY_USAGE)
            self.assertTrue(usage.digital_signature)
            self.assertFalse(usage.key_cert_sign)
            self.assertEqual(set(extension(leaf, ExtensionOID.EXTENDED_KEY_USAGE)),
                             {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH})
            san = extension(leaf, ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
            # The name asked for comes first: it is the identity logs show.
            self.assertEqual(san.get_values_for_type(x509.DNSName), [name, "localhost"])
            self.assertIn(ipaddress.ip_address("127.0.0.1"), san.get_values_for_type(x509.IPAddress))
        md_ips = extension(load_certificate(paths.md_certificate), ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
        self.assertEqual(md_ips.get_values_for_type(x509.IPAddress),
                         [ipaddress.ip_address("10.0.0.7"), ipaddress.ip_address("127.0.0.1")])

    def test_days(self):
        paths = pki.create_dev_pki(self.directory, days=10)
        for path in (paths.ca_certificate, paths.kd_certificate, paths.md_certificate):
            certificate = load_certificate(path)
            now = datetime.datetime.now(datetime.timezone.utc)
            self.assertLessEqual(certificate.not_valid_before_utc, now)
            remaining = certificate.not_valid_after_utc - now
            self.assertGreater(remaining, datetime.timedelta(days=9, hours=23))
            self.assertLessEqual(remaining, datetime.timedelta(days=10))

    def test_refuses_to_overwrite(self):
        """One existing file: nothing is written, and the message names it and --force."""
        os.makedirs(self.directory)
        existing = os.path.join(self.directory, "md.key")
        with open(existing, "wb") as out:
            out.write(b"precious")
        with self.assertRaises(ConfigError) as caught:
            pki.create_dev_pki(self.directory)
        self.assertEqual(
            str(caught.exception),
            "refusing to overwrite existing file in {}: md.key (use --force to replace)".format(
                self.directory))
        self.assertEqual(os.listdir(self.directory), ["md.key"])
        with open(existing, "rb") as source:
            self.assertEqual(source.read(), b"precious")

    def test_force_replaces(self):
        """--force makes a new PKI; a replaced key gets 0600 whatever the old file's mode."""
        first = pki.create_dev_pki(self.directory)
        old_ca = load_certificate(first.ca_certificate)
        os.chmod(first.kd_key, 0o644)
        second = pki.create_dev_pki(self.directory, force=True)
        new_ca = load_certificate(second.ca_certificate)
        self.assertNotEqual(pki.fingerprint(old_ca), pki.fingerprint(new_ca))
        load_certificate(second.kd_certificate).verify_directly_issued_by(new_ca)
        self.assertEqual(mode(second.kd_key), 0o600)
        self.assertEqual(sorted(os.listdir(self.directory)),
                         ["ca.key", "ca.pem", "kd.key", "kd.pem", "md.key", "md.pem"])

    def test_bad_name_writes_nothing(self):
        with self.assertRaises(ConfigError) as caught:
            pki.create_dev_pki(self.directory, md_names=["not a name"])
        self.assertIn("'not a name'", str(caught.exception))
        self.assertFalse(os.path.exists(self.directory))

    def test_directory_is_a_file(self):
        os.makedirs(os.path.dirname(self.directory))
        with open(self.directory, "w"):
            pass
        with self.assertRaises(ConfigError) as caught:
            pki.create_dev_pki(self.directory)
        self.assertEqual(str(caught.exception), "{}: exists and is not a directory".format(self.directory))

    def test_subject_alt_names(self):
        san = pki.subject_alt_names(["a.test", "A.TEST", "::1", "*.b.test", "c.test.", "::1"])
        self.assertEqual(list(san), [
            x509.DNSName("a.test"), x509.IPAddress(ipaddress.ip_address("::1")),
            x509.DNSName("*.b.test"), x509.DNSName("c.test")])
        for bad in ["", "a b", "-a.test", "a..test", "é.test", "a" * 64 + ".test"]:
            self.assertRaises(ConfigError, pki.subject_alt_names, [bad])


class EndpointTests(SynchronousTestCase):
    def setUp(self):
        self.addCleanup(os.umask, os.umask(0))
        self.directory = self.mktemp()

    def test_files_and_fingerprint(self):
        files = pki.create_endpoint_certificate(self.directory)
        self.assertEqual(files.certificate, os.path.join(self.directory, "endpoint.pem"))
        self.assertEqual(files.key, os.path.join(self.directory, "endpoint.key"))
        self.assertEqual(mode(files.key), 0o600)
        self.assertEqual(mode(files.certificate), 0o644)
        certificate = load_certificate(files.certificate)
        certificate.verify_directly_issued_by(certificate)
        self.assertEqual(files.fingerprint, pki.fingerprint(certificate))
        self.assertEqual(public_der(load_key(files.key).public_key()), public_der(certificate.public_key()))

    def test_name(self):
        files = pki.create_endpoint_certificate(self.directory, name="alice")
        self.assertEqual(os.path.basename(files.certificate), "alice.pem")
        self.assertEqual(os.path.basename(files.key), "alice.key")
        self.assertIn("CN=alice", load_certificate(files.certificate).subject.rfc4514_string())

    def test_bad_names(self):
        for bad in ["", "../x", ".hidden", "a/b", "a b"]:
            self.assertRaises(ConfigError, pki.create_endpoint_certificate, self.directory, bad)
        self.assertFalse(os.path.exists(self.directory))

    def test_refuse_and_force(self):
        first = pki.create_endpoint_certificate(self.directory)
        with self.assertRaises(ConfigError) as caught:
            pki.create_endpoint_certificate(self.directory)
        self.assertIn("endpoint.pem, endpoint.key", str(caught.exception))
        second = pki.create_endpoint_certificate(self.directory, force=True)
        self.assertNotEqual(first.fingerprint, second.fingerprint)
        self.assertEqual(second.fingerprint, pki.fingerprint(load_certificate(second.certificate)))


class PkiCommandTests(SynchronousTestCase):
    def run_perc(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            try:
                status = cli.main(list(argv))
            except SystemExit as exit:
                status = exit.code
        return status, out.getvalue(), err.getvalue()

    def test_init(self):
        directory = self.mktemp()
        status, out, err = self.run_perc(
            "pki", "init", directory, "--kd-name", "kd1.test", "--md-name=md1.test",
            "--md-name", "10.0.0.7", "--days", "10")
        self.assertEqual((status, err), (0, ""))
        paths = pki.dev_pki_paths(directory)
        for path in paths.paths():
            self.assertIn(path, out)
            self.assertTrue(os.path.isfile(path))
        self.assertEqual(mode(paths.md_key), 0o600)
        san = extension(load_certificate(paths.md_certificate), ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["md1.test", "localhost"])
        kd = load_certificate(paths.kd_certificate)
        self.assertEqual(
            extension(kd, ExtensionOID.SUBJECT_ALTERNATIVE_NAME).get_values_for_type(x509.DNSName),
            ["kd1.test", "localhost"])
        self.assertLessEqual(kd.not_valid_after_utc - kd.not_valid_before_utc,
                             datetime.timedelta(days=10, minutes=5))

    def test_init_refuses_then_force(self):
        directory = self.mktemp()
        self.assertEqual(self.run_perc("pki", "init", directory)[0], 0)
        before = pki.fingerprint(load_certificate(os.path.join(directory, "ca.pem")))
        status, out, err = self.run_perc("pki", "init", directory)
        self.assertEqual(status, 1)
        self.assertEqual(out, "")
        self.assertEqual(
            err,
            "perc pki: refusing to overwrite existing files in {}: ca.pem, ca.key, kd.pem, kd.key,"
            " md.pem, md.key (use --force to replace)\n".format(directory))
        self.assertEqual(before, pki.fingerprint(load_certificate(os.path.join(directory, "ca.pem"))))
        status, out, err = self.run_perc("pki", "init", "--force", directory)
        self.assertEqual((status, err), (0, ""))
        self.assertNotEqual(before, pki.fingerprint(load_certificate(os.path.join(directory, "ca.pem"))))

    def test_init_bad_name(self):
        status, out, err = self.run_perc("pki", "init", self.mktemp(), "--kd-name", "a b")
        self.assertEqual(status, 1)
        self.assertEqual(len(err.splitlines()), 1)
        self.assertIn("'a b'", err)

    def test_usage_errors(self):
        self.assertEqual(self.run_perc("pki")[0], 2)
        self.assertEqual(self.run_perc("pki", "init")[0], 2)
        self.assertEqual(self.run_perc("pki", "init", self.mktemp(), "--days", "0")[0], 2)
        self.assertEqual(self.run_perc("pki", "endpoint", self.mktemp(), "extra")[0], 2)

    def test_endpoint_prints_fingerprint_last(self):
        directory = self.mktemp()
        status, out, err = self.run_perc("pki", "endpoint", directory, "--name", "bob")
        self.assertEqual((status, err), (0, ""))
        certificate = load_certificate(os.path.join(directory, "bob.pem"))
        last = out.splitlines()[-1]
        self.assertEqual(last, pki.fingerprint(certificate))
        self.assertEqual(pki.normalise_fingerprint(last), last)
        self.assertTrue(os.path.isfile(os.path.join(directory, "bob.key")))

    def test_endpoint_default_name_and_refusal(self):
        directory = self.mktemp()
        status, out, _ = self.run_perc("pki", "endpoint", directory)
        self.assertEqual(status, 0)
        certificate = load_certificate(os.path.join(directory, "endpoint.pem"))
        self.assertEqual(out.splitlines()[-1], pki.fingerprint(certificate))
        status, out, err = self.run_perc("pki", "endpoint", directory)
        self.assertEqual(status, 1)
        self.assertEqual(len(err.splitlines()), 1)
        self.assertIn("--force", err)
        status, out, err = self.run_perc("pki", "endpoint", "-f", directory)
        self.assertEqual(status, 0)
        self.assertNotEqual(out.splitlines()[-1], pki.fingerprint(certificate))


class DerFingerprintTests(SynchronousTestCase):
    def test_same_as_fingerprint_for_every_hash(self):
        """The DTLS handshake's fingerprint of the DER is the certificate's, for every hash."""
        certificate, _ = pki.self_signed_certificate("fingerprinted")
        der = certificate.public_bytes(serialization.Encoding.DER)
        for name in pki.FINGERPRINT_HASHES:
            self.assertEqual(pki.der_fingerprint(der, name.upper()),
                             pki.fingerprint(certificate, name))

    def test_unknown_hash_refused(self):
        with self.assertRaises(pki.FingerprintError):
            pki.der_fingerprint(b"\x30\x00", "md5")
