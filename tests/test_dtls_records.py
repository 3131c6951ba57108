"""
Tests for perc.dtls.records: the TLS 1.2 PRF against a published vector and
OpenSSL's exporter, record sealing and opening, the replay window, and
compacted server associations against OpenSSL clients in memory (the
interop tests against ``openssl s_client`` are in test_dtls_interop).
"""

from __future__ import annotations

import gc
import hashlib
import hmac
import random

from OpenSSL import SSL
from OpenSSL._util import lib as _lib
from twisted.trial.unittest import SynchronousTestCase

from perc import dtls
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from perc.dtls.established import last_message_seq
from perc.dtls.mac import KeyedHmac
from perc.dtls.post_handshake import encode_handshake
from perc.dtls.records import (
    CONTENT_ALERT,
    CONTENT_APPLICATION_DATA,
    CONTENT_HANDSHAKE,
    MAX_PLAINTEXT,
    RecordProtection,
    _ReplayWindow,
    suite_for,
    tls12_prf,
)
from perc.ekt import EktKey
from tests.test_dtls import P9, make
from tests.test_dtls import tls12_prf as td_prf

AES128 = suite_for("ECDHE-ECDSA-AES128-GCM-SHA256")
AES256 = suite_for("ECDHE-ECDSA-AES256-GCM-SHA384")
CHACHA = suite_for("ECDHE-ECDSA-CHACHA20-POLY1305")


