"""dimse-relay benchmark: the same DCMTK/pynetdicom SCU and the same DCMTK storescp, direct
and through the relay (edge agent -> TLS nats-server with client certificates -> cloud agent
-> storescp), side by side in one run. C-FIND and C-MOVE the same way against Orthanc (a real
PACS, loaded over REST before any clock starts): direct to Orthanc, and through fresh agents
whose cloud target is Orthanc and whose edge maps the move destination to a storescp.

    .venv/bin/python bench/run.py [--quick] [--strict] [--keep]

From the run of the listener-like pynetdicom storage SCP on, this process's own pynetdicom
is configured as in an agent (dimse_relay.dicom.configure_pynetdicom): the C-FIND, C-MOVE and
C-GET SCUs after it, direct and relayed alike, wait for events instead of polling.

Prints a table and writes the figures to bench/results/<UTC timestamp>.json and
bench/results/latest.json. Exits 1 if any transfer fails or what is stored is not what was
sent (the figures would be worthless), 3 with --strict if a target is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the harness lives in tests/harness
    sys.path.insert(0, str(REPO))

from tests.harness import NATS_SERVER, STORESCU  # noqa: E402
from tests.harness.agents import AgentProcess, nats_section  # noqa: E402
from tests.harness.dicom import (  # noqa: E402
    DcmtkStoreSCP,
    ScuResult,
    dataset_bytes,
    make_large_instance,
    small_instances,
    storescu,
)
from tests.harness.leaf import HubServer, LeafServer  # noqa: E402
from tests.harness.nats import NatsServer  # noqa: E402
from tests.harness.orthanc import Orthanc  # noqa: E402
from tests.harness.pki import TestPKI, make_pki  # noqa: E402
from tests.harness.ports import free_port  # noqa: E402
from workload import (  # noqa: E402
    BenchFailure,
    PhaseMonitor,
    c_find,
    c_get_seconds,
    c_move,
    check_small_stored,
    dataset_digest,
    echo_series,
    echoscu_mean_rtt,
    event_driven_echo_series,
    find_studies,
    median,
    move_study,
    nats_rtt,
    percentile,
    upload,
)

RESULTS = Path(__file__).resolve().parent / "results"
SCP_AET = "BENCHSCP"
SCU_AET = "BENCHSCU"
MIB = 1024 * 1024
MB = 1_000_000
REPEATS = 3  # small and large C-STORE runs each way; the table has the median

FULL = {
    "small_count": 300,
    "large_mib": 256,
    "rss_mib": 2048,
    "echo_count": 200,
    "find_matches": 1000,
    "move_count": 100,
}
QUICK = {
    "small_count": 50,
    "large_mib": 32,
    "rss_mib": 256,
    "echo_count": 100,
    "find_matches": 200,
    "move_count": 20,
}
PACS_AET = "PACS"  # the edge listener's AE title for Orthanc
ORTHANC_AET = "ORTHANC"
DEST_AET = "DESTSCP"  # the C-MOVE destination, direct (Orthanc's table) and relayed (edge's)


@dataclass
class Row:
    metric: str
    unit: str
    direct: float | None
    relay: float | None
    ratio: float | None  # relay / direct
    target: str
    ok: bool | None  # None: no target, informational


@contextlib.contextmanager
def nodelay_env() -> Iterator[None]:
    """TCP_NODELAY=1 in the environment of processes started inside (DCMTK reads it)."""
    old = os.environ.get("TCP_NODELAY")
    os.environ["TCP_NODELAY"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TCP_NODELAY"]
        else:
            os.environ["TCP_NODELAY"] = old


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Bench:
    def __init__(self, work: Path, params: dict[str, int]):
        self.work = work
        self.params = params
        self.stack = contextlib.ExitStack()
        self.only: set[str] = set()
        self.pki: TestPKI | None = None
        self.nats: NatsServer | None = None
        self.scp: DcmtkStoreSCP | None = None
        self.agents: list[AgentProcess] = []
        self.rows: list[Row] = []
        self.extra: dict[str, Any] = {}
        self.analysis: dict[str, Any] = {}
        self.pacs: Orthanc | None = None
        self.extra["analysis"] = self.analysis

    # --- set-up -------------------------------------------------------------------------

    def start_infra(self) -> None:
        self.pki = make_pki(self.work / "pki")
        self.nats = NatsServer(self.work / "nats", self.pki).start()
        self.stack.callback(self.nats.stop)
        # ONE storescp: direct transfers and the cloud agent's target are the same SCP.
        self.scp = DcmtkStoreSCP(self.work / "scp", SCP_AET).start()
        self.stack.callback(self.scp.stop)

    def start_relay(
        self,
        tag: str,
        target: dict[str, Any] | None = None,
        edge_extra: dict[str, Any] | None = None,
    ) -> int:
        """A cloud agent with storescp (or ``target``) as its target and an edge agent
        listening for the same AE title, as in tests/conftest.py; the edge listener's port."""
        assert self.pki and self.nats and self.scp
        if target is None:
            target = {"ae_title": SCP_AET, "host": "127.0.0.1", "port": self.scp.port}
        cloud = AgentProcess(
            f"cloud-{tag}",
            self.work / f"cloud-{tag}",
            {
                "nats": nats_section(self.nats.url, self.pki, self.pki.client("cloud")),
                "targets": [target],
            },
        )
        self.agents.append(cloud)
        self.stack.callback(cloud.stop)
        cloud.start()
        port = free_port()
        edge = AgentProcess(
            f"edge-{tag}",
            self.work / f"edge-{tag}",
            {
                "nats": nats_section(self.nats.url, self.pki, self.pki.client("edge")),
                "listeners": [{"ae_title": target["ae_title"], "bind": "127.0.0.1", "port": port}],
                **(edge_extra or {}),
            },
        )
        self.agents.append(edge)
        self.stack.callback(edge.stop)
        edge.start()
        self.edge, self.cloud = edge, cloud
        return port

    def stop_relay(self) -> None:
        for agent in (self.edge, self.cloud):
            agent.stop()
            if agent.proc is not None and agent.proc.returncode not in (0, -15):
                raise BenchFailure(
                    f"agent {agent.name} exited with {agent.proc.returncode}:\n{agent.log_tail()}"
                )

    def listener_seconds(self, service: str) -> tuple[float, float]:
        """The edge listener's request-time histogram (sum s, count) for ``service``: from
        the DIMSE request reaching its handler to the far response (NATS, cloud agent, SCP)."""
        return (
            self.edge.metric("dimse_relay_request_seconds_sum", service=service),
            self.edge.metric("dimse_relay_request_seconds_count", service=service),
        )

    def monitor(self) -> PhaseMonitor:
        assert self.scp is not None
        return PhaseMonitor(
            {
                "edge_spool": Path(self.edge.config["work_dir"]) / "incoming",
                "cloud_spool": Path(self.cloud.config["work_dir"]) / "spool",
                "scp_stored": self.scp.out,
            }
        )

    def direct_tail(self, mon: PhaseMonitor, key: str) -> None:
        """Direct run: when storescp's file was complete and when storescu returned."""
        done = mon.summary()["scp_stored"]["complete_s"]
        self.analysis[f"{key}_direct"] = {"scp_complete_s": done, "elapsed_s": mon.elapsed}
        if done is not None:
            log(
                f"    direct: storescp file complete at {done:.2f} s, "
                f"storescu done at {mon.elapsed:.2f} s"
            )

    def phases(self, mon: PhaseMonitor, total: int, key: str) -> None:
        """Log and keep where a relayed large transfer's time went."""
        s = mon.summary()
        if s["edge_spool"]["complete_s"] is None and s["scp_stored"]["complete_s"] is not None:
            # The direct path spools nothing: the instance is passed through as it arrives.
            first, done = s["scp_stored"]["first_byte_s"], s["scp_stored"]["complete_s"]
            log(
                f"    cut-through: first byte at storescp {first or 0:.2f} s, complete "
                f"{done:.2f} s, storescu done {mon.elapsed:.2f} s"
            )
            self.analysis[key] = {"monitor": s, "elapsed_s": mon.elapsed}
            return
        marks = [
            ("storescu -> edge agent (pynetdicom, to spool)", 0.0, s["edge_spool"]["complete_s"]),
            (
                "edge -> NATS -> cloud agent (chunks, to spool)",
                s["edge_spool"]["complete_s"],
                s["cloud_spool"]["complete_s"],
            ),
            (
                "cloud agent -> storescp (pynetdicom)",
                s["cloud_spool"]["complete_s"],
                s["scp_stored"]["complete_s"],
            ),
            ("response back to storescu", s["scp_stored"]["complete_s"], mon.elapsed),
        ]
        out = []
        for label, a, b in marks:
            if a is None or b is None:
                continue
            dur = max(b - a, 1e-9)
            rate = total / dur / MB if "response" not in label else None
            out.append({"phase": label, "start_s": a, "end_s": b, "seconds": dur, "MB_s": rate})
            log(
                f"    {label:48s} {a:7.2f} -> {b:7.2f} s  ({dur:6.2f} s"
                + (f", {rate:6.1f} MB/s)" if rate else ")")
            )
        self.analysis[key] = {"phases": out, "monitor": s, "elapsed_s": mon.elapsed}

    # --- checked transfers ------------------------------------------------------------

    def store(self, port: int, files: list[Path], label: str, timeout: float) -> ScuResult:
        """storescu on one association; Success for every file and every file stored,
        or BenchFailure."""
        assert self.scp is not None
        self.scp.clear()
        result = storescu(port, files, SCP_AET, calling=SCU_AET, timeout=timeout)
        statuses = result.statuses()
        if result.returncode != 0 or statuses != ["Success"] * len(files):
            bad = [s for s in statuses if s != "Success"]
            raise BenchFailure(
                f"{label}: storescu rc={result.returncode}, {statuses.count('Success')} of "
                f"{len(files)} Success, other statuses {bad[:5]}\n{result.output[-3000:]}"
            )
        deadline = time.monotonic() + 10
        while len(self.scp.files()) < len(files) and time.monotonic() < deadline:
            time.sleep(0.05)
        return result

    def store_large(self, port: int, src: Path, digest: tuple[int, str], label: str) -> float:
        """One large instance; the elapsed seconds, after checking the stored dataset's
        length and SHA-256 against the source. The stored file is deleted."""
        assert self.scp is not None
        result = self.store(port, [src], label, timeout=1800)
        stored = self.scp.files()
        if len(stored) != 1:
            raise BenchFailure(f"{label}: {len(stored)} files stored, 1 sent")
        got = dataset_digest(stored[0])
        stored[0].unlink()
        if got != digest:
            raise BenchFailure(f"{label}: stored dataset {got} differs from sent {digest}")
        return result.elapsed

    # --- the measurements -----------------------------------------------------------

    def bench_small(self, port: int) -> None:
        count = self.params["small_count"]
        files = small_instances(self.work / "small", count)
        size = sum(f.stat().st_size for f in files) / count
        log(f"small: {count} instances of {size / 1024:.1f} KiB, one association each way")
        assert self.scp is not None
        runs: dict[str, list[float]] = {"direct": [], "relay": []}
        reference = None
        for mode, p in (("direct", self.scp.port), ("relay", port)):
            self.store(p, files[:1], f"small warm-up {mode}", timeout=60)
        # Rounds alternate direct and relay so drift (page cache, other load) hits both.
        for rnd in range(REPEATS):
            for mode, p in (("direct", self.scp.port), ("relay", port)):
                before = self.listener_seconds("C-STORE")
                result = self.store(p, files, f"small {mode} #{rnd + 1}", timeout=600)
                after = self.listener_seconds("C-STORE")
                reference = check_small_stored(
                    count, self.scp.files(), f"small {mode} #{rnd + 1}", reference
                )
                runs[mode].append(count / result.elapsed)
                log(f"  {mode} #{rnd + 1}: {result.elapsed:.2f} s, {runs[mode][-1]:.1f} inst/s")
                if mode == "relay":
                    n = after[1] - before[1]
                    if n != count:
                        raise BenchFailure(f"small relay: edge counted {n} C-STOREs, {count} sent")
                    handler_ms = (after[0] - before[0]) / n * 1e3
                    per_ms = result.elapsed / count * 1e3
                    self.analysis.setdefault("small", []).append(
                        {
                            "scu_ms_per_instance": per_ms,
                            "listener_handler_ms_per_instance": handler_ms,
                        }
                    )
                    log(
                        f"    per instance {per_ms:.2f} ms, {handler_ms:.2f} ms of it in the edge "
                        "handler (NATS + cloud agent + storescp)"
                    )
        rates = {mode: median(v) for mode, v in runs.items()}
        self.analysis["small_runs_inst_s"] = runs
        self.scp.clear()
        bare = self.bare_pynetdicom_rate(files)
        shutil.rmtree(self.work / "small")
        ratio = rates["relay"] / rates["direct"]
        self.rows.append(
            Row(
                f"C-STORE {count} x {size / 1024:.0f} KiB, 1 assoc, med/3",
                "inst/s",
                rates["direct"],
                rates["relay"],
                ratio,
                "relay >= 25% of direct",
                ratio >= 0.25,
            )
        )
        # Reference for the figure above: the listener's own DIMSE stack (pynetdicom, with the
        # agent's settings) as a plain storage SCP, no relay behind it.
        self.rows.append(
            Row(
                "  same, storescu -> pynetdicom SCP as in an agent (no relay)",
                "inst/s",
                rates["direct"],
                bare,
                bare / rates["direct"],
                "-",
                None,
            )
        )

    def bare_pynetdicom_rate(self, files: list[Path]) -> float:
        """storescu -> an in-process pynetdicom storage SCP configured like a listener."""
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

        from dimse_relay.dicom import SOCKET_HANDLERS, configure_pynetdicom

        configure_pynetdicom(False)
        ae = AE("BAREPY")
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        port = free_port()
        server = ae.start_server(
            ("127.0.0.1", port),
            block=False,
            evt_handlers=[*SOCKET_HANDLERS, (evt.EVT_C_STORE, lambda event: 0x0000)],
        )
        try:
            rates = []
            for rnd in range(REPEATS):
                result = self.store(port, files, f"small bare pynetdicom #{rnd + 1}", timeout=600)
                rates.append(len(files) / result.elapsed)
        finally:
            server.shutdown()
        return median(rates)

    def bench_large(self, port: int) -> None:
        size = self.params["large_mib"] * MIB
        src = make_large_instance(self.work / "large.dcm", size)
        digest = dataset_digest(src)
        total = src.stat().st_size
        log(f"large: one instance of {total / MIB:.0f} MiB")
        assert self.scp is not None
        runs: dict[str, list[float]] = {"direct": [], "relay": []}
        for rnd in range(REPEATS):
            for mode, p in (("direct", self.scp.port), ("relay", port)):
                with self.monitor() as mon:
                    elapsed = self.store_large(p, src, digest, f"large {mode} #{rnd + 1}")
                runs[mode].append(total / elapsed / MB)
                log(f"  {mode} #{rnd + 1}: {elapsed:.2f} s, {runs[mode][-1]:.1f} MB/s")
                if mode == "direct":
                    self.direct_tail(mon, "large")
        rates = {mode: median(v) for mode, v in runs.items()}
        self.analysis["large_runs_MB_s"] = runs
        self.phases(mon, total, "large")
        src.unlink()
        ratio = rates["relay"] / rates["direct"]
        self.rows.append(
            Row(
                f"C-STORE 1 x {self.params['large_mib']} MiB, med/3",
                "MB/s",
                rates["direct"],
                rates["relay"],
                ratio,
                "relay >= 20% of direct",
                ratio >= 0.20,
            )
        )

    def queued_store(self, port: int, files: list[Path], label: str) -> float:
        """storescu into a queued listener: the seconds until the modality had every Success
        (the acknowledgement rate), then wait until all are delivered to storescp."""
        assert self.scp is not None
        self.scp.clear()
        delivered = self.edge.metric(
            "dimse_relay_queue_delivery_attempts_total", result="delivered"
        )
        started = time.monotonic()
        result = storescu(port, files, SCP_AET, calling=SCU_AET, timeout=1800)
        if result.returncode != 0 or result.statuses() != ["Success"] * len(files):
            raise BenchFailure(f"{label}: storescu rc={result.returncode}\n{result.output[-3000:]}")
        # Delivered = the target's Success came back (storescp's file is complete), not merely
        # that storescp has begun writing a file.
        deadline = time.monotonic() + 600
        while self.edge.metric(
            "dimse_relay_queue_delivery_attempts_total", result="delivered"
        ) < delivered + len(files):
            if time.monotonic() > deadline:
                raise BenchFailure(f"{label}: not all delivered within 600 s")
            time.sleep(0.05)
        # Informational: from the first C-STORE until storescp had them all.
        self.analysis.setdefault("queued_all_delivered_s", {})[label] = round(
            time.monotonic() - started, 2
        )
        return result.elapsed

    def bench_queued(self) -> None:
        """Queued mode (docs/queued-mode.md): a hub (cloud) and a site leaf node with its own
        JetStream; the edge agent's listener acknowledges once the instance is in the leaf's
        JetStream. Direct DCMTK -> storescp vs the modality's acknowledgement rate."""
        assert self.pki is not None and self.scp is not None
        hub = HubServer(self.work / "q-hub", self.pki).start()
        self.stack.callback(hub.stop)
        leaf = LeafServer(
            self.work / "q-leaf", self.pki, hub, self.pki.client("tester"), max_file_store="4G"
        ).start()
        self.stack.callback(leaf.stop)
        cloud = AgentProcess(
            "cloud-queued",
            self.work / "cloud-queued",
            {
                "nats": nats_section(hub.url, self.pki, self.pki.client("cloud")),
                "targets": [{"ae_title": SCP_AET, "host": "127.0.0.1", "port": self.scp.port}],
            },
        )
        port = free_port()
        edge = AgentProcess(
            "edge-queued",
            self.work / "edge-queued",
            {
                "nats": nats_section(leaf.url, self.pki, self.pki.client("edge")),
                "listeners": [
                    {"ae_title": SCP_AET, "bind": "127.0.0.1", "port": port, "mode": "queued"}
                ],
                "queue": {"max_bytes": 1536 * MIB},
            },
        )
        for agent in (cloud, edge):
            self.agents.append(agent)
            self.stack.callback(agent.stop)
            agent.start()
        self.edge = edge
        count = self.params["small_count"]
        log(f"queued: {count} small instances, then one of {self.params['large_mib']} MiB")
        # Fresh SOP Instance UIDs for every round: the queue stores a repeated instance once.
        self.queued_store(port, small_instances(self.work / "q-warm", 1), "queued warm-up")
        runs: dict[str, list[float]] = {"direct": [], "queued": []}
        for rnd in range(REPEATS):
            files = small_instances(self.work / f"q-small-{rnd}", count)
            result = self.store(self.scp.port, files, f"small direct #{rnd + 1}", timeout=600)
            reference = check_small_stored(count, self.scp.files(), "direct")
            runs["direct"].append(count / result.elapsed)
            elapsed = self.queued_store(port, files, f"small queued #{rnd + 1}")
            check_small_stored(count, self.scp.files(), f"small queued #{rnd + 1}", reference)
            runs["queued"].append(count / elapsed)
            log(
                f"  #{rnd + 1}: direct {runs['direct'][-1]:.0f}/s, acked {runs['queued'][-1]:.0f}/s"
            )
        rates = {mode: median(v) for mode, v in runs.items()}
        self.analysis["queued_small_runs_inst_s"] = runs
        for rnd in range(REPEATS):
            shutil.rmtree(self.work / f"q-small-{rnd}")
        ratio = rates["queued"] / rates["direct"]
        self.rows.append(
            Row(
                f"queued C-STORE {count} small, ack rate, med/3",
                "inst/s",
                rates["direct"],
                rates["queued"],
                ratio,
                "ack >= 50% of direct",
                ratio >= 0.50,
            )
        )
        size = self.params["large_mib"] * MIB
        large: dict[str, list[float]] = {"direct": [], "queued": []}
        for rnd in range(REPEATS):
            src = make_large_instance(self.work / "q-large.dcm", size)
            digest = dataset_digest(src)
            total = src.stat().st_size
            large["direct"].append(
                total / self.store_large(self.scp.port, src, digest, "large direct") / MB
            )
            elapsed = self.queued_store(port, [src], f"large queued #{rnd + 1}")
            (stored,) = self.scp.files()
            if dataset_digest(stored) != digest:
                raise BenchFailure("large queued: delivered dataset differs from the sent one")
            stored.unlink()
            large["queued"].append(total / elapsed / MB)
            log(
                f"  large #{rnd + 1}: direct {large['direct'][-1]:.0f} MB/s, "
                f"acked {large['queued'][-1]:.0f} MB/s"
            )
            src.unlink()
        rates = {mode: median(v) for mode, v in large.items()}
        self.analysis["queued_large_runs_MB_s"] = large
        self.rows.append(
            Row(
                f"queued C-STORE 1 x {self.params['large_mib']} MiB, ack, med/3",
                "MB/s",
                rates["direct"],
                rates["queued"],
                rates["queued"] / rates["direct"],
                "-",
                None,
            )
        )
        # Both agents stream the instance (listener -> bucket, bucket -> spool -> target):
        # their peak RSS stays far below the instance size.
        rss = {a.name: a.peak_rss_kib() / 1024 for a in (edge, cloud)}
        self.analysis["queued_peak_rss_mib"] = rss
        self.rows.append(
            Row(
                f"queued peak RSS edge/cloud, {self.params['large_mib']} MiB instances",
                "MiB",
                None,
                max(rss.values()),
                None,
                "-",
                None,
            )
        )
        for agent in (edge, cloud):
            agent.stop()

    def bench_echo(self, port: int) -> None:
        count = self.params["echo_count"]
        assert self.scp is not None
        log(f"echo: {count} C-ECHOs on one association each way, three SCUs")
        # The target row: pynetdicom with only the relay's event-driven waits (reactor.py,
        # none of its codec changes), an SCU that does not poll. The plain pynetdicom SCU
        # (1 ms polling loops) and DCMTK's echoscu (mean of a series) are measured too.
        before = self.listener_seconds("C-ECHO")
        direct = event_driven_echo_series(self.scp.port, SCP_AET, count)
        relay = event_driven_echo_series(port, SCP_AET, count)
        after = self.listener_seconds("C-ECHO")
        plain_direct = echo_series(self.scp.port, SCP_AET, count)
        plain_relay = echo_series(port, SCP_AET, count)
        dcmtk_direct = echoscu_mean_rtt(self.scp.port, SCP_AET, count)
        dcmtk_relay = echoscu_mean_rtt(port, SCP_AET, count)
        assert self.pki is not None and self.nats is not None
        tester = self.pki.client("tester")
        rtt = nats_rtt(self.nats.url, self.pki.ca, tester.cert, tester.key, count)
        handler = (after[0] - before[0]) / max(after[1] - before[1], 1) * 1e3
        self.analysis["echo"] = {
            "listener_handler_mean_ms": handler,
            "nats_tls_request_reply_median_ms": median(rtt) * 1e3,
            "nats_tls_request_reply_p99_ms": percentile(rtt, 99) * 1e3,
            "plain_pynetdicom_scu_median_ms": {
                "direct": median(plain_direct) * 1e3,
                "relay": median(plain_relay) * 1e3,
            },
            "dcmtk_echoscu_mean_ms": {"direct": dcmtk_direct * 1e3, "relay": dcmtk_relay * 1e3},
        }
        for mode, times in (
            ("direct", direct),
            ("relay", relay),
            ("direct, plain pynetdicom SCU", plain_direct),
            ("relay, plain pynetdicom SCU", plain_relay),
        ):
            log(
                f"  {mode}: median {median(times) * 1e3:.2f} ms, "
                f"p99 {percentile(times, 99) * 1e3:.2f} ms, max {max(times) * 1e3:.2f} ms"
            )
        log(
            f"  DCMTK echoscu, mean of {count}: direct {dcmtk_direct * 1e3:.2f} ms, "
            f"relay {dcmtk_relay * 1e3:.2f} ms"
        )
        log(
            f"  edge handler mean {handler:.2f} ms (NATS + cloud agent + storescp); bare NATS "
            f"TLS request/reply median {median(rtt) * 1e3:.2f} ms"
        )
        med_d, med_r = median(direct) * 1e3, median(relay) * 1e3
        p99_d, p99_r = percentile(direct, 99) * 1e3, percentile(relay, 99) * 1e3
        self.rows.append(
            Row(
                f"C-ECHO RTT median ({count}), event-driven SCU",
                "ms",
                med_d,
                med_r,
                med_r / med_d,
                "relay <= 5 ms",
                med_r <= 5.0,
            )
        )
        self.rows.append(
            Row(
                f"C-ECHO RTT p99 ({count}), event-driven SCU",
                "ms",
                p99_d,
                p99_r,
                p99_r / p99_d,
                "-",
                None,
            )
        )
        pd, pr = median(plain_direct) * 1e3, median(plain_relay) * 1e3
        self.rows.append(
            Row("  median, plain pynetdicom SCU (polls)", "ms", pd, pr, pr / pd, "-", None)
        )
        dd, dr = dcmtk_direct * 1e3, dcmtk_relay * 1e3
        self.rows.append(Row("  mean, DCMTK echoscu --repeat", "ms", dd, dr, dr / dd, "-", None))

    def bench_rss(self) -> None:
        """Fresh agents, so VmHWM is what relaying this one instance took."""
        mib = self.params["rss_mib"]
        assert self.scp is not None
        src = make_large_instance(self.work / "huge.dcm", mib * MIB)
        digest = dataset_digest(src)
        total = src.stat().st_size
        log(f"rss: one instance of {total / MIB:.0f} MiB, direct, then through fresh agents")
        with self.monitor() as mon:
            direct_s = self.store_large(self.scp.port, src, digest, f"rss {mib} MiB direct")
        direct = total / direct_s / MB
        self.direct_tail(mon, "rss")
        log(f"  direct: {direct:.1f} MB/s")
        port = self.start_relay("rss")
        baseline = {a.name: a.peak_rss_kib() / 1024 for a in (self.edge, self.cloud)}
        with self.monitor() as mon:
            elapsed = self.store_large(port, src, digest, f"rss {mib} MiB relay")
        src.unlink()
        rate = total / elapsed / MB
        peaks = {a.name: a.peak_rss_kib() / 1024 for a in (self.edge, self.cloud)}
        log(f"  relay: {elapsed:.2f} s, {rate:.1f} MB/s")
        self.phases(mon, total, "rss")
        for name, peak in peaks.items():
            log(f"  {name}: VmHWM {peak:.0f} MiB (at start {baseline[name]:.0f} MiB)")
        self.extra["rss_baseline_mib"] = baseline
        self.stop_relay()
        self.rows.append(
            Row(
                f"C-STORE 1 x {mib} MiB (fresh agents)",
                "MB/s",
                direct,
                rate,
                rate / direct,
                "-",
                None,
            )
        )
        for role, agent in (("edge", self.edge), ("cloud", self.cloud)):
            peak = peaks[agent.name]
            self.rows.append(
                Row(
                    f"{role} agent peak RSS ({mib} MiB)",
                    "MiB",
                    None,
                    peak,
                    None,
                    "< 200 MiB",
                    peak < 200,
                )
            )

    # --- query/retrieve against Orthanc ------------------------------------------------

    def bench_qr(self) -> None:
        """C-FIND and C-MOVE against Orthanc (a real PACS, loaded over REST before the
        clock starts), direct and through fresh agents whose cloud target is Orthanc."""
        n_find, n_move = self.params["find_matches"], self.params["move_count"]
        # The C-MOVE destination on the SCU's side: one storescp for Orthanc's own moves,
        # one for the edge agent's move_destinations, both with the same AE title.
        direct_dest = DcmtkStoreSCP(self.work / "dest-direct", DEST_AET).start()
        self.stack.callback(direct_dest.stop)
        relay_dest = DcmtkStoreSCP(self.work / "dest-relay", DEST_AET).start()
        self.stack.callback(relay_dest.stop)
        pacs = Orthanc(
            self.work / "orthanc",
            ORTHANC_AET,
            modalities={"dest": [DEST_AET, "127.0.0.1", direct_dest.port]},
        )
        # Orthanc's DICOM side is DCMTK's: like storescp, Nagle off (TCP_NODELAY=1), or every
        # C-STORE it sends (direct C-MOVE, and the cloud agent's C-GET) waits ~40 ms for an ACK.
        with nodelay_env():
            pacs.start()
        self.stack.callback(pacs.stop)
        self.pacs = pacs
        started = time.monotonic()
        studies = find_studies(n_find)
        study_uid, instances = move_study(n_move)
        generated = time.monotonic() - started
        started = time.monotonic()
        upload(pacs.rest, [*studies.values(), *instances.values()])
        uploaded = time.monotonic() - started
        count = len(studies) + len(instances)
        log(
            f"orthanc: {count} instances generated in {generated:.1f} s, uploaded over REST "
            f"(4 threads) in {uploaded:.1f} s ({count / uploaded:.0f}/s), not benchmarked"
        )
        self.extra["orthanc_load"] = {
            "instances": count,
            "generate_s": round(generated, 2),
            "upload_s": round(uploaded, 2),
        }
        port = self.start_relay(
            "qr",
            target={
                "ae_title": PACS_AET,
                "host": "127.0.0.1",
                "port": pacs.port,
                "called_ae_title": ORTHANC_AET,
            },
            edge_extra={
                "move_destinations": {DEST_AET: {"host": "127.0.0.1", "port": relay_dest.port}}
            },
        )
        self.bench_find(pacs, port, set(studies))
        self.bench_move(pacs, port, study_uid, set(instances), direct_dest, relay_dest)
        self.stop_relay()
        pacs.stop()
        direct_dest.stop()
        relay_dest.stop()

    def find_checked(
        self, port: int, aet: str, uids: set[str], label: str, reference: dict[str, Any] | None
    ) -> tuple[float, float, dict[str, Any]]:
        """One C-FIND: final Success, every study exactly once, and (with ``reference``, what
        the direct C-FIND returned) every identifier equal to the direct one."""
        elapsed, first, final, found = c_find(port, aet)
        if final != 0x0000:
            raise BenchFailure(f"{label}: final status 0x{final:04X}")
        if found.keys() != uids:
            raise BenchFailure(
                f"{label}: {len(found)} matches, {len(found.keys() & uids)} of the "
                f"{len(uids)} studies"
            )
        if reference is not None:
            bad = [uid for uid, ds in found.items() if ds != reference[uid]]
            if bad:
                raise BenchFailure(f"{label}: {len(bad)} identifiers differ from the direct ones")
        return elapsed, first, found

    def bench_find(self, pacs: Orthanc, port: int, uids: set[str]) -> None:
        n = len(uids)
        log(f"find: Study Root C-FIND matching {n} studies in Orthanc, pynetdicom SCU")
        modes = (("direct", pacs.port, ORTHANC_AET), ("relay", port, PACS_AET))
        _, _, reference = self.find_checked(pacs.port, ORTHANC_AET, uids, "find warm-up", None)
        self.find_checked(port, PACS_AET, uids, "find warm-up relay", reference)
        runs: dict[str, list[float]] = {"direct": [], "relay": []}
        firsts: dict[str, list[float]] = {"direct": [], "relay": []}
        for rnd in range(REPEATS):
            for mode, p, aet in modes:
                label = f"find {mode} #{rnd + 1}"
                elapsed, first, _ = self.find_checked(p, aet, uids, label, reference)
                runs[mode].append(elapsed)
                firsts[mode].append(first)
                log(
                    f"  {mode} #{rnd + 1}: {elapsed:.3f} s, {n / elapsed:.0f} matches/s, "
                    f"first match after {first * 1e3:.1f} ms"
                )
        secs = {mode: median(v) for mode, v in runs.items()}
        first = {mode: median(v) for mode, v in firsts.items()}
        rates = {mode: n / s for mode, s in secs.items()}
        self.analysis["find_runs_s"] = runs
        self.analysis["find_first_match_s"] = firsts
        per = {mode: s / n * 1e6 for mode, s in secs.items()}
        self.analysis["find_us_per_match"] = per
        log(
            f"  per match: direct {per['direct']:.0f} us, relay {per['relay']:.0f} us "
            f"(+{per['relay'] - per['direct']:.0f} us: edge pynetdicom SCP + NATS message + "
            "cloud agent pynetdicom SCU)"
        )
        ratio = rates["relay"] / rates["direct"]
        self.rows.append(
            Row(
                f"C-FIND {n} matches (Orthanc), med/3",
                "matches/s",
                rates["direct"],
                rates["relay"],
                ratio,
                "relay >= 25% of direct",
                ratio >= 0.25,
            )
        )
        self.rows.append(
            Row(
                f"C-FIND {n} matches, request to final",
                "s",
                secs["direct"],
                secs["relay"],
                secs["relay"] / secs["direct"],
                "-",
                None,
            )
        )
        self.rows.append(
            Row(
                f"C-FIND {n} matches, to first match",
                "ms",
                first["direct"] * 1e3,
                first["relay"] * 1e3,
                first["relay"] / first["direct"],
                "-",
                None,
            )
        )

    def move_checked(
        self,
        port: int,
        aet: str,
        dest: DcmtkStoreSCP,
        study_uid: str,
        sop_uids: set[str],
        label: str,
        reference: dict[str, bytes] | None,
    ) -> tuple[float, dict[str, bytes]]:
        """One C-MOVE of the study: final Success with every sub-operation completed (where
        the SCP says), every instance stored at the destination once, and (with
        ``reference``, what the first direct C-MOVE stored) the same dataset bytes. ``dest``
        must be empty."""
        n = len(sop_uids)
        elapsed, final = c_move(port, aet, DEST_AET, study_uid)
        status = int(final.Status)
        counts = {
            k: final.get(f"Number{k}Suboperations")
            for k in ("OfCompleted", "OfFailed", "OfWarning")
        }
        want = {"OfCompleted": n, "OfFailed": 0, "OfWarning": 0}
        wrong = {k: v for k, v in counts.items() if v is not None and int(v) != want[k]}
        if status != 0x0000 or wrong:
            raise BenchFailure(f"{label}: final status 0x{status:04X}, sub-operations {counts}")
        deadline = time.monotonic() + 10
        while len(dest.files()) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        got = {f.name: dataset_bytes(f) for f in dest.files()}
        # storescp names files <modality>.<SOP Instance UID>
        if {name.split(".", 1)[1] for name in got} != sop_uids or len(got) != n:
            raise BenchFailure(f"{label}: {len(got)} files stored, not the study's {n}")
        if reference is not None:
            bad = [name for name, data in got.items() if reference.get(name) != data]
            if bad:
                raise BenchFailure(f"{label}: {len(bad)} datasets differ from the direct move's")
        return elapsed, got

    def bench_move(
        self,
        pacs: Orthanc,
        port: int,
        study_uid: str,
        sop_uids: set[str],
        direct_dest: DcmtkStoreSCP,
        relay_dest: DcmtkStoreSCP,
    ) -> None:
        n = len(sop_uids)
        log(f"move: Study Root C-MOVE of a {n}-instance CT study from Orthanc to storescp")
        # Also the far agent's leg on its own (and Orthanc's cache warmed for both ways).
        get_s = c_get_seconds(pacs.port, ORTHANC_AET, study_uid, n)
        log(f"  C-GET of the study from Orthanc, pynetdicom SCU: {get_s:.2f} s")
        modes = (
            ("direct", pacs.port, ORTHANC_AET, direct_dest),
            ("relay", port, PACS_AET, relay_dest),
        )
        runs: dict[str, list[float]] = {"direct": [], "relay": []}
        reference: dict[str, bytes] | None = None
        phases = []
        for rnd in range(REPEATS):
            for mode, p, aet, dest in modes:
                dest.clear()
                mon = PhaseMonitor(
                    {
                        "edge_retrieved": Path(self.edge.config["work_dir"]) / "retrieved",
                        "dest_stored": dest.out,
                    }
                )
                with mon:
                    elapsed, got = self.move_checked(
                        p, aet, dest, study_uid, sop_uids, f"move {mode} #{rnd + 1}", reference
                    )
                reference = reference or got
                runs[mode].append(n / elapsed)
                s = mon.summary()
                log(
                    f"  {mode} #{rnd + 1}: {elapsed:.2f} s, {runs[mode][-1]:.1f} inst/s "
                    f"(first file stored at {s['dest_stored']['first_byte_s'] or 0:.2f} s)"
                )
                if mode == "relay":
                    phases.append(
                        {
                            "elapsed_s": elapsed,
                            "far_retrieve_to_edge_spool_s": s["edge_retrieved"]["complete_s"],
                            "dest_first_stored_s": s["dest_stored"]["first_byte_s"],
                            "dest_all_stored_s": s["dest_stored"]["complete_s"],
                            "monitor_s": mon.elapsed,
                        }
                    )
        rates = {mode: median(v) for mode, v in runs.items()}
        self.analysis["move_runs_inst_s"] = runs
        self.analysis["move_relay_phases"] = phases
        self.analysis["move_orthanc_c_get_s"] = get_s
        last = phases[-1]
        log(
            "    relay (clock from before the association): far C-GET (Orthanc -> cloud agent "
            f"-> NATS -> edge spool) done at {last['far_retrieve_to_edge_spool_s'] or 0:.2f} s, "
            f"edge -> storescp {last['dest_first_stored_s'] or 0:.2f} -> "
            f"{last['dest_all_stored_s'] or 0:.2f} s, SCU done at {last['monitor_s']:.2f} s"
        )
        ratio = rates["relay"] / rates["direct"]
        self.rows.append(
            Row(
                f"C-MOVE {n}-inst study (Orthanc->storescp), med/3",
                "inst/s",
                rates["direct"],
                rates["relay"],
                ratio,
                "relay >= 25% of direct",
                ratio >= 0.25,
            )
        )

    def run(self) -> None:
        with self.stack:
            self.start_infra()
            port = self.start_relay("main")
            # Each section starts with the page cache written back: the previous one's
            # (or an earlier test run's) deleted GiBs must not slow its file system calls.
            sections = {
                "echo": lambda: self.bench_echo(port),
                "small": lambda: self.bench_small(port),
                "large": lambda: self.bench_large(port),
                "stop": self.stop_relay,
                "queued": self.bench_queued,
                "qr": self.bench_qr,
                "rss": self.bench_rss,
            }
            for name, section in sections.items():
                if self.only and name not in self.only and name != "stop":
                    continue
                os.sync()
                section()

    def log_tails(self) -> str:
        parts = [f"--- {a.name} ---\n{a.log_tail(20)}" for a in self.agents]
        if self.scp is not None and self.scp.log_path.exists():
            tail = self.scp.log_path.read_text(errors="replace").splitlines()[-20:]
            parts.append("--- storescp ---\n" + "\n".join(tail))
        pacs = self.pacs
        if pacs is not None and (pacs.workdir / "orthanc.log").exists():
            tail = (pacs.workdir / "orthanc.log").read_text(errors="replace").splitlines()[-20:]
            parts.append("--- orthanc ---\n" + "\n".join(tail))
        return "\n".join(parts)


