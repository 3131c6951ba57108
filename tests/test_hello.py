"""
Tests for perc.hello: reading cleartext DTLS 1.2 hellos produced by the
real DTLS engine (perc.dtls over OpenSSL), and malformed variants of them.
"""

from __future__ import annotations

import dataclasses
import functools
import struct

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from perc import dtls, hello
from perc.profiles import by_id
from tests import hello_reference

CLIENT_TLS_ID = b"ClientTlsId0123456789abcdef"
SERVER_TLS_ID = b"ServerTlsId+/-_0123456789"
AID = b"\x02" * 16


@functools.lru_cache(maxsize=None)
def exchange():
    """
    ``(first ClientHello, HelloVerifyRequest, second ClientHello, server
    flight)`` datagrams of one real handshake: the client offers profiles 9
    and 7, the server accepts only 9.
    """
    client = dtls.ClientAssociation(dtls.Credentials.self_signed("ep"), [by_id(9), by_id(7)],
                                    tls_id=CLIENT_TLS_ID)
    listener = dtls.ServerListener(dtls.Credentials.self_signed("kd"), [by_id(9)],
                                   tls_id=SERVER_TLS_ID)
    (first,) = client.start(0.0).datagrams
    (verify,), association = listener.listen(AID, first, 0.0)
    assert association is None
    (second,) = client.receive(verify, 0.0).datagrams
    replies, association = listener.listen(AID, second, 0.0)
    assert replies == () and association is not None
    flight = association.start(0.0).datagrams
    assert len(flight) == 1
    return first, verify, second, flight[0]


def first_client_hello():
    return exchange()[0]


def server_flight():
    return exchange()[3]


# --------------------------------------------------------------------------
# Independent rewriting of a hello, for variants OpenSSL would not produce


def record(body, content_type=22, epoch=0, sequence=0):
    return struct.pack("!BHH", content_type, 0xFEFD, epoch) + sequence.to_bytes(6, "big") \
        + struct.pack("!H", len(body)) + body


def handshake(msg_type, body, message_seq=0, fragment_offset=0, length=None):
    length = len(body) if length is None else length
    return (bytes([msg_type]) + length.to_bytes(3, "big") + struct.pack("!H", message_seq)
            + fragment_offset.to_bytes(3, "big") + len(body).to_bytes(3, "big") + body)


def first_record(datagram):
    """``(record header, handshake header, hello body, rest of datagram)``."""
    length = int.from_bytes(datagram[11:13], "big")
    record_body = datagram[13:13 + length]
    msg_length = int.from_bytes(record_body[1:4], "big")
    assert len(record_body) == 12 + msg_length, "one whole message per record expected"
    return datagram[:13], record_body[:12], record_body[12:], datagram[13 + length:]


def extensions_offset(msg_type, body):
    """Where the extensions block starts, counted by hand from RFC 5246/6347."""
    offset = 2 + 32
    offset += 1 + body[offset]                                    # session_id
    if msg_type == 1:
        offset += 1 + body[offset]                                # cookie
        offset += 2 + int.from_bytes(body[offset:offset + 2], "big")  # cipher_suites
        offset += 1 + body[offset]                                # compression_methods
    else:
        offset += 2 + 1                                           # suite, compression
    return offset


def split_extensions(block):
    extensions = []
    while block:
        ext_type, length = struct.unpack("!HH", block[:4])
        extensions.append((ext_type, block[4:4 + length]))
        block = block[4 + length:]
    return extensions


def rewrite(datagram, change):
    """
    The datagram with the first record's hello extensions replaced by
    ``change(list of (type, data))``; every enclosing length is fixed up.
    ``change`` may return raw bytes to use as the whole extensions block.
    """
    record_header, handshake_header, body, rest = first_record(datagram)
    offset = extensions_offset(handshake_header[0], body)
    block = body[offset + 2:offset + 2 + int.from_bytes(body[offset:offset + 2], "big")]
    changed = change(split_extensions(block))
    if not isinstance(changed, bytes):
        changed = b"".join(struct.pack("!HH", t, len(d)) + d for t, d in changed)
        changed = struct.pack("!H", len(changed)) + changed
    new_body = body[:offset] + changed
    message_seq = int.from_bytes(handshake_header[4:6], "big")
    new_record = handshake(handshake_header[0], new_body, message_seq)
    return record_header[:11] + struct.pack("!H", len(new_record)) + new_record + rest


