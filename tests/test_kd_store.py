"""
The Key Distributor's store (perc.kd.store) on both databases: the same tests
run on SQLite and on PostgreSQL (PERC_TEST_POSTGRES; skipped with a message
saying how to run them when it is not set or does not answer).  Schema
versions and the in-place upgrade of a version-1 file, the sealing-key
check, sealed conference EKTKeys and association state bound to their rows,
atomic (compare-and-swap) key replacement, conference keys across a restart,
a failed write whose key is not used, nothing secret in any table after a
real handshake + EKT + rekey, NOTIFY reaching another Key Distributor, and
connections the server ended replaced without a failed query.
"""

from __future__ import annotations

import os
import sqlite3
import uuid

from twisted.internet import defer, reactor, task
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import TestCase

from perc import dtls, wire
from perc.errors import ConfigError
from perc.kd.associations import KeyDistributor, Limits
from perc.kd.conference_keys import ConferenceKeys
from perc.kd.roster import REASON_DELETED, REASON_FINGERPRINT_CHANGED, Roster
from perc.kd.sealing import SealingError, SealingKey
from perc.kd.store import SCHEMA_VERSION, AssociationRecord, Store, StoredConferenceKey
from perc.profiles import DEFAULT_PROFILES
from tests import test_kd
from tests.kdhelpers import MediaDistributorStandIn, relay_handshake
from tests.storehelpers import PostgresDatabase, SqliteDatabase
from tests.test_logs import encodings
from tests.waits import eventually

FP1 = "sha-256 " + ":".join(["AB"] * 32)
FP2 = "sha-256 " + ":".join(["CD"] * 32)
TLS_A = "StoreTestTlsId-AAAAAAAAAA"


def key_row(conference="conf", spi=7, generation=1, material=b"m" * 29, ttl=3600,
            issued_at=10.5):
    return StoredConferenceKey(conference, spi, generation, ttl, issued_at, material)


