"""Sink targets (docs/sinks.md): ``kind: filesystem`` and ``kind: dicomweb``, through two real
agents on a real TLS nats-server, DCMTK storescu / pynetdicom as the modality, DCMTK storescp
as the direct reference, Orthanc with its DICOMweb plugin as the STOW-RS server."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from tests.harness.agents import AgentProcess, nats_section
from tests.harness.dicom import DcmtkStoreSCP, dataset_bytes, pynetdicom_store, storescu
from tests.harness.nats import NatsServer
from tests.harness.pki import TestPKI
from tests.harness.ports import free_port
from tests.test_relay_store import TEST_FILES, corpus, storescu_options

from dimse_relay.sinks import safe_component

CT = TEST_FILES / "CT_small.dcm"


class EventCollector:
    """A nats-py subscriber (test PKI client certificate) on its own loop and thread."""

    def __init__(self, url: str, pki: TestPKI, subject: str):
        self.url = url
        self.pki = pki
        self.subject = subject
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.nc: Any = None

    def start(self) -> EventCollector:
        import nats

        self.thread.start()
        cert = self.pki.client("tester")
        ctx = ssl.create_default_context(cafile=str(self.pki.ca))
        ctx.load_cert_chain(str(cert.cert), str(cert.key))

        async def connect() -> None:
            self.nc = await nats.connect(self.url, tls=ctx)

            async def on_msg(msg: Any) -> None:
                self.messages.append((msg.subject, json.loads(msg.data)))

            await self.nc.subscribe(self.subject, cb=on_msg)
            await self.nc.flush()

        asyncio.run_coroutine_threadsafe(connect(), self.loop).result(10)
        return self

    def wait_for(self, count: int, timeout: float = 10.0) -> list[tuple[str, dict[str, Any]]]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.messages)

    def stop(self) -> None:
        if self.nc is not None:
            asyncio.run_coroutine_threadsafe(self.nc.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@dataclass
class FsRelay:
    edge: AgentProcess
    cloud: AgentProcess
    direct: DcmtkStoreSCP
    port: int
    roots: dict[str, Path]  # target AE title -> root
    events: EventCollector


FS_TARGETS = {
    "FSARCHIVE": {"duplicates": "keep_both"},
    "FSREJECT": {"duplicates": "reject"},
    "FSFULL": {"duplicates": "keep_both"},  # root is a 2 MiB tmpfs
}


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], check=False)


@pytest.fixture(scope="module")
def fs_relay(
    tmp_path_factory: pytest.TempPathFactory, pki: TestPKI, nats_server: NatsServer
) -> Iterator[FsRelay]:
    work = tmp_path_factory.mktemp("sinks-fs")
    roots = {aet: work / "sink" / aet.lower() for aet in FS_TARGETS}
    _mount_tmpfs(roots["FSFULL"], "2m")
    agents: list[AgentProcess] = []
    events = EventCollector(nats_server.url, pki, "dimse.v1.events.>")
    direct = DcmtkStoreSCP(work / "direct", "FSARCHIVE")
    try:
        events.start()
        direct.start()
        targets = [
            {
                "ae_title": aet,
                "kind": "filesystem",
                "filesystem": {"root": str(roots[aet]), **opts},
            }
            for aet, opts in FS_TARGETS.items()
        ]
        cloud = AgentProcess(
            "cloud-fs",
            work / "cloud",
            {"nats": nats_section(nats_server.url, pki, pki.client("cloud")), "targets": targets},
        ).start()
        agents.append(cloud)
        port = free_port()
        edge = AgentProcess(
            "edge-fs",
            work / "edge",
            {
                "nats": nats_section(nats_server.url, pki, pki.client("edge")),
                "listeners": [
                    {"ae_title": a, "bind": "127.0.0.1", "port": port} for a in FS_TARGETS
                ],
            },
        ).start()
        agents.append(edge)
        yield FsRelay(edge, cloud, direct, port, roots, events)
    finally:
        for agent in agents:
            agent.stop()
        direct.stop()
        events.stop()
        _umount(roots["FSFULL"])


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _clear(root: Path) -> None:
    for child in root.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


def _layout_path(root: Path, path: Path) -> Path:
    """Where the default layout puts ``path``; missing or odd values as docs/sinks.md says."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    study, series, sop = (
        safe_component(ds.get(k))
        for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    )
    return root / study / series / f"{sop}.dcm"