def with_extension(ext_type, data):
    return lambda extensions: extensions + [(ext_type, data)]


def replacing(ext_type, data):
    return lambda extensions: [(t, data if t == ext_type else d) for t, d in extensions]


class ClientHelloTests(SynchronousTestCase):

    def test_first_client_hello(self):
        info = hello.parse_client_hello(first_client_hello())
        self.assertIsInstance(info, hello.ClientHelloInfo)
        self.assertEqual(info.tls_id, CLIENT_TLS_ID)
        self.assertFalse(info.tls_id_malformed)
        self.assertEqual(info.srtp_profiles, (9, 7))
        self.assertEqual(info.srtp_mki, b"")
        self.assertTrue(info.cookie_empty)
        self.assertEqual(info.message_seq, 0)
        self.assertEqual(info.client_version, 0xFEFD)
        self.assertEqual(len(info.random), 32)
        self.assertIn(0, info.compression_methods)
        self.assertTrue(info.cipher_suites)
        self.assertIsNone(info.ekt_ciphers)
        self.assertFalse(info.ekt_offered)
        self.assertIn((56, b"\x1b" + CLIENT_TLS_ID), info.extensions)

    def test_second_client_hello_carries_the_cookie(self):
        first, verify, second, _ = exchange()
        info = hello.parse_client_hello(second)
        self.assertFalse(info.cookie_empty)
        self.assertEqual(len(info.cookie), 32)  # the listener's HMAC-SHA256
        self.assertEqual(info.message_seq, 1)
        self.assertEqual(info.tls_id, CLIENT_TLS_ID)
        self.assertEqual(info.srtp_profiles, (9, 7))
        self.assertEqual(info.random, hello.parse_client_hello(first).random)

    def test_without_tls_id(self):
        client = dtls.ClientAssociation(dtls.Credentials.self_signed(), [by_id(7)])
        (datagram,) = client.start(0.0).datagrams
        info = hello.parse_client_hello(datagram)
        self.assertIsNone(info.tls_id)
        self.assertFalse(info.tls_id_malformed)
        self.assertEqual(info.srtp_profiles, (7,))

    def test_not_client_hellos(self):
        _, verify, _, flight = exchange()
        self.assertIsNone(hello.parse_client_hello(verify))
        self.assertIsNone(hello.parse_client_hello(flight))
        self.assertIsNone(hello.parse_client_hello(b""))
        self.assertIsNone(hello.parse_client_hello(record(b"\x01\x00", content_type=21)))

    def test_later_epoch_is_ignored(self):
        datagram = first_client_hello()
        encrypted_epoch = datagram[:3] + b"\x00\x01" + datagram[5:]
        self.assertIsNone(hello.parse_client_hello(encrypted_epoch))

    def test_malformed_tls_id_is_flagged(self):
        for bad in (b"", b"\x05short", b"\x03" + CLIENT_TLS_ID, b"\x14" + b"!" * 20,
                    bytes([len(CLIENT_TLS_ID) + 1]) + CLIENT_TLS_ID + b"\n"):
            info = hello.parse_client_hello(rewrite(first_client_hello(), replacing(56, bad)))
            self.assertIsNone(info.tls_id)
            self.assertTrue(info.tls_id_malformed)
            self.assertEqual(info.srtp_profiles, (9, 7))

    def test_ekt_offered(self):
        datagram = rewrite(first_client_hello(), with_extension(39, b"\x02\x02\x01"))
        info = hello.parse_client_hello(datagram)
        self.assertEqual(info.ekt_ciphers, (2, 1))
        self.assertTrue(info.ekt_offered)
        self.assertEqual(info.tls_id, CLIENT_TLS_ID)

    def test_malformed_ekt_ciphers(self):
        for bad in (b"", b"\x00", b"\x02\x01", b"\x01\x01\x01"):
            datagram = rewrite(first_client_hello(), with_extension(39, bad))
            self.assertRaises(hello.HelloError, hello.parse_client_hello, datagram)

    def test_use_srtp_with_mki(self):
        datagram = rewrite(first_client_hello(), replacing(14, b"\x00\x02\x00\x09\x02\xAB\xCD"))
        info = hello.parse_client_hello(datagram)
        self.assertEqual(info.srtp_profiles, (9,))
        self.assertEqual(info.srtp_mki, b"\xAB\xCD")

    def test_malformed_use_srtp(self):
        for bad in (b"", b"\x00\x00\x00", b"\x00\x03\x00\x09\x00\x00", b"\x00\x02\x00\x09",
                    b"\x00\x02\x00\x09\x01", b"\x00\x02\x00\x09\x00\x00"):
            datagram = rewrite(first_client_hello(), replacing(14, bad))
            self.assertRaises(hello.HelloError, hello.parse_client_hello, datagram)

    def test_duplicate_extension(self):
        datagram = rewrite(first_client_hello(), with_extension(14, b"\x00\x02\x00\x07\x00"))
        error = self.assertRaises(hello.HelloError, hello.parse_client_hello, datagram)
        self.assertIsInstance(error, ValueError)

    def test_no_extensions_block(self):
        datagram = rewrite(first_client_hello(), lambda extensions: b"")
        info = hello.parse_client_hello(datagram)
        self.assertEqual(info.extensions, ())
        self.assertIsNone(info.tls_id)
        self.assertEqual(info.srtp_profiles, ())

    def test_bad_extensions_blocks(self):
        for block in (b"\x00", b"\x00\x05\x00\x0e\x00", b"\x00\x00\x00",
                      b"\x00\x04\x00\x0e\x00\x01"):
            datagram = rewrite(first_client_hello(), lambda extensions, block=block: block)
            self.assertRaises(hello.HelloError, hello.parse_client_hello, datagram)

    def test_every_truncation_of_the_body(self):
        """A hello cut anywhere (lengths fixed up around it) is a HelloError, never more."""
        record_header, handshake_header, body, _ = first_record(first_client_hello())
        offset = extensions_offset(1, body)
        for cut in range(len(body)):
            message = handshake(1, body[:cut])
            datagram = record_header[:11] + struct.pack("!H", len(message)) + message
            if cut == offset:
                # Exactly the fields before the optional extensions block.
                self.assertEqual(hello.parse_client_hello(datagram).extensions, ())
            else:
                self.assertRaises(hello.HelloError, hello.parse_client_hello, datagram)

    def test_fragmented_hello_gives_none(self):
        """A stateless reader cannot reassemble fragments: documented as None."""
        record_header, handshake_header, body, _ = first_record(first_client_hello())
        half = len(body) // 2
        one = handshake(1, body[:half], length=len(body))
        two = handshake(1, body[half:], fragment_offset=half, length=len(body))
        self.assertIsNone(hello.parse_client_hello(record(one)))
        self.assertIsNone(hello.parse_client_hello(record(two)))
        self.assertIsNone(hello.parse_client_hello(record(one) + record(two)))

    def test_fragment_beyond_message(self):
        self.assertRaises(hello.HelloError, hello.parse_client_hello,
                          record(handshake(1, b"\x00" * 10, fragment_offset=5, length=12)))

    def test_several_messages_in_one_record(self):
        _, _, body, _ = first_record(first_client_hello())
        datagram = record(handshake(3, b"\x00" * 5) + handshake(1, body))
        self.assertEqual(hello.parse_client_hello(datagram).tls_id, CLIENT_TLS_ID)

    def test_after_other_records(self):
        datagram = record(b"\x17" * 20, content_type=23, epoch=1) + first_client_hello()
        self.assertEqual(hello.parse_client_hello(datagram).tls_id, CLIENT_TLS_ID)

    def test_record_limit(self):
        """Work is bounded: a hello behind MAX_RECORDS records is not looked for."""
        empty = record(b"", content_type=23)
        behind = empty * (hello.MAX_RECORDS - 1) + first_client_hello()
        self.assertEqual(hello.parse_client_hello(behind).tls_id, CLIENT_TLS_ID)
        too_far = empty * hello.MAX_RECORDS + first_client_hello()
        self.assertIsNone(hello.parse_client_hello(too_far))

    def test_message_limit(self):
        _, _, body, _ = first_record(first_client_hello())
        filler = handshake(3, b"")
        behind = record(filler * (hello.MAX_MESSAGES - 1) + handshake(1, body))
        self.assertEqual(hello.parse_client_hello(behind).tls_id, CLIENT_TLS_ID)
        too_far = record(filler * hello.MAX_MESSAGES + handshake(1, body))
        self.assertIsNone(hello.parse_client_hello(too_far))

    def test_broken_framing(self):
        datagram = first_client_hello()
        overrun = record(b"", 23)[:11] + b"\x07\xd0"  # claims 2000 octets
        for broken in (datagram[:12], datagram[:-1], overrun + datagram,
                       record(b"\x01\x00\x00"),
                       record(b"\x01" + b"\x00" * 8 + b"\x00\x00\x09")):
            self.assertRaises(hello.HelloError, hello.parse_client_hello, broken)

    def test_nothing_after_the_hello_is_read(self):
        """The scan stops at the hello: a broken record behind it does not matter."""
        info = hello.parse_client_hello(first_client_hello() + b"\x16\xfe\xfd")
        self.assertEqual(info.tls_id, CLIENT_TLS_ID)


