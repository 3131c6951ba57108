"""
A Key Distributor cluster on one real PostgreSQL database (PERC_TEST_POSTGRES;
skipped with a message without it): two stores, two ConferenceKeys, two
whole KeyDistributor services, node leases through a TCP relay that is
stopped, ownership rows claimed by exactly one of two survivors, and
write-sequence blocks reserved atomically.
"""

from __future__ import annotations

import os
import uuid

from twisted.internet import defer, reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import TestCase

from perc import dtls, wire
from perc.dtls.state import AssociationState
from perc.kd.associations import AssociationRecord as AdoptionRecord
from perc.kd.associations import KeyDistributor, Limits
from perc.kd.cluster import (
    AssociationOwnership,
    ClusterNode,
    OrphanAdoption,
    default_node_id,
    decode_association_record,
    encode_association_record,
    export_association_state,
)
from perc.kd.conference_keys import ConferenceKeys
from perc.kd.roster import Roster
from perc.kd.sealing import SealingKey
from perc.kd.store import Store
from perc.profiles import DEFAULT_PROFILES
from perc.testing.tcprelay import TcpRelay
from tests import test_kd
from tests.kdhelpers import MediaDistributorStandIn, relay_handshake
from tests.storehelpers import PostgresDatabase, SqliteDatabase
from tests.test_kd_service import (
    CONFERENCE,
    TLS_ID,
    KeyDistributorServiceMixin,
    TestMediaDistributor,
    eventually,
)

CONFERENCE_KEY_GENERATION = "SELECT generation FROM conference_keys WHERE conference = ?"


class ClusterDatabaseMixin(PostgresDatabase):
    """Stores of several nodes on one new PostgreSQL database, one sealing key."""

    def setUp(self):
        self.database = self.makeDatabase()
        self.sealing_key = SealingKey.generate()

    @defer.inlineCallbacks
    def open(self, database=None):
        store = yield Store.open(database or self.database, self.sealing_key, reactor)
        self.addCleanup(store.close)
        return store

    @defer.inlineCallbacks
    def expire(self, node_id):
        """``node_id`` holds a lease that has run out (on the database's clock)."""
        store = yield self.open()
        yield store.renew_lease(node_id, 30)
        self.execute("UPDATE nodes SET lease_expires_at = 0 WHERE node_id = ?", (node_id,))