def _study(tmp: Path, count: int, series: int = 2) -> list[Path]:
    """``count`` CT instances of one new study in ``series`` series."""
    src = pydicom.dcmread(CT)
    src.StudyInstanceUID = generate_uid()
    series_uids = [generate_uid() for _ in range(series)]
    out = []
    for i in range(count):
        src.SeriesInstanceUID = series_uids[i % series]
        src.SOPInstanceUID = generate_uid()
        src.InstanceNumber = i + 1
        src.file_meta.MediaStorageSOPInstanceUID = src.SOPInstanceUID
        path = tmp / f"ct{i:03d}.dcm"
        src.save_as(path)
        out.append(path)
    return out


# -- filesystem --------------------------------------------------------------------------------
def test_filesystem_pydicom_corpus_bit_exact_in_layout(fs_relay: FsRelay) -> None:
    """Every pydicom test file storescu can send directly to storescp is stored by the
    filesystem sink as a valid Part 10 file at {Study}/{Series}/{SOP}.dcm whose dataset bytes
    equal what storescp stores, in the transfer syntax storescp negotiated."""
    root = fs_relay.roots["FSARCHIVE"]
    stored = []
    syntaxes = set()
    for path, ts in corpus():
        fs_relay.direct.clear()
        _clear(root)
        opts = storescu_options(ts)
        direct = storescu(fs_relay.direct.port, [path], "FSARCHIVE", extra=opts)
        direct_files = fs_relay.direct.files()
        if direct.returncode != 0 or direct.statuses() != ["Success"] or len(direct_files) != 1:
            continue
        through = storescu(fs_relay.port, [path], "FSARCHIVE", extra=opts)
        assert through.statuses() == ["Success"], f"{path.name}: {through.output[-2000:]}"
        files = _files(root)
        expected = _layout_path(root, direct_files[0])
        assert files == [expected], path.name
        assert dataset_bytes(files[0]) == dataset_bytes(direct_files[0]), path.name
        meta = pydicom.dcmread(files[0], stop_before_pixels=True).file_meta
        direct_meta = pydicom.dcmread(direct_files[0], stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == direct_meta.TransferSyntaxUID, path.name
        assert meta.MediaStorageSOPInstanceUID == direct_meta.MediaStorageSOPInstanceUID
        stored.append(path.name)
        syntaxes.add(ts)
    assert len(stored) >= 60, stored
    assert len(syntaxes) >= 10, syntaxes


def test_filesystem_concurrent_writers_of_one_study(fs_relay: FsRelay, tmp_path: Path) -> None:
    """Four modalities send the instances of one study at once (same directories), and
    then all of them again at once (same files): every C-STORE succeeds, every instance is
    stored once with the right bytes, no temporary files remain."""
    root = fs_relay.roots["FSARCHIVE"]
    _clear(root)
    files = _study(tmp_path, 60, series=3)
    parts = [files[i::4] for i in range(4)]

    def send_all(groups: list[list[Path]]) -> list[Any]:
        results: list[Any] = [None] * len(groups)

        def run(i: int) -> None:
            results[i] = storescu(fs_relay.port, groups[i], "FSARCHIVE", calling=f"MOD{i}")

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(groups))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    for result, group in zip(send_all(parts), parts, strict=True):
        assert result.statuses() == ["Success"] * len(group), result.output[-2000:]
    # the same 15 instances from every modality at once: duplicates of identical bytes
    for result in send_all([files[:15]] * 4):
        assert result.statuses() == ["Success"] * 15, result.output[-2000:]
    stored = _files(root)
    assert len(stored) == 60
    assert not [p for p in root.rglob(".*")]
    # what the same SCU stores at storescp directly (storescu may transcode on the wire)
    fs_relay.direct.clear()
    assert storescu(fs_relay.direct.port, files, "FSARCHIVE").statuses() == ["Success"] * 60
    direct = fs_relay.direct.files()
    assert len(direct) == 60
    for path in direct:
        assert dataset_bytes(_layout_path(root, path)) == dataset_bytes(path)
    series_dirs = {p.parent for p in stored}
    assert len(series_dirs) == 3