class StoreTestsMixin:
    def setUp(self):
        self.database = self.makeDatabase()
        self.key = SealingKey.generate()

    @defer.inlineCallbacks
    def open(self, key="default"):
        store = yield Store.open(self.database, self.key if key == "default" else key)
        self.addCleanup(store.close)
        return store

    # -- schema --------------------------------------------------------------

    @defer.inlineCallbacks
    def test_fresh_database_at_current_version(self):
        yield self.open()
        self.assertEqual(self.execute("SELECT version FROM schema_version"),
                         [(SCHEMA_VERSION,)])
        self.assertEqual(SCHEMA_VERSION, 3)
        self.assertEqual(set(self.tables()), {
            "schema_version", "registrations", "conference_keys", "sealing_check", "nodes",
            "associations"})

    @defer.inlineCallbacks
    def test_newer_schema_refused_in_one_line(self):
        store = yield self.open()
        yield store.close()
        self.execute("UPDATE schema_version SET version = 99")
        with self.assertRaises(ConfigError) as caught:
            yield Store.open(self.database, self.key)
        message = str(caught.exception)
        self.assertIn("schema version 99 is newer than this perc-kd knows (3)", message)
        self.assertNotIn("\n", message)

    @defer.inlineCallbacks
    def test_wrong_sealing_key_refused_in_one_line(self):
        store = yield self.open()
        yield store.close()
        other = SealingKey(os.urandom(32), path="/etc/other.key")
        with self.assertRaises(ConfigError) as caught:
            yield Store.open(self.database, other)
        message = str(caught.exception)
        self.assertIn("the sealing key /etc/other.key is not the one this database's secrets "
                      "are sealed with", message)
        self.assertNotIn("\n", message)
        # The right key still opens it.
        yield self.open()

    # -- conference keys -----------------------------------------------------

    @defer.inlineCallbacks
    def test_replacement_is_compare_and_swap(self):
        """Two Key Distributors on one database: the first write wins, the other adopts it."""
        first = yield self.open()
        second = yield self.open()
        mine = key_row(material=b"1" * 29)
        self.assertEqual((yield first.create_conference_key(mine)), mine)
        theirs = yield second.create_conference_key(key_row(spi=9, material=b"2" * 29))
        self.assertEqual(theirs, mine)
        self.assertEqual(theirs.material, b"1" * 29)
        newer = key_row(spi=8, generation=2, material=b"3" * 29)
        self.assertEqual((yield first.replace_conference_key(newer, 1)), newer)
        late = yield second.replace_conference_key(
            key_row(spi=8, generation=2, material=b"4" * 29), 1)
        self.assertEqual(late.material, b"3" * 29)
        self.assertEqual((yield second.load_conference_keys()), [newer])

    @defer.inlineCallbacks
    def test_sealed_values_moved_or_altered_do_not_open(self):
        store = yield self.open()
        yield store.create_conference_key(key_row("a", material=b"a" * 29))
        yield store.create_conference_key(key_row("b", material=b"b" * 29))
        [(sealed,)] = self.execute("SELECT sealed FROM conference_keys WHERE conference = 'a'")
        self.execute("UPDATE conference_keys SET sealed = ? WHERE conference = 'b'",
                     (bytes(sealed),))
        rows = {row.conference: row for row in (yield store.load_conference_keys())}
        self.assertEqual(rows["a"].material, b"a" * 29)
        self.assertIsNone(rows["b"].material)
        self.execute("UPDATE conference_keys SET ttl = 99999 WHERE conference = 'a'")
        self.assertIsNone((yield store.get_conference_key("a")).material)
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_write_sequence_limit_past_32_bits(self):
        """A DTLS record sequence number has 48 bits: so has the reserved limit."""
        store = yield self.open()
        limit = (1 << 48) - 1024
        record = AssociationRecord("aid-1", "node-a", "md.test", b"state", limit - 2048)
        yield store.put_association(record)
        self.assertEqual((yield store.reserve_block("aid-1", 2048, "node-a")),
                         (limit - 2048, limit))
        self.assertEqual((yield store.get_association("aid-1")).sequence_reserved, limit)

    @defer.inlineCallbacks
    def test_association_state_sealed_put_get_delete(self):
        store = yield self.open()
        record = AssociationRecord("aid-1", "node-a", "md.test", b"state one", 1024)
        yield store.put_association(record)
        self.assertEqual((yield store.get_association("aid-1")), record)
        moved = AssociationRecord("aid-1", "node-b", "md.test", b"state two", 2048)
        yield store.put_association(moved)  # adopted by another node: replaced
        self.assertEqual((yield store.get_association("aid-1")), moved)
        self.assertNotIn(b"state two", b"".join(
            bytes(value) for (value,) in self.execute("SELECT sealed_state FROM associations")))
        yield store.put_association(AssociationRecord("aid-2", "node-a", "md.test", b"x", 0))
        [(sealed,)] = self.execute(
            "SELECT sealed_state FROM associations WHERE association_id = 'aid-1'")
        self.execute("UPDATE associations SET sealed_state = ? WHERE association_id = 'aid-2'",
                     (bytes(sealed),))
        with self.assertRaises(SealingError):
            yield store.get_association("aid-2")
        self.execute("UPDATE associations SET md_identity = 'md.evil' WHERE association_id "
                     "= 'aid-1'")
        with self.assertRaises(SealingError):
            yield store.get_association("aid-1")
        self.assertTrue((yield store.delete_association("aid-1")))
        self.assertFalse((yield store.delete_association("aid-1")))
        self.assertIsNone((yield store.get_association("aid-1")))

    @defer.inlineCallbacks
    def test_conference_keys_survive_a_restart(self):
        store = yield self.open()
        keys = ConferenceKeys(ttl=3600, store=store)
        self.assertEqual((yield keys.load()), 0)
        self.assertIsNone(keys.key_for("conf", 100.0))
        first = yield keys.ensure("conf", 100.0)
        self.assertEqual((yield keys.ensure("conf", 200.0)), first)  # kept while usable
        second = yield keys.rekey("conf", 300.0)
        self.assertEqual(second.ekt_spi, (first.ekt_spi + 1) & 0xFFFF)
        self.assertNotEqual(second.ekt_key_value, first.ekt_key_value)
        yield store.close()

        again = ConferenceKeys(ttl=3600, store=(yield self.open()))
        self.assertEqual((yield again.load()), 1)
        self.assertEqual(again.key_for("conf", 300.0), second)
        self.assertEqual(again.rollover_at("conf"), keys.rollover_at("conf"))
        # Past its TTL the stored key is not handed out; ensure replaces it.
        self.assertIsNone(again.key_for("conf", 300.0 + 3600))
        third = yield again.ensure("conf", 300.0 + 3600)
        self.assertEqual(third.ekt_spi, (second.ekt_spi + 1) & 0xFFFF)

    @defer.inlineCallbacks
    def test_key_whose_write_fails_is_not_used(self):
        store = yield self.open()
        keys = ConferenceKeys(store=store)
        first = yield keys.ensure("conf", 0.0)
        self.refuseWrites("conference_keys")
        with self.assertRaises(store.errors):
            yield keys.rekey("conf", 1.0)
        self.assertEqual(keys.key_for("conf", 1.0).ekt_key_value, first.ekt_key_value)
        with self.assertRaises(store.errors):
            yield keys.ensure("other", 1.0)
        self.assertIsNone(keys.key_for("other", 1.0))

    # -- a real Key Distributor ----------------------------------------------

    @defer.inlineCallbacks
    def startKeyDistributor(self):
        store = yield self.open()
        roster = yield Roster.load(store)
        registration, _ = yield roster.put(test_kd.CONFERENCE, test_kd.TLS_ID,
                                           test_kd._ENDPOINT.fingerprint)
        keys = ConferenceKeys(store=store)
        yield keys.load()
        self.clock = MemoryReactorClock()
        kd = KeyDistributor(roster=roster, credentials=test_kd._KD_CREDENTIALS,
                            profiles=DEFAULT_PROFILES, clock=self.clock, limits=Limits(),
                            allow_missing_tls_id=False, conference_keys=keys)
        self.addCleanup(kd.stop)
        return kd, registration

    @defer.inlineCallbacks
    def test_nothing_secret_in_any_table(self):
        """
        A real handshake, the conference's first EKTKey (stored, then sent),
        an EKTKey request and a rekey: no key, salt or hop-by-hop key appears
        in any table, in any encoding.
        """
        kd, registration = yield self.startKeyDistributor()
        md = MediaDistributorStandIn(kd)
        client = dtls.ClientAssociation(
            test_kd._ENDPOINT, DEFAULT_PROFILES, tls_id=test_kd.TLS_ID.encode(),
            expected_peer_tls_id=registration.kd_tls_id.encode(), ekt_ciphers=(1,))
        aid = uuid.uuid4()
        events = relay_handshake(md, client, aid, self.clock)
        [done] = [e for e in events if isinstance(e, dtls.HandshakeComplete)]
        # No key in memory yet: it is stored first, then sent to the member.
        self.assertEqual([e for e in events if isinstance(e, dtls.EktKeyReceived)], [])
        received = []

        def deliver():
            for message in md.received():
                if isinstance(message, wire.TunneledDtls):
                    output = client.receive(message.dtls_message, self.clock.seconds())
                    received.extend(e.key for e in output.events
                                    if isinstance(e, dtls.EktKeyReceived))
                    for datagram in output.datagrams:
                        md.send(wire.TunneledDtls(aid, datagram))
            return received

        yield eventually(deliver)
        [first] = received
        self.assertEqual(first, kd.conference_keys.key_for(test_kd.CONFERENCE, 0.0))
        for datagram in client.send_application_data(b"\x01").datagrams:
            md.send(wire.TunneledDtls(aid, datagram))
        deliver()
        second, count = yield kd.rekey(test_kd.CONFERENCE)
        self.assertEqual(count, 1)
        self.assertEqual(deliver()[-1], second)
        [media_keys] = [m for m in md.log if isinstance(m, wire.MediaKeys)]

        secrets = [done.keys.client_key, done.keys.server_key, done.keys.client_salt,
                   done.keys.server_salt, media_keys.client_key, media_keys.server_key]
        for key in (first, second):
            secrets += [key.ekt_key_value, key.srtp_master_salt]
        values = [value for table in self.tables()
                  for row in self.execute("SELECT * FROM {}".format(table)) for value in row]
        # The key is stored (sealed) under the SPI in use.
        self.assertEqual(self.execute("SELECT spi FROM conference_keys"), [(second.ekt_spi,)])
        raw = b"\0".join(bytes(value) if isinstance(value, (bytes, memoryview))
                         else str(value).encode() for value in values)
        text = raw.decode("latin-1")
        for secret in secrets:
            self.assertNotIn(secret, raw)
            for form in encodings(secret):
                self.assertNotIn(form, text)


    @defer.inlineCallbacks
    def test_joins_while_the_first_key_is_stored_get_it_once(self):
        """
        Three endpoints complete their handshakes before the conference's
        first EKTKey is written: one store, and each gets the key once
        (a store per joiner sent the key to every member once per joiner).
        """
        kd, _ = yield self.startKeyDistributor()
        endpoints = [(test_kd.TLS_ID, test_kd._ENDPOINT)]
        for number in range(2):
            credentials = dtls.Credentials.self_signed("burst-{}".format(number))
            tls_id = "EndpointTlsId-Burst-{:04d}".format(number)
            yield kd.roster.put(test_kd.CONFERENCE, tls_id, credentials.fingerprint)
            endpoints.append((tls_id, credentials))
        md = MediaDistributorStandIn(kd)
        joined = []
        for tls_id, credentials in endpoints:
            client = dtls.ClientAssociation(
                credentials, DEFAULT_PROFILES, tls_id=tls_id.encode(),
                expected_peer_tls_id=kd.roster.lookup(tls_id).kd_tls_id.encode(),
                ekt_ciphers=(1,))
            association_id = uuid.uuid4()
            events = relay_handshake(md, client, association_id, self.clock)
            self.assertEqual([e for e in events if isinstance(e, dtls.EktKeyReceived)], [])
            self.assertTrue([e for e in events if isinstance(e, dtls.HandshakeComplete)])
            joined.append(association_id)
        md.received()
        handshakes = len(md.log)

        def ekt_key_messages():
            md.received()
            return [m.association_id for m in md.log[handshakes:]
                    if isinstance(m, wire.TunneledDtls)]

        yield eventually(lambda: len(set(ekt_key_messages())) == len(joined))
        yield task.deferLater(reactor, 0.1, lambda: None)  # any later send has happened
        self.assertEqual(sorted(ekt_key_messages()), sorted(joined))

    @defer.inlineCallbacks
    def test_key_request_after_a_failed_store_stores_again(self):
        """
        The conference's first EKTKey could not be written: the member's
        next EKTKey request writes it, and the member gets it.
        """
        kd, registration = yield self.startKeyDistributor()
        self.refuseWrites("conference_keys")
        md = MediaDistributorStandIn(kd)
        client = dtls.ClientAssociation(
            test_kd._ENDPOINT, DEFAULT_PROFILES, tls_id=test_kd.TLS_ID.encode(),
            expected_peer_tls_id=registration.kd_tls_id.encode(), ekt_ciphers=(1,))
        association_id = uuid.uuid4()
        relay_handshake(md, client, association_id, self.clock)
        yield eventually(lambda: kd.counters.get("ekt-key-store-failed") == 1)
        self.flushLoggedErrors(*kd.conference_keys.store.errors)
        self.allowWrites("conference_keys")
        for datagram in client.send_application_data(b"\x01").datagrams:
            md.send(wire.TunneledDtls(association_id, datagram))
        received = []

        def delivered():
            for message in md.received():
                if isinstance(message, wire.TunneledDtls):
                    received.extend(
                        e.key for e in client.receive(message.dtls_message, 0.0).events
                        if isinstance(e, dtls.EktKeyReceived))
            return received

        yield eventually(delivered)
        self.assertEqual(received, [kd.conference_keys.key_for(test_kd.CONFERENCE, 0.0)])

    @defer.inlineCallbacks
    def test_rekey_whose_write_fails_sends_nothing(self):
        kd, registration = yield self.startKeyDistributor()
        first = yield kd.conference_keys.ensure(test_kd.CONFERENCE, 0.0)
        md = MediaDistributorStandIn(kd)
        client = dtls.ClientAssociation(
            test_kd._ENDPOINT, DEFAULT_PROFILES, tls_id=test_kd.TLS_ID.encode(),
            expected_peer_tls_id=registration.kd_tls_id.encode(), ekt_ciphers=(1,))
        events = relay_handshake(md, client, uuid.uuid4(), self.clock)
        self.assertEqual([e.key for e in events if isinstance(e, dtls.EktKeyReceived)], [first])
        md.received()
        self.refuseWrites("conference_keys")
        with self.assertRaises(kd.conference_keys.store.errors):
            yield kd.rekey(test_kd.CONFERENCE)
        self.assertEqual([m for m in md.received() if isinstance(m, wire.TunneledDtls)], [])
        self.assertEqual(kd.conference_keys.key_for(test_kd.CONFERENCE, 0.0), first)


