"""Event-driven waits for pynetdicom's per-association threads.

pynetdicom runs two polling loops per association: the DUL thread (socket and send queue)
sleeps ``_run_loop_delay`` whenever it finds nothing to do, and the association thread
(incoming DIMSE messages, release, abort) sleeps 1 ms per turn. A relayed message crosses
such loops four times, so short sleeps are needed for latency, and short sleeps keep every
open association's two threads waking thousands of times a second: on a small host that CPU
is taken from the relay itself.

Installed by :func:`install`, the idle sleeps become waits that end as soon as there is
something to do, or after ``IDLE_WAIT_S`` at the latest (timers, kill flags and the idle
timeout are still checked then):

- the DUL thread waits in ``poll`` on its socket and on a wake-up pipe of its own, written
  when another thread queues a PDU to send (``send_pdu``) or stops the reactor (without a
  free descriptor for the pipe, that association polls as pynetdicom does);
- the association thread waits on an event set whenever the DUL thread has processed an
  event (a PDU arrived or was sent: DIMSE messages, release, abort), when a thread wants the
  reactor paused (the ``send_c_*`` methods) and when the association is killed.

Every other sleep inside pynetdicom (short spins while a reactor pauses) is capped at the
configured poll interval, as before.
"""

from __future__ import annotations

import contextlib
import os
import select
import ssl
import threading
import time
from typing import Any

from pynetdicom import association as pynetdicom_association
from pynetdicom import dul as pynetdicom_dul
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import StateMachine

IDLE_WAIT_S = 0.005
_poll_interval_s = 0.0002
_installed = False


def _activity_of(assoc: Any) -> threading.Event | None:
    return getattr(assoc, "_relay_activity", None)


class _WakingEvent(threading.Event):
    """The association's reactor checkpoint. Clearing it (a ``send_c_*`` asking the reactor
    to pause) also wakes the reactor, which then pauses at once instead of after its idle
    wait.

    It also closes a race of pynetdicom's pause handshake that waking the reactor on every
    event makes likely: the reactor sets ``_is_paused``, passes the checkpoint and only then
    clears ``_is_paused``; a ``send_c_*`` that clears the checkpoint in between sees the stale
    flag, sends, and the reactor can take the response off the queue ("Received unexpected
    C-ECHO service message", the caller gets none). Here passing the checkpoint and clearing
    the flag happen under one lock with ``clear``: a reactor that finds the checkpoint
    cleared meanwhile stays paused."""

    def __init__(self, activity: threading.Event, assoc: Any):
        super().__init__()
        self._activity = activity
        self._assoc = assoc
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            super().clear()
        self._activity.set()

    def wait(self, timeout: float | None = None) -> bool:
        while True:
            if not super().wait(timeout):
                return False
            with self._lock:
                if self.is_set():
                    self._assoc._is_paused = False
                    return True


class _AssociationTime:
    """Stands in for the ``time`` module inside pynetdicom.association."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        activity = _activity_of(threading.current_thread())
        if activity is not None and seconds == 0.001:
            # The association thread's reactor turn (the only 1 ms sleep in
            # pynetdicom.association): until its DUL has done something, or IDLE_WAIT_S.
            activity.wait(IDLE_WAIT_S)
            activity.clear()
            return
        time.sleep(min(seconds, _poll_interval_s))


class _DulTime:
    """Stands in for the ``time`` module inside pynetdicom.dul."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        thread = threading.current_thread()
        wake: _WakePipe | None = getattr(thread, "_relay_wake", None)
        if wake is None:
            time.sleep(min(seconds, _poll_interval_s))
            return
        try:
            _wait_for_dul_work(thread, wake)
        except Exception:  # e.g. the socket closed by another thread meanwhile
            time.sleep(_poll_interval_s)


def _wait_for_dul_work(thread: Any, wake: _WakePipe) -> None:
    poller = select.poll()
    poller.register(wake.read_fd, select.POLLIN)
    sock = getattr(getattr(thread, "socket", None), "socket", None)
    if sock is not None:
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted data waiting that poll cannot see
        fileno = sock.fileno()
        if fileno >= 0:
            poller.register(fileno, select.POLLIN)
    poller.poll(IDLE_WAIT_S * 1000)
    wake.drain()


