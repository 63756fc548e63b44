"""Sink targets (docs/sinks.md): ``kind: filesystem`` and ``kind: dicomweb``, through two real
agents on a real TLS nats-server, DCMTK storescu / pynetdicom as the modality, DCMTK storescp
as the direct reference, Orthanc with its DICOMweb plugin as the STOW-RS server."""

from __future__ import annotations

import asyncio
import contextlib
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


# -- DICOMweb ----------------------------------------------------------------------------------
def _split_multipart(content_type: str, body: bytes) -> list[bytes]:
    """The parts of a multipart/related body (the test's own minimal parser)."""
    boundary = content_type.split("boundary=", 1)[1].split(";")[0].strip().strip('"').encode()
    chunks = body.split(b"--" + boundary)
    assert chunks[0] == b"" and chunks[-1] == b"--\r\n", (chunks[0][:50], chunks[-1][:50])
    parts = []
    for chunk in chunks[1:-1]:
        head, _, payload = chunk.partition(b"\r\n\r\n")
        assert b"Content-Type: application/dicom" in head
        assert payload.endswith(b"\r\n")
        parts.append(payload[:-2])
    return parts


@dataclass
class StowRequest:
    path: str
    headers: dict[str, str]
    parts: list[bytes]
    at: float

    def uids(self) -> list[str]:
        from io import BytesIO

        return [str(pydicom.dcmread(BytesIO(p)).SOPInstanceUID) for p in self.parts]


def stow_json(referenced: list[str], failed: dict[str, int] | None = None) -> bytes:
    doc: dict[str, Any] = {}
    if referenced:
        doc["00081199"] = {
            "vr": "SQ",
            "Value": [{"00081155": {"vr": "UI", "Value": [u]}} for u in referenced],
        }
    if failed:
        doc["00081198"] = {
            "vr": "SQ",
            "Value": [
                {"00081155": {"vr": "UI", "Value": [u]}, "00081197": {"vr": "US", "Value": [r]}}
                for u, r in failed.items()
            ],
        }
    return json.dumps(doc).encode()


class FakeStowServer:
    """A small STOW-RS server whose answers a test scripts: ``respond(request, index)``
    returns (HTTP status, body, extra headers). Every request is recorded."""

    def __init__(self, tls: tuple[Path, Path] | None = None):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        outer = self
        self.requests: list[StowRequest] = []
        self.respond: Any = lambda req, i: (200, stow_json(req.uids()), {})
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_OPTIONS(self) -> None:
                self._reply(200, b"", {})

            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                body = self.rfile.read(length)
                req = StowRequest(
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    _split_multipart(self.headers["Content-Type"], body),
                    time.monotonic(),
                )
                with outer.lock:
                    outer.requests.append(req)
                    index = len(outer.requests) - 1
                code, payload, extra = outer.respond(req, index)
                self._reply(code, payload, extra)

            def _reply(self, code: int, payload: bytes, extra: dict[str, str]) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(payload)))
                for k, v in extra.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.httpd.daemon_threads = True
        self.scheme = "http"
        if tls is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://localhost:{self.httpd.server_address[1]}/dicom-web"

    def start(self) -> FakeStowServer:
        self.thread.start()
        return self

    def reset(self, respond: Any = None) -> None:
        with self.lock:
            self.requests.clear()
        self.respond = respond or (lambda req, i: (200, stow_json(req.uids()), {}))

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class WebRelay:
    edge: AgentProcess
    cloud: AgentProcess
    port: int
    orthanc: Any
    fake: FakeStowServer
    fake_tls: FakeStowServer
    direct: DcmtkStoreSCP


