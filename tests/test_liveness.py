"""
Tunnel liveness (perc.netutil): TCP keepalive and TCP_USER_TIMEOUT on every
tunnel socket, whichever daemon dials, checked with getsockopt on the real
sockets of real tunnels; ``--tunnel-timeout`` validation on both daemons.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid

from hypothesis import given, strategies as st
from twisted.internet import defer, error, protocol, reactor, task
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from perc import netutil, pki
from perc.kd import tap as kd_tap
from perc.kd.service import KeyDistributorService
from perc.md import tap as md_tap
from perc.md.service import MediaDistributorService
from perc.tls import TlsCredentials

LINUX_OPTIONS = ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT", "TCP_USER_TIMEOUT")


@defer.inlineCallbacks
def until(predicate, deadline: float = 30.0, step: float = 0.05):
    """Wait for ``predicate()`` to hold; fails after ``deadline`` seconds (a deadline, not a measurement)."""
    waited = 0.0
    while not predicate():
        if waited > deadline:
            raise AssertionError("condition not reached within the {} s deadline".format(deadline))
        yield task.deferLater(reactor, step, lambda: None)
        waited += step


def tunnel_socket(tunnel) -> socket.socket:
    """The TCP socket under a tunnel protocol (its transport is TLS over TCP)."""
    return tunnel.transport.transport.socket


def liveness_options(sock: socket.socket) -> dict:
    options = {"SO_KEEPALIVE": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)}
    for name in LINUX_OPTIONS:
        if hasattr(socket, name):
            options[name] = sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, name))
    return options


def expected_options(timeout: float) -> dict:
    idle, interval, count = netutil.keepalive_schedule(timeout)
    options = {"SO_KEEPALIVE": 1, "TCP_KEEPIDLE": idle, "TCP_KEEPINTVL": interval,
               "TCP_KEEPCNT": count, "TCP_USER_TIMEOUT": int(timeout * 1000)}
    return {name: value for name, value in options.items()
            if name == "SO_KEEPALIVE" or hasattr(socket, name)}


class ScheduleTests(SynchronousTestCase):
    @given(st.floats(min_value=netutil.MIN_TUNNEL_TIMEOUT, max_value=netutil.MAX_TUNNEL_TIMEOUT))
    def test_keepalive_gives_up_within_the_timeout(self, timeout):
        idle, interval, count = netutil.keepalive_schedule(timeout)
        self.assertGreaterEqual(min(idle, interval, count), 1)
        self.assertLessEqual(idle + interval * count, timeout)
        # Linux's bounds on each.
        self.assertLessEqual(max(idle, interval), 32767)
        self.assertLessEqual(count, 127)

    def test_default_schedule(self):
        self.assertEqual(netutil.keepalive_schedule(30), (15, 5, 3))
        self.assertEqual(netutil.keepalive_schedule(3), (1, 1, 2))


class OptionTests(SynchronousTestCase):
    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        self.pki = pki.create_dev_pki(directory)

    def parse(self, tap, args):
        config = tap.Options()
        config.parseOptions(args)
        return config

    def test_default_is_30_seconds_on_both_daemons(self):
        self.assertEqual(self.parse(kd_tap, ["--pki", self.pki.directory])["tunnel-timeout"], 30.0)
        self.assertEqual(self.parse(md_tap, ["--kd", "tcp:127.0.0.1:4740"])["tunnel-timeout"],
                         30.0)

    def test_accepted_values(self):
        for value, seconds in [("2", 2.0), ("4.5", 4.5), ("32767", 32767.0)]:
            self.assertEqual(self.parse(kd_tap, ["--tunnel-timeout", value])["tunnel-timeout"],
                             seconds)
            self.assertEqual(self.parse(md_tap, ["--kd", "tcp:127.0.0.1:4740",
                                                 "--tunnel-timeout", value])["tunnel-timeout"],
                             seconds)

    def test_refused_values_one_clear_line(self):
        for value in ["0", "-5", "1.5", "abc", "", "nan", "inf", "32768"]:
            for tap, extra in [(kd_tap, []), (md_tap, ["--kd", "tcp:127.0.0.1:4740"])]:
                error = self.assertRaises(usage.UsageError, self.parse, tap,
                                          extra + ["--tunnel-timeout", value])
                message = str(error)
                self.assertEqual(len(message.splitlines()), 1, message)
                self.assertIn("--tunnel-timeout {!r}: must be a number of seconds from 2 to "
                              "32767".format(value), message)


class UnsupportedPlatformTests(SynchronousTestCase):
    """Where an option does not exist the rest are still set, and one line says so."""

    def test_missing_option_is_skipped_and_logged_once(self):
        if not hasattr(socket, "TCP_USER_TIMEOUT"):
            raise self.skipTest("this platform has no TCP_USER_TIMEOUT to take away")
        value = socket.TCP_USER_TIMEOUT
        del socket.TCP_USER_TIMEOUT
        self.addCleanup(setattr, socket, "TCP_USER_TIMEOUT", value)
        self.patch(netutil, "_unsupportedLogged", False)
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for _ in range(2):
            with socket.socket() as sock:
                self.assertEqual(netutil.set_tunnel_liveness(sock, 10), ["TCP_USER_TIMEOUT"])
                self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 1)
                self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, value), 0)
        lines = [event for event in events if "lacks" in event.get("log_format", "")]
        self.assertEqual(len(lines), 1)
        self.assertEqual(lines[0]["options"], "TCP_USER_TIMEOUT")

    def test_not_a_tcp_socket(self):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            self.assertEqual(netutil.set_tunnel_liveness(sock, 10), [])


class TunnelSocketTests(TestCase):
    """Real perc-kd and perc-md services, real TLS tunnels over loopback, both dialling directions."""

    timeout = 60

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.pki = pki.create_dev_pki(os.path.join(self.dir, "pki"))

    def start(self, service):
        service.privilegedStartService()
        service.startService()

        def stop():
            if service.running:
                return service.stopService()
        self.addCleanup(stop)
        return service

    def key_distributor(self, *args) -> KeyDistributorService:
        config = kd_tap.Options()
        config.parseOptions(["--pki", self.pki.directory, "--api", "none",
                             "--db", os.path.join(self.dir, "kd.sqlite3")] + list(args))
        return self.start(KeyDistributorService.fromOptions(config, reactor))

    def media_distributor(self, *args) -> MediaDistributorService:
        config = md_tap.Options()
        config.parseOptions(["--pki", self.pki.directory, "--api", "none", "--media-port", "0",
                             "--media-interface", "127.0.0.1"] + list(args))
        return self.start(MediaDistributorService.fromOptions(config, reactor))

    @defer.inlineCallbacks
    def test_md_dials_kd(self):
        kd = self.key_distributor("--tunnel-listen", "tcp:0:interface=127.0.0.1",
                                  "--tunnel-timeout", "7")
        yield kd.ready
        port = kd._ports[0].getHost().port
        md = self.media_distributor("--kd", "tcp:127.0.0.1:{}".format(port),
                                    "--tunnel-timeout", "5")
        yield until(lambda: md.pool.managers[0].state == "up" and kd.tunnelFactory.connections)
        self.assertEqual(liveness_options(tunnel_socket(md.pool.managers[0].tunnel)),
                         expected_options(5))
        (accepted,) = kd.tunnelFactory.connections
        self.assertEqual(liveness_options(tunnel_socket(accepted)), expected_options(7))

    @defer.inlineCallbacks
    def test_kd_dials_md(self):
        md = self.media_distributor("--tunnel-listen", "tcp:0:interface=127.0.0.1",
                                    "--tunnel-timeout", "9")
        port = md.ports["tunnel-listen"].getHost().port
        kd = self.key_distributor("--tunnel-listen", "none",
                                  "--connect", "tcp:127.0.0.1:{}".format(port),
                                  "--tunnel-timeout", "4")
        yield kd.ready
        yield until(lambda: md.pool.tunnels and kd.tunnelFactory.connections)
        (accepted,) = md.pool.tunnels
        self.assertEqual(liveness_options(tunnel_socket(accepted)), expected_options(9))
        (dialled,) = kd.tunnelFactory.connections
        self.assertEqual(liveness_options(tunnel_socket(dialled)), expected_options(4))


class Link:
    """
    A veth pair whose far end is in a network namespace of its own, so that
    a daemon run there is reachable over a link this test can kill: setting
    the far end down makes packets vanish, with no FIN and no RST.
    Everything is removed on cleanup, also when the test fails.
    """

    _made = 0

    def __init__(self, testcase):
        if os.geteuid() != 0 or shutil.which("ip") is None:
            raise SkipTest("tunnel liveness over a dying link needs root and ip netns "
                           "(iproute2); skipped here")
        Link._made += 1
        tag = "{}{}".format(os.getpid() % 100000, Link._made)
        self.namespace = "perclive" + tag
        self.near, self.far = "plh" + tag, "pln" + tag
        # A /30 of its own per process and link: several suites may run at once.
        slot = (os.getpid() * 8 + Link._made) % (256 * 64)
        prefix = "10.231.{}.".format(slot // 64)
        self.near_address = prefix + str((slot % 64) * 4 + 1)
        self.far_address = prefix + str((slot % 64) * 4 + 2)
        added = self.ip("netns", "add", self.namespace, check=False)
        if added.returncode != 0:
            raise SkipTest("tunnel liveness over a dying link needs root and ip netns: "
                           "ip netns add failed: {}".format(added.stderr.strip()))
        testcase.addCleanup(self.ip, "netns", "del", self.namespace, check=False)
        testcase.addCleanup(self.ip, "link", "del", self.near, check=False)
        self.ip("link", "add", self.near, "type", "veth", "peer", "name", self.far)
        self.ip("link", "set", self.far, "netns", self.namespace)
        self.ip("addr", "add", self.near_address + "/30", "dev", self.near)
        self.ip("link", "set", self.near, "up")
        self.inside("ip", "addr", "add", self.far_address + "/30", "dev", self.far)
        self.inside("ip", "link", "set", "lo", "up")
        self.up()

    @staticmethod
    def ip(*args, check=True):
        return subprocess.run(["ip"] + list(args), capture_output=True, text=True, check=check,
                              timeout=30)

    def inside(self, *command):
        return self.ip("netns", "exec", self.namespace, *command)

    def down(self):
        """Kill the link: the far end goes down, packets to and from it vanish."""
        self.inside("ip", "link", "set", self.far, "down")

    def up(self):
        self.inside("ip", "link", "set", self.far, "up")


TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(netutil.__file__)))
#: --tunnel-timeout of both daemons in these tests.
TIMEOUT = "3"
#: Only a deadline for what should take about TIMEOUT seconds, not a measurement.
DEADLINE = 30.0


class DeadLinkTests(TestCase):
    """
    A real ``perc-kd`` in a network namespace and a real Media Distributor
    service here, a real TLS tunnel between them over a veth pair; the link
    dies without FIN or RST.  Both sides must drop the tunnel as dead, and
    the side that dials must bring it back once the link returns.
    """

    timeout = 120

    def setUp(self):
        self.link = Link(self)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.pki = pki.create_dev_pki(os.path.join(self.dir, "pki"),
                                      kd_names=[self.link.far_address],
                                      md_names=[self.link.near_address])
        self.dead = []
        globalLogPublisher.addObserver(self.observe)
        self.addCleanup(globalLogPublisher.removeObserver, self.observe)

    def observe(self, event):
        if "dropped as dead" in event.get("log_format", ""):
            self.dead.append(event)

    def key_distributor(self, *args):
        """Start perc-kd inside the namespace; returns a function giving its output so far."""
        output = os.path.join(self.dir, "kd.log")
        with open(output, "w") as sink:
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.link.namespace] + TWISTD + [
                    "-n", "--pidfile=", "perc-kd", "--pki", self.pki.directory, "--api", "none",
                    "--db", os.path.join(self.dir, "kd.sqlite3"), "--tunnel-timeout", TIMEOUT]
                + list(args),
                cwd=self.dir, stdout=sink, stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONPATH=PROJECT))

        def stop():
            process.kill()
            process.wait()
        self.addCleanup(stop)

        def log():
            with open(output) as source:
                return source.read()
        return log

    def media_distributor(self, *args) -> MediaDistributorService:
        config = md_tap.Options()
        config.parseOptions(["--pki", self.pki.directory, "--api", "none", "--media-port", "0",
                             "--media-interface", "127.0.0.1", "--tunnel-timeout", TIMEOUT]
                            + list(args))
        service = MediaDistributorService.fromOptions(config, reactor)
        service.privilegedStartService()
        service.startService()

        def stop():
            if service.running:
                return service.stopService()
        self.addCleanup(stop)
        return service

    @defer.inlineCallbacks
    def md_dials(self, data: bool):
        kd_log = self.key_distributor(
            "--tunnel-listen", "tcp:4740:interface={}".format(self.link.far_address))
        yield until(lambda: "Key Distributor ready" in kd_log(), DEADLINE)
        md = self.media_distributor("--kd", "tcp:{}:4740".format(self.link.far_address))
        manager = md.pool.managers[0]
        yield until(lambda: manager.state == "up", DEADLINE)
        self.link.down()
        if data:
            # Unacknowledged data: TCP_USER_TIMEOUT, not keepalive, ends it.
            manager.tunnel.sendDtls(uuid.uuid4(), b"\x16\xfe\xfd" + bytes(200))
        yield until(lambda: manager.state != "up", DEADLINE)
        reason = manager.status()["last_close_reason"]
        self.assertIn("no acknowledgement from the peer", reason)
        (event,) = self.dead
        self.assertEqual(event["cause"], reason)
        self.assertIn(self.link.far_address, event["peer"])
        # The Key Distributor's side of the same tunnel, idle there: keepalive.
        yield until(lambda: "dropped as dead" in kd_log(), DEADLINE)
        self.link.up()
        yield until(lambda: manager.state == "up" and manager.status()["connections"] == 2,
                    DEADLINE)

    def test_md_notices_an_idle_dead_link_and_reconnects(self):
        return self.md_dials(data=False)

    def test_md_notices_a_dead_link_with_data_in_flight(self):
        return self.md_dials(data=True)

    @defer.inlineCallbacks
    def test_kd_connect_notices_a_dead_link_and_reconnects(self):
        md = self.media_distributor(
            "--tunnel-listen", "tcp:0:interface={}".format(self.link.near_address))
        port = md.ports["tunnel-listen"].getHost().port
        kd_log = self.key_distributor(
            "--tunnel-listen", "none",
            "--connect", "tcp:{}:{}".format(self.link.near_address, port))
        yield until(lambda: md.pool.tunnels, DEADLINE)
        (first,) = md.pool.tunnels
        self.link.down()
        yield until(lambda: first not in md.pool.tunnels, DEADLINE)
        (event,) = self.dead
        self.assertIn("no acknowledgement from the peer", event["cause"])
        self.assertIn(self.link.far_address, event["peer"])
        # The Key Distributor noticed too: else it would never dial again.
        yield until(lambda: "dropped as dead" in kd_log(), DEADLINE)
        self.link.up()
        yield until(lambda: md.pool.tunnels and md.pool.tunnels[0] is not first, DEADLINE)

    @defer.inlineCallbacks
    def test_dialling_into_a_dead_link_gives_up_after_the_timeout(self):
        # Without this the attempt waits for the endpoint's own 30 s (or the
        # kernel's SYN retries) before the next one can be made.
        self.link.down()
        credentials = TlsCredentials.from_pki_dir(self.pki.directory, "md")
        endpoint = netutil.tls_client_endpoint(
            reactor, "tcp:{}:4740:timeout=600".format(self.link.far_address), credentials,
            "--kd", tunnel_timeout=2)
        attempt = endpoint.connect(protocol.Factory.forProtocol(protocol.Protocol))
        attempt.addTimeout(DEADLINE, reactor)
        failure = yield self.assertFailure(attempt, error.TimeoutError)
        self.assertIn("no answer within 2 s (--tunnel-timeout)", str(failure))
        self.assertEqual(self.dead, [])
