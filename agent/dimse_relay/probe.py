"""Target reachability for /readyz: every configured target is probed in the background.

One thread ("target-probe") probes all targets right at start, then every
``http.target_probe_interval_s`` (an unreachable one every RETRY_UNREACHABLE_S, if that is
shorter); each probe runs in a thread of its own and has ``http.target_probe_timeout_s`` to
finish. Nothing here runs on the NATS loop or on a
session's DIMSE thread, and a hung probe only holds its own thread.

- ``kind: scp``: an association with the SCP as the relay makes it (called AE title
  ``called_ae_title`` or ``ae_title``, calling AE title ``calling_ae_title`` or
  PROBE_AE_TITLE, the agent's socket handlers) proposing Verification, and a C-ECHO on it.
- ``kind: filesystem``: the sink's own check (root exists, writable) and a test file created
  and removed in the root.
- ``kind: dicomweb``: a HEAD request on the DICOMweb root URL with the sink's HTTP client (its
  TLS settings, client certificate, headers) and credentials gets any HTTP response.

Results carry no patient data: reachable or not, when, and a short reason. A change of a
target's state is logged once (warning when it becomes unreachable), never every interval;
pynetdicom's own error lines for probe associations are dropped for the same reason.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dimse_relay import metrics, sinks
from dimse_relay.config import HTTPConfig, TargetConfig
from dimse_relay.dicom import SOCKET_HANDLERS

LOG = logging.getLogger("dimse_relay.probe")

# Calling AE title of a C-ECHO probe towards an SCP whose target has no calling_ae_title (the
# relay passes the SCU's calling AE title through; a probe has no SCU).
PROBE_AE_TITLE = "DIMSE_RELAY"
# How much longer than the timeout a probe may take before it is reported as timed out.
_GRACE_S = 2.0
# An unreachable target is probed again this soon (or every interval, if that is shorter), so
# that readiness comes back soon after the target does.
RETRY_UNREACHABLE_S = 5.0
PROBE_FILE_PREFIX = ".dimse-relay-probe-"


@dataclass(frozen=True)
class ProbeResult:
    reachable: bool
    checked_at: float  # time.monotonic()
    reason: str | None = None  # why it is unreachable
    note: str | None = None  # reachable, but something worth knowing


# -- pynetdicom's log lines of probe associations ---------------------------------------------
class _ProbeAE(AE):
    """The AE of one probe; collects pynetdicom's log messages of its association."""

    def __init__(self, ae_title: str):
        super().__init__(ae_title=ae_title)
        self.probe_log: list[str] = []


_current = threading.local()  # .ae: the _ProbeAE of the probe running in this thread


def _probe_ae_of(thread: threading.Thread) -> _ProbeAE | None:
    ae = getattr(_current, "ae", None)
    if isinstance(ae, _ProbeAE):
        return ae
    assoc: Any = None
    if isinstance(thread, DULServiceProvider):
        assoc = thread.assoc
    elif isinstance(thread, Association):
        assoc = thread
    owner = getattr(assoc, "ae", None)
    return owner if isinstance(owner, _ProbeAE) else None


class _ProbeLogFilter(logging.Filter):
    """Keeps pynetdicom's lines about probe associations out of the agent's log (a target
    that is down would otherwise log its connection errors at every interval); they are
    kept with the probe, which turns them into its reason."""

    def filter(self, record: logging.LogRecord) -> bool:
        ae = _probe_ae_of(threading.current_thread())
        if ae is None:
            return True
        with contextlib.suppress(Exception):
            ae.probe_log.append(record.getMessage())
        return False


_FILTER = _ProbeLogFilter()
_filter_lock = threading.Lock()


def _filter_pynetdicom_logs() -> None:
    """Put the filter on every pynetdicom logger (a logger's filters only see its own
    records, not those of its children)."""
    with _filter_lock:
        names = [
            n for n in list(logging.root.manager.loggerDict) if n.split(".")[0] == "pynetdicom"
        ]
        for name in ["pynetdicom", *names]:
            logger = logging.getLogger(name)
            if _FILTER not in logger.filters:
                logger.addFilter(_FILTER)


