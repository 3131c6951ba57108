"""
PERC key exchange: the DTLS tunnel between a Media Distributor and a Key
Distributor (draft-ietf-perc-dtls-tunnel-05 / RFC 9185).
"""

__version__ = "0.1.0"