# --- reporting -------------------------------------------------------------------------


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "ratio":
        return f"{value * 100:.0f}%" if value < 10 else f"{value:.1f}x"
    return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"


def table(rows: list[Row]) -> str:
    head = ["metric", "unit", "direct", "relay", "ratio", "target", "ok"]
    body = [
        [
            r.metric,
            r.unit,
            fmt(r.direct),
            fmt(r.relay),
            "-"
            if r.ratio is None
            else (f"{r.ratio:.1f}x" if r.unit in ("ms", "s") else fmt(r.ratio, "ratio")),
            r.target,
            "-" if r.ok is None else ("yes" if r.ok else "NO"),
        ]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(head, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in body]
    return "\n".join(lines)


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except OSError as exc:
        return f"unavailable: {exc}"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else ""


def environment() -> dict[str, Any]:
    commit = tool_version(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "git_commit": commit,
        # Uncommitted changes to tracked files when the run started: the figures are then
        # not those of git_commit.
        "git_dirty": bool(dirty),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "nats_server": tool_version([str(NATS_SERVER), "--version"]),
        "dcmtk": tool_version([str(STORESCU), "--version"]),
    }


def write_results(doc: dict[str, Any], stamp: str, partial: bool) -> Path:
    """A partial run (--only) goes to results/partial/ and never replaces latest.json."""
    directory = RESULTS / "partial" if partial else RESULTS
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=2) + "\n"
    out = directory / f"{stamp}.json"
    for path in (out,) if partial else (out, RESULTS / "latest.json"):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--strict", action="store_true", help="exit 3 if a target is missed")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--only",
        action="append",
        choices=["echo", "small", "large", "queued", "qr", "rss"],
        help="run only these sections (repeatable; for development: the table is partial)",
    )
    parser.add_argument(
        "--work-root",
        type=Path,
        default=Path("/var/tmp"),
        help="where the work directory goes (disk, not tmpfs: the RSS run writes GiBs)",
    )
    args = parser.parse_args(argv)
    params = QUICK if args.quick else FULL
    started = time.monotonic()
    now = datetime.now(UTC)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    args.work_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dimse-relay-bench-", dir=args.work_root))
    log(f"work dir {work} ({'quick' if args.quick else 'full'} run: {params})")
    bench = Bench(work, params)
    bench.only = set(args.only or ())
    errors: list[str] = []
    try:
        bench.run()
    except Exception as exc:  # any failure: the figures are incomplete, say so, exit 1
        errors.append(f"{type(exc).__name__}: {exc}")
        print(f"\nBENCH FAILED: {exc}\n{bench.log_tails()}", file=sys.stderr)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    runtime = time.monotonic() - started
    targets_met = all(r.ok is not False for r in bench.rows)
    doc = {
        "timestamp": now.isoformat(timespec="seconds"),
        "quick": args.quick,
        "only": sorted(bench.only),
        "params": params,
        "correct": not errors,
        "errors": errors,
        "targets_met": targets_met and not errors,
        "runtime_s": round(runtime, 1),
        "environment": environment(),
        "rows": [asdict(r) for r in bench.rows],
        **bench.extra,
    }
    out = write_results(doc, stamp, partial=bool(bench.only))
    print()
    print(table(bench.rows))
    print(f"\nruntime {runtime:.0f} s; results in {out.relative_to(REPO)} and latest.json")
    if errors:
        print("FAILED: the figures above are incomplete, a transfer or a check failed")
        return 1
    if not targets_met:
        print("targets missed: " + ", ".join(r.metric for r in bench.rows if r.ok is False))
        if args.strict:
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