class PrfTests(SynchronousTestCase):
    def test_published_sha256_vector(self):
        """The TLS 1.2 PRF test vector for P_SHA256 (100 octets)."""
        out = tls12_prf(hashlib.sha256, bytes.fromhex("9bbe436ba940f017b17652849a71db35"),
                        b"test label", bytes.fromhex("a0ba9f936cda311827a6f796ffd5198c"), 100)
        self.assertEqual(out.hex(), (
            "e3f229ba727be17b8d122620557cd453c2aab21d07c3d495329b52d4e61edb5a"
            "6b301791e90d35c9c9a46b4e14baf9af0fa022f7077def17abfd3797c0564bab"
            "4fbc91666e9def9b97fce34f796789baa48082d122ee42c5a72e5a5110fff701"
            "87347b66"))

    def test_keyed_hmac_is_hmac(self):
        """KeyedHmac agrees with hmac (OpenSSL's) for keys shorter, as long and longer than a block."""
        self.assertEqual(  # RFC 4231 test case 2
            KeyedHmac(hashlib.sha256, b"Jefe").digest(b"what do ya want for nothing?").hex(),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
        rng = random.Random(4231)
        for hash_function, name in ((hashlib.sha256, "sha256"), (hashlib.sha384, "sha384")):
            for key_length in (0, 1, 32, 48, 63, 64, 65, 127, 128, 129, 300):
                key = rng.randbytes(key_length)
                mac = KeyedHmac(hash_function, key)
                for message_length in (0, 1, 77, 1000):
                    message = rng.randbytes(message_length)
                    self.assertEqual(mac.digest(message), hmac.digest(key, message, name))

    def test_matches_openssl_exporter(self):
        """RFC 5705 export is the PRF over client_random + server_random: OpenSSL agrees."""
        harness = make(client_kwargs={"compact": False})
        harness.start()
        harness.run()
        connection = harness.client._conn
        suite = suite_for(connection.get_cipher_name())
        self.assertIsNotNone(suite)
        self.assertEqual(
            tls12_prf(suite.prf_hash, connection.master_key(), b"EXTRACTOR-dtls_srtp",
                      connection.client_random() + connection.server_random(), 80),
            connection.export_keying_material(b"EXTRACTOR-dtls_srtp", 80))


def pair(suite, epoch=1):
    """A server and a client protection built from the same secrets."""
    secrets = dict(master_secret=bytes(range(48)), client_random=b"c" * 32,
                   server_random=b"s" * 32, epoch=epoch, next_write_sequence=0)
    return (RecordProtection.from_master_secret(suite, server=True, **secrets),
            RecordProtection.from_master_secret(suite, server=False, **secrets))


class RecordTests(SynchronousTestCase):
    def test_round_trip_each_suite_both_ways(self):
        for suite in (AES128, AES256, CHACHA):
            server, client = pair(suite)
            record = server.seal(CONTENT_APPLICATION_DATA, b"to the client")
            self.assertEqual(len(record), len(b"to the client") + suite.overhead)
            self.assertEqual(client.open(record), (CONTENT_APPLICATION_DATA, b"to the client"))
            record = client.seal(CONTENT_ALERT, b"\x01\x00")
            self.assertEqual(server.open(record), (CONTENT_ALERT, b"\x01\x00"))

    def test_header_and_sequence_numbers(self):
        server, _ = pair(AES128, epoch=1)
        first = server.seal(CONTENT_APPLICATION_DATA, b"a")
        second = server.seal(CONTENT_APPLICATION_DATA, b"b")
        self.assertEqual(first[:11], bytes.fromhex("17fefd0001000000000000"))
        self.assertEqual(second[3:11], bytes.fromhex("0001000000000001"))
        self.assertEqual(int.from_bytes(first[11:13], "big"), len(first) - 13)
        # GCM: the explicit nonce is the epoch and sequence number.
        self.assertEqual(second[13:21], second[3:11])

    def test_directions_use_different_keys(self):
        server, _ = pair(AES128)
        self.assertIsNone(server.open(server.seal(CONTENT_APPLICATION_DATA, b"mirror")))

    def test_tampered_records_rejected(self):
        for suite in (AES128, CHACHA):
            server, client = pair(suite)
            record = bytearray(server.seal(CONTENT_APPLICATION_DATA, b"payload"))
            for index in (0, 4, 10, 14, len(record) - 1):
                altered = bytearray(record)
                altered[index] ^= 1
                self.assertIsNone(client.open(bytes(altered)), (suite.name, index))
            self.assertEqual(client.open(bytes(record)), (CONTENT_APPLICATION_DATA, b"payload"))

    def test_malformed_records_rejected(self):
        server, client = pair(AES128)
        record = server.seal(CONTENT_APPLICATION_DATA, b"payload")
        for bad in (b"", record[:12], record[:-1], record + b"x", record[:1] + b"\xfe\xff"
                    + record[3:]):
            self.assertIsNone(client.open(bad))

    def test_other_epoch_rejected(self):
        server, _ = pair(AES128, epoch=1)
        _, client2 = pair(AES128, epoch=2)
        self.assertIsNone(client2.open(server.seal(CONTENT_APPLICATION_DATA, b"x")))

    def test_replays_rejected_reordering_accepted(self):
        server, client = pair(AES128)
        records = [server.seal(CONTENT_APPLICATION_DATA, bytes([n])) for n in range(100)]
        self.assertIsNotNone(client.open(records[5]))
        self.assertIsNone(client.open(records[5]))
        self.assertIsNotNone(client.open(records[2]))  # older, inside the window
        self.assertIsNone(client.open(records[2]))
        self.assertIsNotNone(client.open(records[90]))
        self.assertIsNone(client.open(records[20]))  # 70 behind: outside the window
        self.assertIsNotNone(client.open(records[30]))  # 60 behind: inside, fresh
        self.assertIsNone(client.open(records[30]))
        self.assertIsNotNone(client.open(records[99]))
        self.assertIsNone(client.open(records[90]))

    def test_forged_record_does_not_move_the_window(self):
        server, client = pair(AES128)
        genuine = server.seal(CONTENT_APPLICATION_DATA, b"genuine")
        forged = bytearray(genuine)
        forged[5:11] = (2 ** 47).to_bytes(6, "big")
        self.assertIsNone(client.open(bytes(forged)))
        self.assertIsNotNone(client.open(genuine))

    def test_sequence_exhaustion(self):
        secrets = dict(master_secret=bytes(48), client_random=bytes(32),
                       server_random=bytes(32), epoch=1)
        server = RecordProtection.from_master_secret(
            AES128, server=True, next_write_sequence=2 ** 48 - 1, **secrets)
        server.seal(CONTENT_APPLICATION_DATA, b"last")
        self.assertRaises(OverflowError, server.seal, CONTENT_APPLICATION_DATA, b"one too many")
        self.assertRaises(ValueError, RecordProtection.from_master_secret, AES128,
                          server=True, next_write_sequence=2 ** 48, **secrets)

    def test_unknown_suites(self):
        self.assertIsNone(suite_for("ECDHE-ECDSA-AES128-SHA256"))
        self.assertIsNone(suite_for(None))

    def test_repr_hides_keys(self):
        server, _ = pair(AES128)
        self.assertEqual(repr(server), "<RecordProtection ECDHE-ECDSA-AES128-GCM-SHA256 epoch 1>")


def established(cipher=None, client_kwargs=None, **listener_kwargs):
    """A handshake run to completion in memory; ``cipher`` restricts the client's offer."""
    if cipher is None:
        harness = make(listener_kwargs=listener_kwargs or None, client_kwargs=client_kwargs)
    else:
        # Own credentials give the client its own SSL context, whose cipher
        # list may then be narrowed before the ClientHello (pyOpenSSL
        # refuses to change a context in use, hence the raw call).
        harness = make(listener_kwargs=listener_kwargs or None, client_kwargs=client_kwargs,
                       client_credentials=dtls.Credentials.self_signed("cipher-test"))
        assert _lib.SSL_CTX_set_cipher_list(harness.client._context._context, cipher.encode())
    harness.start()
    harness.run()
    assert harness.complete(), "handshake did not complete"
    return harness


def client_data(harness, data):
    output = harness.client.send_application_data(data)
    events = []
    for datagram in output.datagrams:
        events.extend(harness.server.receive(datagram, 0.0).events)
    return output.datagrams, events


def server_data(harness, data):
    events = []
    for datagram in harness.server.send_application_data(data).datagrams:
        events.extend(harness.client.receive(datagram, 0.0).events)
    return events


class CompactedAssociationTests(SynchronousTestCase):
    def test_established_server_leaves_openssl(self):
        gc.collect()  # what earlier tests left must not be counted in "before"
        before = len(SSL.Connection._reverse_mapping)
        registry = dtls.callback_registry_size()
        harness = established(client_kwargs={"compact": False})
        gc.collect()
        self.assertTrue(harness.server.compacted)
        self.assertFalse(harness.client.compacted)
        self.assertIsNone(harness.server._conn)
        # Only the client's connection is left, and only its callback state.
        self.assertEqual(len(SSL.Connection._reverse_mapping), before + 1)
        self.assertEqual(dtls.callback_registry_size(), registry + 1)
        self.assertIsNone(harness.server.next_timeout(0.0))

    def test_keys_are_openssls_exporter_for_each_suite(self):
        """
        The keys of HandshakeComplete, computed by the engine for the suites
        it handles, are what OpenSSL exports (RFC 5705) on the other side.
        """
        for cipher in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
                       "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-ECDSA-AES128-SHA256"):
            harness = established(cipher=cipher, client_kwargs={"compact": False})
            connection = harness.client._conn
            self.assertEqual(connection.get_cipher_name(), cipher)
            done = harness.event("server", dtls.HandshakeComplete)
            profile = done.profile
            self.assertEqual(done.keys, profile.split(connection.export_keying_material(
                b"EXTRACTOR-dtls_srtp", profile.keying_material_length)))
            self.assertEqual(harness.event("client", dtls.HandshakeComplete).keys, done.keys)

    def test_suite_found_once_per_openssl_cipher(self):
        """
        The exporter finds the suite by the SSL_CIPHER pointer (OpenSSL's
        static cipher table), named once; no cipher (NULL) is not a suite.
        """
        from perc.dtls.association import _SUITES_BY_CIPHER
        from perc.dtls.bindings import ffi
        for cipher in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES128-SHA256"):
            established(cipher=cipher)
        names = {None if suite is None else suite.name for suite in _SUITES_BY_CIPHER.values()}
        self.assertIn("ECDHE-ECDSA-AES128-GCM-SHA256", names)
        self.assertIn(None, names)  # the CBC suite stays on OpenSSL
        count = len(_SUITES_BY_CIPHER)
        established(cipher="ECDHE-ECDSA-AES128-GCM-SHA256")
        self.assertEqual(len(_SUITES_BY_CIPHER), count)
        self.assertIsNone(_SUITES_BY_CIPHER[ffi.NULL])
        self.assertEqual(len(_SUITES_BY_CIPHER), count)

    def test_not_compacted_when_turned_off(self):
        harness = established(compact=False)
        self.assertFalse(harness.server.compacted)
        self.assertEqual(server_data(harness, b"still OpenSSL"),
                         [dtls.ApplicationData(b"still OpenSSL")])

    def test_suite_not_handled_stays_on_openssl(self):
        harness = established(cipher="ECDHE-ECDSA-AES128-SHA256")
        self.assertEqual(harness.client._conn.get_cipher_name(), "ECDHE-ECDSA-AES128-SHA256")
        self.assertFalse(harness.server.compacted)
        self.assertEqual(server_data(harness, b"cbc"), [dtls.ApplicationData(b"cbc")])

    def test_data_both_ways_for_each_suite(self):
        for cipher in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
                       "ECDHE-ECDSA-CHACHA20-POLY1305"):
            harness = established(cipher=cipher)
            self.assertTrue(harness.server.compacted, cipher)
            self.assertEqual(harness.server._records.suite.name, cipher)
            for n in range(5):
                # OpenSSL's replay check would drop a repeated sequence number.
                payload = "server record {}".format(n).encode()
                self.assertEqual(server_data(harness, payload), [dtls.ApplicationData(payload)])
            for n in range(5):
                payload = "client record {}".format(n).encode()
                _, events = client_data(harness, payload)
                self.assertEqual(events, [dtls.ApplicationData(payload)])

    def test_replayed_client_record_ignored(self):
        harness = established()
        datagrams, events = client_data(harness, b"\x01")
        self.assertEqual(events, [dtls.ApplicationData(b"\x01")])
        self.assertEqual(harness.server.receive(datagrams[0], 0.0), dtls.Output())

    def test_garbage_ignored(self):
        harness = established()
        for junk in (b"\x17", b"\x17\xfe\xfd" + bytes(60), bytes(200), b"\x16" * 40):
            self.assertEqual(harness.server.receive(junk, 0.0), dtls.Output())
        self.assertTrue(harness.server.established)

    def test_client_close_notify(self):
        harness = established()
        output = harness.client.close(0.0)
        events = []
        answers = []
        for datagram in output.datagrams:
            result = harness.server.receive(datagram, 0.0)
            events.extend(result.events)
            answers.extend(result.datagrams)
        self.assertEqual(events, [dtls.Closed("peer closed the association (close_notify)")])
        self.assertTrue(harness.server.closed)
        self.assertEqual(len(answers), 1)  # our close_notify
        self.assertEqual(answers[0][0], CONTENT_ALERT)

    def test_server_close_reaches_client(self):
        harness = established()
        output = harness.server.close(0.0, "registration deleted")
        self.assertEqual(output.events, (dtls.Closed("registration deleted"),))
        events = []
        for datagram in output.datagrams:
            events.extend(harness.client.receive(datagram, 0.0).events)
        self.assertEqual(events, [dtls.Closed("peer closed the association (close_notify)")])
        self.assertEqual(harness.server.send_application_data(b"late"), dtls.Output())

    def client_protection(self, harness, next_sequence=1000):
        """Client-side record protection from the client's OpenSSL session."""
        connection = harness.client._conn
        return RecordProtection.from_master_secret(
            suite_for(connection.get_cipher_name()), server=False,
            master_secret=connection.master_key(), client_random=connection.client_random(),
            server_random=connection.server_random(), epoch=1,
            next_write_sequence=next_sequence)

    def test_fatal_alert_ends(self):
        harness = established(client_kwargs={"compact": False})
        record = self.client_protection(harness).seal(CONTENT_ALERT, b"\x02\x50")
        output = harness.server.receive(record, 0.0)
        self.assertEqual(output.events, (dtls.Closed(
            "association failed: peer sent fatal alert 80"),))
        self.assertEqual(output.datagrams, ())

    def test_warning_alert_and_renegotiation_ignored(self):
        harness = established(client_kwargs={"compact": False})
        client = self.client_protection(harness)
        self.assertEqual(harness.server.receive(client.seal(CONTENT_ALERT, b"\x01\x5a"), 0.0),
                         dtls.Output())
        hello = client.seal(CONTENT_HANDSHAKE, b"\x01" + bytes(40))
        self.assertEqual(harness.server.receive(hello, 0.0), dtls.Output())
        self.assertTrue(harness.server.established)

    def test_retransmitted_finished_repeats_final_flight_bounded(self):
        harness = make(listener_kwargs={"max_retransmissions": 2})
        harness.start()
        final = []

        def lose_final_flight(datagram):
            for output in harness.server_outputs:
                if any(isinstance(e, dtls.HandshakeComplete) for e in output.events):
                    final[:] = output.datagrams
                    return True
            return False

        harness.drop_to_client = lose_final_flight
        harness.run()
        self.assertTrue(harness.server.compacted)
        self.assertFalse(harness.client.established)
        client = self.client_protection(harness, next_sequence=1)
        # Each retransmitted Finished gets the same final flight, twice at most.
        for _ in range(2):
            finished = client.seal(CONTENT_HANDSHAKE, b"\x14" + bytes(23))
            self.assertEqual(harness.server.receive(finished, 0.0).datagrams, tuple(final))
        finished = client.seal(CONTENT_HANDSHAKE, b"\x14" + bytes(23))
        self.assertEqual(harness.server.receive(finished, 0.0).datagrams, ())
        # The repeated flight completes the client's handshake.
        events = []
        for datagram in final:
            events.extend(harness.client.receive(datagram, 0.0).events)
        self.assertTrue(any(isinstance(e, dtls.HandshakeComplete) for e in events))
        self.assertEqual(server_data(harness, b"now"), [dtls.ApplicationData(b"now")])

    def test_too_large_for_mtu(self):
        harness = established()
        limit = harness.server._records.max_plaintext(harness.server.mtu)
        self.assertRaises(ValueError, harness.server.send_application_data, b"x" * (limit + 1))
        self.assertEqual(server_data(harness, b"y" * limit), [dtls.ApplicationData(b"y" * limit)])

    def test_profile_and_identity_kept(self):
        harness = established()
        self.assertEqual(harness.server.profile, P9)
        self.assertIsNotNone(harness.server.peer_fingerprint)