class ServerHelloTests(SynchronousTestCase):

    def test_server_flight(self):
        flight = server_flight()
        # The flight packs several records: ServerHello, Certificate, ...
        self.assertGreater(len(dtls.split_records(flight)), 1)
        info = hello.parse_server_hello(flight)
        self.assertIsInstance(info, hello.ServerHelloInfo)
        self.assertEqual(info.srtp_profile, 9)
        self.assertEqual(info.srtp_mki, b"")
        self.assertEqual(info.tls_id, SERVER_TLS_ID)
        self.assertFalse(info.tls_id_malformed)
        self.assertIsNone(info.ekt_cipher)
        self.assertFalse(info.ekt_negotiated)
        self.assertEqual(info.server_version, 0xFEFD)
        self.assertEqual(info.compression_method, 0)
        self.assertEqual(info.message_seq, 1)

    def test_not_server_hellos(self):
        first, verify, second, _ = exchange()
        for datagram in (first, verify, second, b""):
            self.assertIsNone(hello.parse_server_hello(datagram))

    def test_behind_other_records(self):
        """Found wherever it sits in the datagram."""
        records = dtls.split_records(server_flight())
        moved = b"".join(records[1:]) + records[0]
        self.assertEqual(hello.parse_server_hello(moved).srtp_profile, 9)

    def test_ekt_selected(self):
        for cipher in (1, 2):
            datagram = rewrite(server_flight(), with_extension(39, bytes([cipher])))
            info = hello.parse_server_hello(datagram)
            self.assertEqual(info.ekt_cipher, cipher)
            self.assertTrue(info.ekt_negotiated)
            self.assertEqual(info.srtp_profile, 9)

    def test_malformed_ekt_selection(self):
        for bad in (b"", b"\x01\x02", b"\x01\x01"):
            datagram = rewrite(server_flight(), with_extension(39, bad))
            self.assertRaises(hello.HelloError, hello.parse_server_hello, datagram)

    def test_use_srtp_selects_exactly_one(self):
        for bad in (b"\x00\x04\x00\x09\x00\x07\x00", b"\x00\x00\x00", b"\x00\x02\x00\x09"):
            datagram = rewrite(server_flight(), replacing(14, bad))
            self.assertRaises(hello.HelloError, hello.parse_server_hello, datagram)

    def test_without_use_srtp(self):
        datagram = rewrite(server_flight(), lambda extensions: [
            (t, d) for t, d in extensions if t != 14])
        self.assertIsNone(hello.parse_server_hello(datagram).srtp_profile)

    def test_malformed_tls_id_is_flagged(self):
        datagram = rewrite(server_flight(), replacing(56, b"\x00"))
        info = hello.parse_server_hello(datagram)
        self.assertIsNone(info.tls_id)
        self.assertTrue(info.tls_id_malformed)

    def test_trailing_octets_in_body(self):
        datagram = rewrite(server_flight(), lambda extensions: b"\x00\x00\x00")
        self.assertRaises(hello.HelloError, hello.parse_server_hello, datagram)


