"""
Tests for perc.dtls: real DTLS between the client-role and the server-role
engine, shuttled through memory.

OpenSSL runs its retransmission timer on the wall clock and cannot be driven
from outside, so the few tests that need a real retransmission wait for it
(about one second per retransmission) while moving the engines' fake clock
by the same amount.  Everything else runs without waiting.
"""

from __future__ import annotations

import gc
import hashlib
import hmac
import random
import time
import weakref

from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL, crypto
from twisted.trial.unittest import SynchronousTestCase

from perc import dtls
from perc.profiles import by_id

P7 = by_id(0x0007)
P8 = by_id(0x0008)
P9 = by_id(0x0009)
P10 = by_id(0x000A)

AID = b"\x01" * 16
CLIENT_TLS_ID = b"ClientTlsId0123456789abcdef"
SERVER_TLS_ID = b"ServerTlsId+/-_0123456789"

_SERVER = dtls.Credentials.self_signed("test-kd")
_CLIENT = dtls.Credentials.self_signed("test-endpoint")
_OTHER = dtls.Credentials.self_signed("someone-else")

#: How long a test may wait for OpenSSL's wall-clock timers, in total.
REAL_WAIT_LIMIT = 12.0


class Harness:
    """
    A client association and a server listener joined by two in-memory
    queues.  Tests drop or reorder datagrams by editing the queues.
    """

    def __init__(self, client, listener, association_id=AID, **listen_kwargs):
        self.client = client
        self.listener = listener
        self.association_id = association_id
        self.listen_kwargs = listen_kwargs
        self.server = None
        self.to_server = []
        self.to_client = []
        self.client_events = []
        self.server_events = []
        self.listener_replies = []
        self.server_outputs = []
        self.client_sent = []
        self.drop_to_server = None
        self.drop_to_client = None
        self.clock = 0.0

    def start(self):
        self._from_client(self.client.start(self.clock))

    def _from_client(self, output):
        self.client_sent.extend(output.datagrams)
        self.to_server.extend(output.datagrams)
        self.client_events.extend(output.events)

    def _from_server(self, output):
        self.server_outputs.append(output)
        self.to_client.extend(output.datagrams)
        self.server_events.extend(output.events)

    def deliver_to_server(self, datagram):
        if self.server is None:
            replies, association = self.listener.listen(
                self.association_id, datagram, self.clock, **self.listen_kwargs)
            self.listener_replies.append(replies)
            self.to_client.extend(replies)
            if association is not None:
                self.server = association
                self._from_server(association.start(self.clock))
        else:
            self._from_server(self.server.receive(datagram, self.clock))

    def deliver_to_client(self, datagram):
        self._from_client(self.client.receive(datagram, self.clock))

    def step(self, reorder=None):
        """Deliver what is queued now, both ways; returns False if nothing was queued."""
        if not self.to_server and not self.to_client:
            return False
        to_server, self.to_server = self.to_server, []
        to_client, self.to_client = self.to_client, []
        if reorder is not None:
            reorder(to_server)
            reorder(to_client)
        for datagram in to_server:
            if self.drop_to_server is None or not self.drop_to_server(datagram):
                self.deliver_to_server(datagram)
        for datagram in to_client:
            if self.drop_to_client is None or not self.drop_to_client(datagram):
                self.deliver_to_client(datagram)
        return True

    def run(self, reorder=None, rounds=30):
        """Deliver queued datagrams both ways until none are left."""
        for _ in range(rounds):
            if not self.step(reorder):
                return
        raise AssertionError("datagrams still flowing after {} rounds".format(rounds))

    def associations(self):
        return [a for a in (self.client, self.server) if a is not None]

    def wait_for_timer(self):
        """
        Wait (really) until the earliest engine timer is due, advance the
        fake clock to it and fire the timers.  Returns False if no timer runs.
        """
        deadlines = [a.next_timeout(self.clock) for a in self.associations()]
        deadlines = [d for d in deadlines if d is not None]
        if not deadlines:
            return False
        deadline = min(deadlines)
        delay = max(0.0, deadline - self.clock)
        # A little extra, because OpenSSL checks its own clock.
        time.sleep(delay + 0.03)
        self.clock = deadline + 0.03
        self._from_client(self.client.handle_timeout(self.clock))
        if self.server is not None:
            self._from_server(self.server.handle_timeout(self.clock))
        return True

    def complete(self):
        return (any(isinstance(e, dtls.HandshakeComplete) for e in self.client_events)
                and any(isinstance(e, dtls.HandshakeComplete) for e in self.server_events))

    def settle(self, reorder=None):
        """Run, firing timers (with real waits), until both sides completed."""
        started = time.monotonic()
        while True:
            self.run(reorder=reorder)
            if self.complete() or any(a.closed for a in self.associations()):
                return
            if time.monotonic() - started > REAL_WAIT_LIMIT:
                raise AssertionError("handshake did not settle")
            if not self.wait_for_timer():
                raise AssertionError("handshake stalled with no timer running")

    def event(self, side, kind):
        events = self.client_events if side == "client" else self.server_events
        found = [e for e in events if isinstance(e, kind)]
        return found[0] if found else None


def make(client_profiles=(P9,), server_profiles=(P9,), client_credentials=_CLIENT,
         client_kwargs=None, listener_kwargs=None, **listen_kwargs):
    client = dtls.ClientAssociation(client_credentials, client_profiles,
                                    **(client_kwargs or {}))
    listener = dtls.ServerListener(_SERVER, server_profiles, **(listener_kwargs or {}))
    return Harness(client, listener, **listen_kwargs)


def handshake(**kwargs):
    harness = make(**kwargs)
    harness.start()
    harness.run()
    return harness