_ERRNO_PREFIX = re.compile(r"^\[Errno -?\d+\]\s*")


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- the probes --------------------------------------------------------------------------------
def echo_probe(tcfg: TargetConfig, timeout_s: float) -> ProbeResult:
    """(probe thread) associate with the target's SCP, C-ECHO, release."""
    host, port = tcfg.scp_address
    deadline = time.monotonic() + timeout_s
    ae = _ProbeAE(tcfg.calling_ae_title or PROBE_AE_TITLE)
    ae.add_requested_context(Verification)
    ae.connection_timeout = timeout_s
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    seen: dict[str, bool] = {}

    def connected(event: evt.Event) -> None:
        seen["connected"] = True
        # What is left of the budget for the association negotiation.
        event.assoc.acse_timeout = max(0.1, deadline - time.monotonic())

    def accepted(_event: evt.Event) -> None:
        seen["accepted"] = True

    _current.ae = ae
    try:
        assoc = ae.associate(
            host,
            port,
            ae_title=tcfg.scp_ae_title,
            max_pdu=tcfg.max_pdu,
            evt_handlers=[
                (evt.EVT_CONN_OPEN, connected),
                *SOCKET_HANDLERS,
                (evt.EVT_ACCEPTED, accepted),
            ],
        )
        now = time.monotonic
        if assoc.is_established:
            try:
                assoc.dimse_timeout = max(0.1, deadline - now())
                rsp = assoc.send_c_echo()
            finally:
                assoc.acse_timeout = max(0.1, min(timeout_s, deadline - now()))
                with contextlib.suppress(Exception):
                    assoc.release()
            if "Status" not in rsp:
                return ProbeResult(False, now(), reason="no C-ECHO response")
            status = int(rsp.Status)
            note = None if status == 0 else f"C-ECHO status 0x{status:04X}"
            return ProbeResult(True, now(), note=note)
        if assoc.is_rejected:
            prim = assoc.acceptor.primitive
            assert prim is not None
            return _rejected(
                tcfg, int(prim.result or 0), int(prim.result_source or 0), int(prim.diagnostic or 0)
            )
        if seen.get("accepted") and assoc.rejected_contexts:
            # pynetdicom aborts an association whose every context was rejected.
            return ProbeResult(True, now(), note="SCP accepted the association, not Verification")
        log = " ".join(ae.probe_log)
        if not seen.get("connected"):
            match = re.search(r"TCP Initialisation Error: (.*)", log)
            why = _ERRNO_PREFIX.sub("", match.group(1)) if match else "no connection"
            return ProbeResult(False, now(), reason=f"cannot connect ({_short(why, 40)})")
        if "ACSE timeout" in log:
            return ProbeResult(False, now(), reason="no answer to the association request")
        return ProbeResult(False, now(), reason="association aborted")
    finally:
        _current.ae = None


_REJECT_SOURCES = {1: "service user", 2: "service provider (ACSE)", 3: "service provider"}


def _rejected(tcfg: TargetConfig, result: int, source: int, reason: int) -> ProbeResult:
    """The SCP answered with A-ASSOCIATE-RJ: it is there. Unreachable only when relayed
    associations would be refused too: a permanent rejection that is not about the probe's
    own calling AE title (it has none of its own when the SCU's is passed through)."""
    now = time.monotonic()
    kind = "permanent" if result == 1 else "transient"
    what = f"association rejected ({kind}, {_REJECT_SOURCES.get(source, source)}, reason {reason})"
    if result != 1:
        return ProbeResult(True, now, note=what)
    if source == 1 and reason == 3 and tcfg.calling_ae_title is None:
        return ProbeResult(True, now, note=f"{what}: the probe's calling AE title")
    return ProbeResult(False, now, reason=what)


