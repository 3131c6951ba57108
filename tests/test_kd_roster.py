"""
Tests for perc.kd.roster: the Key Distributor's registration store, on real
SQLite files.
"""

import os
import sqlite3

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase, TestCase

from perc.errors import ConfigError
from perc.kd.roster import (
    KD_TLS_ID_LENGTH,
    REASON_DELETED,
    REASON_FINGERPRINT_CHANGED,
    InvalidRegistration,
    Registration,
    RegistrationConflict,
    Roster,
    RosterError,
    RosterFull,
    StorageError,
    new_kd_tls_id,
    validate_conference,
    validate_fingerprint,
    validate_tls_id,
)
from perc.pki import fingerprint as certificate_fingerprint
from perc.pki import self_signed_certificate

TLS_A = "endpoint-a-tls-id-0123456789"
TLS_B = "endpoint-b-tls-id-0123456789"
TLS_C = "endpoint-c/tls_id+0123456789"


def fp(octet: int, hash_name: str = "sha-256", size: int = 32) -> str:
    return "{} {}".format(hash_name, ":".join("{:02X}".format((octet + i) % 256) for i in range(size)))


FP1 = fp(1)
FP2 = fp(2)


class ValidationTests(SynchronousTestCase):
    def test_tls_id_accepted(self):
        for text in ("a" * 20, "A" * 255, "azAZ09+/-_" * 2, TLS_C):
            self.assertEqual(validate_tls_id(text), text)

    def test_tls_id_rejected(self):
        for text in ("a" * 19, "a" * 256, "", "a" * 19 + "=", "a" * 19 + " ",
                     "a" * 19 + "é", "a" * 20 + "\n", None, 12345678901234567890123, b"a" * 20):
            with self.assertRaises(InvalidRegistration, msg=repr(text)) as caught:
                validate_tls_id(text)
            self.assertIn("tls-id", str(caught.exception))

    def test_conference_accepted(self):
        for text in ("c", "C", "0", "room-1.a_b", "x" * 255):
            self.assertEqual(validate_conference(text), text)

    def test_conference_rejected(self):
        for text in ("", ".", "..", "-x", "_x", ".x", "x" * 256, "a/b", "a b", "a%2F",
                     "é", "a\n", None, 5):
            with self.assertRaises(InvalidRegistration, msg=repr(text)) as caught:
                validate_conference(text)
            self.assertIn("conference", str(caught.exception))

    def test_fingerprint_normalised(self):
        lower = FP1.lower().replace("sha-256", "SHA-256")
        self.assertEqual(validate_fingerprint(lower), FP1)
        self.assertEqual(validate_fingerprint("  " + FP1 + " "), FP1)

    def test_fingerprint_rejected(self):
        for text in ("", "sha-256", "md5 " + fp(1, size=16)[8:], "sha-256 " + fp(1, size=31)[8:],
                     "sha-256 zz", "sha-999 AB:CD", None):
            with self.assertRaises(InvalidRegistration, msg=repr(text)) as caught:
                validate_fingerprint(text)
            self.assertIn("fingerprint", str(caught.exception))

    def test_errors_are_roster_errors(self):
        for error in (InvalidRegistration, RegistrationConflict, RosterFull, StorageError):
            self.assertTrue(issubclass(error, RosterError))
        self.assertTrue(issubclass(InvalidRegistration, ValueError))

    def test_new_kd_tls_id(self):
        values = {new_kd_tls_id() for _ in range(50)}
        self.assertEqual(len(values), 50)
        for value in values:
            self.assertEqual(len(value), KD_TLS_ID_LENGTH)
            self.assertEqual(validate_tls_id(value), value)

    def test_registration_certificate_match(self):
        certificate, _ = self_signed_certificate()
        other, _ = self_signed_certificate()
        for hash_name in ("sha-256", "sha-1", "sha-512"):
            registration = Registration(
                "c", TLS_A, certificate_fingerprint(certificate, hash_name), "k" * 32
            )
            self.assertEqual(registration.hash_name, hash_name)
            self.assertTrue(registration.matches_certificate(certificate))
            self.assertFalse(registration.matches_certificate(other))