class ReplayWindowTests(SynchronousTestCase):
    def test_huge_jump_resets_the_window(self):
        """A jump of 2^47 (a shifted bitmap would need terabytes) leaves a fresh window."""
        window = _ReplayWindow()
        for sequence in (0, 1, 3):
            window.mark(sequence)
        window.mark(2 ** 47)
        self.assertEqual((window.highest, window.bitmap), (2 ** 47, 1))
        self.assertTrue(window.seen(2 ** 47))
        self.assertFalse(window.seen(2 ** 47 - 1))
        self.assertTrue(window.seen(3))  # far behind: outside the window
        window.mark(2 ** 47 - 2)
        self.assertEqual(window.bitmap, 0b101)
        self.assertFalse(window.seen(2 ** 47 - 1))

    def test_huge_jump_between_records(self):
        secrets = dict(master_secret=bytes(range(48)), client_random=b"c" * 32,
                       server_random=b"s" * 32, epoch=1)
        server, client = pair(AES128)
        early = server.seal(CONTENT_APPLICATION_DATA, b"early")
        self.assertIsNotNone(client.open(early))
        far = RecordProtection.from_master_secret(AES128, server=True,
                                                  next_write_sequence=2 ** 47, **secrets)
        self.assertEqual(client.open(far.seal(CONTENT_APPLICATION_DATA, b"far")),
                         (CONTENT_APPLICATION_DATA, b"far"))
        self.assertEqual(client.open(far.seal(CONTENT_APPLICATION_DATA, b"next")),
                         (CONTENT_APPLICATION_DATA, b"next"))
        self.assertIsNone(client.open(server.seal(CONTENT_APPLICATION_DATA, b"old")))

    def test_mark_through(self):
        window = _ReplayWindow()
        window.mark_through(5)
        self.assertTrue(all(window.seen(n) for n in range(6)))
        self.assertFalse(window.seen(6))