class SqliteStoreTests(SqliteDatabase, StoreTestsMixin, TestCase):
    @defer.inlineCallbacks
    def test_version_1_file_upgrades_in_place(self):
        """A perc-kd.sqlite3 made by perc-kd before schema 2 keeps its registrations."""
        connection = sqlite3.connect(self.database)
        connection.execute(  # schema 1, exactly as it was created
            "CREATE TABLE IF NOT EXISTS registrations ( tls_id TEXT PRIMARY KEY NOT NULL, "
            "conference TEXT NOT NULL, fingerprint TEXT NOT NULL, kd_tls_id TEXT NOT NULL)")
        connection.execute("CREATE INDEX IF NOT EXISTS registrations_by_conference"
                           " ON registrations (conference)")
        connection.execute("PRAGMA user_version = 1")
        connection.execute("INSERT INTO registrations VALUES (?, 'conf', ?, ?)",
                           (TLS_A, FP1, "K" * 32))
        connection.commit()
        connection.close()
        store = yield self.open()
        roster = yield Roster.load(store)
        self.assertEqual(roster.lookup(TLS_A).kd_tls_id, "K" * 32)
        self.assertEqual(self.execute("SELECT version FROM schema_version"), [(3,)])
        # What perc-kd before schema 2 reads: it refuses the file instead of using it.
        self.assertEqual(self.execute("PRAGMA user_version"), [(3,)])
        yield roster.put("conf", TLS_A, FP2)
        self.assertEqual(self.execute("SELECT fingerprint FROM registrations"), [(FP2,)])