@pytest.fixture(scope="module")
def web_relay(
    tmp_path_factory: pytest.TempPathFactory, pki: TestPKI, nats_server: NatsServer
) -> Iterator[WebRelay]:
    from tests.harness.orthanc import Orthanc

    work = tmp_path_factory.mktemp("sinks-web")
    secrets = work / "secrets"
    secrets.mkdir()
    (secrets / "token").write_text("s3cret-token\n")
    (secrets / "password").write_text("pa55\n")
    orthanc = Orthanc(work / "orthanc", dicomweb=True)
    fake = FakeStowServer()
    fake_tls = FakeStowServer(tls=(pki.server.cert, pki.server.key))
    direct = DcmtkStoreSCP(work / "direct", "ORTHANCWEB")
    agents: list[AgentProcess] = []
    try:
        orthanc.start()
        fake.start()
        fake_tls.start()
        direct.start()
        fast = {"max_time_s": 6, "initial_backoff_s": 0.2, "max_backoff_s": 1}

        def web(aet: str, **cfg: Any) -> dict[str, Any]:
            return {"ae_title": aet, "kind": "dicomweb", "dicomweb": cfg}

        targets = [
            web("ORTHANCWEB", url=orthanc.dicomweb_url),
            web("FAKEWEB", url=fake.url, retry=fast),
            web(
                "BEARERWEB",
                url=fake.url,
                auth={"type": "bearer", "token_file": str(secrets / "token")},
            ),
            web(
                "BASICWEB",
                url=fake.url,
                auth={
                    "type": "basic",
                    "username": "relay",
                    "password_file": str(secrets / "password"),
                },
            ),
            web(
                "BATCHWEB",
                url=fake.url,
                retry=fast,
                batch={"max_instances": 8, "max_bytes": 10_000_000, "linger_s": 0.5},
            ),
            web("DOWNWEB", url=f"http://127.0.0.1:{free_port()}/dicom-web", retry=fast),
            web("TLSWEB", url=fake_tls.url, ca_file=str(pki.ca)),
            web("UNTRUSTEDWEB", url=fake_tls.url, retry=fast),  # system CAs only
        ]
        cloud = AgentProcess(
            "cloud-web",
            work / "cloud",
            {
                "nats": nats_section(nats_server.url, pki, pki.client("cloud")),
                # DOWNWEB and UNTRUSTEDWEB are unreachable on purpose: reported, not waited for.
                "http": {"ready_requires_targets": False},
                "targets": targets,
            },
        ).start()
        agents.append(cloud)
        port = free_port()
        edge = AgentProcess(
            "edge-web",
            work / "edge",
            {
                "nats": nats_section(nats_server.url, pki, pki.client("edge")),
                "listeners": [
                    {"ae_title": t["ae_title"], "bind": "127.0.0.1", "port": port} for t in targets
                ],
            },
        ).start()
        agents.append(edge)
        yield WebRelay(edge, cloud, port, orthanc, fake, fake_tls, direct)
    finally:
        for agent in agents:
            agent.stop()
        for server in (fake, fake_tls):
            with contextlib.suppress(Exception):
                server.stop()
        direct.stop()
        orthanc.stop()


def _orthanc_instances(orthanc: Any) -> dict[str, str]:
    """SOP Instance UID -> Orthanc id of every instance Orthanc holds."""
    out = {}
    for oid in orthanc.rest("GET", "/instances"):
        tags = orthanc.rest("GET", f"/instances/{oid}/simplified-tags")
        out[str(tags["SOPInstanceUID"])] = str(oid)
    return out