def independent_seal(sequence, plaintext, content_type=CONTENT_APPLICATION_DATA):
    """A server record of pair(AES128), sealed from RFC 5246/5288 without perc.dtls.records."""
    block = td_prf(bytes(range(48)), b"key expansion", b"s" * 32 + b"c" * 32, 40,
                   hashlib.sha256)
    server_key, server_iv = block[16:32], block[36:40]
    explicit = (1).to_bytes(2, "big") + sequence.to_bytes(6, "big")
    additional = explicit + bytes((content_type,)) + b"\xfe\xfd" + \
        len(plaintext).to_bytes(2, "big")
    body = explicit + AESGCM(server_key).encrypt(server_iv + explicit, plaintext, additional)
    return bytes((content_type,)) + b"\xfe\xfd" + explicit + len(body).to_bytes(2, "big") + body


class RecordSizeTests(SynchronousTestCase):
    """RFC 5246 section 6.2.1: at most 2^14 octets of plaintext a record, whatever the MTU."""

    def test_sealing_refuses_more(self):
        server, client = pair(AES128)
        self.assertRaises(ValueError, server.seal, CONTENT_APPLICATION_DATA,
                          bytes(MAX_PLAINTEXT + 1))
        record = server.seal(CONTENT_APPLICATION_DATA, bytes(MAX_PLAINTEXT))
        self.assertEqual(client.open(record), (CONTENT_APPLICATION_DATA, bytes(MAX_PLAINTEXT)))
        self.assertEqual(server.max_plaintext(65535), MAX_PLAINTEXT)

    def test_opening_discards_more(self):
        _, client = pair(AES128)
        self.assertIsNone(client.open(independent_seal(0, bytes(MAX_PLAINTEXT + 1))))
        self.assertEqual(client.open(independent_seal(1, bytes(MAX_PLAINTEXT))),
                         (CONTENT_APPLICATION_DATA, bytes(MAX_PLAINTEXT)))

    def test_engine_under_a_large_mtu(self):
        harness = established(mtu=65535)
        self.assertRaises(ValueError, harness.server.send_application_data,
                          bytes(MAX_PLAINTEXT + 1))
        self.assertEqual(server_data(harness, bytes(MAX_PLAINTEXT)),
                         [dtls.ApplicationData(bytes(MAX_PLAINTEXT))])