def test_filesystem_disk_full_gives_out_of_resources_and_no_partial_file(
    fs_relay: FsRelay, tmp_path: Path
) -> None:
    """The sink's file system (a 2 MiB tmpfs) cannot hold a 3 MiB instance: 0xA700, nothing
    left behind; a small instance afterwards is stored."""
    from tests.harness.dicom import make_large_instance

    root = fs_relay.roots["FSFULL"]
    big = make_large_instance(tmp_path / "big.dcm", 4 * 1024 * 1024)
    assert big.stat().st_size > 2 * 1024 * 1024
    assert pynetdicom_store(fs_relay.port, "FSFULL", [big]) == [0xA700]
    assert _files(root) == []
    assert pynetdicom_store(fs_relay.port, "FSFULL", [CT]) == [0x0000]
    (stored,) = _files(root)
    assert dataset_bytes(stored) == dataset_bytes(CT)
    stored.unlink()


def _changed_copy(tmp: Path, name: str) -> Path:
    """CT_small with the same UIDs but other content."""
    ds = pydicom.dcmread(CT)
    ds.InstitutionName = "Somewhere Else"
    out = tmp / name
    ds.save_as(out)
    return out


def test_filesystem_duplicate_policies(fs_relay: FsRelay, tmp_path: Path) -> None:
    changed = _changed_copy(tmp_path, "changed.dcm")
    # keep_both: same bytes again -> no-op; different bytes -> a second, content-named file
    root = fs_relay.roots["FSARCHIVE"]
    _clear(root)
    assert pynetdicom_store(fs_relay.port, "FSARCHIVE", [CT, CT]) == [0, 0]
    assert len(_files(root)) == 1
    assert pynetdicom_store(fs_relay.port, "FSARCHIVE", [changed, changed]) == [0, 0]
    first, *others = _files(root)
    main = _layout_path(root, CT)
    assert main in _files(root)
    (other,) = [p for p in _files(root) if p != main]
    assert other.parent == main.parent
    assert other.name.startswith(main.stem + ".") and other.suffix == ".dcm"
    assert dataset_bytes(main) == dataset_bytes(CT)
    assert dataset_bytes(other) == dataset_bytes(changed)
    del first, others
    # reject: different bytes -> 0x0111 Duplicate SOP Instance, the stored file unchanged
    root = fs_relay.roots["FSREJECT"]
    _clear(root)
    assert pynetdicom_store(fs_relay.port, "FSREJECT", [CT, CT, changed]) == [0, 0, 0x0111]
    (only,) = _files(root)
    assert dataset_bytes(only) == dataset_bytes(CT)


def test_filesystem_event_per_stored_instance(fs_relay: FsRelay, tmp_path: Path) -> None:
    """One NATS event per stored instance on dimse.v1.events.<AET>.stored: path, UIDs, size
    and sha256 of the file, duplicate flag; no patient data."""
    root = fs_relay.roots["FSARCHIVE"]
    _clear(root)
    files = _study(tmp_path, 3, series=1)
    fs_relay.events.messages.clear()
    assert pynetdicom_store(fs_relay.port, "FSARCHIVE", [*files, files[0]]) == [0] * 4
    msgs = fs_relay.events.wait_for(4)
    assert len(msgs) == 4
    assert {s for s, _ in msgs} == {"dimse.v1.events.FSARCHIVE.stored"}
    by_uid: dict[str, list[dict[str, Any]]] = {}
    for _, ev in msgs:
        by_uid.setdefault(ev["sop_instance_uid"], []).append(ev)
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        evs = by_uid[str(ds.SOPInstanceUID)]
        assert [e["duplicate"] for e in evs] == ([False, True] if path == files[0] else [False])
        ev = evs[0]
        stored = Path(ev["path"])
        assert stored == _layout_path(root, path)
        assert ev["relative_path"] == str(stored.relative_to(root))
        assert ev["size"] == stored.stat().st_size
        assert ev["sha256"] == hashlib.sha256(stored.read_bytes()).hexdigest()
        assert ev["sop_class_uid"] == str(ds.SOPClassUID)
        assert ev["target"] == "FSARCHIVE" and ev["calling_ae_title"] == "PYSCU"
        text = json.dumps(ev)
        assert str(ds.PatientName) not in text and str(ds.PatientID) not in text


