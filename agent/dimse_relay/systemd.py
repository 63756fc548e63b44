"""systemd service notifications (sd_notify protocol), without a library: READY=1 once the
agent is up, and WATCHDOG=1 while its NATS loop answers, so that a hung agent is restarted.

Only active when systemd started the agent with Type=notify (NOTIFY_SOCKET set) and, for the
watchdog, WatchdogSec= (WATCHDOG_USEC set). See docs/operations.md.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

LOG = logging.getLogger("dimse_relay.systemd")


def notify(state: str) -> bool:
    """Send one notification; False when not running under systemd's notify protocol."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        LOG.warning("systemd notification failed", extra={"error": type(exc).__name__})
        return False
    return True


def watchdog_interval() -> float | None:
    """Half the watchdog timeout systemd asked for, in seconds (None: no watchdog)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6


def start_watchdog(alive: Callable[[], bool], stop: threading.Event) -> None:
    """Ping the watchdog every half period while ``alive()`` holds; stop pinging otherwise,
    so systemd kills and restarts the agent."""
    interval = watchdog_interval()
    if interval is None:
        return

    def run() -> None:
        while not stop.wait(interval):
            if alive():
                notify("WATCHDOG=1")
            else:
                LOG.error("agent not responsive; withholding the systemd watchdog ping")

    threading.Thread(target=run, name="systemd-watchdog", daemon=True).start()