def tls12_prf(secret, label, seed, length, algorithm):
    """RFC 5246 section 5 P_hash, written out independently of OpenSSL."""
    out = b""
    a = label + seed
    while len(out) < length:
        a = hmac.new(secret, a, algorithm).digest()
        out += hmac.new(secret, a + label + seed, algorithm).digest()
    return out[:length]


def independent_export(association, length):
    """RFC 5705 exporter (no context) from the session's master secret."""
    connection = association._conn
    algorithm = hashlib.sha384 if connection.get_cipher_name().endswith("SHA384") \
        else hashlib.sha256
    return tls12_prf(connection.master_key(), b"EXTRACTOR-dtls_srtp",
                     connection.client_random() + connection.server_random(),
                     length, algorithm)


def alerts(datagrams):
    """(level, description) of every plaintext alert record in ``datagrams``."""
    found = []
    for datagram in datagrams:
        for record in dtls.split_records(datagram):
            epoch = int.from_bytes(record[3:5], "big")
            if record[0] == 21 and epoch == 0 and len(record) >= 15:
                found.append((record[13], record[14]))
    return found


def live_connections():
    gc.collect()
    return len(SSL.Connection._reverse_mapping)


class HandshakeTests(SynchronousTestCase):

    def assertKeys(self, harness, profile, key_length, salt_length):
        client = harness.event("client", dtls.HandshakeComplete)
        server = harness.event("server", dtls.HandshakeComplete)
        self.assertIsNotNone(client)
        self.assertIsNotNone(server)
        self.assertEqual(client.profile, profile)
        self.assertEqual(server.profile, profile)
        self.assertEqual(client.keys, server.keys)
        total = 2 * (key_length + salt_length)
        # The server has left OpenSSL by now (compacted); the client's
        # (kept on OpenSSL) session holds the same master secret and randoms.
        material = independent_export(harness.client, total)
        k, s = key_length, salt_length
        self.assertEqual(server.keys.client_key, material[0:k])
        self.assertEqual(server.keys.server_key, material[k:2 * k])
        self.assertEqual(server.keys.client_salt, material[2 * k:2 * k + s])
        self.assertEqual(server.keys.server_salt, material[2 * k + s:2 * k + 2 * s])

    def test_double_profile_keys(self):
        """0x0009: both sides export the same 112 octets, split 32/32/24/24."""
        harness = handshake(client_profiles=(P9,), server_profiles=(P9,),
                            client_kwargs={"compact": False})
        self.assertKeys(harness, P9, 32, 24)

    def test_non_double_profile_keys(self):
        """0x0007: 56 octets, split 16/16/12/12."""
        harness = handshake(client_profiles=(P7,), server_profiles=(P7,),
                            client_kwargs={"compact": False})
        self.assertKeys(harness, P7, 16, 12)

    def test_identities_reported(self):
        harness = handshake(client_kwargs=dict(tls_id=CLIENT_TLS_ID),
                            listener_kwargs=dict(tls_id=SERVER_TLS_ID))
        client = harness.event("client", dtls.HandshakeComplete)
        server = harness.event("server", dtls.HandshakeComplete)
        self.assertEqual(server.peer_fingerprint, _CLIENT.fingerprint)
        self.assertEqual(client.peer_fingerprint, _SERVER.fingerprint)
        self.assertEqual(server.peer_tls_id, CLIENT_TLS_ID)
        self.assertEqual(client.peer_tls_id, SERVER_TLS_ID)
        self.assertTrue(harness.server.established)
        self.assertTrue(harness.client.established)

    def test_extension_56_on_the_wire(self):
        """The ClientHello carries type 56 holding a length octet and the tls-id."""
        client = dtls.ClientAssociation(_CLIENT, [P9], tls_id=CLIENT_TLS_ID)
        (hello,) = client.start(0.0).datagrams
        n = len(CLIENT_TLS_ID)
        self.assertIn(b"\x00\x38" + (n + 1).to_bytes(2, "big") + bytes([n]) + CLIENT_TLS_ID,
                      hello)

    def test_server_final_flight_with_handshake_complete(self):
        """
        The Output holding the server's HandshakeComplete also holds the final
        flight, which is what completes the client: the caller can put its
        MediaKeys in between.
        """
        harness = make()
        harness.start()
        # Run until the server's HandshakeComplete appears, without
        # delivering that output.
        for _ in range(10):
            to_server, harness.to_server = harness.to_server, []
            to_client, harness.to_client = harness.to_client, []
            for d in to_server:
                harness.deliver_to_server(d)
            if harness.event("server", dtls.HandshakeComplete):
                break
            for d in to_client:
                harness.deliver_to_client(d)
        else:
            self.fail("the server never completed")
        final = harness.server_outputs[-1]
        self.assertTrue(any(isinstance(e, dtls.HandshakeComplete) for e in final.events))
        self.assertTrue(final.datagrams)
        self.assertIsNone(harness.event("client", dtls.HandshakeComplete))
        for datagram in final.datagrams:
            harness.deliver_to_client(datagram)
        self.assertIsNotNone(harness.event("client", dtls.HandshakeComplete))

    def test_repr_hides_secrets(self):
        harness = handshake()
        event = harness.event("server", dtls.HandshakeComplete)
        text = repr(event)
        for value in (event.keys.client_key, event.keys.server_key,
                      event.keys.client_salt, event.keys.server_salt):
            self.assertNotIn(value.hex(), text.lower())
            self.assertNotIn(repr(value), text)
        self.assertNotIn("secret", repr(dtls.ApplicationData(b"secret")))

    def test_datagrams_fit_mtu(self):
        """A small MTU fragments the handshake; every datagram holds whole records."""
        harness = make(client_kwargs=dict(mtu=300), listener_kwargs=dict(mtu=300))
        seen = []
        original = harness.deliver_to_server

        def record(datagram):
            seen.append(datagram)
            original(datagram)

        harness.deliver_to_server = record
        harness.start()
        harness.run()
        self.assertTrue(harness.complete())
        seen.extend(d for output in harness.server_outputs for d in output.datagrams)
        self.assertGreater(len(seen), 4)
        for datagram in seen:
            self.assertLessEqual(len(datagram), 300)
            records = dtls.split_records(datagram)
            self.assertEqual(sum(len(r) for r in records), len(datagram))
            for record in records:
                self.assertEqual(len(record), 13 + int.from_bytes(record[11:13], "big"))


