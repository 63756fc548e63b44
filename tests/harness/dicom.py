"""Real DICOM peers for tests: DCMTK storescp/storescu/echoscu processes and pynetdicom SCPs."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.filereader import read_preamble
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from . import ECHOSCU, LOOPBACK, STORESCP, STORESCU, require_executable, spawn
from .ports import free_port, wait_port

# DCMTK honours TCP_NODELAY from the environment; without it every small PDU waits for Nagle.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def dataset_bytes(path: Path) -> bytes:
    """The dataset of a Part 10 file: everything after the File Meta Information group."""
    with path.open("rb") as fh:
        read_preamble(fh, False)
        fh.seek(132)
        data = fh.read()
    # File meta group: (0002,0000) UL group length comes first, explicit VR little endian.
    assert data[:4] == b"\x02\x00\x00\x00", f"{path}: no file meta group length"
    group_length = int.from_bytes(data[8:12], "little")
    return data[12 + group_length :]


class DcmtkStoreSCP:
    """DCMTK storescp, bit-preserving (+B), accepting all transfer syntaxes (+xa)."""

    def __init__(self, workdir: Path, ae_title: str = "STORESCP", port: int | None = None):
        self.workdir = workdir
        self.ae_title = ae_title
        self.port = port or free_port()
        self.out = workdir / "stored"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "storescp.log"

    def start(self) -> DcmtkStoreSCP:
        require_executable(STORESCP)
        self.out.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = spawn(
            [
                str(STORESCP),
                "-v",
                "+B",
                "+xa",
                "-aet",
                self.ae_title,
                "-od",
                str(self.out),
                str(self.port),
            ],
            stdout=log,
            stderr=log,
            env=DCMTK_ENV,
        )
        wait_port(self.port, 10, proc=self.proc)
        return self

    def files(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_file())

    def clear(self) -> None:
        for p in self.files():
            p.unlink()

    def calling_aets(self) -> list[str]:
        text = self.log_path.read_text(errors="replace")
        return re.findall(r"Calling Application Name\s*:\s*(\S+)", text)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class ScuResult:
    returncode: int
    output: str
    elapsed: float

    def statuses(self) -> list[str]:
        """Store/echo response statuses as DCMTK prints them with -v, e.g. 'Success'."""
        return re.findall(r"Received (?:Store|Echo) Response \(([^)]*)\)", self.output)


def _run(cmd: list[str], timeout: float) -> ScuResult:
    started = time.monotonic()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=DCMTK_ENV, timeout=timeout, check=False
    )
    return ScuResult(proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started)


def storescu(
    port: int,
    files: list[Path],
    called: str,
    calling: str = "MODALITY",
    extra: list[str] | None = None,
    timeout: float = 300,
) -> ScuResult:
    """DCMTK storescu (by absolute path: the venv has a pynetdicom script of the same name)."""
    require_executable(STORESCU)
    cmd = [
        str(STORESCU),
        "-v",
        "-aet",
        calling,
        "-aec",
        called,
        *(extra or []),
        LOOPBACK,
        str(port),
        *map(str, files),
    ]
    return _run(cmd, timeout)


def echoscu(port: int, called: str, calling: str = "MODALITY", timeout: float = 60) -> ScuResult:
    require_executable(ECHOSCU)
    return _run([str(ECHOSCU), "-v", "-aet", calling, "-aec", called, LOOPBACK, str(port)], timeout)


def dcmtk_query(
    tool: str,
    port: int,
    called: str,
    calling: str,
    keys: list[str],
    extra: list[str] | None = None,
    timeout: float = 120,
) -> ScuResult:
    """DCMTK findscu/movescu/getscu (by absolute path) with -S (Study Root) and -k keys."""
    path = require_executable(Path("/usr/bin") / tool)
    cmd = [str(path), "-v", "-S", "-aet", calling, "-aec", called, *(extra or [])]
    for key in keys:
        cmd += ["-k", key]
    return _run([*cmd, LOOPBACK, str(port)], timeout)


@dataclass
class PynetdicomSCP:
    """A pynetdicom storage SCP in this process, storing raw dataset bytes as received.

    ``delay_s`` makes every C-STORE slow (a slow target); ``status`` what it answers.
    """

    ae_title: str = "PYSCP"
    port: int = field(default_factory=free_port)
    delay_s: float = 0.0
    status: int = 0x0000
    received: dict[str, bytes] = field(default_factory=dict)
    calling_aets: list[str] = field(default_factory=list)
    server: Any = None
    on_store: Callable[[Any], None] | None = None
    # (SOP class UID, transfer syntaxes) it supports; None: Verification and all storage.
    contexts: list[tuple[str, list[str]]] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _handle_store(self, event: evt.Event) -> int:
        if self.on_store is not None:
            self.on_store(event)
        if self.delay_s:
            time.sleep(self.delay_s)
        raw = bytes(event.request.DataSet.getvalue())
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            self.received[uid] = raw
        return self.status

    def _handle_assoc(self, event: evt.Event) -> None:
        self.calling_aets.append(str(event.assoc.requestor.ae_title).strip())

    def start(self) -> PynetdicomSCP:
        ae = AE(ae_title=self.ae_title)
        if self.contexts is not None:
            for uid, syntaxes in self.contexts:
                ae.add_supported_context(uid, syntaxes)
        else:
            ae.add_supported_context(Verification)
            for cx in AllStoragePresentationContexts:
                ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.server = ae.start_server(
            (LOOPBACK, self.port),
            block=False,
            evt_handlers=[
                (evt.EVT_C_STORE, self._handle_store),
                (evt.EVT_ACCEPTED, self._handle_assoc),
            ],
        )
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


def pynetdicom_store(
    port: int,
    called: str,
    files: list[Path],
    calling: str = "PYSCU",
    timeout: float = 60,
) -> list[int | None]:
    """Send files with a pynetdicom SCU on one association; the status of each (None: none)."""
    from pydicom import dcmread

    datasets = [dcmread(f) for f in files]
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for ds in datasets:
        ts = ds.file_meta.TransferSyntaxUID
        ae.add_requested_context(ds.SOPClassUID, [ts])
    assoc = ae.associate(LOOPBACK, port, ae_title=called)
    if not assoc.is_established:
        raise AssertionError(f"association to {called} not established")
    out: list[int | None] = []
    try:
        for ds in datasets:
            rsp = assoc.send_c_store(ds)
            out.append(int(rsp.Status) if "Status" in rsp else None)
    finally:
        assoc.release()
    return out


def pynetdicom_echo(port: int, called: str, calling: str = "PYSCU") -> tuple[int | None, float]:
    """One C-ECHO on a new association: the status and the round trip time of the echo."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOOPBACK, port, ae_title=called)
    if not assoc.is_established:
        raise AssertionError(f"association to {called} not established")
    try:
        started = time.monotonic()
        rsp = assoc.send_c_echo()
        elapsed = time.monotonic() - started
    finally:
        assoc.release()
    return (int(rsp.Status) if "Status" in rsp else None), elapsed