def test_filesystem_negotiation_echo_and_rejected_services(fs_relay: FsRelay) -> None:
    """The agent negotiates for the sink: storage contexts accepted in the SCU's first
    proposed syntax, Verification accepted (C-ECHO Success), query/retrieve rejected."""
    from pynetdicom import AE

    ae = AE(ae_title="SCU")
    ae.add_requested_context(
        "1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.1"]
    )
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", ["1.2.840.10008.1.2"])
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.2.2.1")  # Study Root Q/R Find
    assoc = ae.associate("127.0.0.1", fs_relay.port, ae_title="FSARCHIVE")
    assert assoc.is_established
    try:
        accepted = sorted(
            (c.abstract_syntax, c.transfer_syntax[0]) for c in assoc.accepted_contexts
        )
        assert accepted == [
            ("1.2.840.10008.1.1", "1.2.840.10008.1.2"),
            ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.4.50"),
            ("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2"),
        ]
        assert [c.abstract_syntax for c in assoc.rejected_contexts] == [
            "1.2.840.10008.5.1.4.1.2.2.1"
        ]
        assert int(assoc.send_c_echo().Status) == 0
    finally:
        assoc.release()
    for path in fs_relay.roots["FSARCHIVE"].rglob("*"):
        assert os.access(path, os.R_OK)


# -- configuration -----------------------------------------------------------------------------
def _target_errors(target: dict[str, Any], tmp: Path) -> list[str]:
    from dimse_relay.config import ConfigError, parse_config

    raw = {"nats": {"servers": ["nats://x:4222"], "allow_insecure": True}, "targets": [target]}
    try:
        parse_config(raw, environ={})
    except ConfigError as exc:
        return exc.errors
    return []


def test_target_kind_configuration(tmp_path: Path) -> None:
    fs = {"root": str(tmp_path)}
    assert _target_errors({"ae_title": "A", "host": "h", "port": 104}, tmp_path) == []
    assert _target_errors({"ae_title": "A", "kind": "filesystem", "filesystem": fs}, tmp_path) == []
    assert _target_errors({"ae_title": "A", "port": 104}, tmp_path) == [
        "targets.0: kind scp needs host"
    ]
    assert _target_errors({"ae_title": "A", "kind": "filesystem"}, tmp_path) == [
        "targets.0: kind filesystem needs a filesystem section"
    ]
    assert _target_errors(
        {"ae_title": "A", "kind": "filesystem", "host": "h", "filesystem": fs}, tmp_path
    ) == ["targets.0: host: only for kind scp (this is filesystem)"]
    bad_layouts = {
        "{StudyInstanceUID}/x.dcm": "must contain {SOPInstanceUID}",
        "{PatientName}/{SOPInstanceUID}": "unknown field {PatientName}",
        "../{SOPInstanceUID}": "relative path",
        "/abs/{SOPInstanceUID}": "relative path",
        "{SOPInstanceUID!r}": "no format spec",
    }
    for layout, why in bad_layouts.items():
        errors = _target_errors(
            {"ae_title": "A", "kind": "filesystem", "filesystem": {**fs, "layout": layout}},
            tmp_path,
        )
        assert len(errors) == 1 and why in errors[0], (layout, errors)
    errors = _target_errors(
        {"ae_title": "A", "kind": "filesystem", "filesystem": {"root": "rel/dir"}}, tmp_path
    )
    assert errors == ["targets.0.filesystem.root: root must be an absolute path: rel/dir"]


def test_safe_component() -> None:
    assert safe_component("1.2.840.10008.1.2") == "1.2.840.10008.1.2"
    assert safe_component("1.2.3 \x00") == "1.2.3"
    assert safe_component("../../etc/passwd") == "_._.._etc_passwd"
    assert safe_component("..") == "_."
    assert safe_component("") == "unknown"
    assert safe_component(None) == "unknown"
    assert safe_component("MR NORTH/1") == "MR_NORTH_1"
    assert len(safe_component("9" * 200)) == 64
