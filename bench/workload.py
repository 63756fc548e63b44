"""Workloads and checks for the benchmark: test instances, digests, a C-ECHO series."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import socket
import ssl
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402
import pydicom.data  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from pynetdicom import AE, evt  # noqa: E402
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # noqa: E402
from tests.harness import LOOPBACK  # noqa: E402
from tests.harness.dicom import dataset_bytes  # noqa: E402


class BenchFailure(RuntimeError):
    """A transfer failed or what arrived is not what was sent: the figures are worthless."""


def small_instances(directory: Path, count: int) -> list[Path]:
    """``count`` copies of pydicom's CT_small.dcm, each with a fresh SOP Instance UID."""
    directory.mkdir(parents=True, exist_ok=True)
    src = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    files = []
    for i in range(count):
        src.SOPInstanceUID = generate_uid()
        src.file_meta.MediaStorageSOPInstanceUID = src.SOPInstanceUID
        out = directory / f"ct{i:04d}.dcm"
        src.save_as(out)
        files.append(out)
    return files


def dataset_digest(path: Path) -> tuple[int, str]:
    """Length and SHA-256 of the dataset of a Part 10 file (after the File Meta group),
    read in blocks so multi-GiB files are never held in memory."""
    h = hashlib.sha256()
    n = 0
    with path.open("rb") as fh:
        fh.seek(132)
        head = fh.read(12)
        if head[:4] != b"\x02\x00\x00\x00":
            raise BenchFailure(f"{path}: no file meta group length")
        fh.seek(132 + 12 + int.from_bytes(head[8:12], "little"))
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
            n += len(block)
    return n, h.hexdigest()


def check_small_stored(
    sent: int, stored: list[Path], label: str, reference: dict[str, bytes] | None = None
) -> dict[str, bytes]:
    """Every sent instance stored exactly once (storescp names files by SOP Instance UID);
    with ``reference`` (what the direct run stored) the dataset bytes must be identical to
    it. storescu drops group length elements, so the source files are not the reference.
    The stored datasets by file name."""
    got = {p.name: dataset_bytes(p) for p in stored}
    if len(got) != sent:
        raise BenchFailure(f"{label}: {len(got)} instances stored, {sent} sent")
    if reference is not None:
        if got.keys() != reference.keys():
            raise BenchFailure(f"{label}: stored SOP Instance UIDs differ from the direct run")
        bad = [name for name, data in got.items() if reference[name] != data]
        if bad:
            raise BenchFailure(f"{label}: {len(bad)} datasets differ from the direct run's")
    return got


def _nodelay(event: evt.Event) -> None:
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def echo_series(port: int, called: str, count: int, warmup: int = 10) -> list[float]:
    """``warmup`` + ``count`` C-ECHOs on ONE association with a pynetdicom SCU (TCP_NODELAY
    on, like DCMTK with TCP_NODELAY=1); the round trip of each of the last ``count``
    send_c_echo calls in seconds. Any status but Success is a failure."""
    ae = AE(ae_title="BENCHSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate(
        LOOPBACK, port, ae_title=called, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)]
    )
    if not assoc.is_established:
        raise BenchFailure(f"C-ECHO: association to {called} on port {port} not established")
    times = []
    try:
        for i in range(warmup + count):
            started = time.perf_counter()
            rsp = assoc.send_c_echo()
            elapsed = time.perf_counter() - started
            status = int(rsp.Status) if "Status" in rsp else None
            if status != 0x0000:
                raise BenchFailure(f"C-ECHO {i} to {called}: status {status!r}")
            if i >= warmup:
                times.append(elapsed)
    finally:
        if assoc.is_established:
            assoc.release()
    return times


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, q in (0, 100]."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def median(values: list[float]) -> float:
    return statistics.median(values)


class PhaseMonitor:
    """Watches, every ``interval`` s, how many bytes sit in the files of some directories
    (the edge agent's pynetdicom spool, the cloud agent's chunk spool, storescp's output) and
    records when each first reached the largest size it ever had: where a large transfer's
    time goes, without touching the agents."""

    def __init__(self, dirs: dict[str, Path], interval: float = 0.02):
        self.dirs = dirs
        self.interval = interval
        self.peak: dict[str, int] = dict.fromkeys(dirs, 0)
        self.first_byte: dict[str, float | None] = dict.fromkeys(dirs)
        self.full_at: dict[str, float | None] = dict.fromkeys(dirs)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="phase-monitor", daemon=True)
        self.started = 0.0

    def _size(self, directory: Path) -> int:
        total = 0
        with contextlib.suppress(OSError):
            for entry in os.scandir(directory):
                with contextlib.suppress(OSError):
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic() - self.started
            for name, directory in self.dirs.items():
                size = self._size(directory)
                if size and self.first_byte[name] is None:
                    self.first_byte[name] = now
                if size > self.peak[name]:
                    self.peak[name] = size
                    self.full_at[name] = now
            self._stop.wait(self.interval)

    def __enter__(self) -> PhaseMonitor:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.elapsed = time.monotonic() - self.started

    def summary(self) -> dict[str, dict[str, float | None]]:
        return {
            name: {
                "first_byte_s": self.first_byte[name],
                "complete_s": self.full_at[name],
                "peak_bytes": self.peak[name],
            }
            for name in self.dirs
        }


async def _nats_rtt(url: str, ca: Path, cert: Path, key: Path, count: int) -> list[float]:
    import nats

    # nats-py's TLS close makes asyncio warn "returning true from eof_received()"; noise.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    responder = await nats.connect(url, tls=ctx, name="bench-responder")
    requester = await nats.connect(url, tls=ctx, name="bench-requester")
    try:

        async def answer(msg: Any) -> None:
            await msg.respond(msg.data)

        await responder.subscribe("bench.rtt", cb=answer)
        await responder.flush()
        payload = b"x" * 200
        times = []
        for i in range(count + 10):
            started = time.perf_counter()
            await requester.request("bench.rtt", payload, timeout=5)
            if i >= 10:
                times.append(time.perf_counter() - started)
        return times
    finally:
        await requester.close()
        await responder.close()


def nats_rtt(url: str, ca: Path, cert: Path, key: Path, count: int) -> list[float]:
    """Request/reply round trips between two nats-py clients over the TLS server: the floor
    of what one relayed DIMSE message costs on the NATS hop."""
    return asyncio.run(_nats_rtt(url, ca, cert, key, count))
