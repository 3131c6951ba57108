"""
The Key Distributor service: tunnel listener and/or outgoing tunnels, the
registration store, the control API, metrics and health.
"""

from __future__ import annotations

import os

from twisted.application import internet, service
from twisted.internet import defer, protocol
from twisted.logger import Logger

from perc import dtls
from perc.apitoken import load_or_create_token
from perc.errors import ConfigError
from perc.httpapi import OperationsResource, make_site
from perc.kd.api import make_api_site
from perc.kd.associations import KeyDistributor, Limits
from perc.kd.cluster import (DEFAULT_LEASE_SECONDS, AssociationOwnership, ClusterNode,
                             OrphanAdoption, WriteSequences, default_node_id)
from perc.kd.conference_keys import DEFAULT_EKT_TTL, DEFAULT_ROLLOVER, ConferenceKeys
from perc.kd.roster import Roster
from perc.kd.sealing import SealingKey
from perc.kd.store import Store
from perc.kd.store.database import describe_database, is_postgresql
from perc.kd.tunnel import KeyDistributorTunnelFactory
from perc.metrics import KeyDistributorMetrics
from perc.netutil import (DEFAULT_TUNNEL_TIMEOUT, GatedFactory, server_endpoint,
                          tls_client_endpoint, tls_server_factory)
from perc.sighup import ReloadOnSighup
from perc.tls import Authoriser, ReloadableCredentials, TlsCredentials

__all__ = ["KeyDistributorService"]

#: The sealing-key file's name beside an SQLite database (--sealing-key).
DEFAULT_SEALING_KEY = "perc-kd.sealing-key"

#: Seconds ``GET /readyz`` waits for the registration database to answer.
READY_TIMEOUT = 5.0