class CookieTests(SynchronousTestCase):

    def test_hello_verify_request_first(self):
        """The first reply is a HelloVerifyRequest: handshake record, message type 3."""
        harness = make()
        harness.start()
        harness.run()
        first = harness.listener_replies[0]
        self.assertEqual(len(first), 1)
        self.assertEqual(first[0][0], 22)
        self.assertEqual(first[0][13], 3)
        self.assertTrue(harness.complete())

    def test_no_state_before_cookie(self):
        client = dtls.ClientAssociation(_CLIENT, [P9])
        (hello,) = client.start(0.0).datagrams
        listener = dtls.ServerListener(_SERVER, [P9])
        connections = live_connections()
        registered = dtls.callback_registry_size()
        attributes = dict(vars(listener))
        for i in range(50):
            replies, association = listener.listen(bytes([i]) * 16, hello, 0.0)
            self.assertIsNone(association)
            self.assertEqual(len(replies), 1)
        self.assertEqual(live_connections(), connections)
        self.assertEqual(dtls.callback_registry_size(), registered)
        self.assertEqual(vars(listener), attributes)

    def test_cookie_bound_to_association_id(self):
        """A cookie earned for one association id does not open another."""
        client = dtls.ClientAssociation(_CLIENT, [P9])
        listener = dtls.ServerListener(_SERVER, [P9])
        (hello,) = client.start(0.0).datagrams
        (verify,), _ = listener.listen(AID, hello, 0.0)
        (hello2,) = client.receive(verify, 0.0).datagrams
        self.assertIn(listener.cookie_for(AID, hello), hello2)
        replies, association = listener.listen(b"\x02" * 16, hello2, 0.0)
        self.assertIsNone(association)
        self.assertEqual(replies[0][13], 3)
        replies, association = listener.listen(AID, hello2, 0.0)
        self.assertIsNotNone(association)
        self.assertEqual(replies, ())

    def openssl_hello_verify_request(self, hello, cookie):
        """What OpenSSL's own DTLSv1_listen answers ``hello`` with, given ``cookie``."""
        context = SSL.Context(SSL.DTLS_METHOD)
        context.set_options(SSL.OP_COOKIE_EXCHANGE)
        context.set_cookie_generate_callback(lambda connection: cookie)
        context.set_cookie_verify_callback(lambda connection, echoed: False)
        connection = SSL.Connection(context, None)
        connection.set_accept_state()
        connection.bio_write(hello)
        self.assertRaises(SSL.WantReadError, connection.DTLSv1_listen)
        return connection.bio_read(65536)

    def test_hello_verify_request_is_openssl_s(self):
        """
        The listener builds the HelloVerifyRequest itself: byte for byte what
        OpenSSL's DTLSv1_listen writes for the same ClientHello and cookie,
        including the ClientHello's record sequence number (a retransmitted
        ClientHello has another).
        """
        listener = dtls.ServerListener(_SERVER, [P9])
        (hello,) = dtls.ClientAssociation(_CLIENT, [P9]).start(0.0).datagrams
        retransmitted = hello[:5] + bytes([0, 0, 0, 0, 1, 7]) + hello[11:]
        for datagram in (hello, retransmitted):
            cookie = listener.cookie_for(AID, datagram)
            self.assertEqual(len(cookie), 32)
            (verify,), association = listener.listen(AID, datagram, 0.0)
            self.assertIsNone(association)
            self.assertEqual(verify, self.openssl_hello_verify_request(datagram, cookie))
            self.assertEqual(verify[5:11], datagram[5:11])

    def test_hello_verify_request_accepted_by_openssl_client(self):
        """A bare pyOpenSSL client echoes the cookie, and that ClientHello opens the association."""
        context = SSL.Context(SSL.DTLS_METHOD)
        context.set_tlsext_use_srtp(P9.openssl_name.encode("ascii"))
        client = SSL.Connection(context, None)
        client.set_connect_state()
        self.assertRaises(SSL.WantReadError, client.do_handshake)
        hello = client.bio_read(65536)
        listener = dtls.ServerListener(_SERVER, [P9])
        (verify,), association = listener.listen(AID, hello, 0.0)
        self.assertIsNone(association)
        client.bio_write(verify)
        self.assertRaises(SSL.WantReadError, client.do_handshake)
        hello2 = client.bio_read(65536)
        cookie = listener.cookie_for(AID, hello)
        self.assertEqual(listener.cookie_for(AID, hello2), cookie)
        self.assertIn(bytes([len(cookie)]) + cookie, hello2)
        replies, association = listener.listen(AID, hello2, 0.0)
        self.assertEqual(replies, ())
        self.assertIsNotNone(association)
        flight = association.start(0.0).datagrams
        self.assertTrue(flight)
        # The ServerHello follows the HelloVerifyRequest: message_seq 1.
        self.assertEqual(flight[0][13], 2)
        self.assertEqual(flight[0][17:19], b"\x00\x01")

    def test_forged_or_stale_cookie_makes_no_ssl_object(self):
        """
        A ClientHello whose cookie this listener did not issue for this
        association id and these ClientHello fields gets another
        HelloVerifyRequest, and no OpenSSL connection is made for it.
        """
        from perc.dtls import listener as listener_module

        made = []
        real = listener_module.new_connection

        def counted(*args):
            made.append(args)
            return real(*args)

        self.patch(listener_module, "new_connection", counted)
        client = dtls.ClientAssociation(_CLIENT, [P9])
        listener = dtls.ServerListener(_SERVER, [P9], cookie_secret=b"now" * 11)
        (hello,) = client.start(0.0).datagrams
        (verify,), _ = listener.listen(AID, hello, 0.0)
        (hello2,) = client.receive(verify, 0.0).datagrams
        cookie = listener.cookie_for(AID, hello)
        at = hello2.index(bytes([len(cookie)]) + cookie) + 1
        flipped = bytearray(hello2)
        flipped[at + 5] ^= 0x01
        other_random = bytearray(hello2)
        other_random[13 + 12 + 2] ^= 0x01  # the first octet of the client random
        stale = dtls.ServerListener(_SERVER, [P9], cookie_secret=b"before" * 6)
        connections = live_connections()
        for listening, datagram, association_id in (
                (listener, bytes(flipped), AID),            # forged
                (listener, bytes(other_random), AID),       # another ClientHello's
                (listener, hello2, b"\x02" * 16),           # another association's
                (stale, hello2, AID)):                      # another secret's
            replies, association = listening.listen(association_id, datagram, 0.0)
            self.assertIsNone(association)
            self.assertEqual(len(replies), 1)
            self.assertEqual(replies[0][13], 3)
            self.assertEqual(listening.cookie_for(association_id, datagram),
                             replies[0][-32:])
        self.assertEqual(made, [])
        self.assertEqual(live_connections(), connections)
        replies, association = listener.listen(AID, hello2, 0.0)
        self.assertIsNotNone(association)
        self.assertEqual(len(made), 1)

    def test_hello_verify_request_alone(self):
        """hello_verify_request gives what listen answers without a cookie, None once it is valid."""
        client = dtls.ClientAssociation(_CLIENT, [P9])
        listener = dtls.ServerListener(_SERVER, [P9])
        (hello,) = client.start(0.0).datagrams
        verify = listener.hello_verify_request(AID, hello)
        self.assertEqual(listener.listen(AID, hello, 0.0), ((verify,), None))
        (hello2,) = client.receive(verify, 0.0).datagrams
        self.assertIsNone(listener.hello_verify_request(AID, hello2))
        self.assertIsNotNone(listener.hello_verify_request(b"\x02" * 16, hello2))
        self.assertIsNone(listener.hello_verify_request(AID, b"\x17" + hello2[1:]))
        self.assertIsNotNone(listener.listen(AID, hello2, 0.0)[1])

    def test_listener_drops_what_dtlsv1_listen_drops(self):
        """No HelloVerifyRequest for a later message_seq, a later fragment or a cut ClientHello."""
        listener = dtls.ServerListener(_SERVER, [P9])
        (hello,) = dtls.ClientAssociation(_CLIENT, [P9]).start(0.0).datagrams
        later_seq = hello[:17] + b"\x00\x03" + hello[19:]
        later_fragment = hello[:21] + b"\x01" + hello[22:]
        cut_record = hello[:-1]
        two_messages = (hello[:11] + (len(hello) - 13 + 12).to_bytes(2, "big") + hello[13:]
                        + hello[13:25])
        for datagram in (later_seq, later_fragment, cut_record, two_messages):
            self.assertEqual(listener.listen(AID, datagram, 0.0), ((), None))
            self.assertIsNone(listener.cookie_for(AID, datagram))

    def test_listener_ignores_non_hello(self):
        listener = dtls.ServerListener(_SERVER, [P9])
        for junk in (b"", b"\x16", b"\x17\xfe\xfd" + b"\x00" * 40, bytes(range(256)),
                     b"\x16\xfe\xfd\x00\x00" + b"\x00" * 6 + b"\x00\x10" + b"\x01" * 16):
            self.assertEqual(listener.listen(AID, junk, 0.0), ((), None))


