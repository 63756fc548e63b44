"""Workloads and checks for the benchmark: test instances, digests, a C-ECHO series."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import socket
import ssl
import statistics
import subprocess
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
from tests.harness import ECHOSCU, LOOPBACK  # noqa: E402
from tests.harness.dicom import dataset_bytes  # noqa: E402


class BenchFailure(RuntimeError):
    """A transfer failed or what arrived is not what was sent: the figures are worthless."""


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


# --- query/retrieve against Orthanc --------------------------------------------------------

FIND_PATIENT_ID = "FINDBENCH"
MOVE_PATIENT_ID = "MOVEBENCH"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def find_studies(count: int) -> dict[str, bytes]:
    """``count`` tiny Secondary Capture Part 10 files (8 x 8 pixels, under 1 KiB), each in a
    study of its own, all of one patient: what the C-FIND benchmark finds. By Study
    Instance UID."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    out = {}
    for i in range(count):
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.PatientName = "Find^Bench"
        ds.PatientID = FIND_PATIENT_ID
        ds.StudyDate = "20260101"
        ds.StudyTime = f"{i // 60 % 24:02d}{i % 60:02d}00"
        ds.StudyDescription = f"bench study {i:04d}"
        ds.AccessionNumber = f"FB{i:06d}"
        ds.Modality = "OT"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = 8
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = bytes(range(64))
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out[str(ds.StudyInstanceUID)] = buf.getvalue()
    return out


def move_study(count: int) -> tuple[str, dict[str, bytes]]:
    """One study (one series) of ``count`` copies of pydicom's CT_small.dcm; its Study
    Instance UID and the Part 10 files by SOP Instance UID."""
    src = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    src.StudyInstanceUID = generate_uid()
    src.SeriesInstanceUID = generate_uid()
    src.PatientID = MOVE_PATIENT_ID
    src.PatientName = "Move^Bench"
    out = {}
    for i in range(count):
        src.SOPInstanceUID = generate_uid()
        src.file_meta.MediaStorageSOPInstanceUID = src.SOPInstanceUID
        src.InstanceNumber = i + 1
        buf = io.BytesIO()
        src.save_as(buf)
        out[str(src.SOPInstanceUID)] = buf.getvalue()
    return str(src.StudyInstanceUID), out


def upload(post: Any, blobs: list[bytes], threads: int = 4) -> None:
    """POST every Part 10 file to Orthanc's /instances, ``threads`` at a time."""
    from concurrent.futures import ThreadPoolExecutor

    def one(blob: bytes) -> None:
        rsp = post("POST", "/instances", blob)
        if not isinstance(rsp, dict) or rsp.get("Status") not in ("Success", "AlreadyStored"):
            raise BenchFailure(f"Orthanc upload: {rsp!r}")

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, blobs))


def _qr_association(port: int, called: str, model: str, **kwargs: Any) -> Any:
    ae = AE(ae_title="BENCHSCU")
    ae.add_requested_context(model)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    assoc = ae.associate(
        LOOPBACK, port, ae_title=called, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)], **kwargs
    )
    if not assoc.is_established:
        raise BenchFailure(f"association to {called} on port {port} not established")
    return assoc


def find_studies_query() -> Any:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = FIND_PATIENT_ID
    for keyword in (
        "StudyInstanceUID",
        "PatientName",
        "StudyDate",
        "StudyTime",
        "StudyDescription",
        "AccessionNumber",
    ):
        setattr(ds, keyword, "")
    return ds


def c_find(port: int, called: str) -> tuple[float, float, int, dict[str, Any]]:
    """One Study Root C-FIND for the benchmark patient's studies with a pynetdicom SCU (an
    association already open, TCP_NODELAY on): the seconds from the request to the final
    response, to the first pending one, the final status and the identifiers by Study
    Instance UID."""
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelFind as FIND,
    )

    assoc = _qr_association(port, called, FIND)
    found: dict[str, Any] = {}
    first = None
    final = None
    try:
        started = time.perf_counter()
        for status, identifier in assoc.send_c_find(find_studies_query(), FIND):
            code = int(status.Status) if "Status" in status else None
            if code in (0xFF00, 0xFF01):
                if first is None:
                    first = time.perf_counter() - started
                uid = str(identifier.StudyInstanceUID)
                if uid in found:
                    raise BenchFailure(f"C-FIND to {called}: study {uid} twice")
                found[uid] = identifier
            else:
                final = code
        elapsed = time.perf_counter() - started
    finally:
        if assoc.is_established:
            assoc.release()
    if final is None:
        raise BenchFailure(f"C-FIND to {called}: no final response")
    return elapsed, first or elapsed, final, found