def _sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_dicomweb_orthanc_corpus_and_study(web_relay: WebRelay, tmp_path: Path) -> None:
    """pydicom's test files (those storescu can send directly to storescp) and a generated
    study go through a dicomweb target to Orthanc's STOW-RS: each instance Orthanc accepts is
    held with exactly the dataset bytes storescp stores directly; each it refuses gets a
    failure status; Orthanc holds exactly the accepted instances."""
    orthanc = web_relay.orthanc
    for oid in orthanc.rest("GET", "/instances"):
        orthanc.rest("DELETE", f"/instances/{oid}")
    expected: dict[str, bytes] = {}
    refused = []
    accepted: list[str] = []
    for path, ts in corpus():
        web_relay.direct.clear()
        opts = storescu_options(ts)
        direct = storescu(web_relay.direct.port, [path], "ORTHANCWEB", extra=opts)
        direct_files = web_relay.direct.files()
        if direct.returncode != 0 or direct.statuses() != ["Success"] or len(direct_files) != 1:
            continue
        through = storescu(web_relay.port, [path], "ORTHANCWEB", extra=opts)
        (answer,) = through.statuses()
        uid = _sop_uid(direct_files[0])
        if answer != "Success":
            assert "Out of Resources" not in answer, f"{path.name}: {through.output[-1500:]}"
            refused.append((path.name, answer))
            continue
        held = _orthanc_instances(orthanc)
        assert uid in held, path.name
        got = orthanc.instance_file(held[uid])
        got_path = tmp_path / "got.dcm"
        got_path.write_bytes(got)
        assert dataset_bytes(got_path) == dataset_bytes(direct_files[0]), path.name
        expected[uid] = got
        accepted.append(path.name)
    # the generated study, on one association
    files = _study(tmp_path, 20, series=2)
    web_relay.direct.clear()
    assert storescu(web_relay.direct.port, files, "ORTHANCWEB").statuses() == ["Success"] * 20
    result = storescu(web_relay.port, files, "ORTHANCWEB")
    assert result.statuses() == ["Success"] * 20, result.output[-2000:]
    held = _orthanc_instances(orthanc)
    for direct_file in web_relay.direct.files():
        uid = _sop_uid(direct_file)
        got_path = tmp_path / "got.dcm"
        got_path.write_bytes(orthanc.instance_file(held[uid]))
        assert dataset_bytes(got_path) == dataset_bytes(direct_file)
        expected[uid] = b""
    assert set(held) == set(expected), (sorted(set(held) ^ set(expected)), refused)
    # pydicom 3.0 ships 66 files storescu can send (many share a SOP Instance UID); Orthanc
    # refuses a few it cannot decode (JPEG-LS near-lossless): 0xCxxx, never 0xA700.
    assert len(accepted) >= 55 and len(refused) <= 10, (accepted, refused)
    assert len(expected) >= 20 + 30


def test_dicomweb_request_body_streams_part10_and_auth(web_relay: WebRelay) -> None:
    """One instance per request (the default), multipart/related; type=application/dicom,
    with Content-Length; the part is the Part 10 file with the SCU's dataset bytes; bearer
    and basic credentials come from their secret files."""
    fake = web_relay.fake
    for aet, auth in (
        ("FAKEWEB", None),
        ("BEARERWEB", "Bearer s3cret-token"),
        ("BASICWEB", "Basic cmVsYXk6cGE1NQ=="),
    ):
        fake.reset()
        assert pynetdicom_store(web_relay.port, aet, [CT, CT]) == [0, 0]
        assert len(fake.requests) == 2
        req = fake.requests[0]
        assert req.path == "/dicom-web/studies"
        assert req.headers["content-type"].startswith('multipart/related; type="application/dicom"')
        assert "transfer-encoding" not in req.headers
        assert req.headers.get("authorization") == auth
        (part,) = req.parts
        part_path = web_relay.direct.workdir / "part.dcm"
        part_path.write_bytes(part)
        assert dataset_bytes(part_path) == dataset_bytes(CT)  # pynetdicom sends it as it is
        assert pydicom.dcmread(part_path).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"


def test_dicomweb_retries_busy_server_with_backoff(web_relay: WebRelay) -> None:
    """503, 503, then 200: the C-STORE succeeds after two retries with growing waits; a 429
    with Retry-After is honoured."""
    fake = web_relay.fake
    retries_before = web_relay.cloud.metric("dimse_relay_sink_retries_total", kind="dicomweb")
    fake.reset(lambda req, i: (503, b"", {}) if i < 2 else (200, stow_json(req.uids()), {}))
    assert pynetdicom_store(web_relay.port, "FAKEWEB", [CT]) == [0]
    at = [r.at for r in fake.requests]
    assert len(at) == 3
    assert 0.09 <= at[1] - at[0] and at[2] - at[1] >= 0.19, at  # 0.2 s, then 0.4 s, +-50 %
    retries = web_relay.cloud.metric("dimse_relay_sink_retries_total", kind="dicomweb")
    assert retries == retries_before + 2
    fake.reset(
        lambda req, i: (429, b"", {"Retry-After": "1"}) if i == 0 else (200, stow_json([]), {})
    )
    assert pynetdicom_store(web_relay.port, "FAKEWEB", [CT]) == [0]
    assert fake.requests[1].at - fake.requests[0].at >= 0.95


