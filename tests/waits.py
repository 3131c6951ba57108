"""
Waiting in tests on the real reactor: for what is expected, with a
deadline, rather than sleeping for a time and hoping.
"""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

#: Seconds a test waits for something that should happen at once.
WAIT = 20


def sleep(seconds):
    return deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def eventually(predicate, timeout=WAIT, step=0.02, what="condition"):
    """
    Fires once ``predicate()`` is true, polled every ``step`` s; fails with
    an AssertionError naming ``what`` after ``timeout`` s.
    """
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError("{} not reached within {} s".format(what, timeout))
        yield sleep(step)