class _WakePipe:
    """A non-blocking pipe that wakes one DUL thread; closed when that thread ends."""

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._lock = threading.Lock()
        self._closed = False

    def wake(self) -> None:
        with self._lock:
            if self._closed:
                return
            with contextlib.suppress(BlockingIOError):  # full: it is awake anyway
                os.write(self._write_fd, b"\0")

    def drain(self) -> None:
        with contextlib.suppress(OSError):  # BlockingIOError: drained
            while os.read(self.read_fd, 4096):
                pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            os.close(self.read_fd)
            os.close(self._write_fd)


def _wake_dul(dul: DULServiceProvider) -> None:
    wake: _WakePipe | None = getattr(dul, "_relay_wake", None)
    if wake is not None:
        wake.wake()


# The methods wrapped, as they were when install() ran (other patches included).
_original: dict[str, Any] = {}


def _association_init(self: Association, *args: Any, **kwargs: Any) -> None:
    _original["association_init"](self, *args, **kwargs)
    activity = threading.Event()
    checkpoint = _WakingEvent(activity, self)
    if self._reactor_checkpoint.is_set():
        checkpoint.set()
    self._reactor_checkpoint = checkpoint
    self._relay_activity = activity  # type: ignore[attr-defined]


def _association_kill(self: Association) -> None:
    activity = _activity_of(self)
    if activity is not None:
        self._kill = True  # before the wake-up, so the woken reactor sees it
        activity.set()
    _original["association_kill"](self)


def _run_reactor(self: DULServiceProvider) -> None:
    try:
        wake: _WakePipe | None = _WakePipe()
    except OSError:  # out of descriptors: this association polls as pynetdicom does
        wake = None
    self._relay_wake = wake  # type: ignore[attr-defined]
    try:
        _original["run_reactor"](self)
    finally:
        self._relay_wake = None  # type: ignore[attr-defined]
        if wake is not None:
            wake.close()
        activity = _activity_of(self.assoc)
        if activity is not None:
            activity.set()  # the association thread checks dul.is_alive()


def _send_pdu(self: DULServiceProvider, primitive: Any) -> None:
    _original["send_pdu"](self, primitive)
    _wake_dul(self)


def _kill_dul(self: DULServiceProvider) -> None:
    _original["kill_dul"](self)
    _wake_dul(self)


def _stop_dul(self: DULServiceProvider) -> bool:
    if self.state_machine.current_state == "Sta1":
        self._kill_thread = True
        _wake_dul(self)  # it exits now rather than after its idle wait
    return bool(_original["stop_dul"](self))


def _do_action(self: StateMachine, event: str) -> None:
    try:
        _original["do_action"](self, event)
    finally:
        activity = _activity_of(self.dul.assoc)
        if activity is not None:
            activity.set()


def install(poll_interval_s: float) -> None:
    """Patch pynetdicom (process-wide, idempotent); ``poll_interval_s`` caps the remaining
    short sleeps. Must run before the first association is created."""
    global _installed, _poll_interval_s
    _poll_interval_s = poll_interval_s
    if _installed:
        return
    _installed = True
    pynetdicom_association.time = _AssociationTime()  # type: ignore[attr-defined,assignment]
    pynetdicom_dul.time = _DulTime()  # type: ignore[attr-defined,assignment]
    _original.update(
        association_init=Association.__init__,
        association_kill=Association.kill,
        run_reactor=DULServiceProvider.run_reactor,
        send_pdu=DULServiceProvider.send_pdu,
        kill_dul=DULServiceProvider.kill_dul,
        stop_dul=DULServiceProvider.stop_dul,
        do_action=StateMachine.do_action,
    )
    Association.__init__ = _association_init  # type: ignore[method-assign]
    Association.kill = _association_kill  # type: ignore[method-assign]
    DULServiceProvider.run_reactor = _run_reactor  # type: ignore[method-assign]
    DULServiceProvider.send_pdu = _send_pdu  # type: ignore[method-assign]
    DULServiceProvider.kill_dul = _kill_dul  # type: ignore[method-assign]
    DULServiceProvider.stop_dul = _stop_dul  # type: ignore[method-assign]
    StateMachine.do_action = _do_action  # type: ignore[method-assign]
