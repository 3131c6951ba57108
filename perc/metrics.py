"""
Prometheus metrics of the two daemons (``GET /metrics``).

Each daemon instance has its own ``CollectorRegistry`` (never the global
default one), so tests and several daemons in one process do not collide.
Most values are read from the live objects at scrape time by a custom
collector: the counters the daemons already keep for ``/v1/status`` cost
nothing more on the forwarding path.  The one thing observed as it happens
is the Key Distributor's handshake duration histogram, once per completed
handshake.  No label or value carries key material: labels are fixed
reasons and kinds, values are counts and seconds.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

import perc

__all__ = ["CONTENT_TYPE", "HANDSHAKE_BUCKETS", "HANDSHAKE_RESULTS", "KeyDistributorMetrics",
           "exposition", "media_distributor_registry", "tunnels_up"]

#: The Content-Type of :func:`exposition` (Prometheus text format 0.0.4).
CONTENT_TYPE = CONTENT_TYPE_LATEST.encode("ascii")

#: How a Key Distributor handshake ended; the KD counts each as
#: ``handshake-<result>`` (see perc.kd.associations), always exported.
HANDSHAKE_RESULTS = ("completed", "refused", "timeout", "failed", "abandoned")

#: Seconds from the ClientHello with the cookie to HandshakeComplete: through
#: a tunnel on a LAN tens of milliseconds, with retransmissions seconds, and
#: never more than --handshake-timeout (30 s by default).
HANDSHAKE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _registry() -> CollectorRegistry:
    """A registry of its own with ``perc_build_info{version}``."""
    registry = CollectorRegistry()
    Info("perc_build", "The perc release this daemon runs.", registry=registry).info(
        {"version": perc.__version__})
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry's samples in the Prometheus text exposition format."""
    return generate_latest(registry)


def _prefixed(counters: dict, prefix: str):
    """(rest of the name, count) for each counter named ``prefix...``, sorted."""
    return sorted((name[len(prefix):], value) for name, value in counters.items()
                  if name.startswith(prefix))


# -- Media Distributor ----------------------------------------------------


class _MediaDistributorCollector(Collector):
    """Reads the relay's and the tunnel pool's state at scrape time."""

    def __init__(self, relay, pool):
        self._relay = relay
        self._pool = pool

    def collect(self):
        status = self._relay.status()
        counters = status["counters"]
        forwarded = CounterMetricFamily(
            "perc_md_forwarded_packets", "SRTP/SRTCP packets forwarded to conference members "
            "(one per receiving member).", labels=["kind"])
        for kind in ("rtp", "rtcp"):
            forwarded.add_metric([kind], counters.get("forwarded-" + kind, 0))
        yield forwarded
        dropped = CounterMetricFamily(
            "perc_md_dropped_packets", "Datagrams and tunnel messages dropped, by reason.",
            labels=["reason"])
        for reason, value in _prefixed(counters, "dropped-"):
            dropped.add_metric([reason], value)
        yield dropped
        refused = CounterMetricFamily(
            "perc_md_refused_associations", "New endpoint associations refused, by reason.",
            labels=["reason"])
        for reason, value in _prefixed(counters, "refused-"):
            refused.add_metric([reason], value)
        yield refused
        endpoints = GaugeMetricFamily(
            "perc_md_endpoints", "Endpoint associations by state.", labels=["state"])
        endpoints.add_metric(["handshaking"], status["associations"] - status["established"])
        endpoints.add_metric(["keyed"], status["established"])
        yield endpoints
        yield GaugeMetricFamily("perc_md_tunnels_up", "Key Distributor tunnels up and usable.",
                                value=tunnels_up(self._pool))
        yield GaugeMetricFamily("perc_md_conferences",
                                "Conferences with at least one keyed endpoint.",
                                value=len(status["conferences"]))


def tunnels_up(pool) -> int:
    """The Media Distributor's usable Key Distributor tunnels (also its readiness)."""
    return sum(1 for tunnel in pool.tunnels if tunnel.usable)


def media_distributor_registry(relay, pool) -> CollectorRegistry:
    """The registry of one Media Distributor (``relay``: MediaRelay, ``pool``: TunnelPool)."""
    registry = _registry()
    registry.register(_MediaDistributorCollector(relay, pool))
    return registry


# -- Key Distributor ------------------------------------------------------


class _KeyDistributorCollector(Collector):
    """Reads the KeyDistributor and roster a service holds, once it has them."""

    def __init__(self, service):
        self._service = service

    def collect(self):
        distributor = self._service.distributor
        roster = self._service.roster
        counters = distributor.counters if distributor is not None else {}
        status = distributor.status() if distributor is not None else None
        yield GaugeMetricFamily("perc_kd_associations",
                                "Live endpoint associations (handshaking or established).",
                                value=status["associations"] if status else 0)
        yield GaugeMetricFamily("perc_kd_established_associations",
                                "Live endpoint associations whose handshake completed.",
                                value=status["established"] if status else 0)
        handshakes = CounterMetricFamily(
            "perc_kd_handshakes", "Endpoint DTLS handshakes by how they ended.",
            labels=["result"])
        for result in HANDSHAKE_RESULTS:
            handshakes.add_metric([result], counters.get("handshake-" + result, 0))
        yield handshakes
        yield GaugeMetricFamily("perc_kd_tunnels_up", "Media Distributor tunnels up.",
                                value=status["tunnels"] if status else 0)
        rekeys = CounterMetricFamily(
            "perc_kd_rekeys", "Conference EKTKeys replaced: by the API's rekey route or by "
            "the --ekt-ttl rollover.", labels=["cause"])
        rekeys.add_metric(["api"], counters.get("rekey-api", 0))
        rekeys.add_metric(["rollover"], counters.get("ekt-rollover", 0))
        yield rekeys
        yield GaugeMetricFamily("perc_kd_registrations", "Endpoint registrations in the roster.",
                                value=len(roster) if roster is not None else 0)
        writes = getattr(self._service.store, "writes", None)
        store = writes.snapshot() if writes is not None else {}
        yield GaugeMetricFamily(
            "perc_kd_store_writes_queued", "Association writes (ownership rows, write "
            "sequence blocks) waiting for their group commit.", value=store.get("queued", 0))
        yield CounterMetricFamily(
            "perc_kd_store_write_transactions", "Group commits of association writes run.",
            value=store.get("batches", 0))
        yield CounterMetricFamily(
            "perc_kd_store_writes_refused", "Association writes refused because too many "
            "waited for a slow database.", value=store.get("refused", 0))


class KeyDistributorMetrics:
    """
    The registry of one Key Distributor service (read through its
    ``distributor``, ``roster`` and ``store`` attributes, which are None
    until the roster has loaded) and the handshake histogram the KeyDistributor feeds
    through :meth:`observe_handshake`.
    """

    def __init__(self, service):
        self.registry = _registry()
        self._handshake_seconds = Histogram(
            "perc_kd_handshake_seconds",
            "Endpoint handshakes: seconds from the ClientHello with the cookie to "
            "HandshakeComplete.", buckets=HANDSHAKE_BUCKETS, registry=self.registry)
        self.registry.register(_KeyDistributorCollector(service))

    def observe_handshake(self, seconds: float) -> None:
        self._handshake_seconds.observe(seconds)
