"""How `decalign serve` stops. uvicorn alone waits for every request in flight, however long its
answer (up to --timeout), and on a second Ctrl-C drops them with tracebacks while the engine's
thread is still in a forward pass (the process then aborts). Here the first signal stops taking
connections and gives the requests in flight `grace` seconds to finish; then, or at once on a
second signal, each gets a 503 in OpenAI's error shape (a stream ends with it as an error event),
and the engine's thread ends its step before the process exits with status 0. A response still
unsent `LINGER` seconds after that (a client that stopped reading its stream) is dropped."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

import uvicorn
from fastapi import FastAPI

from .scheduler import Scheduler

LINGER = 2.0  # seconds a response may take to go out once its request has been answered 503


class GracefulServer(uvicorn.Server):
    """uvicorn's server for an app from create_app, with the shutdown above; a third signal leaves at
    once (uvicorn's own force exit)."""

    def __init__(self, app: FastAPI, *, host: str, port: int, grace: float, log_level: str = "warning") -> None:
        # no lifespan: the app has no startup or shutdown hooks, and a forced exit would log the
        # cancelled lifespan task as a traceback. Unsent responses are dropped by _close's force exit.
        super().__init__(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off"))
        self.scheduler: Scheduler = app.state.server.scheduler
        self.grace = grace
        self.signals = 0
        self.deadline: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.signals += 1
        if self.signals > 2:
            self.force_exit = True
            return
        busy = self.scheduler.in_flight()
        if self.signals == 1:
            self.should_exit = True
            if busy and self.grace > 0:
                again = "Ctrl-C again" if sig == signal.SIGINT else "a second signal"
                _say(f"stopping: {busy} request(s) in flight get {self.grace:g} s to finish ({again} "
                     f"answers them 503 now)")
            delay = self.grace
        else:
            if busy:
                _say(f"stopping now: {busy} request(s) in flight answered 503")
            delay = 0.0
        if self.deadline is not None:
            self.deadline.cancel()
        # the scheduler's lock is not taken inside a signal handler: the main thread may hold it
        self.deadline = threading.Timer(delay, self._close)
        self.deadline.daemon = True
        self.deadline.start()

    def _close(self) -> None:
        """Answer everything in flight 503; responses still unsent LINGER seconds later are dropped."""
        self.scheduler.close()
        linger = threading.Timer(LINGER, setattr, (self, "force_exit", True))
        linger.daemon = True
        linger.start()

    def serve_until_stopped(self) -> None:
        """Serve until a signal stops the server, then stop the engine's thread."""
        try:
            self.run()
        finally:
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGINT, signal.SIGTERM):  # a late second signal: the exit is under way
                    signal.signal(sig, signal.SIG_IGN)
            if self.deadline is not None:
                self.deadline.cancel()
            self.scheduler.stop()


def serve_app(app: FastAPI, *, host: str, port: int, grace: float) -> None:
    """Serve `app` (from create_app) until Ctrl-C or SIGTERM, as the module's docstring says."""
    GracefulServer(app, host=host, port=port, grace=grace).serve_until_stopped()


def _say(message: str) -> None:
    print(f"decalign serve: {message}", file=sys.stderr, flush=True)