class IdentityTests(SynchronousTestCase):

    def registered_hook(self, tls_id, fingerprint, server_tls_id=SERVER_TLS_ID):
        """A Key Distributor-like hook knowing one endpoint."""
        queries = []

        def hook(query):
            queries.append(query)
            if query.peer_tls_id != tls_id:
                return dtls.Reject("unknown tls-id")
            if query.stage == dtls.STAGE_HELLO:
                return dtls.Accept(tls_id=server_tls_id)
            if query.peer_fingerprint != fingerprint:
                return dtls.Reject("fingerprint does not match registration")
            return dtls.Accept()

        return hook, queries

    def assertRejected(self, harness, side, alert_description):
        events = harness.server_events if side == "server" else harness.client_events
        closed = [e for e in events if isinstance(e, dtls.Closed)]
        self.assertEqual(len(closed), 1, events)
        self.assertTrue(closed[0].rejected)
        self.assertTrue(closed[0].reason.startswith("rejected: "), closed[0].reason)
        if side == "server":
            self.assertIn((2, alert_description), alerts(harness.server_outputs[-1].datagrams))
        else:
            self.assertIn((2, alert_description), alerts(harness.client_sent))
        self.assertIsNone(harness.event("client", dtls.HandshakeComplete))
        self.assertIsNone(harness.event("server", dtls.HandshakeComplete))
        return closed[0]

    def test_registered_endpoint_accepted(self):
        hook, queries = self.registered_hook(CLIENT_TLS_ID, _CLIENT.fingerprint)
        harness = handshake(client_kwargs=dict(tls_id=CLIENT_TLS_ID,
                                               expected_peer_tls_id=SERVER_TLS_ID,
                                               expected_peer_fingerprint=_SERVER.fingerprint),
                            listener_kwargs=dict(identity_hook=hook))
        self.assertTrue(harness.complete())
        self.assertEqual([q.stage for q in queries], [dtls.STAGE_HELLO, dtls.STAGE_CERTIFICATE])
        self.assertEqual(queries[0].association_id, AID)
        self.assertIsNone(queries[0].peer_fingerprint)
        self.assertEqual(queries[1].peer_fingerprint, _CLIENT.fingerprint)

    def test_server_rejects_unknown_tls_id(self):
        hook, queries = self.registered_hook(CLIENT_TLS_ID, _CLIENT.fingerprint)
        harness = handshake(client_kwargs=dict(tls_id=b"SomebodyElse01234567890"),
                            listener_kwargs=dict(identity_hook=hook))
        closed = self.assertRejected(harness, "server", 40)  # handshake_failure (RFC 8844)
        self.assertIn("unknown tls-id", closed.reason)
        self.assertEqual([q.stage for q in queries], [dtls.STAGE_HELLO])
        # The client learns it through the alert and closes too.
        client_closed = harness.event("client", dtls.Closed)
        self.assertIsNotNone(client_closed)
        self.assertFalse(client_closed.rejected)
        self.assertTrue(harness.client.closed and harness.server.closed)

    def test_server_hook_sees_missing_tls_id(self):
        """A client without extension 56 reaches the hook with tls-id None."""
        hook, queries = self.registered_hook(CLIENT_TLS_ID, _CLIENT.fingerprint)
        harness = handshake(listener_kwargs=dict(identity_hook=hook))
        # Decided in the verify callback: the verification error chosen
        # still makes OpenSSL send handshake_failure.
        self.assertRejected(harness, "server", 40)
        self.assertEqual(queries[0].stage, dtls.STAGE_HELLO)
        self.assertIsNone(queries[0].peer_tls_id)

    def test_server_rejects_wrong_fingerprint(self):
        hook, queries = self.registered_hook(CLIENT_TLS_ID, _OTHER.fingerprint)
        harness = handshake(client_kwargs=dict(tls_id=CLIENT_TLS_ID),
                            listener_kwargs=dict(identity_hook=hook))
        closed = self.assertRejected(harness, "server", 42)  # bad_certificate
        self.assertIn("fingerprint", closed.reason)
        self.assertEqual(queries[-1].stage, dtls.STAGE_CERTIFICATE)
        self.assertEqual(queries[-1].peer_fingerprint, _CLIENT.fingerprint)

    def test_client_rejects_wrong_server_tls_id(self):
        harness = handshake(client_kwargs=dict(tls_id=CLIENT_TLS_ID,
                                               expected_peer_tls_id=b"NotTheServer0123456789"),
                            listener_kwargs=dict(tls_id=SERVER_TLS_ID))
        closed = self.assertRejected(harness, "client", 40)  # RFC 8844
        self.assertIn("tls-id", closed.reason)
        self.assertIsNotNone(harness.event("server", dtls.Closed))

    def test_client_rejects_missing_server_tls_id(self):
        harness = handshake(client_kwargs=dict(tls_id=CLIENT_TLS_ID,
                                               expected_peer_tls_id=SERVER_TLS_ID))
        # Noticed when the server certificate arrives, in the verify
        # callback: still handshake_failure on the wire.
        closed = self.assertRejected(harness, "client", 40)
        self.assertIn("no tls-id", closed.reason)

    def test_client_rejects_wrong_server_fingerprint(self):
        harness = handshake(client_kwargs=dict(expected_peer_fingerprint=_OTHER.fingerprint))
        closed = self.assertRejected(harness, "client", 42)
        self.assertIn("fingerprint", closed.reason)

    def test_client_accepts_matching_fingerprint_other_spelling(self):
        hash_name, digest = _SERVER.fingerprint.split()
        harness = handshake(client_kwargs=dict(
            expected_peer_fingerprint="SHA-256 " + digest.lower()))
        self.assertTrue(harness.complete())

    def test_no_client_certificate_refused(self):
        harness = handshake(client_credentials=None)
        closed = harness.event("server", dtls.Closed)
        self.assertIsNotNone(closed)
        self.assertIn((2, 40), alerts(harness.server_outputs[-1].datagrams))
        self.assertIn("certificate", closed.reason)
        self.assertIsNone(harness.event("server", dtls.HandshakeComplete))
        self.assertIsNone(harness.event("client", dtls.HandshakeComplete))
        self.assertIsNotNone(harness.event("client", dtls.Closed))

    def test_certificate_not_the_checked_one_refused(self):
        """
        The certificate OpenSSL holds at the end must be the one the verify
        callback checked (the same X509, or its DER): if they differ the
        server fails closed, with no keys.
        """
        harness = make()
        other = crypto.X509.from_cryptography(_OTHER.certificate)

        def hook(query):
            if query.stage == dtls.STAGE_CERTIFICATE:
                # What the check compares against, as if another
                # certificate had been verified.
                state = harness.server._state
                state.peer_x509 = other._x509
                state.peer_der = _OTHER.certificate.public_bytes(Encoding.DER)
            return dtls.Accept()

        harness.listen_kwargs["identity_hook"] = hook
        harness.start()
        harness.run()
        closed = harness.event("server", dtls.Closed)
        self.assertIsNotNone(closed)
        self.assertEqual(closed.reason, "peer certificate changed during the handshake")
        self.assertIsNone(harness.event("server", dtls.HandshakeComplete))
        self.assertIsNone(harness.event("client", dtls.HandshakeComplete))

    def test_hook_exception_rejects(self):
        def hook(query):
            raise KeyError("boom")

        harness = handshake(client_kwargs=dict(tls_id=CLIENT_TLS_ID),
                            listener_kwargs=dict(identity_hook=hook))
        closed = self.assertRejected(harness, "server", 80)  # internal_error
        self.assertIn("KeyError", closed.reason)

    def test_hook_bad_return_rejects(self):
        harness = handshake(client_kwargs=dict(tls_id=CLIENT_TLS_ID),
                            listener_kwargs=dict(identity_hook=lambda q: True))
        self.assertRejected(harness, "server", 80)

    def test_per_association_overrides(self):
        """listen() may override the hook and the server tls-id per association."""
        seen = []

        def hook(query):
            seen.append(query.peer_tls_id)
            return dtls.Accept()

        harness = handshake(client_kwargs=dict(tls_id=CLIENT_TLS_ID,
                                               expected_peer_tls_id=SERVER_TLS_ID),
                            listener_kwargs=dict(tls_id=b"DefaultServerTlsId0000"),
                            identity_hook=hook, tls_id=SERVER_TLS_ID)
        self.assertTrue(harness.complete())
        self.assertEqual(seen, [CLIENT_TLS_ID, CLIENT_TLS_ID])

    def test_tls_id_validation(self):
        self.assertRaises(dtls.ExtensionError, dtls.ClientAssociation, _CLIENT, [P9],
                          tls_id=b"short")
        self.assertRaises(dtls.ExtensionError, dtls.encode_external_session_id, b"x" * 256)
        self.assertRaises(dtls.ExtensionError, dtls.encode_external_session_id,
                          b"bad character!!!!!!!!!")
        self.assertEqual(dtls.decode_external_session_id(
            dtls.encode_external_session_id(CLIENT_TLS_ID)), CLIENT_TLS_ID)
        for bad in (b"", CLIENT_TLS_ID, b"\x05" + CLIENT_TLS_ID):
            self.assertRaises(dtls.ExtensionError, dtls.decode_external_session_id, bad)

    def test_trailing_newline_refused(self):
        """A "$" match would accept these; an oversize one then broke every handshake."""
        for bad in (CLIENT_TLS_ID + b"\n", b"x" * 255 + b"\n"):
            self.assertRaises(dtls.ExtensionError, dtls.validate_tls_id, bad)
            self.assertRaises(dtls.ExtensionError, dtls.encode_external_session_id, bad)
            self.assertRaises(dtls.ExtensionError, dtls.decode_external_session_id,
                              bytes([len(bad) % 256]) + bad)
            self.assertRaises(dtls.ExtensionError, dtls.ClientAssociation, _CLIENT, [P9],
                              tls_id=bad)
            self.assertRaises(dtls.ExtensionError, dtls.ServerListener, _SERVER, [P9],
                              tls_id=bad)
            listener = dtls.ServerListener(_SERVER, [P9])
            client = dtls.ClientAssociation(_CLIENT, [P9])
            [datagram] = client.start(0.0).datagrams
            self.assertRaises(dtls.ExtensionError, listener.listen, AID, datagram, 0.0,
                              tls_id=bad)