# --------------------------------------------------------------------------
# Nothing but HelloError, whatever the bytes


PARSERS = (hello.parse_client_hello, hello.parse_server_hello)


def assertOnlyHelloError(test, datagram):
    for parse in PARSERS:
        try:
            result = parse(datagram)
        except hello.HelloError:
            continue
        test.assertIsInstance(result, (type(None), hello.ClientHelloInfo, hello.ServerHelloInfo))


def mutate(data, edits):
    data = bytearray(data)
    for kind, position, value in edits:
        if not data:
            break
        position %= len(data)
        if kind == 0:
            data[position] = value
        elif kind == 1:
            del data[position]
        elif kind == 2:
            data.insert(position, value)
        else:
            del data[position:]
    return bytes(data)


edits = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4000), st.integers(0, 255)),
                 min_size=1, max_size=6)


class RobustnessTests(SynchronousTestCase):

    @settings(max_examples=1000)
    @given(st.binary(max_size=400))
    def test_random_bytes(self, data):
        assertOnlyHelloError(self, data)

    @settings(max_examples=500)
    @given(st.sampled_from((0, 2, 3)), st.binary(max_size=300))
    def test_random_hello_bodies(self, which, body):
        """Random bodies in well-formed record and handshake headers reach the field parsers."""
        msg_type = {0: 1, 2: 1, 3: 2}[which]
        assertOnlyHelloError(self, record(handshake(msg_type, body)))

    @settings(max_examples=1000)
    @given(st.sampled_from((0, 2, 3)), edits)
    def test_mutated_real_hellos(self, which, changes):
        assertOnlyHelloError(self, mutate(exchange()[which], changes))

    @settings(max_examples=1000)
    @given(st.sampled_from((0, 2, 3)), edits)
    def test_mutated_hello_bodies(self, which, changes):
        """Mutations inside the hello body, with every enclosing length still right."""
        _, handshake_header, body, _ = first_record(exchange()[which])
        assertOnlyHelloError(self, record(handshake(handshake_header[0],
                                                    mutate(body, changes))))