def filesystem_probe(tcfg: TargetConfig, sink: sinks.Sink | None) -> ProbeResult:
    """(probe thread) the root exists and a file can be created in it."""
    assert tcfg.filesystem is not None
    if sink is not None:
        why = sink.check()
        if why is not None:
            return ProbeResult(False, time.monotonic(), reason=why)
    try:
        fd, name = tempfile.mkstemp(
            prefix=PROBE_FILE_PREFIX, suffix=".tmp", dir=tcfg.filesystem.root
        )
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        code = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        return ProbeResult(False, time.monotonic(), reason=f"cannot create a file in root ({code})")
    return ProbeResult(True, time.monotonic())


def dicomweb_probe(sink: sinks.Sink | None, timeout_s: float) -> ProbeResult:
    """(probe thread) any HTTP answer to HEAD <url>, sent with the sink's client."""
    if not isinstance(sink, sinks.DicomwebSink):
        return ProbeResult(False, time.monotonic(), reason="no DICOMweb client")
    try:
        auth = sink._auth_header()
    except OSError:
        return ProbeResult(False, time.monotonic(), reason="secret file unreadable")
    try:
        rsp = sink.client.request("HEAD", sink.cfg.url, headers=auth, timeout=timeout_s)
    except Exception as exc:
        if sinks._tls_error(exc):
            return ProbeResult(False, time.monotonic(), reason="TLS verification failed")
        return ProbeResult(
            False, time.monotonic(), reason=f"no HTTP response ({type(exc).__name__})"
        )
    code = rsp.status_code
    return ProbeResult(True, time.monotonic(), note=None if code < 400 else f"HTTP {code}")


# -- the prober --------------------------------------------------------------------------------
@dataclass
class _Probe:
    tcfg: TargetConfig
    box: list[ProbeResult] = field(default_factory=list)  # the result, once there is one
    thread: threading.Thread | None = None