def epoch_of(record):
    return int.from_bytes(record[3:5], "big")


class HandOffReplayTests(SynchronousTestCase):
    def test_earlier_finished_cannot_be_replayed_after_the_hand_off(self):
        """
        The client's Finished arrives alone (OpenSSL keeps it), the rest of
        its flight completes the handshake: that earlier Finished must not
        make the compacted server send its final flight again.
        """
        harness = make()
        harness.start()
        while not any(epoch_of(r) == 1 for d in harness.to_server
                      for r in dtls.split_records(d)):
            self.assertTrue(harness.step())
        flight = [r for d in harness.to_server for r in dtls.split_records(d)]
        harness.to_server = []
        finished = b"".join(r for r in flight if epoch_of(r) == 1)
        harness.deliver_to_server(finished)
        self.assertFalse(harness.server.established)
        harness.deliver_to_server(b"".join(r for r in flight if epoch_of(r) == 0))
        self.assertTrue(harness.server.compacted)
        harness.run()
        self.assertTrue(harness.complete())
        self.assertEqual(harness.server.receive(finished, 0.0), dtls.Output())
        # A genuinely new record still gets through.
        _, events = client_data(harness, b"fresh")
        self.assertEqual(events, [dtls.ApplicationData(b"fresh")])

    def test_prime_with_authenticated_records_opens_none(self):
        """
        Records the caller knows authentic (of this epoch) prime the window
        unopened: even one that would not open counts; another epoch's not.
        """
        server, client = pair(AES128)
        record = client.seal(CONTENT_APPLICATION_DATA, b"finished")  # sequence 0
        unopenable = record[:5] + (5).to_bytes(6, "big") + record[11:-1] + bytes((record[-1] ^ 1,))
        other_epoch = record[:3] + b"\x00\x02" + (9).to_bytes(6, "big") + record[11:]
        server.prime([unopenable, other_epoch], authenticated=True)
        for sequence in range(1, 6):
            self.assertIsNone(server.open(client.seal(CONTENT_APPLICATION_DATA, b"old")), sequence)
        self.assertEqual(server.open(client.seal(CONTENT_APPLICATION_DATA, b"next")),
                         (CONTENT_APPLICATION_DATA, b"next"))

    def test_forged_early_record_does_not_move_the_window(self):
        """Only authentic early records prime the window: a forged far-ahead one does not."""
        forged = bytes.fromhex("17fefd0001") + (2 ** 47).to_bytes(6, "big") + \
            (40).to_bytes(2, "big") + bytes(40)
        harness = make()
        harness.start()
        while harness.server is None or not harness.server.established:
            if harness.server is not None:
                harness.deliver_to_server(forged)
            self.assertTrue(harness.step())
        harness.run()
        self.assertTrue(harness.server.compacted)
        _, events = client_data(harness, b"after")
        self.assertEqual(events, [dtls.ApplicationData(b"after")])