class ProfileTests(SynchronousTestCase):

    def test_intersection(self):
        harness = handshake(client_profiles=(P7, P9), server_profiles=(P10, P9, P8))
        self.assertEqual(harness.event("client", dtls.HandshakeComplete).profile, P9)
        self.assertEqual(harness.event("server", dtls.HandshakeComplete).profile, P9)

    def test_per_association_profiles(self):
        harness = handshake(client_profiles=(P7, P9), server_profiles=(P9,),
                            profiles=(P7,))
        self.assertEqual(harness.event("server", dtls.HandshakeComplete).profile, P7)

    def test_no_common_profile_client_detects(self):
        """
        Without extension 56 from the client OpenSSL gives the server no hook
        before its flight, so the client's own check refuses first.
        """
        harness = handshake(client_profiles=(P7,), server_profiles=(P9,))
        closed = harness.event("client", dtls.Closed)
        self.assertIsNotNone(closed)
        self.assertFalse(closed.rejected)
        self.assertIn("no common SRTP protection profile", closed.reason)
        self.assertIn((2, 40), alerts(harness.client_sent))
        self.assertIsNotNone(harness.event("server", dtls.Closed))
        self.assertIsNone(harness.event("client", dtls.HandshakeComplete))
        self.assertIsNone(harness.event("server", dtls.HandshakeComplete))

    def test_no_common_profile(self):
        harness = handshake(client_profiles=(P7,), server_profiles=(P9,),
                            client_kwargs=dict(tls_id=CLIENT_TLS_ID))
        closed = harness.event("server", dtls.Closed)
        self.assertIsNotNone(closed)
        self.assertFalse(closed.rejected)
        self.assertIn("no common SRTP protection profile", closed.reason)
        self.assertIn((2, 40), alerts(harness.server_outputs[-1].datagrams))
        self.assertIsNotNone(harness.event("client", dtls.Closed))
        self.assertIsNone(harness.event("client", dtls.HandshakeComplete))
        self.assertIsNone(harness.event("server", dtls.HandshakeComplete))