class TargetProber:
    """Probes the targets of one agent; ``snapshot`` is what /readyz and /status report."""

    def __init__(
        self, targets: list[TargetConfig], http: HTTPConfig, sink_map: Mapping[str, sinks.Sink]
    ):
        self.targets = list(targets)
        self.interval_s = http.target_probe_interval_s
        self.timeout_s = http.target_probe_timeout_s
        self.sinks = sink_map
        self._lock = threading.Lock()
        self._results: dict[str, ProbeResult] = {}
        self._hung: dict[str, threading.Thread] = {}  # probes that outlived their round
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        if not self.targets:
            return
        _filter_pynetdicom_logs()
        metrics.TARGETS_UNREACHABLE.set(0)
        self._thread = threading.Thread(target=self._run, name="target-probe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)

    def _run(self) -> None:
        due = {t.ae_title: 0.0 for t in self.targets}  # time.monotonic() each probe is due
        while not self._stop.is_set():
            started = time.monotonic()
            batch = [t for t in self.targets if due[t.ae_title] <= started]
            if batch:
                try:
                    self.probe_all(batch)
                except Exception:  # never let the prober die: /readyz would go stale
                    LOG.exception("target probe round failed")
                done = time.monotonic()
                with self._lock:
                    results = dict(self._results)
                for tcfg in batch:
                    result = results.get(tcfg.ae_title)
                    if result is not None and result.reachable:
                        due[tcfg.ae_title] = started + self.interval_s
                    else:
                        due[tcfg.ae_title] = done + min(self.interval_s, RETRY_UNREACHABLE_S)
            self._stop.wait(max(0.0, min(due.values()) - time.monotonic()))

    # -- one round -----------------------------------------------------------------------------
    def check(self, tcfg: TargetConfig) -> ProbeResult:
        """(probe thread) probe one target now."""
        if tcfg.kind == "filesystem":
            return filesystem_probe(tcfg, self.sinks.get(tcfg.ae_title))
        if tcfg.kind == "dicomweb":
            return dicomweb_probe(self.sinks.get(tcfg.ae_title), self.timeout_s)
        return echo_probe(tcfg, self.timeout_s)

    def _probe_into(self, probe: _Probe) -> None:
        try:
            result = self.check(probe.tcfg)
        except Exception as exc:
            result = ProbeResult(
                False, time.monotonic(), reason=f"probe failed ({type(exc).__name__})"
            )
        probe.box.append(result)

    def probe_all(self, targets: list[TargetConfig] | None = None) -> None:
        """Probe the targets (default all) in parallel; wait at most the timeout and a little."""
        deadline = time.monotonic() + self.timeout_s + _GRACE_S
        running: list[_Probe] = []
        for tcfg in self.targets if targets is None else targets:
            index = self.targets.index(tcfg)
            hung = self._hung.get(tcfg.ae_title)
            if hung is not None and hung.is_alive():
                self._record(
                    tcfg, ProbeResult(False, time.monotonic(), reason="earlier probe still running")
                )
                continue
            self._hung.pop(tcfg.ae_title, None)
            probe = _Probe(tcfg)
            probe.thread = threading.Thread(
                target=self._probe_into, args=(probe,), name=f"target-probe-{index}", daemon=True
            )
            probe.thread.start()
            running.append(probe)
        for probe in running:
            assert probe.thread is not None
            while probe.thread.is_alive() and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                probe.thread.join(min(left, 0.2))
            if self._stop.is_set():
                return
            if probe.box:
                self._record(probe.tcfg, probe.box[0])
            else:
                self._hung[probe.tcfg.ae_title] = probe.thread
                self._record(
                    probe.tcfg,
                    ProbeResult(
                        False,
                        time.monotonic(),
                        reason=f"no result within {self.timeout_s:g} s",
                    ),
                )

    def _record(self, tcfg: TargetConfig, result: ProbeResult) -> None:
        with self._lock:
            before = self._results.get(tcfg.ae_title)
            self._results[tcfg.ae_title] = result
        metrics.TARGETS_UNREACHABLE.set(self.unreachable_count())
        if before is not None and before.reachable == result.reachable:
            return
        # The AE title is logged at debug level only (logs.py); the position in the
        # configuration says which target it is at every level.
        location = f"targets.{self.targets.index(tcfg)}"
        extra = {"target": tcfg.ae_title, "kind": tcfg.kind, "location": location}
        if not result.reachable:
            LOG.warning("target unreachable", extra={**extra, "why": result.reason})
        elif before is None:
            LOG.info("target reachable", extra=extra)
        else:
            LOG.info("target reachable again", extra=extra)

    # -- what /readyz says ---------------------------------------------------------------------
    def unreachable_count(self) -> int:
        _ok, detail = self.snapshot()
        return sum(1 for entry in detail.values() if not entry["reachable"])

    def snapshot(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        """(all reachable, AE title -> {kind, reachable, checked_age_s, reason/note}). A target
        not probed yet, or whose last result is older than two intervals and the timeout (the
        prober is stuck), counts as unreachable."""
        now = time.monotonic()
        stale_after = 2 * self.interval_s + self.timeout_s + _GRACE_S + 5
        with self._lock:
            results = dict(self._results)
        detail: dict[str, dict[str, Any]] = {}
        for tcfg in self.targets:
            result = results.get(tcfg.ae_title)
            entry: dict[str, Any] = {"kind": tcfg.kind}
            if result is None:
                entry.update(reachable=False, checked_age_s=None, reason="not probed yet")
            else:
                age = now - result.checked_at
                entry.update(reachable=result.reachable, checked_age_s=round(age, 1))
                if result.reachable and age > stale_after:
                    entry.update(reachable=False, reason="no recent probe")
                elif result.reason:
                    entry["reason"] = result.reason
                if result.note:
                    entry["note"] = result.note
            detail[tcfg.ae_title] = entry
        return all(e["reachable"] for e in detail.values()), detail
