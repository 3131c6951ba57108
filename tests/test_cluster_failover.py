"""
Issue 14, what must hold, with real processes: two ``twistd perc-kd`` on
one PostgreSQL database (PERC_TEST_POSTGRES), a Media Distributor with a
tunnel to each, three reference endpoints (real UDP, real DTLS, real SRTP)
in one conference spread over both.  The Key Distributor holding the most
associations is killed with SIGKILL mid-conference; once the survivor has
adopted them, a rekey through it reaches every endpoint: no packet fails
verification, every endpoint sees the new key, none handshakes again.
This is ``perc demo --key-distributors 2 --db ... --kill-key-distributor-at``,
whose summary is checked too.
"""

from __future__ import annotations

import io
import re

from twisted.internet import defer, reactor
from twisted.python import usage
from twisted.trial.unittest import TestCase

from perc.errors import ConfigError
from perc.kd.store.postgresql import create_scratch_database, drop_database
from perc.scripts.demo import DemoOptions, run_demo
from tests.storehelpers import postgres_server


class KilledKeyDistributorTests(TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_sigkill_one_of_two_survivor_rekeys_no_handshake(self):
        server = postgres_server()
        out = io.StringIO()
        members = []
        status = yield run_demo(reactor, endpoints=3, seconds=3.0, out=out,
                                key_distributors=2, db=server, kill_at=1.0,
                                members_out=members)
        text = out.getvalue()
        self.assertEqual(status, 0, text)
        # Both Key Distributors carried associations, and the busier one was killed.
        [spread] = re.findall(r"associations per Key Distributor: kd-1 (\d+), kd-2 (\d+)", text)
        self.assertEqual(sorted(int(n) for n in spread), [1, 2], text)
        [(victim, held)] = re.findall(r"killed (kd-\d) \(SIGKILL, process \d+\) holding (\d+)",
                                      text)
        self.assertEqual(int(held), 2, text)
        [survivor] = re.findall(r"rekeyed through (kd-\d)", text)
        self.assertNotEqual(survivor, victim)
        self.assertIn("{} adopted them".format(survivor), text)
        self.assertEqual(len(members), 3)
        for member in members:
            self.assertEqual(member.joins, 1, member.summary())  # no new handshake
            self.assertGreaterEqual(member.rekeys, 1, member.summary())  # the rekey arrived
            self.assertEqual(len(member.stats), 2, member.summary())
            for stats in member.stats.values():
                self.assertGreater(stats.verified, 0)
                self.assertEqual((stats.failed, stats.undecryptable), (0, 0), member.summary())
        self.assertIn("every endpoint carried on without a new handshake", text)
        # The demo's own database is gone.
        [database] = re.findall(r"on postgresql://\S+/(perc_demo_[0-9a-f]+) ", text)
        import psycopg

        with psycopg.connect(server, autocommit=True) as connection:
            found = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                       (database,)).fetchall()
        self.assertEqual(found, [])


class DemoClusterOptionsTests(TestCase):
    def parse(self, *arguments):
        options = DemoOptions()
        options.parseOptions(list(arguments))
        return options

    def refused(self, *arguments) -> str:
        with self.assertRaises(usage.UsageError) as caught:
            self.parse(*arguments)
        return str(caught.exception)

    def test_defaults_one_in_process(self):
        options = self.parse()
        self.assertEqual((options["key-distributors"], options["db"],
                          options["kill-key-distributor-at"]), (1, None, None))

    def test_cluster_needs_postgresql(self):
        self.assertIn("give --db postgresql://", self.refused("--key-distributors", "2"))
        self.assertIn("--db: a postgresql://", self.refused("--db", "kd.sqlite3"))
        self.assertIn("1 to 4", self.refused("--key-distributors", "5"))

    def test_kill_needs_a_survivor_and_a_time_within_the_media(self):
        self.assertIn("needs --key-distributors 2", self.refused(
            "--kill-key-distributor-at", "1"))
        db = "postgresql://postgres@127.0.0.1/postgres"
        self.assertIn("below --seconds", self.refused(
            "-k", "2", "--db", db, "--kill-key-distributor-at", "9", "--seconds", "4"))
        options = self.parse("-k", "2", "--db", db, "--kill-key-distributor-at", "2")
        self.assertEqual(options["kill-key-distributor-at"], 2.0)


class ScratchDatabaseTests(TestCase):
    def test_unreachable_server_one_line(self):
        with self.assertRaises(ConfigError) as caught:
            create_scratch_database("postgresql://nobody@127.0.0.1:1/postgres", "perc_test")
        message = str(caught.exception)
        self.assertIn("cannot create a database on postgresql://nobody@127.0.0.1:1/postgres",
                      message)
        self.assertNotIn("\n", message)

    def test_password_not_in_the_error(self):
        with self.assertRaises(ConfigError) as caught:
            create_scratch_database("postgresql://nobody:s3cret@127.0.0.1:1/postgres", "x")
        self.assertNotIn("s3cret", str(caught.exception))

    def test_created_then_dropped(self):
        server = postgres_server()
        url = create_scratch_database(server, "perc_test")
        import psycopg

        with psycopg.connect(url, autocommit=True) as connection:
            self.assertEqual(connection.execute("SELECT 1").fetchall(), [(1,)])
        drop_database(url, server)
        with self.assertRaises(psycopg.OperationalError):
            psycopg.connect(url, connect_timeout=5).close()
