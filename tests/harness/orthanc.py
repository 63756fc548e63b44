"""Orthanc (Debian package) as a real PACS: C-FIND/C-GET/C-MOVE SCP, loaded over REST."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from . import require_executable, spawn
from .ports import free_port, wait_port

ORTHANC = Path("/usr/sbin/Orthanc")
# Debian's orthanc-dicomweb (scripts/bootstrap.sh): STOW-RS/QIDO-RS/WADO-RS under /dicom-web/.
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc:
    def __init__(
        self,
        workdir: Path,
        ae_title: str = "ORTHANC",
        modalities: dict[str, Any] | None = None,
        dicomweb: bool = False,
    ):
        self.workdir = workdir
        self.ae_title = ae_title
        self.port = free_port()
        self.http_port = free_port()
        self.modalities = modalities or {}
        self.dicomweb = dicomweb
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        require_executable(ORTHANC)
        if self.dicomweb:
            require_executable(DICOMWEB_PLUGIN)
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "dimse-relay-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "UnknownSopClassAccepted": True,
            "DicomModalities": self.modalities,
            "Plugins": [str(DICOMWEB_PLUGIN)] if self.dicomweb else [],
            "DicomWeb": {"Enable": self.dicomweb, "Root": "/dicom-web/"},
            "StorageCompression": False,
            "OverwriteInstances": True,
        }
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=1))
        log = (self.workdir / "orthanc.log").open("ab")
        self.proc = spawn([str(ORTHANC), str(cfg)], stdout=log, stderr=log)
        wait_port(self.http_port, 30, proc=self.proc)
        wait_port(self.port, 30, proc=self.proc)
        return self

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def rest(self, method: str, path: str, data: bytes | None = None) -> Any:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method
        )
        with urllib.request.urlopen(req, timeout=30) as rsp:
            body = rsp.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def upload(self, path: Path) -> str:
        """Store a Part 10 file; returns its Orthanc instance id."""
        return str(self.rest("POST", "/instances", path.read_bytes())["ID"])

    def instance_file(self, orthanc_id: str) -> bytes:
        return bytes(self.rest("GET", f"/instances/{orthanc_id}/file"))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