class StoreClusterTests(ClusterDatabaseMixin, TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_reserve_block_is_atomic_across_nodes(self):
        """Concurrent reservations from two connection pools get disjoint, contiguous blocks."""
        one = yield self.open()
        two = yield self.open()
        node = ClusterNode(store=one, node_id="kd-1", clock=reactor)
        yield node.recordAssociation("aid", "md.test", b"opaque", 1000)
        blocks = yield defer.gatherResults(
            [store.reserve_block("aid", 100, "kd-1") for _ in range(10)
             for store in (one, two)])
        self.assertEqual(sorted(blocks), [(1000 + 100 * i, 1100 + 100 * i) for i in range(20)])
        self.assertEqual(self.execute("SELECT sequence_reserved FROM associations"), [(3000,)])
        # Not the owner (adopted elsewhere), or gone: nothing reserved.
        self.assertIsNone((yield two.reserve_block("aid", 100, "kd-2")))
        self.assertIsNone((yield node.reserveBlock("no-such", 100)))
        self.assertEqual((yield node.reserveBlock("aid", 5)), (3000, 3005))

    @defer.inlineCallbacks
    def test_update_only_by_the_owner(self):
        store = yield self.open()
        node = ClusterNode(store=store, node_id="kd-1", clock=reactor)
        other = ClusterNode(store=store, node_id="kd-2", clock=reactor)
        yield node.recordAssociation("aid", "md.test", b"first", 10)
        self.assertTrue((yield node.updateAssociation("aid", "md.test", b"second", 20)))
        self.assertFalse((yield other.updateAssociation("aid", "md.test", b"theirs", 30)))
        record = yield store.get_association("aid")
        self.assertEqual((record.owner_node, record.state, record.sequence_reserved),
                         ("kd-1", b"second", 20))
        yield node.forgetAssociation("aid")
        self.assertIsNone((yield store.get_association("aid")))

    @defer.inlineCallbacks
    def test_orphans_claimed_by_exactly_one_of_two_survivors(self):
        """
        A dead node's rows (lease expired) go, each, to exactly one of two
        survivors claiming at once; a live node's rows and the survivors' own
        stay where they are; the state comes back opened.
        """
        stores = []
        for _ in range(3):
            stores.append((yield self.open()))
        dead = ClusterNode(store=stores[0], node_id="dead", clock=reactor)
        alive = ClusterNode(store=stores[0], node_id="alive", clock=reactor)
        for index in range(30):
            yield dead.recordAssociation("d{:02d}".format(index), "md.test",
                                         "state {}".format(index).encode(), index)
        yield alive.recordAssociation("a", "md.test", b"alive's", 0)
        yield stores[0].renew_lease("alive", 30)
        yield self.expire("dead")
        survivors = [ClusterNode(store=store, node_id="survivor-{}".format(i), clock=reactor,
                                 lease_seconds=30) for i, store in enumerate(stores[1:])]
        yield defer.gatherResults([survivor.start() for survivor in survivors])
        yield survivors[0].recordAssociation("s", "md.test", b"own", 0)
        self.addCleanup(lambda: defer.gatherResults([s.stop() for s in survivors]))
        claims = yield defer.gatherResults([survivor.claimOrphans() for survivor in survivors])
        ids = [{record.association_id for record in claim} for claim in claims]
        self.assertEqual(ids[0] & ids[1], set())
        self.assertEqual(ids[0] | ids[1], {"d{:02d}".format(i) for i in range(30)})
        for survivor, claim in zip(survivors, claims):
            for record in claim:
                self.assertEqual(record.owner_node, survivor.node_id)
                self.assertEqual(record.state, "state {}".format(
                    record.sequence_reserved).encode())
        owners = dict(self.execute("SELECT association_id, owner_node FROM associations"))
        self.assertEqual((owners["a"], owners["s"]), ("alive", "survivor-0"))
        # Nothing left to claim.
        self.assertEqual((yield survivors[1].claimOrphans()), [])

    @defer.inlineCallbacks
    def test_a_live_lease_is_not_claimed_a_released_one_is(self):
        store = yield self.open()
        node = ClusterNode(store=store, node_id="kd-1", clock=reactor, lease_seconds=30)
        survivor = ClusterNode(store=store, node_id="kd-2", clock=reactor, lease_seconds=30)
        yield node.start()
        yield survivor.start()
        self.addCleanup(survivor.stop)
        yield node.recordAssociation("aid", "md.test", b"opaque", 0)
        self.assertEqual((yield survivor.claimOrphans()), [])
        yield node.stop(release=True)  # a clean stop: adoptable at once
        [record] = yield survivor.claimOrphans()
        self.assertEqual((record.association_id, record.owner_node), ("aid", "kd-2"))

    @defer.inlineCallbacks
    def test_concurrent_rollover_ends_with_one_key(self):
        """Two nodes rolling a conference over at once: one compare-and-swap wins, both use its key."""
        one, two = ConferenceKeys(store=(yield self.open())), ConferenceKeys(
            store=(yield self.open()))
        first = yield one.ensure("conf", 100.0)
        yield two.load()
        keys = yield defer.gatherResults([one.rekey("conf", 200.0, rollover=True),
                                          two.rekey("conf", 200.0, rollover=True)])
        self.assertEqual(keys[0], keys[1])
        self.assertNotEqual(keys[0].ekt_spi, first.ekt_spi)
        self.assertEqual(self.execute(CONFERENCE_KEY_GENERATION, ("conf",)), [(2,)])
        self.assertEqual(one.key_for("conf", 200.0), two.key_for("conf", 200.0))

    @defer.inlineCallbacks
    def test_concurrent_rekeys_spis_unique(self):
        """
        Rekeys through two nodes at once (each from a stale generation):
        each ends with a key newer than the one before it (its own, or one
        stored after it was asked for), every stored key has the next SPI,
        and no two keys share an SPI.
        """
        one, two = ConferenceKeys(store=(yield self.open())), ConferenceKeys(
            store=(yield self.open()))
        first = yield one.ensure("conf", 100.0)
        yield two.load()
        keys = yield defer.gatherResults([keys.rekey("conf", 200.0) for _ in range(3)
                                          for keys in (one, two)])
        spi_of = {key.ekt_key_value: key.ekt_spi for key in keys}
        self.assertEqual(len(set(spi_of.values())), len(spi_of))
        self.assertNotIn(first.ekt_key_value, spi_of)
        [(generation,)] = self.execute(CONFERENCE_KEY_GENERATION, ("conf",))
        self.assertGreaterEqual(generation, 1 + len(spi_of))
        self.assertLessEqual(set(spi_of.values()), {(first.ekt_spi + i) & 0xFFFF
                                                    for i in range(1, generation)})

    @defer.inlineCallbacks
    def test_a_key_written_by_one_node_reaches_the_other(self):
        """NOTIFY perc_conference_keys: the other node takes the new key in and tells its observers."""
        one, two = ConferenceKeys(store=(yield self.open())), ConferenceKeys(
            store=(yield self.open()))
        yield one.ensure("conf", 100.0)
        yield two.load()
        heard = defer.Deferred()
        two.add_observer(lambda conference: heard.called or heard.callback(conference))
        two.watch(two.store.notifications)
        key = yield one.rekey("conf", 150.0)
        self.assertEqual((yield heard.addTimeout(20, reactor)), "conf")
        self.assertEqual(two.key_for("conf", 150.0), key)


class LeaseTests(ClusterDatabaseMixin, TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_node_cut_from_the_database_stops_serving_before_its_lease_expires(self):
        """
        A node whose database goes away (a relay in between, stopped) calls
        ``lost`` while the lease the database holds for it has not expired
        yet (read on the database's clock), so no survivor can have claimed
        its associations; once the database answers again it serves again.
        """
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(self.database)
        relay = TcpRelay(reactor, (parts.hostname, parts.port or 5432))
        port = relay.listen().getHost().port
        through = urlunsplit(parts._replace(netloc="{}@127.0.0.1:{}".format(
            parts.username, port)))
        store = yield self.open(through)
        lost, regained = defer.Deferred(), defer.Deferred()
        left = []

        def cut():
            left.extend(self.execute("SELECT lease_expires_at - ({}) FROM nodes".format(
                "extract(epoch from clock_timestamp())::double precision")))
            lost.callback(None)

        node = ClusterNode(store=store, node_id="kd-1", clock=reactor, lease_seconds=1.5,
                           lost=cut, regained=lambda: regained.callback(None))
        yield node.start()
        self.addCleanup(node.stop, False)
        self.assertTrue(node.serving)
        before = self.execute("SELECT lease_expires_at FROM nodes")[0][0]
        # Renewed while the database answers.
        yield eventually(lambda: self.execute("SELECT lease_expires_at FROM nodes")[0][0]
                         > before)
        self.assertTrue(node.serving)
        yield relay.port.stopListening()
        relay.reset()
        yield lost.addTimeout(30, reactor)
        self.assertFalse(node.serving)
        [(seconds_left,)] = left
        self.assertGreater(seconds_left, 0)
        relay.listen(port)
        self.addCleanup(lambda: relay.port.stopListening())
        yield regained.addTimeout(30, reactor)
        self.assertTrue(node.serving)


class TwoKeyDistributorsTests(KeyDistributorServiceMixin, TestCase):
    """Two whole Key Distributor services (same PKI, sealing key and database), own ports."""

    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        from tests.storehelpers import postgres_database

        self.dsn = postgres_database(self)
        yield super().setUp()
        self.first = self.service
        self.first_api = self.api_url
        self.first_tunnel = self.tunnel_port
        self.service = None
        self.dir_token = self.token
        yield self.start("--api-token-file", os.path.join(self.dir, "token2"))
        self.second = self.service

    def options(self, *extra):
        return super().options("--db", self.dsn, "--sealing-key",
                               os.path.join(self.dir, "cluster.sealing-key"),
                               "--lease-seconds", "30", *extra)

    @defer.inlineCallbacks
    def test_registration_through_one_is_known_to_the_other(self):
        self.assertNotEqual(self.first.node_id, self.second.node_id)
        endpoint = dtls.Credentials.self_signed("endpoint")
        self.api_url, self.token = self.first_api, self.dir_token
        kd_tls_id = yield self.register(endpoint.fingerprint)
        yield eventually(lambda: self.second.roster.lookup(TLS_ID) is not None)
        self.assertEqual(self.second.roster.lookup(TLS_ID).kd_tls_id, kd_tls_id)
        nodes = yield self.first.store.nodes()
        self.assertEqual(sorted(node for node, _ in nodes),
                         sorted([self.first.node_id, self.second.node_id]))

    @defer.inlineCallbacks
    def test_rekey_through_the_other_reaches_an_endpoint(self):
        """An endpoint joined through KD1; a rekey through KD2's API reaches it (by NOTIFY)."""
        endpoint = dtls.Credentials.self_signed("endpoint")
        self.api_url, self.token = self.first_api, self.dir_token
        kd_tls_id = yield self.register(endpoint.fingerprint)
        self.tunnel_port = self.first_tunnel
        md = yield self.tunnel()
        client = dtls.ClientAssociation(endpoint, DEFAULT_PROFILES[:1], tls_id=TLS_ID.encode(),
                                        expected_peer_tls_id=kd_tls_id.encode(),
                                        ekt_ciphers=(1,))
        aid = uuid.uuid4()
        yield self.relay(md, client, aid)
        received = []
        yield self.untilKey(md, client, aid, received, lambda key: True)
        first = received[-1]
        rekeyed = yield self.rekeyThroughSecond()
        self.assertNotEqual(rekeyed["ekt_spi"], first.ekt_spi)
        yield self.untilKey(md, client, aid, received,
                            lambda key: key.ekt_spi == rekeyed["ekt_spi"])
        self.assertEqual(self.first.distributor.conference_keys.key_for(
            CONFERENCE, reactor.seconds()).ekt_key_value, received[-1].ekt_key_value)

    @defer.inlineCallbacks
    def test_lease_lost_stops_serving(self):
        """Its lease lost, a Key Distributor closes its tunnels, refuses new ones and is not ready."""
        self.tunnel_port = self.first_tunnel
        md = yield self.tunnel()
        yield eventually(lambda: len(self.first.tunnelFactory.connections) == 1)
        self.first.node._expire()  # what the deadline timer does (see LeaseTests)
        yield md.lost.addTimeout(20, reactor)
        ready, reason = yield self.first.readiness()
        self.assertFalse(ready)
        self.assertIn("lease", reason)
        refused = TestMediaDistributor()
        yield self.tunnelTo(refused)  # TCP accepted, then closed at once
        yield refused.lost.addTimeout(20, reactor)
        self.assertEqual(len(self.first.tunnelFactory.connections), 0)
        ready, reason = yield self.second.readiness()
        self.assertTrue(ready, reason)

    def tunnelTo(self, md):
        from twisted.internet.endpoints import connectProtocol

        from perc.netutil import tls_client_endpoint

        endpoint = tls_client_endpoint(reactor, "tcp:127.0.0.1:{}".format(self.first_tunnel),
                                       self.md_credentials, "--kd")
        return connectProtocol(endpoint, md)

    @defer.inlineCallbacks
    def rekeyThroughSecond(self):
        import json

        from twisted.web.client import Agent, readBody
        from twisted.web.http_headers import Headers

        with open(os.path.join(self.dir, "token2")) as f:
            token = f.read().strip()
        url = "http://127.0.0.1:{}/v1/conferences/{}/rekey".format(
            self.second._ports[1].getHost().port, CONFERENCE)
        response = yield Agent(reactor).request(
            b"POST", url.encode(), Headers({b"Authorization": [
                "Bearer {}".format(token).encode()]}))
        body = yield readBody(response)
        self.assertEqual(response.code, 200, body)
        return json.loads(body)

    @defer.inlineCallbacks
    def untilKey(self, md, client, aid, received, wanted):
        while not (received and wanted(received[-1])):
            message = yield md.next()
            if not isinstance(message, wire.TunneledDtls):
                continue
            output = client.receive(message.dtls_message, reactor.seconds())
            received.extend(e.key for e in output.events if isinstance(e, dtls.EktKeyReceived))
            for datagram in output.datagrams:
                md.sendMessage(wire.TunneledDtls(aid, datagram))


class OwnershipRowsTests(SqliteDatabase, TestCase):
    """
    A real KeyDistributor's ownership rows (any database: SQLite here): a
    row once an association is established, with the exported state as an
    opaque blob until ``exportAssociation`` lands; gone when it ends; kept
    when the Key Distributor stops (so that a survivor may adopt it).
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.database = self.makeDatabase()
        store = yield Store.open(self.database, SealingKey.generate(), reactor)
        self.addCleanup(store.close)
        self.roster = yield Roster.load(store)
        self.registration, _ = yield self.roster.put(
            test_kd.CONFERENCE, test_kd.TLS_ID, test_kd._ENDPOINT.fingerprint)
        self.clock = MemoryReactorClock()
        self.kd = KeyDistributor(roster=self.roster, credentials=test_kd._KD_CREDENTIALS,
                                 profiles=DEFAULT_PROFILES, clock=self.clock, limits=Limits())
        self.addCleanup(self.kd.stop)
        self.node = ClusterNode(store=store, node_id="kd-1", clock=self.clock)
        self.ownership = AssociationOwnership(
            self.node, export=lambda kd, association: (b"opaque " + association.id.bytes, 4096))
        self.kd.ownership = self.ownership

    def join(self):
        md = MediaDistributorStandIn(self.kd)
        client = dtls.ClientAssociation(
            test_kd._ENDPOINT, DEFAULT_PROFILES, tls_id=test_kd.TLS_ID.encode(),
            expected_peer_tls_id=self.registration.kd_tls_id.encode())
        aid = uuid.uuid4()
        events = relay_handshake(md, client, aid, self.clock)
        self.assertTrue(any(isinstance(e, dtls.HandshakeComplete) for e in events))
        return aid

    def rows(self):
        return self.execute("SELECT association_id, owner_node, md_identity, sequence_reserved"
                            " FROM associations")

    @defer.inlineCallbacks
    def test_row_while_established(self):
        aid = self.join()
        yield self.ownership.writing()
        self.assertEqual(self.rows(), [(str(aid), "kd-1", "md.test", 4096)])
        record = yield self.node.store.get_association(str(aid))
        self.assertEqual(record.state, b"opaque " + aid.bytes)
        yield self.roster.delete(test_kd.CONFERENCE, test_kd.TLS_ID)
        self.assertIsNone(self.kd.association(aid))
        yield self.ownership.writing()
        self.assertEqual(self.rows(), [])

    @defer.inlineCallbacks
    def test_row_kept_when_the_key_distributor_stops(self):
        aid = self.join()
        self.kd.stop()
        yield self.ownership.writing()
        self.assertEqual([row[0] for row in self.rows()], [str(aid)])

    @defer.inlineCallbacks
    def test_row_holds_the_exported_association(self):
        """The real export: what a survivor needs to adopt it, and the reserved limit."""
        self.ownership.export = export_association_state
        aid = self.join()
        yield self.ownership.writing()
        [(row_id, owner, md_identity, reserved)] = self.rows()
        self.assertEqual((row_id, owner, md_identity), (str(aid), "kd-1", "md.test"))
        row = yield self.node.store.get_association(str(aid))
        record = decode_association_record(row.state)
        self.assertEqual((record.association_id, record.tls_id, record.conference,
                          record.media_distributor),
                         (aid, test_kd.TLS_ID, test_kd.CONFERENCE, "md.test"))
        self.assertEqual(reserved, AssociationState.from_bytes(record.state).write_limit)
        self.assertGreater(reserved, 0)
        # Nothing secret in the row's clear columns; the state itself is sealed.
        self.assertNotIn(record.state, self.execute("SELECT * FROM associations")[0])

    def test_record_encoding_round_trips_and_refuses_junk(self):
        record = AdoptionRecord(association_id=uuid.uuid4(), state=b"\x00\x01secret",
                                tls_id=test_kd.TLS_ID, conference="c", media_distributor="md",
                                ekt=True)
        self.assertEqual(decode_association_record(encode_association_record(record)), record)
        for junk in (b"", b"{}", b"[1]", b'{"format": 2}', b"\xff"):
            self.assertRaises(ValueError, decode_association_record, junk)


class OwnOrphansTests(SqliteDatabase, TestCase):
    """
    A node's own rows from before it (re)gained its lease hold state it no
    longer has (a restart with the same --node-id, or a lapse): its next
    claimOrphans returns them, once; rows it wrote since are not orphans.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.database = self.makeDatabase()
        self.store = yield Store.open(self.database, SealingKey.generate(), reactor)
        self.addCleanup(self.store.close)

    @defer.inlineCallbacks
    def node(self, **kwargs):
        node = ClusterNode(store=self.store, node_id="kd-1", clock=reactor, lease_seconds=30,
                           **kwargs)
        yield node.start()
        self.addCleanup(node.stop, False)
        return node

    @defer.inlineCallbacks
    def test_restart_with_the_same_node_id(self):
        before = yield self.node()
        yield before.recordAssociation("old", "md.test", b"old state", 0)
        yield before.stop(release=False)
        after = yield self.node()
        yield after.recordAssociation("new", "md.test", b"new state", 0)
        [record] = yield after.claimOrphans()
        self.assertEqual((record.association_id, record.state), ("old", b"old state"))
        self.assertEqual((yield after.claimOrphans()), [])

    @defer.inlineCallbacks
    def test_lease_regained(self):
        regained = []
        node = yield self.node(regained=lambda: regained.append(True))
        yield node.recordAssociation("aid", "md.test", b"state", 0)
        self.assertEqual((yield node.claimOrphans()), [])
        node._expire()  # the deadline passed: state dropped
        self.assertEqual((yield node.claimOrphans()), [])  # not serving
        yield node._renew()
        self.assertEqual(regained, [True])
        self.assertEqual([r.association_id for r in (yield node.claimOrphans())], ["aid"])


class NodeIdTests(TestCase):
    def test_default_node_id(self):
        self.assertTrue(default_node_id("tcp:4740").endswith(":4740"))
        self.assertNotEqual(default_node_id("tcp:0"), default_node_id("tcp:0"))
        self.assertNotEqual(default_node_id(None), default_node_id(None))


class _ClaimingNode:
    """What OrphanAdoption asks of its node: claims that fail, then succeed (the database's part)."""

    node_id = "kd-claims"
    serving = True

    def __init__(self, outcomes):
        self.outcomes = list(outcomes)

    def claimOrphans(self):
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            return defer.fail(outcome)
        return defer.succeed(outcome)


class OrphanClaimLoggingTests(TestCase):
    def test_one_warning_per_outage_and_a_line_when_it_ends(self):
        from twisted.logger import capturedLogs

        outage = ConnectionError("server closed the connection unexpectedly")
        node = _ClaimingNode([outage, outage, outage, [], outage, []])
        adoption = OrphanAdoption(node, distributor=None, sequences=None, interval=1.0)
        with capturedLogs() as events:
            for _ in range(6):
                self.assertEqual(self.successResultOf(adoption.run()), (0, 0))
        said = [(e["log_level"].name, e["log_format"].split(":")[0]) for e in events]
        self.assertEqual(said, [
            ("warn", "Node {node} could not claim orphaned associations"),
            ("info", "Node {node} claims orphaned associations again"),
            ("warn", "Node {node} could not claim orphaned associations"),
            ("info", "Node {node} claims orphaned associations again"),
        ])
