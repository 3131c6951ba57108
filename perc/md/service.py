"""
The Media Distributor service: tunnels to Key Distributors, the endpoint UDP
port, the control API, metrics and health.
"""

from __future__ import annotations

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from perc.apitoken import load_or_create_token
from perc.errors import ConfigError
from perc.httpapi import OperationsResource, make_site
from perc.kd.roster import InvalidRegistration
from perc.md.api import make_api_site
from perc.md.batchport import BatchedPort, listen_media_udp
from perc.md.conference import Memberships
from perc.md.relay import MediaRelay, RelayLimits
from perc.md.tunnel import TunnelPool
from perc.metrics import media_distributor_registry, tunnels_up
from perc.netutil import (DEFAULT_TUNNEL_TIMEOUT, set_receive_buffer, server_endpoint,
                          tls_client_endpoint, tls_server_factory)
from perc.sighup import ReloadOnSighup
from perc.tls import ReloadableCredentials, TlsCredentials

__all__ = ["MediaDistributorService"]


class MediaDistributorService(service.MultiService):
    """
    Binds the media port and listeners in ``privilegedStartService`` (one
    clear error before the reactor runs if it cannot), then the tunnel pool
    dials every Key Distributor.
    """

    log = Logger()

    def __init__(self, *, reactor, credentials: TlsCredentials | ReloadableCredentials,
                 profiles, kd: list,
                 kd_name: str | None, tunnel_listen: str | None, media_port: int,
                 media_interface: str, api: str | None, api_token: str | None,
                 default_conference: str | None, limits: RelayLimits,
                 udp_receive_buffer: int | None = None,
                 tunnel_timeout: float | None = DEFAULT_TUNNEL_TIMEOUT,
                 metrics: str | None = None):
        super().__init__()
        self.reactor = reactor
        #: What new tunnels present; SIGHUP reloads it (reloadCredentials).
        self.tlsCredentials = credentials = (
            credentials if isinstance(credentials, ReloadableCredentials)
            else ReloadableCredentials(credentials))
        self.media_port = media_port
        self.media_interface = media_interface
        self.udp_receive_buffer = udp_receive_buffer
        self.memberships = Memberships(default_conference)
        self.pool = TunnelPool(profiles, clock=reactor)
        self.pool.setServiceParent(self)
        ReloadOnSighup(self.reloadCredentials, reactor).setServiceParent(self)
        for description in kd:
            self.pool.addKeyDistributor(
                tls_client_endpoint(reactor, description, credentials, "--kd", kd_name,
                                    tunnel_timeout=tunnel_timeout),
                name=description)
        self.relay = MediaRelay(pool=self.pool, memberships=self.memberships, profiles=profiles,
                                clock=reactor, limits=limits)
        self.pool.owner = self.relay
        self.metrics = media_distributor_registry(self.relay, self.pool)
        #: /metrics, /healthz, /readyz: on the API port and on --metrics.
        self.operations = OperationsResource(self.metrics, self.readiness)
        self._listen = []
        if tunnel_listen:
            self._listen.append(("--tunnel-listen", tunnel_listen,
                                 server_endpoint(reactor, tunnel_listen, "--tunnel-listen"),
                                 tls_server_factory(credentials, self.pool.listenFactory,
                                                    tunnel_timeout)))
        if api:
            self._listen.append(("--api", api, server_endpoint(reactor, api, "--api"),
                                 make_api_site(self.memberships, self.status, api_token,
                                               self.operations)))
        if metrics:
            self._listen.append(("--metrics", metrics,
                                 server_endpoint(reactor, metrics, "--metrics"),
                                 make_site(self.operations)))
        self.ports = {}

    @classmethod
    def fromOptions(cls, config, reactor=None):
        """Build from ``perc.md.tap.Options``; raises ConfigError for what a user must fix."""
        if reactor is None:
            from twisted.internet import reactor
        credentials = ReloadableCredentials.from_options(
            "md", cert=config["cert"], key=config["key"], ca=config["ca"], pki_dir=config["pki"])
        api = None if config["api"] == "none" else config["api"]
        token = load_or_create_token(config["api-token-file"]) if api else None
        try:
            return cls(
                reactor=reactor, credentials=credentials, profiles=config["profiles"],
                kd=config["kd"], kd_name=config["kd-name"],
                tunnel_listen=config["tunnel-listen"], media_port=config["media-port"],
                media_interface=config["media-interface"], api=api, api_token=token,
                default_conference=config["default-conference"],
                udp_receive_buffer=config["udp-receive-buffer"],
                tunnel_timeout=config["tunnel-timeout"], metrics=config["metrics"],
                limits=RelayLimits(
                    endpoint_timeout=config["endpoint-timeout"],
                    handshake_timeout=config["handshake-timeout"],
                    max_associations=config["max-associations"],
                    new_associations_per_address_per_second=config[
                        "new-associations-per-second"]))
        except InvalidRegistration as error:
            raise ConfigError("--default-conference: {}".format(error))

    def privilegedStartService(self):
        try:
            # recvmmsg/sendmmsg where available (PERC_UDP_BATCH=0: recvfrom/sendto).
            self.ports["media"] = listen_media_udp(
                self.reactor, self.media_port, self.relay, interface=self.media_interface)
        except Exception as error:
            raise SystemExit("perc-md: cannot bind --media-port {} on {}: {}".format(
                self.media_port, self.media_interface, error))
        self.log.info("Endpoints' UDP port: {address} ({io})", address=self.ports["media"].getHost(),
                      io="recvmmsg/sendmmsg" if isinstance(self.ports["media"], BatchedPort)
                      else "recvfrom/sendto")
        if self.udp_receive_buffer is not None:
            granted = set_receive_buffer(self.ports["media"].socket, self.udp_receive_buffer)
            if granted < self.udp_receive_buffer:
                self.log.warn(
                    "UDP receive buffer is {granted} octets, less than the {asked} asked for "
                    "(--udp-receive-buffer): raise net.core.rmem_max or expect loss in bursts",
                    granted=granted, asked=self.udp_receive_buffer)
        for option, description, endpoint, factory in self._listen:
            result = []
            endpoint.listen(factory).addBoth(result.append)
            if result and hasattr(result[0], "getErrorMessage"):
                raise SystemExit("perc-md: cannot listen on {} {}: {}".format(
                    option, description, result[0].getErrorMessage()))
            if result:
                self.ports[option.lstrip("-")] = result[0]
                self.log.info("Listening for {what} on {address}", what=option.lstrip("-"),
                              address=result[0].getHost())
        super().privilegedStartService()

    @property
    def credentials(self) -> TlsCredentials:
        """The TLS credentials new tunnels use now."""
        return self.tlsCredentials.current

    def reloadCredentials(self) -> bool:
        """
        Read the certificate, key and CA files again (SIGHUP): new tunnels,
        dialled or accepted, use them; live ones are untouched.  A bad file
        is logged in one line and the current credentials stay.
        """
        try:
            credentials = self.tlsCredentials.reload()
        except ConfigError as error:
            self.log.error("Certificate reload failed, keeping the current certificate: {error}",
                           error=str(error))
            return False
        self.log.info("Certificate reloaded: new tunnels present {identity}",
                      identity=credentials.identity)
        return True

    def status(self) -> dict:
        """The document ``GET /v1/status`` returns."""
        document = self.relay.status()
        document["tunnels"] = self.pool.status()
        return document

    def readiness(self) -> tuple[bool, str]:
        """``GET /readyz``: ready while at least one Key Distributor tunnel is up."""
        up = tunnels_up(self.pool)
        if not up:
            return False, "no Key Distributor tunnel is up"
        return True, "{} Key Distributor tunnel{} up".format(up, "s" if up > 1 else "")

    @defer.inlineCallbacks
    def stopService(self):
        # The endpoints are disconnected: their Key Distributors are told
        # (EndpointDisconnect) before the tunnels close, or they would keep
        # the associations for the next tunnel of this identity.
        self.relay.disconnectAll("Media Distributor stopping")
        yield super().stopService()
        self.relay.stop()
        for port in self.ports.values():
            yield port.stopListening()
        self.ports = {}