def test_dicomweb_failures_map_to_documented_statuses(web_relay: WebRelay) -> None:
    fake = web_relay.fake
    uid = _sop_uid(CT)
    cases = [
        ((400, b"", {}), 0xC190),  # 0xC000 + HTTP status
        ((409, b"", {}), 0xC199),
        ((409, stow_json([], {uid: 0xA900}), {}), 0xA900),  # the instance's Failure Reason
        ((200, stow_json([], {uid: 0xC122}), {}), 0xC122),
        ((202, stow_json([], {uid: 0x0110}), {}), 0x0110),
        ((202, stow_json([uid]), {}), 0x0000),
        ((415, b"", {}), 0xC19F),
        ((401, b"", {}), 0xA700),  # credentials: retry later, not a data problem
        ((302, b"", {"Location": "http://elsewhere/"}), 0x0110),  # never followed
    ]
    for answer, expected in cases:
        fake.reset(lambda req, i, answer=answer: answer)
        assert pynetdicom_store(web_relay.port, "FAKEWEB", [CT]) == [expected], answer
        assert len(fake.requests) == 1, answer  # none of these is retried


def test_dicomweb_unavailable_server_gives_out_of_resources_in_bounded_time(
    web_relay: WebRelay,
) -> None:
    fake = web_relay.fake
    fake.reset(lambda req, i: (503, b"", {}))
    started = time.monotonic()
    assert pynetdicom_store(web_relay.port, "FAKEWEB", [CT]) == [0xA700]
    elapsed = time.monotonic() - started
    assert 4 <= elapsed <= 9, elapsed  # retry.max_time_s is 6
    assert len(fake.requests) >= 4
    started = time.monotonic()
    assert pynetdicom_store(web_relay.port, "DOWNWEB", [CT]) == [0xA700]
    assert time.monotonic() - started <= 9


def test_dicomweb_tls_verification(web_relay: WebRelay) -> None:
    """https with the configured CA file works; against a certificate no trusted CA signed
    the store fails with 0xA700 at once (not retried) and nothing reaches the server."""
    web_relay.fake_tls.reset()
    assert pynetdicom_store(web_relay.port, "TLSWEB", [CT]) == [0]
    assert len(web_relay.fake_tls.requests) == 1
    web_relay.fake_tls.reset()
    started = time.monotonic()
    assert pynetdicom_store(web_relay.port, "UNTRUSTEDWEB", [CT]) == [0xA700]
    assert time.monotonic() - started < 3
    assert web_relay.fake_tls.requests == []


def test_dicomweb_echo_reflects_server_health(web_relay: WebRelay) -> None:
    from tests.harness.dicom import pynetdicom_echo

    assert pynetdicom_echo(web_relay.port, "ORTHANCWEB")[0] == 0
    assert pynetdicom_echo(web_relay.port, "DOWNWEB")[0] == 0x0110


def test_dicomweb_batches_concurrent_instances_of_a_study(
    web_relay: WebRelay, tmp_path: Path
) -> None:
    """Four modalities send instances of one study at the same time to a target with
    batching: they share one STOW-RS request, and each C-STORE gets its own instance's
    verdict (one failed in the response; in a second round the server refuses the whole
    batch and every instance is sent again on its own to learn its true status)."""
    fake = web_relay.fake
    files = _study(tmp_path, 4, series=1)
    uids = [_sop_uid(f) for f in files]
    bad = uids[2]

    def answer(req: StowRequest, i: int) -> tuple[int, bytes, dict[str, str]]:
        got = req.uids()
        ok = [u for u in got if u != bad]
        return (202 if bad in got else 200), stow_json(ok, {bad: 0xA900} if bad in got else {}), {}

    def send_concurrently() -> list[list[int | None]]:
        results: list[list[int | None]] = [[] for _ in files]

        def run(i: int) -> None:
            results[i] = pynetdicom_store(web_relay.port, "BATCHWEB", [files[i]], calling=f"M{i}")

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(files))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    fake.reset(answer)
    results = send_concurrently()
    assert results == [[0], [0], [0xA900], [0]]
    assert len(fake.requests) == 1 and sorted(fake.requests[0].uids()) == sorted(uids)

    def refuse_batches(req: StowRequest, i: int) -> tuple[int, bytes, dict[str, str]]:
        if len(req.parts) > 1:
            return 400, b"", {}
        return answer(req, i)

    fake.reset(refuse_batches)
    results = send_concurrently()
    assert results == [[0], [0], [0xA900], [0]]
    assert [len(r.parts) for r in fake.requests] == [4, 1, 1, 1, 1]