def fragmented_client_hello():
    """A real ClientHello OpenSSL split in two datagrams (MTU 256, a 255-character tls-id)."""
    client = dtls.ClientAssociation(dtls.Credentials.self_signed("ep"), [by_id(9), by_id(7)],
                                    tls_id=b"F" * 255, mtu=256, ekt_ciphers=(1, 2))
    datagrams = client.start(0.0).datagrams
    assert len(datagrams) == 2
    return datagrams


def split_fragment(datagram, at):
    """One fragment record cut in two at ``at`` octets of its data (RFC 6347 4.2.3)."""
    header, message = datagram[:13], datagram[13:]
    offset = int.from_bytes(message[6:9], "big")
    data = message[12:]
    out = []
    for start, piece in ((0, data[:at]), (at, data[at:])):
        handshake_header = (message[:6] + (offset + start).to_bytes(3, "big")
                            + len(piece).to_bytes(3, "big"))
        out.append(header[:11] + (12 + len(piece)).to_bytes(2, "big") + handshake_header + piece)
    return out


class ReassemblyTests(SynchronousTestCase):

    def test_fragments_give_the_whole_client_hello(self):
        first, second = fragmented_client_hello()
        self.assertIsNone(hello.parse_client_hello(first))
        for order in ((first, second), (second, first)):
            reassembler = hello.ClientHelloReassembler()
            self.assertIsNone(reassembler.feed("a", order[0], 0.0))
            whole = reassembler.feed("a", order[1], 0.1)
            info = hello.parse_client_hello(whole)
            self.assertEqual(info.tls_id, b"F" * 255)
            self.assertEqual(info.srtp_profiles, (9, 7))
            self.assertEqual(info.ekt_ciphers, (1, 2))
            self.assertEqual(len(reassembler), 0)
            self.assertEqual(reassembler.counters, {"hello-reassembled": 1})
            # One record, one unfragmented message.
            self.assertEqual(len(dtls.split_records(whole)), 1)

    def test_overlapping_and_duplicate_fragments(self):
        first, second = fragmented_client_hello()
        reassembler = hello.ClientHelloReassembler()
        a, b = split_fragment(first, 50)
        for datagram in (a, a, second):
            self.assertIsNone(reassembler.feed("a", datagram, 0.0))
        whole = reassembler.feed("a", first, 0.0)  # overlaps a, same octets
        self.assertEqual(hello.parse_client_hello(whole).tls_id, b"F" * 255)

    def test_whole_hellos_and_other_datagrams_pass_unchanged(self):
        reassembler = hello.ClientHelloReassembler()
        for datagram in (first_client_hello(), server_flight(), b"\x17\xfe\xfd" + bytes(30),
                         b"\x16\xfe"):
            self.assertIs(reassembler.feed("a", datagram, 0.0), datagram)
        self.assertEqual(reassembler.counters, {})

    def test_too_big_refused(self):
        first, second = fragmented_client_hello()
        reassembler = hello.ClientHelloReassembler(max_octets=300)
        self.assertIsNone(reassembler.feed("a", first, 0.0))
        self.assertIsNone(reassembler.feed("a", second, 0.0))
        self.assertEqual(reassembler.counters, {"hello-fragments-too-big": 2})
        self.assertEqual(len(reassembler), 0)

    def test_too_many_fragments_refused(self):
        first, second = fragmented_client_hello()
        reassembler = hello.ClientHelloReassembler(max_fragments=2)
        a, b = split_fragment(first, 50)
        for datagram in (a, b, second):
            self.assertIsNone(reassembler.feed("a", datagram, 0.0))
        self.assertEqual(reassembler.counters, {"hello-fragments-too-many": 1})
        self.assertEqual(len(reassembler), 0)

    def test_contradicting_fragments_refused(self):
        first, second = fragmented_client_hello()
        reassembler = hello.ClientHelloReassembler()
        self.assertIsNone(reassembler.feed("a", first, 0.0))
        tampered = first[:-1] + bytes([first[-1] ^ 1])
        self.assertIsNone(reassembler.feed("a", tampered, 0.0))
        self.assertEqual(reassembler.counters, {"hello-fragments-inconsistent": 1})
        # Nothing of it is kept: the second fragment alone completes nothing.
        self.assertIsNone(reassembler.feed("a", second, 0.0))
        self.assertEqual(len(reassembler), 1)
        other_length = second[:14] + (int.from_bytes(second[14:17], "big") + 1).to_bytes(
            3, "big") + second[17:]
        self.assertIsNone(reassembler.feed("a", other_length, 0.0))
        self.assertEqual(reassembler.counters["hello-fragments-inconsistent"], 2)

    def test_timeout(self):
        first, second = fragmented_client_hello()
        reassembler = hello.ClientHelloReassembler(timeout=5.0)
        self.assertIsNone(reassembler.feed("a", first, 0.0))
        self.assertIsNone(reassembler.feed("a", second, 5.0))
        self.assertEqual(reassembler.counters["hello-fragments-timed-out"], 1)
        self.assertEqual(len(reassembler), 1)  # the second one, started anew

    def test_bounded_number_in_progress(self):
        first, second = fragmented_client_hello()
        reassembler = hello.ClientHelloReassembler(max_pending=4)
        for key in range(100):
            self.assertIsNone(reassembler.feed(key, first, 0.0))
        self.assertEqual(len(reassembler), 4)
        self.assertEqual(reassembler.counters, {"hello-fragments-evicted": 96})
        self.assertIsNotNone(reassembler.feed(99, second, 0.0))
        self.assertIsNone(reassembler.feed(0, second, 0.0))


