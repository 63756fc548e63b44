"""A 3-node nats-server cluster on loopback: TLS with verified client certificates on the client
ports, mutual TLS on the routes (route certificates with serverAuth and clientAuth)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from . import LOOPBACK
from .nats import NatsServer
from .pki import CertFiles, TestPKI, issue_cert
from .ports import free_port


class ClusterNode(NatsServer):
    """One node: the single-server setup of NatsServer plus a cluster block with mTLS routes."""

    def __init__(self, name: str, workdir: Path, pki: TestPKI, route: CertFiles):
        super().__init__(workdir, pki)
        self.name = name
        self.route = route
        self.cluster_port = free_port()
        self.peers: list[ClusterNode] = []
        self.config_path = workdir / f"{name}.conf"
        self.log_path = workdir / f"{name}.log"

    def _config_lines(self) -> list[str]:
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
        return [
            f"server_name: {json.dumps(self.name)}",
            *super()._config_lines(),
            f"cluster: {json.dumps(cluster)}",
        ]

    def monitor(self, endpoint: str) -> dict[str, Any]:
        return self.varz(endpoint)

    def route_peers(self) -> set[str]:
        """Names of the nodes this one has a route to (route pooling: several routes each)."""
        routes = self.monitor("routez").get("routes") or []
        return {str(r.get("remote_name")) for r in routes}

    def client_names(self) -> list[str]:
        """Names of the clients connected to this node (from /connz)."""
        return [str(c.get("name", "")) for c in self.monitor("connz").get("connections") or []]


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
