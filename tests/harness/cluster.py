"""A 3-node nats-server cluster on loopback: TLS with verified client certificates on the client
ports, mutual TLS on the routes (route certificates with serverAuth and clientAuth)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from . import LOOPBACK, NATS_SERVER, require_executable
from .pki import CertFiles, TestPKI, issue_cert
from .ports import free_port, wait_port


class ClusterNode:
    def __init__(self, name: str, workdir: Path, pki: TestPKI, route: CertFiles):
        self.name = name
        self.workdir = workdir
        self.pki = pki
        self.route = route
        self.port = free_port()
        self.cluster_port = free_port()
        self.http_port = free_port()
        self.peers: list[ClusterNode] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.config_path = workdir / f"{name}.conf"
        self.log_path = workdir / f"{name}.log"

    @property
    def url(self) -> str:
        return f"tls://localhost:{self.port}"

    def _config(self) -> str:
        client_tls = {
            "cert_file": str(self.pki.server.cert),
            "key_file": str(self.pki.server.key),
            "ca_file": str(self.pki.ca),
            "verify": True,
            "timeout": 2,
        }
        cluster = {
            "name": "dimse-test",
            "listen": f"{LOOPBACK}:{self.cluster_port}",
            "no_advertise": True,
            "tls": {
                "cert_file": str(self.route.cert),
                "key_file": str(self.route.key),
                "ca_file": str(self.pki.ca),
                "verify": True,
                "timeout": 2,
            },
            "routes": [f"tls://localhost:{p.cluster_port}" for p in self.peers],
        }
        lines = [
            f"server_name: {json.dumps(self.name)}",
            f"listen: {json.dumps(f'{LOOPBACK}:{self.port}')}",
            f"http: {json.dumps(f'{LOOPBACK}:{self.http_port}')}",
            "max_payload: 8MB",
            f"tls: {json.dumps(client_tls)}",
            f"cluster: {json.dumps(cluster)}",
        ]
        return "\n".join(lines) + "\n"

    def start(self) -> ClusterNode:
        require_executable(NATS_SERVER)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._config())
        check = subprocess.run(
            [str(NATS_SERVER), "-t", "-c", str(self.config_path)], capture_output=True, text=True
        )
        if check.returncode != 0:
            raise RuntimeError(f"nats-server config invalid: {check.stderr or check.stdout}")
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [str(NATS_SERVER), "-c", str(self.config_path)], stdout=log, stderr=log
        )
        wait_port(self.port, 10, proc=self.proc)
        wait_port(self.http_port, 10, proc=self.proc)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def monitor(self, endpoint: str) -> dict[str, Any]:
        with urllib.request.urlopen(
            f"http://{LOOPBACK}:{self.http_port}/{endpoint}", timeout=2
        ) as rsp:
            return json.loads(rsp.read())  # type: ignore[no-any-return]

    def route_peers(self) -> set[str]:
        """Names of the nodes this one has a route to (route pooling: several routes each)."""
        routes = self.monitor("routez").get("routes") or []
        return {str(r.get("remote_name")) for r in routes}

    def client_names(self) -> list[str]:
        """Names of the clients connected to this node (from /connz)."""
        return [str(c.get("name", "")) for c in self.monitor("connz").get("connections") or []]

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


class NatsCluster:
    """Three nodes that route to each other over mTLS; agents get all three client URLs."""

    def __init__(self, workdir: Path, pki: TestPKI, size: int = 3):
        self.workdir = workdir
        route = issue_cert(pki, "nats-route", server=True, client=True)
        self.nodes = [ClusterNode(f"n{i + 1}", workdir, pki, route) for i in range(size)]
        for node in self.nodes:
            node.peers = [p for p in self.nodes if p is not node]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self) -> NatsCluster:
        for node in self.nodes:
            node.start()
        self.wait_routes()
        return self

    def wait_routes(self, timeout: float = 20.0) -> None:
        """Until every live node has a route to every other live node."""
        deadline = time.monotonic() + timeout
        while True:
            live = [n for n in self.nodes if n.alive]
            counts = {n.name: n.route_peers() for n in live}
            if all(len(c) >= len(live) - 1 for c in counts.values()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster routes not up: {counts}")
            time.sleep(0.1)

    def node_of(self, client_name: str) -> ClusterNode | None:
        """The live node a client (by its NATS connection name) is connected to."""
        for node in self.nodes:
            if node.alive and client_name in node.client_names():
                return node
        return None

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