class LossTests(SynchronousTestCase):

    def test_reordered_server_flight(self):
        """The server's multi-datagram flight delivered backwards still works, no timer."""
        harness = make(client_kwargs=dict(mtu=300), listener_kwargs=dict(mtu=300))
        harness.start()
        # ClientHello, HelloVerifyRequest, ClientHello with cookie.
        harness.step()
        harness.deliver_to_client(harness.to_client.pop())
        harness.deliver_to_server(harness.to_server.pop())
        flight = harness.to_client
        self.assertGreater(len(flight), 1)
        flight.reverse()
        harness.run()
        self.assertTrue(harness.complete())
        self.assertEqual(harness.client.retransmissions, 0)
        self.assertEqual(harness.server.retransmissions, 0)

    def test_everything_reversed(self):
        """Every batch reversed (CCS before the messages it follows): timers fix it."""
        harness = make(client_kwargs=dict(mtu=300), listener_kwargs=dict(mtu=300))
        harness.start()
        harness.settle(reorder=list.reverse)
        self.assertTrue(harness.complete())
        self.assertEqual(harness.event("client", dtls.HandshakeComplete).keys,
                         harness.event("server", dtls.HandshakeComplete).keys)

    def test_first_flight_lost(self):
        harness = make()
        harness.start()
        self.assertEqual(len(harness.to_server), 1)
        harness.to_server.clear()
        harness.run()
        self.assertIsNone(harness.server)
        self.assertTrue(harness.wait_for_timer())
        self.assertEqual(harness.client.retransmissions, 1)
        self.assertEqual(len(harness.to_server), 1)
        harness.settle()
        self.assertTrue(harness.complete())

    def test_server_final_flight_lost(self):
        """The Key Distributor's last flight is lost: the client's retransmission recovers it."""
        harness = make()
        harness.start()
        dropped = []

        def drop_final(datagram):
            # The output carrying the server's HandshakeComplete holds its
            # final flight; lose it once (a compacted server repeats the
            # very same datagrams).
            if dropped:
                return False
            for output in harness.server_outputs:
                if any(isinstance(e, dtls.HandshakeComplete) for e in output.events):
                    if datagram in output.datagrams:
                        dropped.append(datagram)
                        return True
            return False

        harness.drop_to_client = drop_final
        harness.settle()
        self.assertTrue(dropped)
        self.assertTrue(harness.complete())
        self.assertGreaterEqual(harness.client.retransmissions, 1)

    def test_give_up_after_retransmissions(self):
        client = dtls.ClientAssociation(_CLIENT, [P9], max_retransmissions=1,
                                        handshake_timeout=1000)
        clock = 0.0
        self.assertEqual(len(client.start(clock).datagrams), 1)
        outputs = []
        started = time.monotonic()
        while not client.closed:
            self.assertLess(time.monotonic() - started, REAL_WAIT_LIMIT)
            deadline = client.next_timeout(clock)
            self.assertIsNotNone(deadline)
            time.sleep(max(0.0, deadline - clock) + 0.03)
            clock = deadline + 0.03
            outputs.append(client.handle_timeout(clock))
        self.assertEqual(client.retransmissions, 1)
        retransmitted = [o for o in outputs if o.datagrams]
        self.assertEqual(len(retransmitted), 1)
        closed = outputs[-1].events[-1]
        self.assertIsInstance(closed, dtls.Closed)
        self.assertIn("1 retransmissions", closed.reason)
        self.assertFalse(closed.rejected)
        self.assertTrue(closed.timed_out)
        self.assertIsNone(client.next_timeout(clock))

    def test_give_up_after_total_time(self):
        """The total-time bound runs on the caller's clock: no real wait."""
        harness = make(client_kwargs=dict(handshake_timeout=5.0),
                       listener_kwargs=dict(handshake_timeout=5.0))
        harness.start()
        harness.step()
        harness.deliver_to_client(harness.to_client.pop())
        harness.deliver_to_server(harness.to_server.pop())
        self.assertIsNotNone(harness.server)
        harness.to_client.clear()  # the server's flight is lost
        for association in (harness.client, harness.server):
            self.assertLessEqual(association.next_timeout(1.0), 5.0)
            self.assertEqual(association.handle_timeout(4.0).events, ())
            output = association.handle_timeout(5.0)
            (closed,) = output.events
            self.assertIsInstance(closed, dtls.Closed)
            self.assertIn("5 s", closed.reason)
            self.assertTrue(closed.timed_out)
            self.assertTrue(association.closed)
            self.assertEqual(association.handle_timeout(60.0), dtls.Output())