class PostgresStoreTests(PostgresDatabase, StoreTestsMixin, TestCase):
    @defer.inlineCallbacks
    def test_schema_2_database_widens_the_reserved_limit(self):
        """Schema 2 made sequence_reserved a 32-bit integer on PostgreSQL: 3 widens it."""
        store = yield self.open()
        yield store.put_association(AssociationRecord("aid-1", "node-a", "md.test", b"s", 7))
        yield store.close()
        self.execute("ALTER TABLE associations ALTER COLUMN sequence_reserved TYPE INTEGER")
        self.execute("UPDATE schema_version SET version = 2")
        store = yield self.open()
        self.assertEqual(self.execute(
            "SELECT data_type FROM information_schema.columns WHERE table_name = "
            "'associations' AND column_name = 'sequence_reserved'"), [("bigint",)])
        self.assertEqual(self.execute("SELECT version FROM schema_version"), [(3,)])
        self.assertEqual((yield store.get_association("aid-1")).sequence_reserved, 7)
        self.assertEqual((yield store.reserve_block("aid-1", 1 << 40, "node-a")),
                         (7, 7 + (1 << 40)))

    @defer.inlineCallbacks
    def test_registration_changes_reach_other_key_distributors(self):
        """NOTIFY perc_registrations: a change through one roster reaches the other's memory."""
        here = yield Roster.load((yield self.open()))
        there = yield Roster.load((yield self.open()))
        removed = []
        there.add_removal_observer(lambda registration, reason: removed.append(reason))
        registration, _ = yield here.put("conf", TLS_A, FP1)
        yield eventually(lambda: there.lookup(TLS_A) == registration)
        yield here.put("conf", TLS_A, FP2)
        yield eventually(lambda: there.lookup(TLS_A).fingerprint == FP2)
        self.assertEqual(removed, [REASON_FINGERPRINT_CHANGED])
        yield here.delete("conf", TLS_A)
        yield eventually(lambda: there.lookup(TLS_A) is None)
        self.assertEqual(removed, [REASON_FINGERPRINT_CHANGED, REASON_DELETED])

    @defer.inlineCallbacks
    def test_notifications_hook_delivers_payloads_on_the_reactor_thread(self):
        writer = yield self.open()
        listener = yield self.open()
        heard = []
        listener.notifications.add("perc_conference_keys", heard.append)
        connected = []
        listener.notifications.add_connected(lambda: connected.append(True))
        yield eventually(lambda: connected)
        yield writer.create_conference_key(key_row("conf-x"))
        yield eventually(lambda: heard)
        self.assertEqual(heard, ["conf-x"])

    @defer.inlineCallbacks
    def test_connections_the_server_ended_are_replaced(self):
        """
        The server ends every connection of a store (what a restart or a
        network cut does to them): each pooled connection fails its next
        query, is dropped (one log line, no traceback) and the query runs
        once more on a new connection, so none fails; the LISTEN connection
        is established again and notifications arrive through it.
        """
        store = yield self.open()
        heard, connected = [], []
        store.notifications.add("perc_conference_keys", heard.append)
        store.notifications.add_connected(lambda: connected.append(True))
        yield eventually(lambda: connected)
        pings = 4  # as many as the pool has connections: each thread holds one
        yield defer.gatherResults([store.ping() for _ in range(pings)])
        ended = self.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                             " WHERE datname = current_database() AND pid <> pg_backend_pid()")
        self.assertGreaterEqual(len(ended), 2)  # the pool's and the LISTEN connection
        answers = yield defer.gatherResults([store.ping() for _ in range(pings)])
        self.assertEqual(answers, [(1,)] * pings)
        yield eventually(lambda: len(connected) == 2)
        writer = yield self.open()
        yield writer.create_conference_key(key_row("conf-x"))
        yield eventually(lambda: heard)
        self.assertEqual(heard, ["conf-x"])
