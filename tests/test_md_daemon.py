"""
``twistd perc-md`` and ``twistd perc-kd`` as real processes: one-line
errors, a tunnel that comes up between them, and ``perc register`` placing
an endpoint with both.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request

from cryptography import x509
from twisted.trial.unittest import SynchronousTestCase

from perc import pki

from tests.daemonhelpers import PERC, TWISTD, DaemonOutput, listening_port


class Daemon:
    """A twistd process, its output read with deadlines (:class:`DaemonOutput`)."""

    def __init__(self, test, directory, args):
        self.process = subprocess.Popen(
            TWISTD + ["-n", "--pidfile="] + args, cwd=directory,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output = DaemonOutput(self.process)
        test.addCleanup(self.stop)

    def wait_for(self, text):
        return self.output.wait_for(text)

    def port(self, what):
        """The port bound for ``what`` (tests.daemonhelpers.listening_port)."""
        return listening_port(self.output, what)

    def stop(self):
        if self.process.stdout.closed:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.rest = "".join(self.output.rest())
        self.process.stdout.close()


def get_json(url, token):
    request = urllib.request.Request(url, headers={"Authorization": "Bearer " + token})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


class MediaDistributorDaemonTests(SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        self.pki = pki.create_dev_pki(os.path.join(self.dir, "pki"))

    def test_missing_key_one_line(self):
        result = subprocess.run(
            TWISTD + ["-n", "--pidfile=", "perc-md", "--kd", "tcp:127.0.0.1:1",
                      "--cert", self.pki.md_certificate, "--key", "missing.key",
                      "--ca", self.pki.ca_certificate],
            cwd=self.dir, capture_output=True, text=True, timeout=60)
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(result.stderr.strip(), "perc-md: --key missing.key: no such file")

    def test_daemons_together(self):
        kd = Daemon(self, self.dir, [
            "perc-kd", "--pki", self.pki.directory, "--tunnel-listen", "tcp:0:interface=127.0.0.1",
            "--api", "tcp:0:interface=127.0.0.1"])
        kd.wait_for("Key Distributor ready")
        kd_port, kd_api = kd.port("tunnel-listen"), kd.port("api")
        md = Daemon(self, self.dir, [
            "perc-md", "--pki", self.pki.directory, "--kd", "tcp:127.0.0.1:{}".format(kd_port),
            "--media-port", "0", "--media-interface", "127.0.0.1",
            "--api", "tcp:0:interface=127.0.0.1"])
        md_api = md.port("api")
        kd.wait_for("Tunnel with")
        md_token_file = os.path.join(self.dir, "perc-md-api.token")
        with open(md_token_file) as f:
            md_token = f.read().strip()
        endpoint = pki.self_signed_certificate("endpoint")[0]
        result = subprocess.run(PERC + [
            "register", "--kd-api", "http://127.0.0.1:{}".format(kd_api),
            "--token-file", os.path.join(self.dir, "perc-kd-api.token"),
            "--md-api", "http://127.0.0.1:{}".format(md_api), "--md-token-file", md_token_file,
            "--conference", "daemons", "--tls-id", "DaemonsTlsId-0123456789",
            "--fingerprint", pki.fingerprint(endpoint)],
            capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("Media Distributor: placed", result.stderr)
        base = "http://127.0.0.1:{}".format(md_api)
        membership = get_json(base + "/v1/conferences/daemons/endpoints/DaemonsTlsId-0123456789",
                              md_token)
        self.assertEqual(membership, {"conference": "daemons", "tls_id": "DaemonsTlsId-0123456789"})
        status = get_json(base + "/v1/status", md_token)
        [link] = status["tunnels"]["key_distributors"]
        self.assertEqual(link["state"], "up")
        self.assertEqual(link["version"], 0)
        md.stop()
        kd.stop()
        # twistd ends with the signal it was stopped by, after a clean shutdown.
        self.assertIn(md.process.returncode, (0, -signal.SIGTERM))
        self.assertIn("Server Shut Down.", md.rest)


class ConferenceOfProcessesTests(SynchronousTestCase):
    """Two ``perc endpoint`` processes through real ``twistd`` daemons."""

    def test_endpoints_verify_each_other(self):
        directory = os.path.abspath(self.mktemp())
        dev = pki.create_dev_pki(os.path.join(directory, "pki"))
        kd = Daemon(self, directory, [
            "perc-kd", "--pki", dev.directory, "--tunnel-listen", "tcp:0:interface=127.0.0.1",
            "--api", "tcp:0:interface=127.0.0.1"])
        kd.wait_for("Key Distributor ready")
        kd_port, kd_api = kd.port("tunnel-listen"), kd.port("api")
        md = Daemon(self, directory, [
            "perc-md", "--pki", dev.directory, "--kd", "tcp:127.0.0.1:{}".format(kd_port),
            "--media-port", "0", "--media-interface", "127.0.0.1",
            "--api", "tcp:0:interface=127.0.0.1"])
        md_api, media = md.port("api"), md.port("media")
        kd.wait_for("Tunnel with")
        # Both registered before either starts: an endpoint sends for two
        # seconds, which a slow ``perc register`` for the other could outlast.
        registered_ids = []
        for name in ("alice", "bob"):
            fingerprint = subprocess.run(
                PERC + ["pki", "endpoint", directory, "--name", name],
                capture_output=True, text=True, timeout=60).stdout.strip().splitlines()[-1]
            tls_id = "{}-ProcessTlsId-0123456789".format(name)
            registered = subprocess.run(PERC + [
                "register", "--kd-api", "http://127.0.0.1:{}".format(kd_api),
                "--token-file", os.path.join(directory, "perc-kd-api.token"),
                "--md-api", "http://127.0.0.1:{}".format(md_api),
                "--md-token-file", os.path.join(directory, "perc-md-api.token"),
                "--conference", "processes", "--tls-id", tls_id, "--fingerprint", fingerprint],
                capture_output=True, text=True, timeout=60)
            self.assertEqual(registered.returncode, 0, registered.stderr)
            registered_ids.append((name, tls_id, registered.stdout.strip().splitlines()[-1]))
        runs = []
        for name, tls_id, kd_tls_id in registered_ids:
            runs.append(subprocess.Popen(PERC + [
                "endpoint", "--media", "127.0.0.1:{}".format(media), "--name", name,
                "--cert", os.path.join(directory, name + ".pem"),
                "--key", os.path.join(directory, name + ".key"), "--tls-id", tls_id,
                "--expect-kd-tls-id", kd_tls_id,
                "--expect-kd-fingerprint", pki.fingerprint(
                    x509.load_pem_x509_certificate(open(dev.kd_certificate, "rb").read())),
                "--duration", "2", "--rate", "50", "--expect-senders", "1"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for run in runs:
            out, err = run.communicate(timeout=90)
            self.assertEqual(run.returncode, 0, out + err)
            self.assertIn("verified 1 senders (expected 1); 0 failed verification", out)
        md.stop()
        kd.stop()