class DataAndCloseTests(SynchronousTestCase):

    def test_application_data_both_ways(self):
        harness = handshake()
        out = harness.server.send_application_data(b"ekt key from the kd")
        self.assertEqual(len(out.datagrams), 1)
        self.assertEqual(out.datagrams[0][0], 23)
        events = harness.client.receive(out.datagrams[0], 1.0).events
        self.assertEqual(events, (dtls.ApplicationData(b"ekt key from the kd"),))
        out = harness.client.send_application_data(b"hello kd")
        events = harness.server.receive(out.datagrams[0], 1.0).events
        self.assertEqual(events, (dtls.ApplicationData(b"hello kd"),))

    def test_application_data_in_one_datagram_with_final_flight(self):
        """Records after the Finished in the same datagram are not lost."""
        harness = make()
        harness.start()
        for _ in range(10):
            if harness.event("server", dtls.HandshakeComplete):
                break
            harness.step()
        else:
            self.fail("the server never completed")
        final = harness.server_outputs[-1].datagrams
        data = harness.server.send_application_data(b"first").datagrams
        harness.to_client.clear()
        events = harness.client.receive(b"".join(final + data), 1.0).events
        self.assertIsInstance(events[0], dtls.HandshakeComplete)
        self.assertEqual(events[1:], (dtls.ApplicationData(b"first"),))

    def test_application_data_before_handshake(self):
        client = dtls.ClientAssociation(_CLIENT, [P9])
        client.start(0.0)
        self.assertRaises(dtls.DtlsStateError, client.send_application_data, b"x")

    def test_application_data_too_large(self):
        harness = handshake()
        self.assertRaises(ValueError, harness.client.send_application_data, b"x" * 1200)

    def test_close_notify(self):
        harness = handshake()
        out = harness.client.close(2.0)
        self.assertEqual(out.events, (dtls.Closed("closed locally", False),))
        self.assertEqual(len(out.datagrams), 1)
        self.assertEqual(out.datagrams[0][0], 21)
        peer = harness.server.receive(out.datagrams[0], 2.0)
        (closed,) = peer.events
        self.assertIsInstance(closed, dtls.Closed)
        self.assertIn("close_notify", closed.reason)
        self.assertFalse(closed.rejected)

    def test_nothing_after_closed(self):
        harness = handshake()
        data = harness.client.send_application_data(b"late").datagrams
        harness.server.close(3.0)
        empty = dtls.Output()
        self.assertEqual(harness.server.receive(data[0], 3.0), empty)
        self.assertEqual(harness.server.send_application_data(b"x"), empty)
        self.assertEqual(harness.server.handle_timeout(100.0), empty)
        self.assertEqual(harness.server.close(3.0), empty)
        self.assertIsNone(harness.server.next_timeout(3.0))
        self.assertTrue(harness.server.closed)
        self.assertFalse(harness.server.established)

    def test_close_during_handshake(self):
        client = dtls.ClientAssociation(_CLIENT, [P9])
        client.start(0.0)
        out = client.close(1.0, "endpoint removed")
        self.assertEqual(out.events, (dtls.Closed("endpoint removed", False),))
        self.assertEqual(client.receive(b"\x16\xfe\xfd" + b"\x00" * 20, 1.0), dtls.Output())


