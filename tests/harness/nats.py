"""A real nats-server with TLS and verified client certificates, started for a test."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from . import LOOPBACK, NATS_SERVER, require_executable, spawn
from .pki import TestPKI
from .ports import free_port, port_open, wait_port


class NatsServer:
    """One nats-server process: client port with TLS + verify, monitoring on loopback.

    ``users`` maps a client certificate subject (RFC 2253 DN) to publish/subscribe permissions
    when ``verify_and_map`` is wanted; without it every verified client may do anything.
    """

    def __init__(
        self,
        workdir: Path,
        pki: TestPKI,
        *,
        port: int | None = None,
        jetstream: bool = False,
        users: list[dict[str, object]] | None = None,
        tls: bool = True,
    ):
        self.workdir = workdir
        self.pki = pki
        self.port = port or free_port()
        self.http_port = free_port()
        self.jetstream = jetstream
        self.users = users
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None
        self.config_path = workdir / "nats.conf"
        self.log_path = workdir / "nats.log"

    @property
    def url(self) -> str:
        return f"tls://localhost:{self.port}"

    def _config(self) -> str:
        return "\n".join(self._config_lines()) + "\n"

    def _config_lines(self) -> list[str]:
        tls = {
            "cert_file": str(self.pki.server.cert),
            "key_file": str(self.pki.server.key),
            "ca_file": str(self.pki.ca),
            "verify": True,
            "timeout": 2,
        }
        if self.users is not None:
            tls["verify_and_map"] = True
            del tls["verify"]
        lines = [
            f"listen: {json.dumps(f'{LOOPBACK}:{self.port}')}",
            f"http: {json.dumps(f'{LOOPBACK}:{self.http_port}')}",
            "max_payload: 8MB",
        ]
        if self.tls:
            lines.append(f"tls: {json.dumps(tls)}")
        if self.users is not None:
            lines.append(f"authorization: {json.dumps({'users': self.users})}")
        if self.jetstream:
            lines.append(f"jetstream: {json.dumps({'store_dir': str(self.workdir / 'js')})}")
        return lines

    def start(self) -> NatsServer:
        require_executable(NATS_SERVER)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._config())
        check = subprocess.run(
            [str(NATS_SERVER), "-t", "-c", str(self.config_path)], capture_output=True, text=True
        )
        if check.returncode != 0:
            raise RuntimeError(f"nats-server config invalid: {check.stderr or check.stdout}")
        log = self.log_path.open("ab")
        self.proc = spawn([str(NATS_SERVER), "-c", str(self.config_path)], stdout=log, stderr=log)
        wait_port(self.port, 10, proc=self.proc)
        wait_port(self.http_port, 10, proc=self.proc)
        return self

    def varz(self, endpoint: str = "varz") -> dict[str, object]:
        url = f"http://{LOOPBACK}:{self.http_port}/{endpoint}"
        with urllib.request.urlopen(url, timeout=5) as rsp:
            return json.loads(rsp.read())  # type: ignore[no-any-return]

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        deadline = time.monotonic() + 5
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self) -> None:
        self.stop()
        self.start()
