"""
``twistd perc-kd``: options and service construction for the Key Distributor.
"""

from __future__ import annotations

from twisted.python import usage

from perc import profiles
from perc.config import ConfigFileOptions
from perc.errors import ConfigError
from perc.kd.cluster import DEFAULT_LEASE_SECONDS
from perc.kd.conference_keys import (
    DEFAULT_EKT_TTL,
    DEFAULT_ROLLOVER,
    check_rollover,
    check_ttl,
)
from perc.netutil import DEFAULT_TUNNEL_TIMEOUT, tunnel_timeout
from perc.options import CommandOptions
from perc.optiontypes import positive_float, positive_int


def ekt_ttl(value: str) -> int:
    return check_ttl(int(value))


def rollover_fraction(value: str) -> float:
    return check_rollover(float(value))


class Options(ConfigFileOptions, CommandOptions):
    longdesc = (
        "Run a PERC Key Distributor: accept mutually authenticated TLS tunnels "
        "from Media Distributors (or dial them with --connect), terminate "
        "endpoints' DTLS-SRTP associations carried through them, check each "
        "endpoint against its registration, and hand the Media Distributor "
        "only the hop-by-hop keys."
    )

    optParameters = [
        ["tunnel-listen", None, "tcp:4740",
         "Twisted server endpoint description for tunnels; TLS with mandatory "
         "client certificates is applied by the service. 'none' disables it."],
        ["cert", None, None, "PEM certificate of this Key Distributor."],
        ["key", None, None, "PEM private key of this Key Distributor."],
        ["ca", None, None, "PEM file of the CA(s) that issue Media Distributor certificates."],
        ["pki", None, None,
         "Directory made by 'perc pki init': uses kd.pem, kd.key and ca.pem "
         "(explicit --cert/--key/--ca win)."],
        ["profiles", None, profiles.format_profile_list(profiles.DEFAULT_PROFILES),
         "Comma-separated SRTP protection profiles, in order of preference. "
         "Non-double profiles expose media to the Media Distributor and are "
         "used only when listed here."],
        ["api", None, "tcp:4741:interface=127.0.0.1",
         "Twisted server endpoint description for the registration API. 'none' disables it."],
        ["api-token-file", None, "perc-kd-api.token",
         "Bearer token file for the registration API; created with a random "
         "token (mode 0600) if missing."],
        ["metrics", None, None,
         "Twisted server endpoint description serving GET /metrics, /healthz and /readyz "
         "(no token) on a port of their own; they are on the --api port too."],
        ["db", None, "perc-kd.sqlite3",
         "Database of registrations and (sealed) conference EKTKeys: an SQLite file, or "
         "postgresql://USER@HOST:PORT/DB shared by the Key Distributors of a cluster."],
        ["sealing-key", None, None,
         "File of 32 random octets that seals the secrets stored in --db; created (mode "
         "0600) if missing; the same file on every Key Distributor of a cluster. Default: "
         "perc-kd.sealing-key beside an SQLite --db; required with PostgreSQL."],
        ["max-associations", None, 10000, "Most live associations in total.", positive_int],
        ["max-associations-per-tunnel", None, 5000,
         "Most live associations started through one tunnel.", positive_int],
        ["handshake-timeout", None, 30.0,
         "Seconds a DTLS handshake may take before it is abandoned.", positive_float],
        ["tunnel-grace", None, 10.0,
         "Seconds an association whose tunnel closed waits for its Media "
         "Distributor to come back before it is released.", positive_float],
        ["ekt-ttl", None, DEFAULT_EKT_TTL,
         "Seconds a conference's EKTKey may be used (1 to 16777215); it is replaced "
         "before then (see --ekt-rollover).", ekt_ttl],
        ["ekt-rollover", None, DEFAULT_ROLLOVER,
         "Fraction of --ekt-ttl after which a conference's EKTKey is replaced by a new "
         "one (new SPI) sent to every member (between 0 and 1).", rollover_fraction],
        ["tunnel-timeout", None, DEFAULT_TUNNEL_TIMEOUT,
         "Seconds (2 to 32767) after which a tunnel whose Media Distributor stopped "
         "answering is dropped as dead (TCP keepalive and TCP_USER_TIMEOUT; Linux), "
         "and a --connect tunnel dialled again.", tunnel_timeout],
        ["node-id", None, None,
         "This Key Distributor's name in the database's nodes table (each of a cluster's "
         "Key Distributors has its own). Default: HOSTNAME:PORT of --tunnel-listen, or "
         "HOSTNAME: and random hex."],
        ["lease-seconds", None, DEFAULT_LEASE_SECONDS,
         "Seconds of this Key Distributor's lease in the database, renewed every third of "
         "it; one that cannot renew stops serving before it expires, and once it has "
         "expired the others may adopt its associations.", positive_float],
    ]

    optFlags = [
        ["allow-missing-tls-id", None,
         "Match an endpoint whose ClientHello has no extension 56 by its "
         "certificate fingerprint alone (for ordinary DTLS-SRTP clients). Weakens "
         "the identity check; logged as a warning at start."],
    ]

    def __init__(self):
        super().__init__()
        self["allow-md"] = []
        self["connect"] = []

    def opt_allow_md(self, name):
        """
        Media Distributor identity (certificate subjectAltName DNS name)
        allowed to open tunnels; repeatable. Default: any certificate issued
        by --ca.
        """
        self["allow-md"].append(name)

    def opt_connect(self, description):
        """
        Twisted client endpoint description of a Media Distributor's tunnel
        listener to dial (e.g. tcp:md.example:4750); repeatable. Kept up with
        backoff.
        """
        self["connect"].append(description)

    def postOptions(self):
        try:
            self["profiles"] = profiles.parse_profile_list(self["profiles"])
        except profiles.ProfileError as error:
            raise usage.UsageError("--profiles: {}".format(error))
        if self["tunnel-listen"] == "none" and not self["connect"]:
            raise usage.UsageError("nothing to do: --tunnel-listen none and no --connect")


def makeService(config):
    from perc.kd.service import KeyDistributorService

    try:
        return KeyDistributorService.fromOptions(config)
    except ConfigError as error:
        # One line a user can act on, not a traceback.
        raise SystemExit("perc-kd: {}".format(error))
