"""One agent process: NATS transport, listeners, targets and the HTTP endpoint, wired together."""

from __future__ import annotations

import contextlib
import logging
import signal
import tempfile
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from dimse_relay import __version__, systemd
from dimse_relay.config import AgentConfig
from dimse_relay.delivery import Deliverer
from dimse_relay.dicom import configure_pynetdicom
from dimse_relay.health import HealthServer
from dimse_relay.listener import ListenerServer
from dimse_relay.logs import setup_logging
from dimse_relay.probe import TargetProber
from dimse_relay.queue import EdgeQueue
from dimse_relay.target import TargetServer
from dimse_relay.transport import NatsTransport

LOG = logging.getLogger("dimse_relay.agent")


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it 0700: it holds DICOM data in transit."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


# Sub-directories of work_dir that only hold DICOM data in transit. Whatever a previous run
# left there (killed mid-transfer) is incomplete and was never acknowledged as stored.
TRANSIT_DIRS = ("incoming", "spool", "retrieved", "queue-spool")


def purge_transit_files(work_dir: Path) -> int:
    """Delete files left in the transit directories; returns how many."""
    removed = 0
    for name in TRANSIT_DIRS:
        directory = work_dir / name
        if not directory.is_dir():
            continue
        for entry in directory.iterdir():
            if entry.is_file() or entry.is_symlink():
                with contextlib.suppress(OSError):
                    entry.unlink()
                    removed += 1
    return removed


class Agent:
    def __init__(self, cfg: AgentConfig):
        self.cfg = cfg
        private_dir(cfg.work_dir)
        leftovers = purge_transit_files(cfg.work_dir)
        if leftovers:
            LOG.warning(
                "removed incomplete transfers left by a previous run", extra={"files": leftovers}
            )
        # pynetdicom spools incoming C-STORE datasets with tempfile; keep them in work_dir
        # (0700, on the agent's own volume) rather than in the system temp directory.
        tempfile.tempdir = str(private_dir(cfg.work_dir / "incoming"))
        self.transport = NatsTransport(cfg.nats, cfg.name)
        queued = [lst.far_ae_title for lst in cfg.listeners if lst.mode == "queued"]
        self.queue = (
            EdgeQueue(cfg.queue, self.transport, cfg.nats.subject_prefix, queued)
            if queued
            else None
        )
        self.deliverer = Deliverer(cfg, self.transport, self.queue) if self.queue else None
        self.listeners = ListenerServer(cfg, self.transport, self.queue)
        self.targets = TargetServer(cfg, self.transport) if cfg.targets else None
        # Reachability of the targets' SCPs and sinks, probed in its own threads (/readyz).
        self.prober = TargetProber(
            cfg.targets, cfg.http, self.targets.sinks if self.targets is not None else {}
        )
        self.health: HealthServer | None = None
        self._targets_subscribed = threading.Event()
        if not cfg.targets:
            self._targets_subscribed.set()
        self._stop = threading.Event()

    def ready(self) -> tuple[bool, dict[str, Any]]:
        reachable, probes = self.prober.snapshot()
        own = {
            "nats_connected": self.transport.connected,
            "listeners_bound": self.listeners.bound,
            "targets_subscribed": self._targets_subscribed.is_set(),
            "subscriptions_permitted": not self.transport.refused_subjects,
        }
        if self.queue is not None:
            own["edge_queue_ready"] = self.queue.ready
        requires = self.cfg.http.ready_requires_targets
        ok = all(own.values()) and (reachable or not requires)
        detail: dict[str, Any] = {
            **own,
            "targets_reachable": reachable,
            "ready_requires_targets": requires,
            "target_reachability": probes,
        }
        return ok, detail

    def status(self) -> dict[str, Any]:
        ok, detail = self.ready()
        return {
            "agent": self.cfg.name,
            "version": __version__,
            "ready": ok,
            **detail,
            "nats_server": self.transport.server_url,
            "listeners": [
                {
                    "ae_title": c.ae_title,
                    "port": c.port,
                    "relays_to": c.far_ae_title,
                    "mode": c.mode,
                }
                for c in self.cfg.listeners
            ],
            "targets": [
                {
                    "ae_title": c.ae_title,
                    "kind": c.kind,
                    "scp": c.destination,
                    "called": c.scp_ae_title,
                }
                for c in self.cfg.targets
            ],
            "target_sessions": len(self.targets.sessions) if self.targets else 0,
        }

    def start(self) -> None:
        if self.cfg.http.enabled:
            self.health = HealthServer(
                self.cfg.http.host, self.cfg.http.port, self.ready, self.status
            )
            self.health.start()
        self.prober.start()
        if self.targets is not None:
            targets = self.targets

            async def subscribe_targets() -> None:
                await targets.subscribe()
                self._targets_subscribed.set()

            self.transport.on_connect(subscribe_targets)
        if self.deliverer is not None:
            self.deliverer.start()
        self.transport.start()
        self.listeners.start()
        LOG.info(
            "agent started",
            extra={
                "version": __version__,
                "listeners": len(self.cfg.listeners),
                "targets": len(self.cfg.targets),
            },
        )

    def stop(self) -> None:
        LOG.info("agent stopping")
        self.prober.stop()
        self.listeners.stop()
        if self.deliverer is not None:
            self.deliverer.stop()
        if self.targets is not None:
            with contextlib.suppress(Exception):  # best effort at shutdown
                self.transport.submit(self.targets.shutdown()).result(10)
        self.transport.stop()
        if self.health is not None:
            self.health.stop()

    def run_forever(self) -> None:
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            LOG.info("signal received", extra={"signal": signal.Signals(signum).name})
            self._stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        systemd.notify("READY=1")
        systemd.start_watchdog(self.responsive, self._stop)
        self._stop.wait()
        systemd.notify("STOPPING=1")
        self.stop()

    def responsive(self) -> bool:
        """The NATS loop runs a no-op within 5 s (a hung loop stops the watchdog pings)."""

        async def noop() -> None:
            return None

        try:
            self.transport.call(noop(), 5.0)
        except Exception:
            return False
        return True


def run(cfg: AgentConfig) -> None:
    setup_logging(cfg.logging.level, cfg.logging.format, cfg.name)
    configure_pynetdicom(cfg.logging.log_identifiers, cfg.dimse_poll_interval_s)
    Agent(cfg).run_forever()
