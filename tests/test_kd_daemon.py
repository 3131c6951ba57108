"""
``twistd perc-kd`` as a real process: clear one-line errors, and a daemon
that starts, serves the registration API to ``perc register`` and stops.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from perc import pki

from tests.daemonhelpers import PERC, TWISTD, DaemonOutput, listening_port


class DaemonTests(SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        self.pki = pki.create_dev_pki(os.path.join(self.dir, "pki"))

    def twistd(self, *args, timeout=60):
        return subprocess.run(TWISTD + ["-n", "--pidfile=", "perc-kd"] + list(args),
                              cwd=self.dir, capture_output=True, text=True, timeout=timeout)

    def test_missing_certificate_one_line(self):
        result = self.twistd("--cert", "nope.pem", "--key", self.pki.kd_key,
                             "--ca", self.pki.ca_certificate)
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(result.stderr.strip(), "perc-kd: --cert nope.pem: no such file")
        self.assertNotIn("Traceback", result.stdout + result.stderr)

    def test_no_credentials_one_line(self):
        result = self.twistd()
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertIn("perc-kd: ", result.stderr)

    def test_port_in_use_one_line(self):
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            result = self.twistd("--pki", self.pki.directory, "--api", "none",
                                 "--tunnel-listen", "tcp:{}:interface=127.0.0.1".format(port))
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("perc-kd: cannot listen on --tunnel-listen", result.stdout + result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)

    def test_daemon_serves_registrations(self):
        process = subprocess.Popen(
            TWISTD + ["-n", "--pidfile=", "perc-kd", "--pki", self.pki.directory,
                      "--tunnel-listen", "tcp:0:interface=127.0.0.1",
                      "--api", "tcp:0:interface=127.0.0.1"],
            cwd=self.dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output = DaemonOutput(process)
        self.addCleanup(output.stop)
        output.wait_for("Key Distributor ready")
        api_port = listening_port(output, "api")
        token_file = os.path.join(self.dir, "perc-kd-api.token")
        self.assertEqual(os.stat(token_file).st_mode & 0o777, 0o600)
        endpoint = pki.self_signed_certificate("endpoint")[0]
        result = subprocess.run(PERC + [
            "register", "--kd-api", "http://127.0.0.1:{}".format(api_port),
            "--token-file", token_file, "--conference", "daemon-test",
            "--tls-id", "DaemonTestTlsId-0123456789", "--fingerprint", pki.fingerprint(endpoint)],
            capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        kd_tls_id = result.stdout.strip().splitlines()[-1]
        self.assertRegex(kd_tls_id, r"^[A-Za-z0-9+/_-]{32}$")
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        self.assertTrue(os.path.exists(os.path.join(self.dir, "perc-kd.sqlite3")))

    def test_unusable_stored_tls_id_one_line(self):
        """
        A Key Distributor tls-id in the database that is no tls-id (here a
        trailing newline, which a "$" match would let through into every
        ServerHello) stops the daemon with one line, not a traceback.
        """
        import sqlite3
        connection = sqlite3.connect(os.path.join(self.dir, "perc-kd.sqlite3"))
        connection.execute(
            "CREATE TABLE registrations (tls_id TEXT PRIMARY KEY NOT NULL, conference TEXT "
            "NOT NULL, fingerprint TEXT NOT NULL, kd_tls_id TEXT NOT NULL)")
        endpoint = pki.self_signed_certificate("endpoint")[0]
        connection.execute("INSERT INTO registrations VALUES (?, ?, ?, ?)", (
            "DaemonTestTlsId-0123456789", "conf", pki.fingerprint(endpoint),
            "KdTlsId-0123456789abcdef\n"))
        connection.commit()
        connection.close()
        result = self.twistd("--pki", self.pki.directory, "--api", "none",
                             "--tunnel-listen", "tcp:0:interface=127.0.0.1")
        output = result.stdout + result.stderr
        self.assertNotIn("Traceback", output)
        [line] = [line for line in output.splitlines() if "unusable row" in line]
        self.assertIn("perc-kd: ", line)
        self.assertIn("tls-id", line)


class StoreDaemonTests(SynchronousTestCase):
    """``twistd perc-kd`` refuses an unusable sealing key or database in one line."""

    setUp = DaemonTests.setUp
    twistd = DaemonTests.twistd

    def start(self, *args):
        return self.twistd("--pki", self.pki.directory, "--api", "none", "--tunnel-listen",
                           "tcp:0:interface=127.0.0.1", *args)

    def seal_database(self, key):
        """A current-schema database whose secrets are sealed with ``key``."""
        import sqlite3

        from perc.kd.store.database import _prepare
        from perc.kd.store.dialects import SQLITE
        connection = sqlite3.connect(os.path.join(self.dir, "perc-kd.sqlite3"))
        _prepare(connection.cursor(), SQLITE, key)
        connection.commit()
        connection.close()

    def test_wrong_sealing_key_one_line(self):
        from perc.kd.sealing import SealingKey
        self.seal_database(SealingKey.generate())
        result = self.start()
        output = result.stdout + result.stderr
        self.assertNotIn("Traceback", output)
        [line] = [line for line in output.splitlines() if "sealing key" in line]
        self.assertIn("perc-kd: ", line)
        self.assertIn("the sealing key {} is not the one this database's secrets are sealed "
                      "with".format(os.path.join(self.dir, "perc-kd.sealing-key")), line)

    def test_sealing_key_file_refused_one_line(self):
        path = os.path.join(self.dir, "short.key")
        with open(path, "wb") as handle:
            handle.write(b"too short")
        os.chmod(path, 0o600)
        result = self.start("--sealing-key", path)
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(result.stderr.strip(),
                         "perc-kd: sealing key {} is not 32 octets".format(path))
        os.chmod(path, 0o644)
        result = self.start("--sealing-key", path)
        self.assertEqual(result.stderr.strip(), "perc-kd: sealing key {} may be accessed by "
                         "group or others (mode 0644): chmod 600 it".format(path))

    def test_postgresql_needs_a_sealing_key_file(self):
        result = self.start("--db", "postgresql://kd:secret@db.invalid/perc")
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(result.stderr.strip(),
                         "perc-kd: --db postgresql://kd:***@db.invalid/perc needs --sealing-key "
                         "FILE (the same file on every Key Distributor)")

    def test_newer_schema_one_line(self):
        from perc.kd.sealing import SealingKey
        self.seal_database(SealingKey.load_or_create(
            os.path.join(self.dir, "perc-kd.sealing-key")))
        import sqlite3
        connection = sqlite3.connect(os.path.join(self.dir, "perc-kd.sqlite3"))
        from perc.kd.store import SCHEMA_VERSION
        newer = SCHEMA_VERSION + 1
        connection.execute("UPDATE schema_version SET version = ?", (newer,))
        connection.commit()
        connection.close()
        result = self.start()
        output = result.stdout + result.stderr
        self.assertNotIn("Traceback", output)
        [line] = [line for line in output.splitlines() if "schema version" in line]
        self.assertIn("perc-kd: ", line)
        self.assertIn("database schema version {} is newer than this perc-kd knows ({})".format(
            newer, SCHEMA_VERSION), line)

    def test_unreachable_postgresql_one_line(self):
        import importlib.util
        if importlib.util.find_spec("psycopg") is None:
            raise SkipTest('psycopg is not installed (pip install ".[postgresql]")')
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
        key = os.path.join(self.dir, "cluster.sealing-key")
        result = self.start("--db", "postgresql://kd:secret@127.0.0.1:{}/perc".format(port),
                            "--sealing-key", key)
        output = result.stdout + result.stderr
        self.assertNotIn("Traceback", output)
        self.assertNotIn("secret", output)
        [line] = [line for line in output.splitlines() if "cannot use database" in line]
        self.assertIn("perc-kd: cannot use database postgresql://kd:***@127.0.0.1:{}/perc: "
                      .format(port), line)