KEY = EktKey(bytes(range(16)), bytes(range(100, 112)), 0x1234, 3600)
REKEY = EktKey(bytes(range(16, 32)), bytes(range(100, 112)), 0x1235, 3600)


def ekt_established(compact=True, client_ciphers=(1,)):
    harness = make(client_kwargs=dict(ekt_ciphers=client_ciphers, compact=compact),
                   listener_kwargs=dict(ekt_ciphers=(1,)))
    harness.start()
    harness.run()
    assert harness.complete(), "handshake did not complete"
    return harness


def independent_open(connection, record):
    """
    The plaintext of a server record (AES-GCM suites), with keys derived
    here from the client's OpenSSL session (RFC 5246 6.3, RFC 5288 3).
    """
    name = connection.get_cipher_name()
    k = 32 if "AES256" in name else 16
    algorithm = hashlib.sha384 if name.endswith("SHA384") else hashlib.sha256
    block = td_prf(connection.master_key(), b"key expansion",
                   connection.server_random() + connection.client_random(), 2 * k + 8, algorithm)
    server_key, server_iv = block[k:2 * k], block[2 * k + 4:2 * k + 8]
    sealed = record[21:]
    additional = record[3:11] + record[0:3] + (len(sealed) - 16).to_bytes(2, "big")
    return AESGCM(server_key).decrypt(server_iv + record[13:21], sealed, additional)


def only_record(output):
    [datagram] = output.datagrams
    [record] = dtls.split_records(datagram)
    return record


def sequence_of(record):
    return int.from_bytes(record[5:11], "big")


class LastMessageSeqTests(SynchronousTestCase):
    """The server's next message_seq is learnt from the epoch-0 records it wrote."""

    def test_messages_and_fragments_of_an_epoch_zero_record(self):
        messages = encode_handshake(11, 3, b"c" * 40) + encode_handshake(14, 5, b"")
        record = bytes.fromhex("16fefd0000000000000007") + len(messages).to_bytes(2, "big")
        self.assertEqual(last_message_seq(record + messages), 5)
        # A truncated last message still names its message_seq.
        self.assertEqual(last_message_seq(record + messages[:-12] + messages[-12:-4]), 3)

    def test_other_records_count_as_none(self):
        body = encode_handshake(20, 9, b"f" * 12)
        header = len(body).to_bytes(2, "big")
        self.assertEqual(last_message_seq(bytes.fromhex("16fefd0001000000000000") + header
                                          + body), -1)  # epoch 1: encrypted
        self.assertEqual(last_message_seq(bytes.fromhex("14fefd0000000000000000000101")), -1)
        self.assertEqual(last_message_seq(b"\x16\xfe"), -1)

    def test_handshake_keeps_the_count_of_the_server_flight(self):
        harness = established()
        plain = [r for o in harness.server_outputs for d in o.datagrams
                 for r in dtls.split_records(d) if epoch_of(r) == 0 and r[0] == 22]
        # ServerHello, Certificate, ServerKeyExchange, CertificateRequest,
        # ServerHelloDone: message_seq 1 to 5 after the cookie exchange.
        self.assertEqual([int.from_bytes(r[17:19], "big") for r in plain], [1, 2, 3, 4, 5])
        self.assertEqual(harness.server._next_message_seq, 7)  # Finished is 6


