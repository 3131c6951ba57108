"""
``perc endpoint``: run one reference endpoint against a Media Distributor.
"""

from __future__ import annotations

import sys

from twisted.internet import defer, task
from twisted.python import usage

from perc import dtls, pki, profiles, rtpbridge
from perc.endpoint import ReferenceEndpoint, backoff
from perc.errors import ConfigError
from perc.kd.roster import InvalidRegistration, validate_tls_id
from perc.options import CommandOptions
from perc.tls import load_certificates, load_private_key

__all__ = ["EndpointOptions"]


def _address(text: str):
    host, _, port = text.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not host or not 0 < number < 65536:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:5004")
    return host.strip("[]"), number


class EndpointOptions(CommandOptions):
    synopsis = "--media HOST:PORT --cert FILE --key FILE --tls-id ID [options]"
    longdesc = ("Join a PERC conference through a Media Distributor: DTLS-SRTP with the Key "
                "Distributor (tls-id in extension 56, EKT in extension 39), then send "
                "double-encrypted synthetic media and verify everyone else's end to end. "
                "Prints a per-sender summary; exits non-zero when fewer than --expect-senders "
                "senders were verified or any packet failed verification.  A handshake that "
                "times out is retried with exponential backoff (a refusal is final); once "
                "joined, the endpoint asks the Key Distributor for the EKTKey every "
                "--keepalive seconds and joins again when no answer comes back within "
                "--keepalive-timeout (a restarted Media or Key Distributor).  "
                "--rtp-in and --rtp-out make it a bridge for a local RTP application "
                "(ffmpeg, GStreamer): plain RTP in, double encryption with EKT into the "
                "conference; verified media out as plain RTP.  RTP packets over {} octets "
                "(header included) cannot be carried and are refused (set the "
                "application's packet size, e.g. ffmpeg's pkt_size=1300).".format(
                    rtpbridge.MAX_RTP_PACKET))
    optParameters = [
        ["media", None, None, "The Media Distributor's UDP address, HOST:PORT.", _address],
        ["cert", None, None, "PEM certificate of this endpoint (its fingerprint is registered)."],
        ["key", None, None, "PEM private key of this endpoint."],
        ["tls-id", None, None, "This endpoint's tls-id (as registered)."],
        ["name", None, "endpoint", "Name shown in the summary."],
        ["expect-kd-tls-id", None, None,
         "The Key Distributor's tls-id from signalling (kd_tls_id); the association is "
         "torn down if the Key Distributor sends another."],
        ["expect-kd-fingerprint", None, None,
         "The Key Distributor's certificate fingerprint from signalling ('sha-256 AB:...')."],
        ["profile", None, "DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM", "Double profile to offer."],
        ["rate", None, 50.0, "Packets per second.", float],
        ["duration", None, 5.0, "Seconds of media.", float],
        ["join-timeout", None, 30.0, "Seconds to wait for keys, retries included.", float],
        ["handshake-timeout", None, 10.0,
         "Seconds one DTLS handshake may take before it is given up and retried.", float],
        ["retry-delay", None, 1.0,
         "Seconds before the first retry; doubled after each failed attempt in a row "
         "(plus up to this much jitter).", float],
        ["retry-max-delay", None, 30.0, "Cap on the delay between retries.", float],
        ["keepalive", None, 5.0,
         "Seconds between liveness probes (EKTKey requests) once joined; 0 for none.", float],
        ["keepalive-timeout", None, 5.0,
         "Seconds without an answer (the request is repeated every 0.5 s) before the "
         "association counts as lost and the endpoint joins again.", float],
        ["expect-senders", None, 0, "How many other senders must be verified.", int],
        ["rtp-in", None, None,
         "Bridge: take plain RTP from a local application on this UDP address, HOST:PORT "
         "(RTCP on PORT+1, or on PORT multiplexed), instead of sending synthetic media. "
         "Largest RTP packet: {} octets.".format(rtpbridge.MAX_RTP_PACKET), _address],
    ]

    def __init__(self):
        super().__init__()
        self["rtp-out"] = []

    def opt_rtp_out(self, value):
        """Bridge: hand every packet that verifies end to end to a local application at HOST:PORT as plain RTP (RTCP to PORT+1 of the destination its sender's RTP goes to); HOST:PORT/PT,PT only those payload types (repeat the option for more destinations)."""  # noqa: E501 (usage.Options shows it as written)
        try:
            self["rtp-out"].append(rtpbridge.parse_output(value))
        except ValueError as error:
            raise usage.UsageError("--rtp-out: {}".format(error))

    def postOptions(self):
        missing = ["--" + n for n in ("media", "cert", "key", "tls-id") if not self[n]]
        if missing:
            raise usage.UsageError("missing option{}: {}".format(
                "s" if len(missing) > 1 else "", ", ".join(missing)))
        try:
            [self["profile"]] = profiles.parse_profile_list(self["profile"])
        except (profiles.ProfileError, ValueError) as error:
            raise usage.UsageError("--profile: {}".format(error))
        if not self["profile"].double:
            raise usage.UsageError("--profile must be a double profile")
        if not (0 < self["rate"] <= 1000 and 0 < self["duration"] and self["join-timeout"] > 0):
            raise usage.UsageError("--rate must be 0..1000, --duration and --join-timeout positive")
        for name in ("handshake-timeout", "retry-delay", "keepalive-timeout"):
            if not self[name] > 0:
                raise usage.UsageError("--{} must be positive".format(name))
        if not self["retry-max-delay"] >= self["retry-delay"]:
            raise usage.UsageError("--retry-max-delay must be at least --retry-delay")
        if not self["keepalive"] >= 0:
            raise usage.UsageError("--keepalive must be 0 (none) or positive")
        if self["rtp-in"] is not None and self["rtp-in"][1] == 65535:
            raise usage.UsageError("--rtp-in: PORT+1 (RTCP) must be a port too")
        if len(self["rtp-out"]) > rtpbridge.MAX_OUTPUTS:
            raise usage.UsageError("at most {} --rtp-out".format(rtpbridge.MAX_OUTPUTS))

    def _endpoint(self, reactor) -> ReferenceEndpoint:
        try:
            tls_id = validate_tls_id(self["tls-id"])
            if self["expect-kd-tls-id"]:
                validate_tls_id(self["expect-kd-tls-id"])
            fingerprint = (pki.normalise_fingerprint(self["expect-kd-fingerprint"])
                           if self["expect-kd-fingerprint"] else None)
        except (InvalidRegistration, pki.FingerprintError) as error:
            raise ConfigError(str(error)) from None
        certificate = load_certificates(self["cert"], "--cert")[0]
        key = load_private_key(self["key"], "--key")
        return ReferenceEndpoint(
            name=self["name"], credentials=dtls.Credentials(certificate, key), tls_id=tls_id,
            server=self["media"], profile=self["profile"], clock=reactor,
            expected_kd_tls_id=self["expect-kd-tls-id"], expected_kd_fingerprint=fingerprint,
            rate=self["rate"], handshake_timeout=self["handshake-timeout"],
            retry_policy=backoff(initial=self["retry-delay"], maximum=self["retry-max-delay"]),
            keepalive=self["keepalive"], keepalive_timeout=self["keepalive-timeout"])

    @defer.inlineCallbacks
    def _run(self, reactor, out):
        endpoint = self._endpoint(reactor)
        port = reactor.listenUDP(0, endpoint, interface="0.0.0.0")
        bridge = []
        try:
            bridge = rtpbridge.listen(reactor, endpoint, self["rtp-in"], self["rtp-out"])
            try:
                elapsed = yield endpoint.joined.addTimeout(self["join-timeout"], reactor)
            except defer.TimeoutError:
                raise ConfigError("no keys from the Key Distributor within {} s".format(
                    self["join-timeout"])) from None
            except RuntimeError as error:
                raise ConfigError("association failed: {}".format(error)) from None
            if self["rtp-in"] is None:
                print("{}: joined in {:.1f} ms; sending {} packets/s for {} s".format(
                    endpoint.name, elapsed * 1000, self["rate"], self["duration"]), file=out)
                endpoint.startSending()
            else:
                print("{}: joined in {:.1f} ms; bridging RTP from {}:{} for {} s".format(
                    endpoint.name, elapsed * 1000, *self["rtp-in"], self["duration"]),
                    file=out)
            out.flush()
            yield task.deferLater(reactor, self["duration"], lambda: None)
            endpoint.stopSending()
            yield task.deferLater(reactor, 0.5, lambda: None)
        finally:
            for bridged in bridge:
                yield bridged.stopListening()
            yield port.stopListening()
        return self._summary(endpoint, out)

    def _summary(self, endpoint, out) -> int:
        print("{:<10} {:>8} {:>9} {:>7} {:>6} {:>10}".format(
            "sender", "received", "verified", "failed", "lost", "jitter ms"), file=out)
        verified_senders = 0
        failed = 0
        for ssrc, stats in sorted(endpoint.stats.items()):
            print("{:08x} {:>10} {:>9} {:>7} {:>6} {:>10.2f}".format(
                ssrc, stats.received, stats.verified, stats.failed, stats.lost,
                stats.jitter * 1000), file=out)
            verified_senders += stats.verified > 0
            failed += stats.failed
        print("sent {}; verified {} senders (expected {}); {} failed verification".format(
            endpoint.sent, verified_senders, self["expect-senders"], failed), file=out)
        print("handshakes {}; joins {}; rekeys {}; associations lost {}; joined again {}".format(
            endpoint.attempts, endpoint.joins, endpoint.rekeys, endpoint.lost,
            endpoint.rejoins), file=out)
        if self["rtp-in"] is not None or self["rtp-out"]:
            print("bridge: RTCP sent {}, received {}; refused {}".format(
                endpoint.rtcp_sent, endpoint.rtcp_received,
                ", ".join("{} {}".format(n, reason)
                          for reason, n in sorted(endpoint.refused.items())) or "none"),
                file=out)
        return 0 if verified_senders >= self["expect-senders"] and not failed else 1

    def run(self):
        from perc.scripts.register import run_in_reactor

        return run_in_reactor(lambda reactor: self._run(reactor, sys.stdout))