class RosterTestsMixin:
    def setUp(self):
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "roster.sqlite")

    @defer.inlineCallbacks
    def open(self, **kwargs):
        roster = yield Roster.open(self.path, **kwargs)
        self.addCleanup(roster.close)
        return roster

    def stored_rows(self):
        """What is in the database file, read with a separate connection."""
        connection = sqlite3.connect(self.path)
        try:
            return sorted(connection.execute(
                "SELECT conference, tls_id, fingerprint, kd_tls_id FROM registrations"))
        finally:
            connection.close()

    def sabotage(self, statement: str):
        """Make the database refuse ``statement`` ('INSERT', 'UPDATE', 'DELETE')."""
        connection = sqlite3.connect(self.path)
        try:
            connection.execute(
                "CREATE TRIGGER sabotage_{0} BEFORE {0} ON registrations "
                "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END".format(statement))
            connection.commit()
        finally:
            connection.close()


class RosterTests(RosterTestsMixin, TestCase):
    @defer.inlineCallbacks
    def test_put_get_list(self):
        roster = yield self.open()
        registration, created = yield roster.put("conf", TLS_A, FP1.lower())
        self.assertTrue(created)
        self.assertEqual(registration.conference, "conf")
        self.assertEqual(registration.tls_id, TLS_A)
        self.assertEqual(registration.fingerprint, FP1)
        validate_tls_id(registration.kd_tls_id)
        self.assertEqual(len(registration.kd_tls_id), KD_TLS_ID_LENGTH)
        self.assertEqual(roster.get("conf", TLS_A), registration)
        self.assertEqual(roster.lookup(TLS_A), registration)
        self.assertIsNone(roster.get("other", TLS_A))
        self.assertIsNone(roster.lookup(TLS_B))
        second, _ = yield roster.put("conf", TLS_C, FP2)
        yield roster.put("elsewhere", TLS_B, FP2)
        self.assertEqual(roster.list("conf"), (registration, second))
        self.assertEqual([r.tls_id for r in roster.list("elsewhere")], [TLS_B])
        self.assertEqual(roster.list("nobody"), ())
        self.assertEqual(len(roster), 3)
        self.assertEqual(registration.to_json(), {
            "conference": "conf", "tls_id": TLS_A, "fingerprint": FP1,
            "kd_tls_id": registration.kd_tls_id})
        self.assertEqual(self.stored_rows(), sorted([
            ("conf", TLS_A, FP1, registration.kd_tls_id),
            ("conf", TLS_C, FP2, second.kd_tls_id),
            ("elsewhere", TLS_B, FP2, roster.lookup(TLS_B).kd_tls_id),
        ]))

    @defer.inlineCallbacks
    def test_kd_tls_ids_differ_between_endpoints(self):
        roster = yield self.open()
        a, _ = yield roster.put("conf", TLS_A, FP1)
        b, _ = yield roster.put("conf", TLS_B, FP1)
        self.assertNotEqual(a.kd_tls_id, b.kd_tls_id)

    @defer.inlineCallbacks
    def test_replace_keeps_kd_tls_id(self):
        roster = yield self.open()
        first, created = yield roster.put("conf", TLS_A, FP1)
        second, created_again = yield roster.put("conf", TLS_A, FP2)
        self.assertTrue(created)
        self.assertFalse(created_again)
        self.assertEqual(second.fingerprint, FP2)
        self.assertEqual(second.kd_tls_id, first.kd_tls_id)
        self.assertEqual(roster.lookup(TLS_A), second)
        self.assertEqual(self.stored_rows(), [("conf", TLS_A, FP2, first.kd_tls_id)])
        same, created_third = yield roster.put("conf", TLS_A, FP2)
        self.assertEqual(same, second)
        self.assertFalse(created_third)

    @defer.inlineCallbacks
    def test_delete(self):
        roster = yield self.open()
        yield roster.put("conf", TLS_A, FP1)
        yield roster.put("conf", TLS_B, FP2)
        self.assertFalse((yield roster.delete("other", TLS_A)))
        self.assertIsNotNone(roster.lookup(TLS_A))
        self.assertTrue((yield roster.delete("conf", TLS_A)))
        self.assertIsNone(roster.lookup(TLS_A))
        self.assertIsNone(roster.get("conf", TLS_A))
        self.assertEqual([r.tls_id for r in roster.list("conf")], [TLS_B])
        self.assertEqual(roster.lookup_by_fingerprint(FP1), ())
        self.assertFalse((yield roster.delete("conf", TLS_A)))
        self.assertEqual([row[1] for row in self.stored_rows()], [TLS_B])

    @defer.inlineCallbacks
    def test_reregister_after_delete_gets_new_kd_tls_id(self):
        roster = yield self.open()
        first, _ = yield roster.put("conf", TLS_A, FP1)
        yield roster.delete("conf", TLS_A)
        again, created = yield roster.put("other", TLS_A, FP1)
        self.assertTrue(created)
        self.assertEqual(again.conference, "other")
        self.assertNotEqual(again.kd_tls_id, first.kd_tls_id)

    @defer.inlineCallbacks
    def test_persistence_across_reopen(self):
        roster = yield Roster.open(self.path)
        a, _ = yield roster.put("conf", TLS_A, FP1)
        b, _ = yield roster.put("conf", TLS_B, FP1)
        c, _ = yield roster.put("other", TLS_C, FP2)
        b2, _ = yield roster.put("conf", TLS_B, FP2)
        yield roster.delete("other", TLS_C)
        yield roster.close()

        reopened = yield self.open()
        self.assertEqual(reopened.lookup(TLS_A), a)
        self.assertEqual(reopened.lookup(TLS_B), b2)
        self.assertEqual(reopened.lookup(TLS_B).kd_tls_id, b.kd_tls_id)
        self.assertIsNone(reopened.lookup(TLS_C))
        self.assertEqual(reopened.list("conf"), (a, b2))
        self.assertEqual(reopened.lookup_by_fingerprint(FP2), (b2,))
        # And the reopened roster keeps working.
        replaced, created = yield reopened.put("conf", TLS_A, FP2)
        self.assertFalse(created)
        self.assertEqual(replaced.kd_tls_id, a.kd_tls_id)

    @defer.inlineCallbacks
    def test_put_validates(self):
        roster = yield self.open()
        cases = [("bad conf", TLS_A, FP1), ("conf", "short", FP1), ("conf", TLS_A, "sha-256 AB"),
                 ("conf", TLS_A, "md5 " + FP1.split()[1]), ("", TLS_A, FP1)]
        for conference, tls_id, fingerprint_text in cases:
            with self.assertRaises(InvalidRegistration):
                yield roster.put(conference, tls_id, fingerprint_text)
        self.assertEqual(len(roster), 0)
        self.assertEqual(self.stored_rows(), [])

    @defer.inlineCallbacks
    def test_conflict_across_conferences(self):
        roster = yield self.open()
        first, _ = yield roster.put("conf", TLS_A, FP1)
        with self.assertRaises(RegistrationConflict) as caught:
            yield roster.put("other", TLS_A, FP2)
        self.assertIn(TLS_A, str(caught.exception))
        self.assertEqual(roster.lookup(TLS_A), first)
        self.assertEqual(roster.list("other"), ())
        self.assertEqual(self.stored_rows(), [("conf", TLS_A, FP1, first.kd_tls_id)])

    @defer.inlineCallbacks
    def test_concurrent_puts_are_serialised(self):
        roster = yield self.open(max_registrations=1)
        results = yield defer.DeferredList(
            [roster.put("conf", TLS_A, FP1), roster.put("other", TLS_A, FP2),
             roster.put("conf", TLS_B, FP1)],
            consumeErrors=True)
        (ok1, first), (ok2, conflict), (ok3, full) = results
        self.assertTrue(ok1)
        self.assertFalse(ok2)
        conflict.trap(RegistrationConflict)
        self.assertFalse(ok3)
        full.trap(RosterFull)
        self.assertEqual(self.stored_rows(), [("conf", TLS_A, FP1, first[0].kd_tls_id)])

    @defer.inlineCallbacks
    def test_limit(self):
        roster = yield self.open(max_registrations=2)
        self.assertEqual(roster.max_registrations, 2)
        yield roster.put("conf", TLS_A, FP1)
        yield roster.put("conf", TLS_B, FP1)
        with self.assertRaises(RosterFull):
            yield roster.put("conf", TLS_C, FP1)
        self.assertIsNone(roster.lookup(TLS_C))
        self.assertEqual(len(self.stored_rows()), 2)
        # Replacing an existing registration is still allowed when full.
        replaced, created = yield roster.put("conf", TLS_A, FP2)
        self.assertFalse(created)
        # Deleting one makes room again.
        yield roster.delete("conf", TLS_B)
        _, created = yield roster.put("conf", TLS_C, FP1)
        self.assertTrue(created)

    @defer.inlineCallbacks
    def test_limit_applies_to_loaded_rows(self):
        roster = yield Roster.open(self.path)
        yield roster.put("conf", TLS_A, FP1)
        yield roster.put("conf", TLS_B, FP1)
        yield roster.close()
        reopened = yield self.open(max_registrations=2)
        with self.assertRaises(RosterFull):
            yield reopened.put("conf", TLS_C, FP1)

    @defer.inlineCallbacks
    def test_observers_on_delete_and_fingerprint_change(self):
        roster = yield self.open()
        seen = []
        roster.add_removal_observer(lambda registration, reason: seen.append((registration, reason)))
        first, _ = yield roster.put("conf", TLS_A, FP1)
        self.assertEqual(seen, [])
        same, _ = yield roster.put("conf", TLS_A, FP1.lower())
        self.assertEqual(seen, [])
        second, _ = yield roster.put("conf", TLS_A, FP2)
        self.assertEqual(seen, [(first, REASON_FINGERPRINT_CHANGED)])
        yield roster.delete("conf", TLS_A)
        self.assertEqual(seen, [(first, REASON_FINGERPRINT_CHANGED), (second, REASON_DELETED)])
        yield roster.delete("conf", TLS_A)
        self.assertEqual(len(seen), 2)

    @defer.inlineCallbacks
    def test_observer_sees_change_already_made(self):
        roster = yield self.open()
        states = []
        roster.add_removal_observer(lambda registration, reason: states.append(
            roster.lookup(registration.tls_id)))
        yield roster.put("conf", TLS_A, FP1)
        second, _ = yield roster.put("conf", TLS_A, FP2)
        yield roster.delete("conf", TLS_A)
        self.assertEqual(states, [second, None])

    @defer.inlineCallbacks
    def test_failing_observer_does_not_break_change(self):
        roster = yield self.open()
        seen = []

        def broken(registration, reason):
            raise RuntimeError("observer bug")

        roster.add_removal_observer(broken)
        roster.add_removal_observer(lambda registration, reason: seen.append(reason))
        yield roster.put("conf", TLS_A, FP1)
        deleted = yield roster.delete("conf", TLS_A)
        self.assertTrue(deleted)
        self.assertEqual(seen, [REASON_DELETED])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    @defer.inlineCallbacks
    def test_remove_observer(self):
        roster = yield self.open()
        seen = []
        observer = lambda registration, reason: seen.append(reason)  # noqa: E731
        roster.add_removal_observer(observer)
        roster.remove_removal_observer(observer)
        yield roster.put("conf", TLS_A, FP1)
        yield roster.delete("conf", TLS_A)
        self.assertEqual(seen, [])

    @defer.inlineCallbacks
    def test_lookup_by_fingerprint(self):
        roster = yield self.open()
        a, _ = yield roster.put("zeta", TLS_A, FP1)
        b, _ = yield roster.put("alpha", TLS_B, FP1)
        c, _ = yield roster.put("alpha", TLS_C, FP2)
        self.assertEqual(roster.lookup_by_fingerprint(FP1.lower()), (b, a))
        self.assertEqual(roster.lookup_by_fingerprint(FP2), (c,))
        self.assertEqual(roster.lookup_by_fingerprint(fp(3)), ())
        yield roster.put("alpha", TLS_B, FP2)
        self.assertEqual(roster.lookup_by_fingerprint(FP1), (a,))
        self.assertEqual([r.tls_id for r in roster.lookup_by_fingerprint(FP2)], [TLS_B, TLS_C])
        with self.assertRaises(InvalidRegistration):
            roster.lookup_by_fingerprint("not a fingerprint")

    @defer.inlineCallbacks
    def test_lookup_by_certificate(self):
        certificate, _ = self_signed_certificate()
        roster = yield self.open()
        self.assertEqual(roster.lookup_by_certificate(certificate), ())
        a, _ = yield roster.put("conf", TLS_A, certificate_fingerprint(certificate, "sha-1"))
        b, _ = yield roster.put("conf", TLS_B, certificate_fingerprint(certificate, "sha-256"))
        yield roster.put("conf", TLS_C, FP1)
        self.assertEqual(roster.lookup_by_certificate(certificate), (a, b))

    @defer.inlineCallbacks
    def test_failed_insert_stores_nothing(self):
        roster = yield self.open()
        self.sabotage("INSERT")
        with self.assertRaises(StorageError) as caught:
            yield roster.put("conf", TLS_A, FP1)
        self.assertIn("disk on fire", str(caught.exception))
        self.assertIsNone(roster.lookup(TLS_A))
        self.assertEqual(roster.list("conf"), ())
        self.assertEqual(roster.lookup_by_fingerprint(FP1), ())
        self.assertEqual(len(roster), 0)
        self.assertEqual(self.stored_rows(), [])
        self.flushLoggedErrors(sqlite3.Error)

    @defer.inlineCallbacks
    def test_failed_update_keeps_old_registration(self):
        roster = yield self.open()
        seen = []
        roster.add_removal_observer(lambda registration, reason: seen.append(reason))
        first, _ = yield roster.put("conf", TLS_A, FP1)
        self.sabotage("UPDATE")
        with self.assertRaises(StorageError):
            yield roster.put("conf", TLS_A, FP2)
        self.assertEqual(roster.lookup(TLS_A), first)
        self.assertEqual(roster.lookup_by_fingerprint(FP2), ())
        self.assertEqual(seen, [])
        self.assertEqual(self.stored_rows(), [("conf", TLS_A, FP1, first.kd_tls_id)])
        self.flushLoggedErrors(sqlite3.Error)

    @defer.inlineCallbacks
    def test_failed_delete_keeps_registration(self):
        roster = yield self.open()
        seen = []
        roster.add_removal_observer(lambda registration, reason: seen.append(reason))
        first, _ = yield roster.put("conf", TLS_A, FP1)
        self.sabotage("DELETE")
        with self.assertRaises(StorageError):
            yield roster.delete("conf", TLS_A)
        self.assertEqual(roster.lookup(TLS_A), first)
        self.assertEqual(seen, [])
        self.assertEqual(len(self.stored_rows()), 1)
        self.flushLoggedErrors(sqlite3.Error)

    @defer.inlineCallbacks
    def test_changes_after_close_fail(self):
        roster = yield Roster.open(self.path)
        first, _ = yield roster.put("conf", TLS_A, FP1)
        yield roster.close()
        with self.assertRaises(StorageError):
            yield roster.put("conf", TLS_B, FP1)
        with self.assertRaises(StorageError):
            yield roster.delete("conf", TLS_A)
        self.assertEqual(roster.lookup(TLS_A), first)
        yield roster.close()  # closing twice is harmless

    @defer.inlineCallbacks
    def test_close_waits_for_pending_write(self):
        roster = yield Roster.open(self.path)
        put = roster.put("conf", TLS_A, FP1)
        yield roster.close()
        registration, created = yield put
        self.assertTrue(created)
        self.assertEqual(self.stored_rows(), [("conf", TLS_A, FP1, registration.kd_tls_id)])


