"""
``twistd perc-md``: options and service construction for the Media Distributor.
"""

from __future__ import annotations

from twisted.python import usage

from perc import profiles
from perc.config import ConfigFileOptions
from perc.errors import ConfigError
from perc.netutil import DEFAULT_TUNNEL_TIMEOUT, tunnel_timeout
from perc.options import CommandOptions
from perc.optiontypes import positive_float, positive_int, udp_port


#: Octets of kernel receive buffer perc-md asks for on its UDP port.
DEFAULT_UDP_RECEIVE_BUFFER = 4 * 1024 * 1024


class Options(ConfigFileOptions, CommandOptions):
    longdesc = (
        "Run a PERC Media Distributor: one UDP port for endpoints, DTLS relayed "
        "to Key Distributors through mutually authenticated TLS tunnels, SRTP "
        "forwarded hop-by-hop between the endpoints of a conference. It never "
        "holds end-to-end keys."
    )

    optParameters = [
        ["kd-name", None, None,
         "Identity to verify in the Key Distributors' certificates when it differs "
         "from the host of --kd."],
        ["tunnel-listen", None, None,
         "Twisted server endpoint description on which to accept tunnels dialled "
         "by Key Distributors (e.g. tcp:4750)."],
        ["cert", None, None, "PEM certificate of this Media Distributor."],
        ["key", None, None, "PEM private key of this Media Distributor."],
        ["ca", None, None, "PEM file of the CA(s) that issue Key Distributor certificates."],
        ["pki", None, None,
         "Directory made by 'perc pki init': uses md.pem, md.key and ca.pem "
         "(explicit --cert/--key/--ca win)."],
        ["media-port", None, 5004, "UDP port for endpoints.", udp_port],
        ["media-interface", None, "0.0.0.0", "Address the UDP port binds to."],
        ["udp-receive-buffer", None, DEFAULT_UDP_RECEIVE_BUFFER,
         "Octets of kernel receive buffer asked for on the UDP port; bursts beyond it are "
         "lost before perc-md sees them (capped by net.core.rmem_max unless privileged).",
         positive_int],
        ["profiles", None, profiles.format_profile_list(profiles.DEFAULT_PROFILES),
         "Comma-separated SRTP protection profiles announced in SupportedProfiles."],
        ["endpoint-timeout", None, 30.0,
         "Seconds without RTP/RTCP from an endpoint before its association ends.",
         positive_float],
        ["handshake-timeout", None, 60.0,
         "Seconds an association may take to get its keys.", positive_float],
        ["max-associations", None, 10000, "Most live associations.", positive_int],
        ["new-associations-per-second", None, 5,
         "Most new associations per source address per second.", positive_int],
        ["api", None, "tcp:4751:interface=127.0.0.1",
         "Twisted server endpoint description for the control API. 'none' disables it."],
        ["api-token-file", None, "perc-md-api.token",
         "Bearer token file for the control API; created with a random token "
         "(mode 0600) if missing."],
        ["metrics", None, None,
         "Twisted server endpoint description serving GET /metrics, /healthz and /readyz "
         "(no token) on a port of their own; they are on the --api port too."],
        ["default-conference", None, None,
         "Conference for endpoints whose tls-id was not registered through the API."],
        ["tunnel-timeout", None, DEFAULT_TUNNEL_TIMEOUT,
         "Seconds (2 to 32767) after which a tunnel whose Key Distributor stopped "
         "answering is dropped as dead (TCP keepalive and TCP_USER_TIMEOUT; Linux), "
         "and a --kd tunnel dialled again.", tunnel_timeout],
    ]

    def __init__(self):
        super().__init__()
        self["kd"] = []

    def opt_kd(self, description):
        """
        Twisted client endpoint description of a Key Distributor's tunnel
        listener (e.g. tcp:127.0.0.1:4740); repeatable: a tunnel to each, new
        associations to the least loaded. Kept up with backoff.
        """
        self["kd"].append(description)

    def postOptions(self):
        try:
            self["profiles"] = profiles.parse_profile_list(self["profiles"])
        except profiles.ProfileError as error:
            raise usage.UsageError("--profiles: {}".format(error))
        if not self["kd"] and not self["tunnel-listen"]:
            raise usage.UsageError("give at least one --kd, or --tunnel-listen")


def makeService(config):
    from perc.md.service import MediaDistributorService

    try:
        return MediaDistributorService.fromOptions(config)
    except ConfigError as error:
        raise SystemExit("perc-md: {}".format(error))