class EktKeyMessageTests(SynchronousTestCase):
    """RFC 8870 section 5.2.2: the ekt_key handshake message, its ACK and retransmission."""

    def test_record_bytes(self):
        harness = ekt_established(compact=False)  # the client's session, for the decoder
        connection = harness.client._conn
        final = [r for o in harness.server_outputs for d in o.datagrams
                 for r in dtls.split_records(d) if epoch_of(r) == 1 and r[0] == 22]
        [finished] = [independent_open(connection, r) for r in final]
        self.assertEqual(finished[0], 20)
        finished_seq = int.from_bytes(finished[4:6], "big")
        record = only_record(harness.server.send_ekt_key(KEY, 0.0))
        self.assertEqual(record[:5], bytes.fromhex("16fefd0001"))  # handshake, DTLS 1.2, epoch 1
        body = (b"\x00\x10" + bytes(range(16)) + b"\x00\x0c" + bytes(range(100, 112))
                + b"\x12\x34" + (3600).to_bytes(3, "big"))
        self.assertEqual(independent_open(connection, record),
                         b"\x1a" + len(body).to_bytes(3, "big")
                         + (finished_seq + 1).to_bytes(2, "big") + b"\x00\x00\x00"
                         + len(body).to_bytes(3, "big") + body)
        # The same key again is the same message in a new record.
        again = only_record(harness.server.send_ekt_key(KEY, 0.5))
        self.assertEqual(sequence_of(again), sequence_of(record) + 1)
        self.assertEqual(independent_open(connection, again),
                         independent_open(connection, record))
        # A rekey is a new message: the next message_seq.
        rekey = independent_open(connection, only_record(harness.server.send_ekt_key(REKEY, 1)))
        self.assertEqual(rekey[4:6], (finished_seq + 2).to_bytes(2, "big"))
        self.assertEqual(rekey[12:], REKEY.encode())

    def test_client_reads_and_acknowledges(self):
        harness = ekt_established()
        self.assertTrue(harness.client.compacted)
        output = harness.server.send_ekt_key(KEY, 0.0)
        self.assertEqual(harness.server.next_timeout(0.0), 1.0)
        received = harness.client.receive(output.datagrams[0], 0.1)
        [event] = received.events
        self.assertEqual((event.key, event.repeated), (KEY, False))
        [ack] = received.datagrams
        self.assertEqual(ack[0], 26)  # RFC 9147 ACK content type
        self.assertEqual(harness.server.receive(ack, 0.2), dtls.Output())
        self.assertTrue(harness.server.ekt_key_acknowledged)
        self.assertIsNone(harness.server.next_timeout(0.2))
        self.assertEqual(harness.server.handle_timeout(10.0), dtls.Output())

    def test_retransmitted_until_acknowledged_then_stops(self):
        harness = ekt_established()
        first = only_record(harness.server.send_ekt_key(KEY, 10.0))
        self.assertEqual(harness.server.handle_timeout(10.5), dtls.Output())  # not yet due
        # The ACK is lost: the message goes again after 1 s, then 2 s.
        harness.client.receive(first, 10.1)
        retransmission = only_record(harness.server.handle_timeout(11.0))
        self.assertGreater(sequence_of(retransmission), sequence_of(first))
        self.assertEqual(harness.server.next_timeout(11.0), 13.0)
        # The repeat is a duplicate by message_seq: not processed again, but acknowledged.
        received = harness.client.receive(retransmission, 11.1)
        [event] = received.events
        self.assertEqual((event.key, event.repeated), (KEY, True))
        [ack] = received.datagrams
        harness.server.receive(ack, 11.2)
        self.assertTrue(harness.server.ekt_key_acknowledged)
        self.assertEqual(harness.server.handle_timeout(13.0), dtls.Output())

    def test_retransmissions_bounded_and_doubling(self):
        harness = ekt_established()
        harness.server.send_ekt_key(KEY, 0.0)
        due, sent = harness.server.next_timeout(0.0), []
        while due is not None:
            sent.append((due, len(harness.server.handle_timeout(due).datagrams)))
            due = harness.server.next_timeout(due)
        # 6 retransmissions (max_retransmissions), then the timer that gives up.
        self.assertEqual(sent, [(1.0, 1), (3.0, 1), (7.0, 1), (15.0, 1), (31.0, 1), (63.0, 1),
                                (123.0, 0)])  # the timer is capped at 60 s
        self.assertTrue(harness.server.established)
        # Asked again (the endpoint's request): sent again, with a fresh timer.
        self.assertEqual(len(harness.server.send_ekt_key(KEY, 100.0).datagrams), 1)
        self.assertEqual(harness.server.next_timeout(100.0), 101.0)

    def test_rekey_is_a_new_message_and_stale_ones_are_dropped(self):
        harness = ekt_established()
        old = only_record(harness.server.send_ekt_key(KEY, 0.0))
        new = only_record(harness.server.send_ekt_key(REKEY, 0.1))
        [event] = harness.client.receive(new, 0.2).events
        self.assertEqual((event.key, event.repeated), (REKEY, False))
        # The old message arriving late does not take the client back.
        [event] = harness.client.receive(old, 0.3).events
        self.assertEqual((event.key, event.repeated), (REKEY, True))

    def test_alert_ends_retransmission(self):
        harness = ekt_established()
        harness.server.send_ekt_key(KEY, 0.0)
        alert = harness.client._records.seal(CONTENT_ALERT, b"\x01\x5a")  # warning
        harness.server.receive(alert, 0.1)
        self.assertIsNone(harness.server.next_timeout(0.1))

    def test_unusable_messages_get_an_alert(self):
        cases = [
            (b"garbage", 50),  # decode_error
            (EktKey(bytes(32), bytes(12), 1, 1).encode(), 47),  # a 256-bit key for AESKW-128
        ]
        for body, description in cases:
            harness = ekt_established()
            record = harness.server._records.seal(CONTENT_HANDSHAKE,
                                                  encode_handshake(26, 9, body))
            output = harness.client.receive(record, 0.0)
            [closed] = output.events
            self.assertTrue(closed.rejected)
            self.assertIn("unusable ekt_key message", closed.reason)
            [alert] = output.datagrams
            self.assertEqual(harness.server._records.open(alert),
                             (CONTENT_ALERT, bytes((2, description))))
            self.assertTrue(harness.client.closed)

    def test_fragment_and_unnegotiated_get_alerts(self):
        harness = ekt_established()
        body = KEY.encode()
        fragment = b"\x1a" + (len(body) + 10).to_bytes(3, "big") + b"\x00\x05\x00\x00\x00" + \
            len(body).to_bytes(3, "big") + body
        output = harness.client.receive(
            harness.server._records.seal(CONTENT_HANDSHAKE, fragment), 0.0)
        self.assertEqual(harness.server._records.open(output.datagrams[0]),
                         (CONTENT_ALERT, b"\x02\x32"))  # decode_error
        harness = ekt_established(client_ciphers=None)
        self.assertIsNone(harness.client.ekt_cipher)
        output = harness.client.receive(
            harness.server._records.seal(CONTENT_HANDSHAKE, encode_handshake(26, 5, body)), 0.0)
        self.assertEqual(harness.server._records.open(output.datagrams[0]),
                         (CONTENT_ALERT, b"\x02\x0a"))  # unexpected_message
        self.assertTrue(output.events[0].rejected)

    def test_random_handshake_records_never_raise(self):
        rng = random.Random(8870)
        harness = ekt_established()
        for n in range(300):
            if harness.client.closed:
                harness = ekt_established()
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
            plaintext = encode_handshake(26, n, body) if n % 2 else body
            output = harness.client.receive(
                harness.server._records.seal(CONTENT_HANDSHAKE, plaintext), 0.0)
            for event in output.events:
                if isinstance(event, dtls.Closed):
                    self.assertIn("unusable ekt_key message", event.reason)

    def test_needs_the_own_record_layer(self):
        harness = established(compact=False)
        output = harness.server.send_ekt_key(KEY, 0.0)
        [closed] = output.events
        self.assertIn("not on the own record layer", closed.reason)
        self.assertRaises(dtls.DtlsStateError, harness.client.send_ekt_key, KEY, 0.0)

    def test_client_write_sequence_continues_after_a_retransmitted_finished(self):
        """
        The client's Finished flight went twice (its first copy lost): its
        own record layer starts after both, so no (key, nonce) is used twice.
        """
        harness = make(client_kwargs=dict(ekt_ciphers=(1,)),
                       listener_kwargs=dict(ekt_ciphers=(1,)))
        harness.start()
        while not any(epoch_of(r) == 1 for d in harness.to_server
                      for r in dtls.split_records(d)):
            self.assertTrue(harness.step())
        harness.to_server = []  # the client's Finished flight is lost
        harness.settle()  # its retransmission (a real wait of about a second) completes it
        written = [sequence_of(r) for d in harness.client_sent for r in dtls.split_records(d)
                   if epoch_of(r) == 1]
        self.assertEqual(written, [0, 1])
        record = dtls.split_records(harness.client.send_application_data(b"x").datagrams[0])[0]
        self.assertEqual(sequence_of(record), 2)
