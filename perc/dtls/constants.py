"""Numbers from the DTLS 1.2, TLS and DTLS-SRTP specifications, and the engine's defaults."""

#: DTLS 1.2 on the wire (pyOpenSSL has no constant for it).
DTLS1_2_VERSION = 0xFEFD
#: RFC 5764 section 4.2 exporter label; exported with no context.
EXPORTER_LABEL = b"EXTRACTOR-dtls_srtp"
DEFAULT_MTU = 1200
DEFAULT_MAX_RETRANSMISSIONS = 6
DEFAULT_HANDSHAKE_TIMEOUT = 30.0

#: OpenSSL refuses smaller MTUs for DTLS.
MIN_MTU = 256
RECORD_HEADER_LENGTH = 13

# Record content types (RFC 5246 section 6.2.1).
CONTENT_CHANGE_CIPHER_SPEC = 20
CONTENT_ALERT = 21
CONTENT_HANDSHAKE = 22
CONTENT_APPLICATION_DATA = 23

# Handshake message types.
HANDSHAKE_CLIENT_HELLO = 1
HANDSHAKE_FINISHED = 20
#: A DTLS handshake message header (RFC 6347 section 4.2.2).
HANDSHAKE_HEADER_LENGTH = 12
ALERT_LEVEL_WARNING = 1
ALERT_LEVEL_FATAL = 2

CLIENT = "client"
SERVER = "server"

# TLS alert descriptions (RFC 5246 section 7.2).
ALERT_CLOSE_NOTIFY = 0
ALERT_HANDSHAKE_FAILURE = 40
ALERT_BAD_CERTIFICATE = 42
ALERT_ILLEGAL_PARAMETER = 47
ALERT_ACCESS_DENIED = 49
ALERT_DECODE_ERROR = 50
ALERT_INTERNAL_ERROR = 80

# RFC 8870 section 5.2.2: the ekt_key handshake message, acknowledged with
# DTLS 1.3's ACK record (RFC 9147 section 7), also under DTLS 1.2.
HANDSHAKE_EKT_KEY = 26
CONTENT_ACK = 26
ALERT_UNEXPECTED_MESSAGE = 10
