"""SIGHUP as a request to reload, the way a daemon's operators expect."""

from __future__ import annotations

import signal

from twisted.application import service

__all__ = ["ReloadOnSighup"]


class ReloadOnSighup(service.Service):
    """
    While running, a SIGHUP calls ``reload()`` in the reactor thread (the
    handler only schedules it, with ``callFromThread``: a signal may arrive
    in the middle of anything).  Stopping restores the previous handler.
    Without SIGHUP (Windows) it does nothing.
    """

    _previous = None
    _installed = False

    def __init__(self, reload, reactor):
        self._reload = reload
        self._reactor = reactor

    def startService(self):
        super().startService()
        if hasattr(signal, "SIGHUP"):
            self._previous = signal.signal(signal.SIGHUP, self._signalled)
            self._installed = True

    def _signalled(self, signum, frame):
        self._reactor.callFromThread(self._reload)

    def stopService(self):
        if self._installed:
            # None means the handler was not set from Python: the default then.
            signal.signal(signal.SIGHUP,
                          signal.SIG_DFL if self._previous is None else self._previous)
            self._installed = False
        return super().stopService()