# --------------------------------------------------------------------------
# The single-pass parsers against the ones they replaced


def outcome(parse, datagram):
    """What ``parse`` makes of ``datagram``: its fields, or the HelloError's reason."""
    try:
        result = parse(datagram)
    except Exception as error:  # the old and the new must fail alike
        return (type(error).__name__, str(error))
    if result is None or isinstance(result, list):
        return result
    return (type(result).__name__, dataclasses.asdict(result),
            result.cookie_empty if hasattr(result, "cookie_empty") else result.ekt_negotiated)


def assertSameAsReference(test, datagram):
    for name in ("parse_client_hello", "parse_server_hello", "_client_hello_fragments"):
        test.assertEqual(outcome(getattr(hello, name), datagram),
                         outcome(getattr(hello_reference, name), datagram), name)


class EquivalenceTests(SynchronousTestCase):
    """
    perc.hello's parsers (read in place, in one pass) against the reader
    based ones they replaced (tests/hello_reference.py): the same fields
    for every hello, the same HelloError reason for every malformed one,
    the same fragments for the reassembler.
    """

    def test_real_hellos(self):
        datagrams = list(exchange()) + list(fragmented_client_hello())
        datagrams += split_fragment(fragmented_client_hello()[0], 40)
        for datagram in datagrams + [b"".join(datagrams), b"", b"\x16"]:
            assertSameAsReference(self, datagram)
        self.assertIsNotNone(hello.parse_client_hello(exchange()[2]).tls_id)

    @settings(max_examples=1000)
    @given(st.binary(max_size=400))
    def test_random_bytes(self, data):
        assertSameAsReference(self, data)

    @settings(max_examples=1000)
    @given(st.sampled_from((0, 2, 3)), st.binary(max_size=300))
    def test_random_hello_bodies(self, which, body):
        msg_type = {0: 1, 2: 1, 3: 2}[which]
        assertSameAsReference(self, record(handshake(msg_type, body)))

    @settings(max_examples=2000)
    @given(st.sampled_from((0, 2, 3)), edits)
    def test_mutated_real_hellos(self, which, changes):
        assertSameAsReference(self, mutate(exchange()[which], changes))

    @settings(max_examples=2000)
    @given(st.sampled_from((0, 2, 3)), edits)
    def test_mutated_hello_bodies(self, which, changes):
        _, handshake_header, body, _ = first_record(exchange()[which])
        assertSameAsReference(self, record(handshake(handshake_header[0],
                                                     mutate(body, changes))))

    @settings(max_examples=1000)
    @given(st.sampled_from((0, 1)), st.integers(1, 200), edits)
    def test_mutated_fragments(self, which, at, changes):
        """Fragments (cut, mutated, several in one datagram) reach the reassembler alike."""
        pieces = split_fragment(fragmented_client_hello()[which], at)
        assertSameAsReference(self, mutate(b"".join(pieces), changes))
        assertSameAsReference(self, b"".join(pieces) + exchange()[2])

    @settings(max_examples=500)
    @given(st.lists(st.tuples(st.sampled_from((20, 22, 23)), st.integers(0, 1),
                              st.sampled_from((1, 2, 11)), st.binary(max_size=40),
                              st.integers(0, 60), st.booleans(), st.integers(-2, 2)),
                    min_size=1, max_size=40))
    def test_records_of_every_kind(self, parts):
        """Many records and messages, of other types and epochs, whole and partial."""
        datagram = b""
        for content_type, epoch, msg_type, body, offset, whole, slack in parts:
            # slack: a fragment that ends before, at or beyond its message's end.
            message = handshake(msg_type, body, fragment_offset=0 if whole else offset,
                                length=max(0, offset + len(body) + slack))
            datagram += record(message, content_type=content_type, epoch=epoch)
        assertSameAsReference(self, datagram)
