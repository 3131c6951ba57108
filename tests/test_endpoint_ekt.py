"""
The reference endpoint's EKT receive path (RFC 8870 section 4.3.2) against a
hostile conference member, and EKTKeys with TTL 0: a real endpoint joined to
a real Key Distributor (see tests.test_endpoint_rejoin), fed real
double-encrypted packets protected as its Media Distributor would forward
them.
"""

from __future__ import annotations

import io
import os
import struct

from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding
from twisted.logger import Logger

from perc.double import DoubleSender
from perc.ekt import EktKey, EktSender
from perc.scripts.endpoint import EndpointOptions
from perc.profiles import by_id
from perc.rtp import full_ekt_field, parse_full_ekt_field, split_ekt_field

from tests.test_endpoint_rejoin import CONFERENCE, SERVER, RejoinTestCase

PROFILE = by_id(0x0009)
GOOD = 0x11111111
HOSTILE = 0x66666666


class Sender:
    """
    A conference member's stream: it holds the conference EKTKey, protects
    with its own inner key, and the Media Distributor's outer layer toward
    ``receiver``.
    """

    def __init__(self, kd, receiver, ssrc, master=None):
        self.key = kd.conference_keys.key_for(CONFERENCE, kd.clock.seconds())
        self.ssrc = ssrc
        self.master = master if master is not None else os.urandom(16)
        hbh = receiver.hbh_keys
        self.double = DoubleSender(PROFILE, self.master, self.key.srtp_master_salt[:12],
                                   hbh.server_key, hbh.server_salt)
        self.sequence = 0

    def full_field(self, ssrc=None, master=None):
        """A FullEKTField announcing ``master`` (default: its own) for ``ssrc``."""
        return EktSender(self.key, 1, self.ssrc if ssrc is None else ssrc,
                         self.master if master is None else master, lambda: 0).full_field()

    def packet(self, ekt_field=b"\x00"):
        self.sequence += 1
        payload = struct.pack("!4sIId", b"PERC", self.ssrc, self.sequence, 0.0) + bytes(100)
        header = struct.pack("!BBHII", 0x80, 96, self.sequence, self.sequence * 160, self.ssrc)
        return self.double.protect(header + payload, ekt_field=ekt_field)


class HostileSenderTests(RejoinTestCase):
    def setUp(self):
        done = super().setUp()
        done.addCallback(lambda _: self.join())
        return done

    def join(self):
        self.receiver = self.endpoint()
        self.assertTrue(self.receiver.keyed)
        self.good = Sender(self.kd, self.receiver, GOOD)
        self.deliver(self.good.packet(self.good.full_field()))
        self.assertEqual(self.stats(GOOD), (1, 1))

    def deliver(self, packet):
        self.receiver.datagramReceived(packet, SERVER)

    def stats(self, ssrc):
        stats = self.receiver.stats[ssrc]
        return stats.received, stats.verified

    def test_oversized_master_key_discarded_and_counted(self):
        # A member announces a 32-octet key in a 0x0009 conference (whose
        # end-to-end key is 16 octets): step 6, abort EKT, drop the packet.
        hostile = Sender(self.kd, self.receiver, HOSTILE)
        self.deliver(hostile.packet(hostile.full_field(master=os.urandom(32))))
        self.assertEqual(self.receiver.ekt_discarded, {"wrong-key-length": 1})
        self.assertNotIn(HOSTILE, self.receiver.stats)
        self.assertEqual(self.receiver.summary()["ekt_discarded"], {"wrong-key-length": 1})
        # Everyone else's media is still received.
        self.deliver(self.good.packet())
        self.assertEqual(self.stats(GOOD), (2, 2))

    def test_unknown_spi_discards_the_packet(self):
        # Step 2: no parameter set, an authentication failure.  The packet is
        # otherwise fine (known sender, its current key).
        unheld = EktKey(os.urandom(16), os.urandom(12), (self.good.key.ekt_spi + 1) & 0xFFFF, 60)
        stranger = EktSender(unheld, 1, GOOD, self.good.master, lambda: 0)
        self.deliver(self.good.packet(stranger.full_field()))
        self.assertEqual(self.receiver.ekt_discarded, {"unknown-spi": 1})
        self.assertEqual(self.stats(GOOD), (1, 1))
        # The sender may be under an EKTKey this endpoint lacks: it asks.
        self.assertTrue(self.receiver.stats[GOOD].awaiting_key)
        self.assertIsNotNone(self.receiver._asking_until)

    def test_unwrap_failure_discards_the_packet(self):
        # Step 3: the ciphertext does not authenticate.
        field = bytearray(self.good.full_field())
        field[3] ^= 0x40
        self.deliver(self.good.packet(bytes(field)))
        self.assertEqual(self.receiver.ekt_discarded, {"unwrap-failed": 1})
        self.assertEqual(self.stats(GOOD), (1, 1))

    def test_malformed_plaintext_discards_the_packet(self):
        # Step 4: authentic under the EKTKey, but no EKTPlaintext.
        wrapped = aes_key_wrap_with_padding(self.good.key.ekt_key_value, b"\xff" * 20)
        self.deliver(self.good.packet(full_ekt_field(wrapped, self.good.key.ekt_spi, 1)))
        self.assertEqual(self.receiver.ekt_discarded, {"bad-plaintext": 1})
        self.assertEqual(self.stats(GOOD), (1, 1))

    def test_ssrc_mismatch_discards_only_the_field(self):
        # Step 5: another stream's field is dropped, the packet processed.
        hostile = Sender(self.kd, self.receiver, HOSTILE)
        self.deliver(self.good.packet(hostile.full_field()))
        self.assertEqual(self.receiver.ekt_discarded, {"ssrc-mismatch": 1})
        self.assertEqual(self.stats(GOOD), (2, 2))
        self.assertNotIn(HOSTILE, self.receiver.stats)

    def test_malformed_fields_never_raise(self):
        for field in (b"\x02", b"\x00\x00\x02", b"\x05", bytes(30) + b"\x00\x08\x02",
                      bytes(30) + b"\x00\x09\x02"):
            # In place of the ShortEKTField (the sender refuses to build these).
            self.deliver(self.good.packet()[:-1] + field)
        self.assertEqual(self.stats(GOOD), (1, 1))
        self.assertEqual(self.receiver.undecodable + sum(self.receiver.ekt_discarded.values()), 5)