class GarbageTests(SynchronousTestCase):

    def junk(self, seed, count=200):
        rng = random.Random(seed)
        items = [bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 300)))
                 for _ in range(count)]
        # Junk that looks like DTLS records, in every epoch and content type.
        for _ in range(count):
            body = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 100)))
            length = len(body) if rng.random() < 0.7 else rng.randrange(0, 65536)
            header = bytes([rng.choice([20, 21, 22, 23, 24]), 0xFE, 0xFD,
                            0, rng.choice([0, 1, 2])]) + rng.getrandbits(48).to_bytes(6, "big")
            items.append(header + length.to_bytes(2, "big") + body)
        return items

    def test_junk_established(self):
        harness = handshake()
        for junk in self.junk(1):
            for association in (harness.client, harness.server):
                association.receive(junk, 1.0)
        self.assertTrue(harness.client.established)
        self.assertTrue(harness.server.established)
        out = harness.client.send_application_data(b"still fine")
        self.assertEqual(harness.server.receive(out.datagrams[0], 1.0).events,
                         (dtls.ApplicationData(b"still fine"),))

    def test_junk_listener(self):
        listener = dtls.ServerListener(_SERVER, [P9])
        for junk in self.junk(2):
            replies, association = listener.listen(AID, junk, 0.0)
            self.assertIsNone(association)
        # A ClientHello-shaped record with a garbage body.
        rng = random.Random(3)
        for _ in range(200):
            body = bytes([1]) + bytes(rng.getrandbits(8) for _ in range(rng.randrange(11, 200)))
            datagram = b"\x16\xfe\xfd\x00\x00" + b"\x00" * 6 + len(body).to_bytes(2, "big") + body
            listener.listen(AID, datagram, 0.0)

    def test_junk_during_handshake(self):
        """Junk in every direction during the handshake never raises."""
        for seed in range(3):
            harness = make()
            harness.start()
            junk = iter(self.junk(10 + seed, 40))
            for _ in range(8):
                if harness.server is not None:
                    harness.server.receive(next(junk), 0.0)
                harness.client.receive(next(junk), 0.0)
                harness.step()
            harness.run()
            for association in harness.associations():
                self.assertTrue(association.established or association.closed)

    def test_garbage_types_do_not_raise(self):
        harness = handshake()
        for junk in (b"", bytearray(b"\x17\xfe\xfd"), memoryview(b"\x00" * 13)):
            harness.server.receive(junk, 1.0)
        self.assertTrue(harness.server.established)


class HookHolder:
    association = None

    def hook(self, query):
        return dtls.Accept()


class RegistryTests(SynchronousTestCase):

    def test_registry_empty_after_many_associations(self):
        gc.collect()
        baseline = dtls.callback_registry_size()
        listener = dtls.ServerListener(_SERVER, [P9, P7])
        references = []
        for i in range(200):
            client = dtls.ClientAssociation(
                _CLIENT, (P9,) if i % 2 else (P7,), tls_id=CLIENT_TLS_ID, compact=False)
            # A hook that refers back to its association (as a Key
            # Distributor's might) must not keep it alive.
            holder = HookHolder()
            harness = Harness(client, listener, association_id=i.to_bytes(16, "big"),
                              identity_hook=holder.hook)
            del client
            harness.start()
            harness.run()
            self.assertTrue(harness.complete())
            holder.association = harness.server
            del holder
            if i % 3 == 0:
                harness.client.close(1.0)
                harness.server.close(1.0)
            references.append(weakref.ref(harness.client))
            references.append(weakref.ref(harness.server))
            if i == 100:
                self.assertGreater(dtls.callback_registry_size(), baseline)
            del harness
        gc.collect()
        self.assertEqual(dtls.callback_registry_size(), baseline)
        self.assertEqual([r for r in references if r() is not None], [])

    def test_closed_association_unregisters_at_once(self):
        harness = handshake(client_kwargs={"compact": False})
        before = dtls.callback_registry_size()
        harness.client.close(1.0)
        self.assertEqual(dtls.callback_registry_size(), before - 1)

    def test_contexts_are_shared(self):
        first = dtls.ClientAssociation(_CLIENT, [P9, P7])
        second = dtls.ClientAssociation(_CLIENT, [P9, P7])
        other = dtls.ClientAssociation(_CLIENT, [P7])
        self.assertIs(first._context, second._context)
        self.assertIsNot(first._context, other._context)


class RecordTests(SynchronousTestCase):

    def test_split_and_pack(self):
        records = [b"\x16\xfe\xfd" + b"\x00" * 8 + n.to_bytes(2, "big") + b"x" * n
                   for n in (10, 100, 200, 5)]
        data = b"".join(records)
        self.assertEqual(dtls.split_records(data), records)
        packed = dtls.pack_records(records, 250)
        self.assertEqual(packed, [records[0] + records[1], records[2] + records[3]])
        self.assertEqual(dtls.pack_records([b"y" * 400], 250), [b"y" * 400])
        self.assertEqual(dtls.split_records(data + b"\x16\xfe"), records + [b"\x16\xfe"])