def small_instances(directory: Path, count: int) -> list[Path]:
    """``count`` copies of pydicom's CT_small.dcm, each with a fresh SOP Instance UID and
    without its Data Set Trailing Padding (which DCMTK's storescu drops), so what a target
    stores is byte for byte the dataset in the file."""
    import pydicom
    import pydicom.data
    from pydicom.uid import generate_uid

    directory.mkdir(parents=True, exist_ok=True)
    src = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    if 0xFFFCFFFC in src:
        del src[0xFFFCFFFC]
    files = []
    for i in range(count):
        src.SOPInstanceUID = generate_uid()
        src.file_meta.MediaStorageSOPInstanceUID = src.SOPInstanceUID
        out = directory / f"ct{i:04d}.dcm"
        src.save_as(out)
        files.append(out)
    return files


def make_large_instance(path: Path, size: int) -> Path:
    """A valid multi-frame Secondary Capture Part 10 file whose Pixel Data is ``size`` bytes
    (rounded down to whole 2 MiB frames), streamed to disk (never held in memory)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    frame = 1024 * 1024 * 2  # 1024 x 1024, 16 bit
    size = max(frame, size - size % frame)
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word SC
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "LARGE^INSTANCE"
    ds.PatientID = "LARGE01"
    ds.Modality = "OT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 1024
    ds.Columns = 1024
    ds.NumberOfFrames = size // frame
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    block = bytes(range(256)) * 4096  # 1 MiB of a recognisable pattern
    with path.open("ab") as fh:
        # (7FE0,0010) OW, explicit VR little endian, 4-byte length
        fh.write(b"\xe0\x7f\x10\x00OW\x00\x00" + size.to_bytes(4, "little"))
        left = size
        while left:
            n = min(left, len(block))
            fh.write(block[:n])
            left -= n
    return path


@dataclass
class PynetdicomFindSCP:
    """A pynetdicom Query/Retrieve Find SCP answering every query with ``matches`` pending
    responses, recording when it sent each one and whether it saw a C-CANCEL."""

    ae_title: str = "FINDSCP"
    port: int = field(default_factory=free_port)
    matches: int = 1000
    delay_s: float = 0.0
    sent_at: list[float] = field(default_factory=list)
    cancelled: bool = False
    queries: list[Any] = field(default_factory=list)
    message_ids: list[int] = field(default_factory=list)
    calling_aets: list[str] = field(default_factory=list)
    server: Any = None

    def _handle_find(self, event: evt.Event) -> Any:
        from pydicom.dataset import Dataset

        self.queries.append(event.identifier)
        self.message_ids.append(int(event.request.MessageID))
        self.calling_aets.append(str(event.assoc.requestor.ae_title).strip())
        self.sent_at.clear()
        for i in range(self.matches):
            if event.is_cancelled:
                self.cancelled = True
                yield 0xFE00, None
                return
            ds = Dataset()
            ds.SpecificCharacterSet = "ISO_IR 192"
            ds.QueryRetrieveLevel = "STUDY"
            ds.PatientName = f"Müller^Jürgen^{i}"
            ds.StudyInstanceUID = f"1.2.826.0.1.3680043.10.1484.{i + 1}"
            if self.delay_s:
                time.sleep(self.delay_s)
            self.sent_at.append(time.monotonic())
            yield 0xFF00, ds
        yield 0x0000, None

    def start(self) -> PynetdicomFindSCP:
        from pynetdicom import QueryRetrievePresentationContexts

        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(Verification)
        for cx in QueryRetrievePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context("1.2.840.10008.5.1.4.31")  # Modality Worklist Find
        self.server = ae.start_server(
            (LOOPBACK, self.port), block=False, evt_handlers=[(evt.EVT_C_FIND, self._handle_find)]
        )
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