class KeyDistributorService(service.MultiService):
    """
    Binds its ports in ``privilegedStartService`` (so a port in use is one
    clear error before the reactor runs), then opens the roster and lets
    connections in once it has loaded.
    """

    log = Logger()

    def __init__(self, *, reactor, credentials: TlsCredentials | ReloadableCredentials,
                 profiles, db_path: str, sealing_key: SealingKey | None = None,
                 tunnel_listen: str | None, connect: list, api: str | None,
                 api_token: str | None, allow_md: list, limits: Limits,
                 allow_missing_tls_id: bool, ekt_ttl: int = DEFAULT_EKT_TTL,
                 ekt_rollover: float = DEFAULT_ROLLOVER,
                 tunnel_timeout: float | None = DEFAULT_TUNNEL_TIMEOUT,
                 metrics: str | None = None, node_id: str | None = None,
                 lease_seconds: float = DEFAULT_LEASE_SECONDS):
        super().__init__()
        self.reactor = reactor
        #: What new tunnels and associations present; SIGHUP reloads it (reloadCredentials).
        self.tlsCredentials = (credentials if isinstance(credentials, ReloadableCredentials)
                               else ReloadableCredentials(credentials))
        ReloadOnSighup(self.reloadCredentials, reactor).setServiceParent(self)
        self.profiles = tuple(profiles)
        self.db_path = db_path
        #: Seals the conference EKTKeys in the database; None: a new random
        #: one each start (nothing sealed survives a restart).
        self.sealing_key = sealing_key
        self.store: Store | None = None
        self.conferenceKeys: ConferenceKeys | None = None
        self.limits = limits
        self.allow_missing_tls_id = allow_missing_tls_id
        self.ekt_ttl = ekt_ttl
        self.ekt_rollover = ekt_rollover
        #: Seconds before a silent tunnel peer counts as dead (None: the kernel's defaults).
        self.tunnel_timeout = tunnel_timeout
        self.authorise = Authoriser(allow_md or None)
        #: This Key Distributor in the database's nodes table (perc.kd.cluster).
        self.node_id = node_id or default_node_id(tunnel_listen)
        self.lease_seconds = lease_seconds
        self.node: ClusterNode | None = None
        #: Cluster mode (PostgreSQL): write-sequence blocks from the
        #: database and the adoption of dead nodes' associations.
        self.writeSequences: WriteSequences | None = None
        self.adoption: OrphanAdoption | None = None
        self._api_description = api
        self._tunnel_description = tunnel_listen
        self._clients: list = []
        self.distributor: KeyDistributor | None = None
        self.tunnelFactory: KeyDistributorTunnelFactory | None = None
        self.roster: Roster | None = None
        self.ready = defer.Deferred()
        self._tunnelGate = GatedFactory()
        self._apiGate = GatedFactory()
        self._api_token = api_token
        self._ports = []
        self._listen = []
        if tunnel_listen:
            self._listen.append(("--tunnel-listen", tunnel_listen,
                                 server_endpoint(reactor, tunnel_listen, "--tunnel-listen"),
                                 self._tunnelGate))
        if api:
            self._listen.append(("--api", api, server_endpoint(reactor, api, "--api"),
                                 self._apiGate))
        self.metrics = KeyDistributorMetrics(self)
        #: /metrics, /healthz, /readyz: on the API port and on --metrics.
        self.operations = OperationsResource(self.metrics.registry, self.readiness)
        if metrics:
            self._listen.append(("--metrics", metrics,
                                 server_endpoint(reactor, metrics, "--metrics"),
                                 make_site(self.operations)))
        self._connect = [tls_client_endpoint(reactor, description, self.tlsCredentials,
                                             "--connect",
                                             tunnel_timeout=tunnel_timeout)
                         for description in connect]

    @classmethod
    def fromOptions(cls, config, reactor=None):
        """Build from ``perc.kd.tap.Options``; raises ConfigError for what a user must fix."""
        if reactor is None:
            from twisted.internet import reactor
        credentials = ReloadableCredentials.from_options(
            "kd", cert=config["cert"], key=config["key"], ca=config["ca"], pki_dir=config["pki"])
        db_path = config["db"]
        sealing_path = config["sealing-key"]
        if is_postgresql(db_path):
            if sealing_path is None:
                # Every Key Distributor of a cluster must read the same file.
                raise ConfigError("--db {} needs --sealing-key FILE (the same file on every "
                                  "Key Distributor)".format(describe_database(db_path)))
        else:
            directory = os.path.dirname(os.path.abspath(db_path))
            if not os.path.isdir(directory):
                raise ConfigError("--db {}: directory {} does not exist".format(
                    db_path, directory))
            if sealing_path is None:
                sealing_path = os.path.join(directory, DEFAULT_SEALING_KEY)
        sealing_key = SealingKey.load_or_create(sealing_path)
        api = None if config["api"] == "none" else config["api"]
        token = load_or_create_token(config["api-token-file"]) if api else None
        limits = Limits(
            max_associations=config["max-associations"],
            max_associations_per_tunnel=config["max-associations-per-tunnel"],
            handshake_timeout=config["handshake-timeout"],
            tunnel_grace=config["tunnel-grace"],
        )
        return cls(
            reactor=reactor, credentials=credentials, profiles=config["profiles"],
            db_path=db_path, sealing_key=sealing_key,
            tunnel_listen=None if config["tunnel-listen"] == "none" else config["tunnel-listen"],
            connect=config["connect"], api=api, api_token=token, allow_md=config["allow-md"],
            limits=limits, allow_missing_tls_id=config["allow-missing-tls-id"],
            ekt_ttl=config["ekt-ttl"], ekt_rollover=config["ekt-rollover"],
            tunnel_timeout=config["tunnel-timeout"], metrics=config["metrics"],
            node_id=config["node-id"], lease_seconds=config["lease-seconds"])

    def privilegedStartService(self):
        super().privilegedStartService()
        for option, description, endpoint, gate in self._listen:
            factory = (tls_server_factory(self.tlsCredentials, gate, self.tunnel_timeout)
                       if gate is self._tunnelGate else gate)
            result = []
            endpoint.listen(factory).addBoth(result.append)
            if not result:
                continue  # not synchronous (an unusual endpoint type): let it finish later
            if isinstance(result[0], Exception) or hasattr(result[0], "getErrorMessage"):
                message = result[0].getErrorMessage() if hasattr(result[0], "getErrorMessage") \
                    else str(result[0])
                raise SystemExit("perc-kd: cannot listen on {} {}: {}".format(
                    option, description, message))
            self._ports.append(result[0])
            self.log.info("Listening for {what} on {address}", what=option.lstrip("-"),
                          address=result[0].getHost())

    def startService(self):
        super().startService()
        if self.allow_missing_tls_id:
            self.log.warn(
                "--allow-missing-tls-id is on: endpoints without extension 56 are matched "
                "by certificate fingerprint alone")
        if (1 - self.ekt_rollover) * self.ekt_ttl < 2:
            # A late joiner's TTL is rounded down to whole seconds, and the
            # endpoints switch keys 0.5 s after a rollover: less than this
            # and it may drop packets under the old key (README).
            self.log.warn(
                "--ekt-ttl {ttl} with --ekt-rollover {rollover} leaves less than 2 s between "
                "a rollover and the old key's expiry: late joiners may drop packets around "
                "each rollover", ttl=self.ekt_ttl, rollover=self.ekt_rollover)
        d = Store.open(self.db_path, self.sealing_key or SealingKey.generate(), self.reactor)
        d.addCallback(self._storeOpened)
        d.addErrback(self._startFailed)

    @defer.inlineCallbacks
    def _storeOpened(self, store):
        self.store = store
        roster = yield Roster.load(store)
        self.conferenceKeys = ConferenceKeys(ttl=self.ekt_ttl, rollover=self.ekt_rollover,
                                             store=store)
        loaded = yield self.conferenceKeys.load()
        # Keys another Key Distributor writes reach this one's members.
        self.conferenceKeys.watch(store.notifications)
        self.node = ClusterNode(
            store=store, node_id=self.node_id, lease_seconds=self.lease_seconds,
            clock=self.reactor, lost=self._leaseLost, regained=self._leaseRegained,
            listen_address=self._tunnel_description, api_address=self._api_description)
        yield self.node.start()
        self.log.info("Node {node} holds its lease ({seconds} s)", node=self.node_id,
                      seconds=self.lease_seconds)
        self.log.info("Database {database}: {keys} conference EKTKeys loaded (sealed)",
                      database=store.description, keys=loaded)
        self._rosterOpened(roster)

    @property
    def credentials(self) -> TlsCredentials:
        """The TLS credentials new tunnels and associations use now."""
        return self.tlsCredentials.current

    def reloadCredentials(self) -> bool:
        """
        Read the certificate, key and CA files again (SIGHUP): new tunnels
        and new DTLS associations use them, live ones are untouched.  A bad
        file is logged in one line and the current credentials stay.
        """
        try:
            credentials = self.tlsCredentials.reload()
        except ConfigError as error:
            self.log.error("Certificate reload failed, keeping the current certificate: {error}",
                           error=str(error))
            return False
        dtls_credentials = _dtlsCredentials(credentials)
        if self.distributor is not None:
            self.distributor.useCredentials(dtls_credentials)
        self.log.info("Certificate reloaded: new tunnels present {identity}, new associations "
                      "DTLS certificate {fingerprint}", identity=credentials.identity,
                      fingerprint=dtls_credentials.fingerprint)
        return True

    def _rosterOpened(self, roster):
        self.roster = roster
        dtls_credentials = _dtlsCredentials(self.credentials)
        # Failover (ownership rows, write sequences reserved in the database,
        # adoption) needs a database other nodes share: PostgreSQL.  An
        # SQLite file has one Key Distributor and nobody to adopt its
        # associations, so it writes no rows (they cost a thread hop and
        # a commit per join and per ekt_key, and were never read).
        sequences = None
        if is_postgresql(self.db_path):
            sequences = self.writeSequences = WriteSequences(
                self.node, self.limits.write_sequence_block)
        self.distributor = KeyDistributor(
            roster=roster, credentials=dtls_credentials, profiles=self.profiles,
            clock=self.reactor, limits=self.limits,
            allow_missing_tls_id=self.allow_missing_tls_id, conference_keys=self.conferenceKeys,
            observe_handshake=self.metrics.observe_handshake,
            write_reservation=None if sequences is None else sequences.reserve)
        if sequences is not None:
            self.distributor.ownership = AssociationOwnership(self.node, sequences=sequences)
            sequences.distributor = self.distributor
            self.adoption = OrphanAdoption(self.node, self.distributor, sequences,
                                           self.lease_seconds / 3)
            self.adoption.start()
        factory = self.tunnelFactory = KeyDistributorTunnelFactory(
            self.distributor, self.authorise)
        self._tunnelGate.open(factory)
        if self._api_token is not None:
            self._apiGate.open(make_api_site(roster, self._api_token, self.distributor.rekey,
                                             self.status, self.operations))
        for endpoint in self._connect:
            client = internet.ClientService(endpoint, factory, clock=self.reactor)
            client.setServiceParent(self)
            self._clients.append(client)
        self.log.info(
            "Key Distributor ready: {registrations} registrations, profiles {profiles}, "
            "DTLS certificate {fingerprint}",
            registrations=len(roster), profiles=",".join(p.name for p in self.profiles),
            fingerprint=dtls_credentials.fingerprint)
        self.ready.callback(self)

    def _leaseLost(self) -> None:
        """
        The lease could not be renewed: stop serving before it expires, so
        that no association is served here and by the node adopting it.
        """
        self._tunnelGate.open(protocol.Factory.forProtocol(_RefusedTunnel))
        for client in self._clients:
            if client.running:
                client.stopService()
        if self.tunnelFactory is not None:
            self.tunnelFactory.closeAll()
        if self.distributor is not None:
            self.distributor.stop()
        if self.writeSequences is not None:
            self.writeSequences.clear()

    def _leaseRegained(self) -> None:
        """The lease is held again: serve new tunnels (associations start afresh)."""
        if self.tunnelFactory is None:
            return
        self._tunnelGate.open(self.tunnelFactory)
        for client in self._clients:
            if not client.running:
                client.startService()
        self.conferenceKeys.refresh_all()

    def status(self) -> dict:
        """
        ``GET /v1/status``: the KeyDistributor's counts, and the store's
        group-committed writes (``store_writes``: waiting, in flight, the
        transactions and writes so far, writes refused because too many
        waited, writes sent again after another in their batch failed).
        """
        document = self.distributor.status()
        writes = getattr(self.store, "writes", None)
        if writes is not None:
            document["store_writes"] = writes.snapshot()
        return document

    def readiness(self):
        """
        ``GET /readyz``: ready once the roster has loaded and the listeners
        let connections in, while a cheap query on the registration database
        answers (within READY_TIMEOUT).  ``(ready, reason)`` or a Deferred of it.
        """
        if self.distributor is None or not self.running:
            return False, "not serving yet: the registration database is not open"
        if not self.node.serving:
            return False, "not serving: this node could not renew its lease in the database"

        def failed(failure):
            return False, "the registration database does not answer: {}".format(
                failure.getErrorMessage())

        d = self.roster.ping()
        d.addTimeout(READY_TIMEOUT, self.reactor)
        d.addCallbacks(lambda _: (True, "serving; the registration database answers"), failed)
        return d

    def _startFailed(self, failure):
        if failure.check(ConfigError):
            # Something a user must fix (an unusable registration database,
            # e.g. a stored tls-id that is not one): one line, no traceback.
            self.log.error("perc-kd: {error}", error=failure.getErrorMessage())
        else:
            self.log.failure("Key Distributor could not start", failure)
        self.ready.errback(failure)
        if self.reactor.running:
            self.reactor.stop()

    @defer.inlineCallbacks
    def stopService(self):
        # Close the tunnels first: a ClientService would call the transport's
        # loseConnection(), which a TLS transport holds back while the tunnel
        # is registered as its producer.
        if self.tunnelFactory is not None:
            self.tunnelFactory.closeAll()
        yield super().stopService()
        if self.adoption is not None:
            self.adoption.stop()
        for port in self._ports:
            yield port.stopListening()
        self._ports = []
        if self.distributor is not None:
            self.distributor.stop()
        if self.node is not None:
            yield self.node.stop(release=True)
        if self.roster is not None:
            yield self.roster.close()
        if self.store is not None:
            yield self.store.close()


class _RefusedTunnel(protocol.Protocol):
    """A tunnel accepted while this node holds no lease: closed at once."""

    def connectionMade(self):
        self.transport.abortConnection()


def _dtlsCredentials(credentials: TlsCredentials) -> dtls.Credentials:
    """The endpoints' side of the Key Distributor: the tunnels' certificate and key."""
    return dtls.Credentials(credentials.certificate, credentials.private_key)
