"""
``twistd perc-md``: options and service construction for the Media Distributor.
"""

from twisted.python import usage


class Options(usage.Options):
    longdesc = (
        "Run a PERC Media Distributor: one UDP port for endpoints, DTLS relayed "
        "to Key Distributors through TLS tunnels, SRTP forwarded hop-by-hop."
    )


def makeService(config):
    # The Media Distributor service is not built yet; refuse with one line
    # rather than start something that would silently do nothing.
    raise SystemExit("perc-md: the Media Distributor service is not implemented yet")
