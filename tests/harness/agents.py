"""dimse-relay agents as real processes, configured from dicts written as YAML."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from . import DIMSE_RELAY, LOOPBACK, require_executable, spawn
from .pki import CertFiles, TestPKI
from .ports import free_port


def nats_section(url: str, pki: TestPKI, client: CertFiles, **extra: Any) -> dict[str, Any]:
    return {
        "servers": [url],
        "tls": {"ca_file": str(pki.ca), "cert_file": str(client.cert), "key_file": str(client.key)},
        "connect_timeout_s": 2,
        "reconnect_wait_s": 0.2,
        "max_reconnect_wait_s": 1,
        **extra,
    }


class AgentProcess:
    """One ``dimse-relay run`` process with its own work dir, log file and HTTP port."""

    def __init__(self, name: str, workdir: Path, config: dict[str, Any]):
        self.name = name
        self.workdir = workdir
        self.http_port = free_port()
        # An "http" section in ``config`` is merged into the harness's (host and port), e.g.
        # {"http": {"ready_requires_targets": False}} for targets that are down on purpose.
        http = {"host": LOOPBACK, "port": self.http_port, **config.get("http", {})}
        self.http_port = int(http["port"])
        self.config = {
            "name": name,
            "work_dir": str(workdir / "work"),
            "http": http,
            "logging": {"level": "info", "format": "json"},
            **{k: v for k, v in config.items() if k != "http"},
        }
        self.config_path = workdir / f"{name}.yml"
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True, timeout: float = 20.0) -> AgentProcess:
        require_executable(DIMSE_RELAY)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        log = self.log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = spawn(
            [str(DIMSE_RELAY), "run", "--config", str(self.config_path)],
            stdout=log,
            stderr=log,
            env=env,
        )
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def http_get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(
                f"http://{LOOPBACK}:{self.http_port}{path}", timeout=timeout
            ) as rsp:
                return rsp.status, rsp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def ready(self) -> bool:
        try:
            code, _ = self.http_get("/readyz")
        except OSError:
            return False
        return code == 200

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"agent {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if self.ready():
                return
            time.sleep(0.05)
        raise TimeoutError(f"agent {self.name} not ready after {timeout}s:\n{self.log_tail()}")

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a Prometheus sample's values whose labels include ``labels``."""
        _, body = self.http_get("/metrics")
        total = 0.0
        for line in body.decode().splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            metric, _, label_text = head.partition("{")
            if metric != name:
                continue
            have = dict(
                part.split("=", 1) for part in label_text.rstrip("}").split(",") if "=" in part
            )
            if all(have.get(k) == json.dumps(v) for k, v in labels.items()):
                total += float(value)
        return total

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"raw": line})
        return out

    def log_tail(self, n: int = 30) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def peak_rss_kib(self) -> int:
        """VmHWM of the process (peak resident set size)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise RuntimeError("no VmHWM")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def relay_pair(
    workdir: Path,
    nats_url: str,
    pki: TestPKI,
    ae_title: str,
    scp_port: int,
    *,
    name: str = "relay",
    listener: dict[str, Any] | None = None,
    target: dict[str, Any] | None = None,
) -> tuple[AgentProcess, AgentProcess, int]:
    """The usual test relay for one AE title, not started: a cloud agent whose target
    forwards ``ae_title`` to the SCP on ``scp_port``, and an edge agent with a listener for it
    on a free loopback port. Returns (cloud, edge, listener port)."""
    cloud = AgentProcess(
        f"{name}-cloud",
        workdir / "cloud",
        {
            "nats": nats_section(nats_url, pki, pki.client("cloud")),
            "targets": [
                {"ae_title": ae_title, "host": LOOPBACK, "port": scp_port, **(target or {})}
            ],
        },
    )
    port = free_port()
    edge = AgentProcess(
        f"{name}-edge",
        workdir / "edge",
        {
            "nats": nats_section(nats_url, pki, pki.client("edge")),
            "listeners": [
                {"ae_title": ae_title, "bind": LOOPBACK, "port": port, **(listener or {})}
            ],
        },
    )
    return cloud, edge, port