class ExpiredOnArrivalTests(RejoinTestCase):
    """A Key Distributor that sends EKTKeys with TTL 0 (as Linphone's does for "no limit")."""

    def test_ttl_zero_key_never_used_and_asked_again(self):
        endpoint = self.endpoint()
        events = []
        endpoint.log = Logger(observer=events.append)
        endpoint.startSending()
        key = endpoint._ekt_sender.ekt_key
        self.kd.conference_keys.ttl = 0  # what this project refuses to configure
        self.successResultOf(self.kd.rekey(CONFERENCE))
        self.advance(endpoint, 12.0)
        # Never protected with: the endpoint still sends under its old key.
        self.assertIs(endpoint._ekt_sender.ekt_key, key)
        self.assertEqual(endpoint.rekeys, 0)
        self.assertEqual(endpoint._ekt_receiver.spis, (key.ekt_spi,))
        sent = endpoint.sent
        self.advance(endpoint, 1.0)
        self.assertGreater(endpoint.sent, sent)
        # Counted every time, logged once; no usable answer, so it asked
        # again and joined again.
        self.assertGreater(endpoint.expired_ekt_keys, 2)
        self.assertEqual(endpoint.summary()["expired_ekt_keys"], endpoint.expired_ekt_keys)
        self.assertEqual(len([e for e in events if "TTL 0" in e["log_format"]]), 1)
        self.assertGreaterEqual(endpoint.lost, 1)
        # A usable key arrives: taken at once.
        self.kd.conference_keys.ttl = 3600
        new = self.successResultOf(self.kd.rekey(CONFERENCE))[0]
        self.advance(endpoint, 8.0)
        self.assertEqual(endpoint._ekt_sender.spi, new.ekt_spi)
        self.assertTrue(endpoint.keyed)
        self.assertFalse(endpoint.failed.called)

    def test_first_join_with_a_ttl_zero_key_does_not_join(self):
        self.kd.conference_keys.ttl = 0
        endpoint = self.endpoint()
        endpoint.startSending()
        self.advance(endpoint, 2.0)
        self.assertFalse(endpoint.joined.called)
        self.assertFalse(endpoint.keyed)
        self.assertEqual(endpoint.sent, 0)
        self.assertGreaterEqual(endpoint.expired_ekt_keys, 2)


def announced_spi(datagram):
    """The SPI of a media packet's FullEKTField, or None for a ShortEKTField."""
    _, field = split_ekt_field(datagram)
    return None if field == b"\x00" else parse_full_ekt_field(field).spi