def c_move(port: int, called: str, destination: str, study_uid: str) -> tuple[float, Any]:
    """One Study Root C-MOVE of a study with a pynetdicom SCU: the seconds from the request
    to the final response and the final response."""
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelMove as MOVE,
    )

    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    assoc = _qr_association(port, called, MOVE)
    final = None
    try:
        started = time.perf_counter()
        for status, _ in assoc.send_c_move(ds, destination, MOVE):
            if "Status" in status and int(status.Status) not in (0xFF00, 0xFF01):
                final = status
        elapsed = time.perf_counter() - started
    finally:
        if assoc.is_established:
            assoc.release()
    if final is None:
        raise BenchFailure(f"C-MOVE via {called}: no final response")
    return elapsed, final


def c_get_seconds(port: int, called: str, study_uid: str, count: int) -> float:
    """One Study Root C-GET of a study with a pynetdicom SCU storing nothing to disk: the
    seconds to the final response (what the far agent's leg of a relayed C-MOVE costs at
    least)."""
    from pydicom.dataset import Dataset
    from pynetdicom import StoragePresentationContexts, build_role
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelGet as GET,
    )

    got: list[int] = []

    def on_store(event: evt.Event) -> int:
        got.append(len(event.request.DataSet.getvalue()))
        return 0x0000

    ct = [cx for cx in StoragePresentationContexts if cx.abstract_syntax == CT_IMAGE_STORAGE]
    ae = AE(ae_title="BENCHSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    ae.add_requested_context(GET)
    for cx in ct:
        ae.add_requested_context(cx.abstract_syntax)
    roles = [build_role(cx.abstract_syntax, scp_role=True) for cx in ct]
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    assoc = ae.associate(
        LOOPBACK,
        port,
        ae_title=called,
        ext_neg=roles,
        evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay), (evt.EVT_C_STORE, on_store)],
    )
    if not assoc.is_established:
        raise BenchFailure(f"C-GET association to {called} not established")
    final = None
    try:
        started = time.perf_counter()
        for status, _ in assoc.send_c_get(ds, GET):
            final = int(status.Status) if "Status" in status else None
        elapsed = time.perf_counter() - started
    finally:
        if assoc.is_established:
            assoc.release()
    if final != 0x0000 or len(got) != count:
        raise BenchFailure(f"C-GET from {called}: final {final!r}, {len(got)} of {count}")
    return elapsed


def event_driven_echo_series(port: int, called: str, count: int) -> list[float]:
    """echo_series from a fresh Python process whose pynetdicom waits for events instead of
    polling (only the relay's reactor.py is installed there, none of its codec changes): an
    SCU that adds no polling delay of its own and burns no CPU while it waits. Plain
    pynetdicom's 1 ms polling loops add about 2 ms to every round trip, direct or relayed,
    and on a small host take CPU from whatever it is measuring."""
    out = subprocess.run(
        [sys.executable, __file__, "echo-series", str(port), called, str(count)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if out.returncode != 0:
        raise BenchFailure(f"event-driven C-ECHO series to {called}: {out.stderr[-2000:]}")
    return [float(t) for t in json.loads(out.stdout)]


def echoscu_mean_rtt(port: int, called: str, count: int, rounds: int = 3) -> float:
    """Mean C-ECHO round trip of DCMTK's echoscu in seconds: one association with
    ``count`` + 1 echoes against one with a single echo (best of ``rounds`` each), the
    difference divided by ``count``, so association set-up and process start cancel out."""

    def best(n: int) -> float:
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            out = subprocess.run(
                [str(ECHOSCU), "--repeat", str(n), "-aec", called, LOOPBACK, str(port)],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
                env={**os.environ, "TCP_NODELAY": "1"},  # as for storescu
            )
            times.append(time.perf_counter() - started)
            if out.returncode != 0:
                raise BenchFailure(f"echoscu --repeat {n} to {called}: rc={out.returncode}")
        return min(times)

    return (best(count + 1) - best(1)) / count


if __name__ == "__main__" and sys.argv[1:2] == ["echo-series"]:
    from dimse_relay import reactor

    reactor.install(0.0002)
    _port, _called, _count = int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    print(json.dumps(echo_series(_port, _called, _count)))