class OpenErrorTests(RosterTestsMixin, TestCase):
    @defer.inlineCallbacks
    def test_not_a_database(self):
        with open(self.path, "wb") as handle:
            handle.write(b"this is not an SQLite database, not at all" * 100)
        with self.assertRaises(ConfigError) as caught:
            yield Roster.open(self.path)
        self.assertIn(self.path, str(caught.exception))
        self.assertNotIn("\n", str(caught.exception))

    @defer.inlineCallbacks
    def test_missing_directory(self):
        path = os.path.join(self.directory, "missing", "roster.sqlite")
        with self.assertRaises(ConfigError) as caught:
            yield Roster.open(path)
        self.assertIn(path, str(caught.exception))

    @defer.inlineCallbacks
    def test_newer_schema_refused(self):
        connection = sqlite3.connect(self.path)
        connection.execute("PRAGMA user_version = 99")
        connection.close()
        with self.assertRaises(ConfigError) as caught:
            yield Roster.open(self.path)
        self.assertIn("99", str(caught.exception))

    @defer.inlineCallbacks
    def test_unusable_row_refused(self):
        roster = yield Roster.open(self.path)
        yield roster.close()
        connection = sqlite3.connect(self.path)
        connection.execute("INSERT INTO registrations VALUES ('short', 'conf', ?, ?)",
                           (FP1, "k" * 32))
        connection.commit()
        connection.close()
        with self.assertRaises(ConfigError) as caught:
            yield Roster.open(self.path)
        self.assertIn("tls-id", str(caught.exception))