class KeyLifetimeTests(RejoinTestCase):
    """The endpoint across EKTKey rollovers (perc-kd --ekt-ttl 4, rollover at 3/4)."""

    ekt_options = {"ttl": 4, "rollover": 0.75}

    def test_switch_after_holding_the_new_key(self):
        endpoint = self.endpoint()
        endpoint.startSending()
        first = endpoint._ekt_sender.spi
        self.advance(endpoint, 3.0)
        # The rollover key arrived at 3 s: readable at once, not yet used.
        new = self.kd.conference_keys.key_for(CONFERENCE, self.clock.seconds())
        self.assertNotEqual(new.ekt_spi, first)
        self.assertEqual(endpoint.rekeys, 1)
        self.assertEqual(endpoint._ekt_receiver.spis, (new.ekt_spi, first))
        self.advance(endpoint, 1.5)
        spis = [(at, announced_spi(datagram)) for at, datagram in self.path.media]
        self.assertEqual({spi for at, spi in spis if at < 3.5} - {None}, {first})
        # After KEY_SWITCH_DELAY (0.5 s): a new master key announced under
        # the new SPI, and only that.
        after = [spi for at, spi in spis if at >= 3.5]
        self.assertEqual(after[:3], [new.ekt_spi] * 3)
        self.assertEqual(set(after) - {None}, {new.ekt_spi})
        # Sending never stopped.
        self.assertEqual(endpoint.unsent_key_expired, 0)
        self.assertEqual(endpoint.summary()["rekeys"], 1)
        self.assertEqual(endpoint.summary()["joins"], 1)
        # ``perc endpoint`` prints joins beside rekeys.
        out = io.StringIO()
        options = EndpointOptions()
        options["expect-senders"] = 0
        options._summary(endpoint, out)
        self.assertIn("handshakes 1; joins 1; rekeys 1;", out.getvalue())

    def test_never_protects_with_an_expired_key_and_resumes(self):
        endpoint = self.endpoint()
        endpoint.startSending()
        first = endpoint._ekt_sender.spi
        self.advance(endpoint, 2.0)
        # The path dies before the rollover: the key runs out at 4 s.
        self.path.up = False
        self.advance(endpoint, 4.0)
        self.assertTrue(endpoint._ekt_sender.expired(self.clock.seconds()))
        self.assertEqual([at for at, _ in self.path.media if at >= 4.0], [])
        self.assertGreater(endpoint.unsent_key_expired, 0)
        self.assertTrue(endpoint._sending.running)
        sent = endpoint.sent
        self.path.up = True
        self.advance(endpoint, 8.0)
        # A key arrived: sending resumed under it, never under the old one.
        self.assertGreater(endpoint.sent, sent)
        self.assertTrue(endpoint._sending.running)
        resumed = {spi for at, datagram in self.path.media if at >= 4.0
                   for spi in [announced_spi(datagram)] if spi is not None}
        self.assertTrue(resumed)
        self.assertNotIn(first, resumed)
        self.assertFalse(endpoint._ekt_sender.expired(self.clock.seconds()))
        self.assertEqual(endpoint._ekt_sender.spi,
                         self.kd.conference_keys.key_for(CONFERENCE, self.clock.seconds()).ekt_spi)

    def test_expired_key_makes_it_ask_the_key_distributor(self):
        endpoint = self.endpoint(keepalive=0)  # no liveness probes: only the expiry asks
        endpoint.startSending()
        # The rollover never reaches the endpoint (as if its ekt_key
        # messages were all lost): its key expires at 4 s.
        self.kd._rollOver = lambda conference: None
        self.kd._scheduleRollover(CONFERENCE)
        self.advance(endpoint, 3.9)
        asked = self.kd.counters.get("ekt-key-resent", 0)
        self.advance(endpoint, 0.6)
        self.assertGreater(endpoint.unsent_key_expired, 0)
        self.assertGreater(self.kd.counters.get("ekt-key-resent", 0), asked)
        # A new key (here from a rekey): taken at once, the old one being expired.
        new, _ = self.successResultOf(self.kd.rekey(CONFERENCE))
        self.advance(endpoint, 0.25)
        self.assertEqual(endpoint._ekt_sender.spi, new.ekt_spi)
        sent = endpoint.sent
        self.advance(endpoint, 1.0)
        self.assertGreater(endpoint.sent, sent)
