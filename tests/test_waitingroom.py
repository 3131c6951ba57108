"""Tests for perc.waitingroom: what waits for a peer without a tunnel, and its bounds."""

from __future__ import annotations

import uuid

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from perc import wire
from perc.waitingroom import WaitingRoom


def dtls(n: int) -> wire.TunneledDtls:
    return wire.TunneledDtls(uuid.UUID(int=n), bytes([23]) * 10)


class WaitingRoomTests(SynchronousTestCase):
    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.room = WaitingRoom(peer_kind="Key Distributor", max_messages=3, max_octets=100,
                                max_owed=2, max_peers=2)

    def warnings(self):
        return [e for e in self.events if e.get("log_namespace", "").startswith("perc.waitingroom")]

    def test_drained_in_order_disconnects_last(self):
        gone = uuid.uuid4()
        self.assertTrue(self.room.put("kd", dtls(1)))
        self.assertTrue(self.room.put("kd", wire.EndpointDisconnect(gone)))
        self.assertTrue(self.room.put("kd", wire.EndpointDisconnect(gone)))  # once
        self.assertTrue(self.room.put("kd", dtls(2)))
        self.assertEqual(self.room.waiting("kd"), 3)
        self.assertEqual(self.room.drain("kd"), [dtls(1), dtls(2), wire.EndpointDisconnect(gone)])
        self.assertEqual((len(self.room), self.room.drain("kd")), (0, []))

    def test_message_bound(self):
        for n in range(3):
            self.assertTrue(self.room.put("kd", dtls(n)))
        self.assertFalse(self.room.put("kd", dtls(3)))
        self.assertFalse(self.room.put("kd", dtls(4)))
        self.assertEqual(self.room.dropped, 2)
        self.assertEqual(len(self.warnings()), 1)  # one line, then a total when drained
        self.assertEqual(len(self.room.drain("kd")), 3)
        self.assertEqual(self.warnings()[-1]["count"], 2)

    def test_octet_bound(self):
        big = wire.TunneledDtls(uuid.uuid4(), bytes(80))  # 3 + 16 + 2 + 80 octets
        self.assertTrue(self.room.put("kd", dtls(1)))  # 31 octets
        self.assertFalse(self.room.put("kd", big))
        self.assertEqual(self.room.waiting("kd"), 1)

    def test_disconnect_bound(self):
        self.assertTrue(self.room.put("kd", wire.EndpointDisconnect(uuid.uuid4())))
        self.assertTrue(self.room.put("kd", wire.EndpointDisconnect(uuid.uuid4())))
        self.assertFalse(self.room.put("kd", wire.EndpointDisconnect(uuid.uuid4())))
        self.assertEqual(self.room.waiting("kd"), 2)

    def test_expire_keeps_the_disconnects(self):
        gone = uuid.uuid4()
        self.room.put("kd", dtls(1))
        self.room.put("kd", wire.EndpointDisconnect(gone))
        self.assertEqual(self.room.expire("kd", 10), 1)
        self.assertEqual(self.warnings()[-1]["count"], 1)
        self.assertEqual(self.room.drain("kd"), [wire.EndpointDisconnect(gone)])
        self.room.put("kd", dtls(1))
        self.room.expire("kd", 10)
        self.assertEqual(len(self.room), 0)

    def test_peer_bound_evicts_the_oldest(self):
        self.room.put("kd-1", dtls(1))
        self.room.put("kd-2", dtls(2))
        self.room.put("kd-3", dtls(3))
        self.assertEqual([self.room.waiting(p) for p in ("kd-1", "kd-2", "kd-3")], [0, 1, 1])
        self.assertEqual(self.warnings()[-1]["peer"], "kd-1")
