"""
``twistd perc-kd``: options and service construction for the Key Distributor.
"""

from twisted.python import usage


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a PERC Key Distributor: accept mutually authenticated TLS tunnels "
        "from Media Distributors and terminate endpoints' DTLS-SRTP "
        "associations carried through them."
    )


def makeService(config):
    # The Key Distributor service is not built yet; refuse with one line
    # rather than start something that would silently do nothing.
    raise SystemExit("perc-kd: the Key Distributor service is not implemented yet")