# -- Ansible: sink targets in the sites model --------------------------------------------------
def _filters() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "relay_filters", Path(__file__).resolve().parent.parent / "plugins/filter/relay.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SINK_SITES: dict[str, Any] = {
    "hospital": {
        "zone": "edge",
        "listeners": [
            {"ae_title": "ARCHIVE", "port": 11112},
            {"ae_title": "INGEST", "port": 11113},
        ],
    },
    "cloud": {
        "zone": "cloud",
        "targets": [
            {
                "ae_title": "ARCHIVE",
                "kind": "dicomweb",
                "dicomweb": {
                    "url": "https://archive.example.org/dicom-web",
                    "auth": {"type": "bearer", "token_file": "/etc/dimse-relay/secrets/archive"},
                },
            },
            {"ae_title": "INGEST", "kind": "filesystem", "filesystem": {"root": "/srv/ingest"}},
        ],
    },
}


def test_sites_model_accepts_sink_targets_and_permits_their_events() -> None:
    relay = _filters()
    assert relay.relay_sites_problems(SINK_SITES) == []
    perms = relay.relay_site_permissions(SINK_SITES, "cloud")
    assert "dimse.v1.events.INGEST.stored" in perms["publish"]["allow"]
    assert not any("events.ARCHIVE" in s for s in perms["publish"]["allow"])
    broken = json.loads(json.dumps(SINK_SITES))
    broken["cloud"]["targets"][1].pop("filesystem")
    broken["cloud"]["targets"][0]["kind"] = "s3"
    assert relay.relay_sites_problems(broken) == [
        "dimse_relay_sites.cloud.targets[0].kind: must be one of ['scp', 'filesystem', 'dicomweb']",
        "dimse_relay_sites.cloud.targets[1].filesystem: required for kind filesystem",
    ]


