"""
twistd plugins for the PERC daemons.  Kept to the two ServiceMaker lines so
that ``twistd --help`` imports nothing heavy.
"""

from twisted.application.service import ServiceMaker

percKeyDistributor = ServiceMaker(
    "PERC Key Distributor",
    "perc.kd.tap",
    "PERC Key Distributor: terminates endpoints' DTLS-SRTP through tunnels",
    "perc-kd",
)
percMediaDistributor = ServiceMaker(
    "PERC Media Distributor",
    "perc.md.tap",
    "PERC Media Distributor: relays DTLS to Key Distributors, forwards SRTP",
    "perc-md",
)