def test_relay_agent_role_renders_a_valid_sink_configuration(tmp_path: Path, pki: TestPKI) -> None:
    """The relay_agent role's templates, rendered by ansible for a cloud agent with sink
    targets: dimse-relay check-config accepts the configuration, the unit makes the
    filesystem root writable."""
    import sys

    import yaml

    repo = Path(__file__).resolve().parent.parent
    ansible = Path(sys.executable).parent / "ansible-playbook"
    conf = tmp_path / "etc"
    (conf / "tls").mkdir(parents=True)
    (conf / "secrets").mkdir()
    cloud = pki.client("cloud")  # check-config loads them as the agent would
    for name, source in (("ca.crt", pki.ca), ("agent.crt", cloud.cert), ("agent.key", cloud.key)):
        shutil.copyfile(source, conf / "tls" / name)
    (conf / "secrets" / "archive").write_text("token\n")
    sites = json.loads(json.dumps(SINK_SITES))
    sites["cloud"]["targets"][0]["dicomweb"]["auth"]["token_file"] = str(conf / "secrets/archive")
    playbook = tmp_path / "render.yml"
    role = repo / "roles/relay_agent"
    play = [
        {
            "hosts": "localhost",
            "connection": "local",
            "gather_facts": False,
            "vars_files": [str(role / "defaults/main.yml"), str(role / "vars/main.yml")],
            "tasks": [
                {
                    "name": "render",
                    "ansible.builtin.template": {
                        "src": str(role / f"templates/{src}"),
                        "dest": str(tmp_path / dest),
                        "mode": "0600",
                    },
                    "loop_control": {"loop_var": "unused"},
                }
                for src, dest in (
                    ("agent.yaml.j2", "agent.yaml"),
                    ("dimse-relay.service.j2", "unit"),
                )
            ],
        }
    ]
    playbook.write_text(yaml.safe_dump(play))
    extra = tmp_path / "extra.json"  # extra vars: above the role's defaults and vars
    extra.write_text(
        json.dumps(
            {
                "relay_agent_sites": sites,
                "relay_agent_site": "cloud",
                "relay_agent_config_dir": str(conf),
                "relay_agent_nats_servers": ["tls://nats:4222"],
            }
        )
    )
    env = dict(os.environ, ANSIBLE_NOCOLOR="1")
    env["PATH"] = f"{ansible.parent}:{env.get('PATH', '')}"
    result = subprocess.run(
        [str(ansible), "-i", "localhost,", "-e", f"@{extra}", str(playbook)],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    check = subprocess.run(
        [str(ansible.parent / "dimse-relay"), "check-config", str(tmp_path / "agent.yaml")],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr
    rendered = yaml.safe_load((tmp_path / "agent.yaml").read_text())
    assert [t["kind"] for t in rendered["targets"]] == ["dicomweb", "filesystem"]
    assert rendered["http"]["ready_requires_targets"] is True  # relay_agent_ready_requires_targets
    assert "ReadWritePaths=/srv/ingest\n" in (tmp_path / "unit").read_text()


def test_dicomweb_large_instance_is_streamed_from_the_spool_file(
    web_relay: WebRelay, tmp_path: Path
) -> None:
    """A 300 MB instance reaches the STOW-RS server complete (by digest of its part), and the
    cloud agent's peak RSS stays far below its size: the request body is read from the spool
    file as it is sent."""
    from tests.harness.dicom import make_large_instance

    big = make_large_instance(tmp_path / "big.dcm", 300 * 1024 * 1024)
    # 200 without a body (all stored), so the server does not parse 300 MB to answer; a
    # target with the default retry budget (40 s) for the whole upload
    web_relay.fake.reset(lambda req, i: (200, b"", {}))
    result = storescu(web_relay.port, [big], "BEARERWEB", timeout=300)
    assert result.statuses() == ["Success"], result.output[-2000:]
    (req,) = web_relay.fake.requests
    (part,) = req.parts
    part_path = tmp_path / "part.dcm"
    part_path.write_bytes(part)
    del req, part
    web_relay.fake.reset()
    assert (
        hashlib.sha256(dataset_bytes(part_path)).digest()
        == hashlib.sha256(dataset_bytes(big)).digest()
    )
    rss_mib = web_relay.cloud.peak_rss_kib() / 1024
    assert rss_mib < 200, f"cloud agent peak RSS {rss_mib:.0f} MiB"


def test_site_permissions_let_a_filesystem_target_publish_its_events(
    tmp_path: Path, pki: TestPKI
) -> None:
    """With the NATS permissions the collection renders per site (verify_and_map), a relayed
    C-STORE reaches a filesystem target, which may publish its stored event."""
    relay = _filters()
    root = tmp_path / "ingest"
    sites = {
        "hospital": {"zone": "edge", "listeners": [{"ae_title": "INGEST", "port": 1}]},
        "cloud": {
            "zone": "cloud",
            "targets": [
                {"ae_title": "INGEST", "kind": "filesystem", "filesystem": {"root": str(root)}}
            ],
        },
    }
    users = [
        {
            "user": "CN=edge,O=dimse-relay tests",
            "permissions": relay.relay_site_permissions(sites, "hospital"),
        },
        {
            "user": "CN=cloud,O=dimse-relay tests",
            "permissions": relay.relay_site_permissions(sites, "cloud"),
        },
        {
            "user": "CN=tester,O=dimse-relay tests",
            "permissions": {"subscribe": {"allow": ["dimse.v1.events.>"]}},
        },
    ]
    server = NatsServer(tmp_path / "nats", pki, users=users).start()
    events = EventCollector(server.url, pki, "dimse.v1.events.>")
    agents = []
    try:
        events.start()
        cloud = AgentProcess(
            "cloud-perm",
            tmp_path / "cloud",
            {
                "nats": nats_section(
                    server.url, pki, pki.client("cloud"), inbox_prefix="_INBOX.cloud"
                ),
                "targets": sites["cloud"]["targets"],
            },
        ).start()
        agents.append(cloud)
        port = free_port()
        edge = AgentProcess(
            "edge-perm",
            tmp_path / "edge",
            {
                "nats": nats_section(
                    server.url, pki, pki.client("edge"), inbox_prefix="_INBOX.hospital"
                ),
                "listeners": [{"ae_title": "INGEST", "bind": "127.0.0.1", "port": port}],
            },
        ).start()
        agents.append(edge)
        assert pynetdicom_store(port, "INGEST", [CT]) == [0]
        ((subject, event),) = events.wait_for(1)
        assert subject == "dimse.v1.events.INGEST.stored"
        assert Path(event["path"]).is_file()
        assert "ermissions" not in cloud.log_path.read_text()
    finally:
        for agent in agents:
            agent.stop()
        events.stop()
        server.stop()
