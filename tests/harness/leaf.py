"""A hub nats-server that accepts leaf nodes, and a site leaf node with its own JetStream
domain and file store, dialling out to the hub over mutual TLS: the edge topology of
queued mode (docs/queued-mode.md) with real servers."""

from __future__ import annotations

import json
from pathlib import Path

from . import LOOPBACK
from .nats import NatsServer
from .pki import CertFiles, TestPKI
from .ports import free_port


class HubServer(NatsServer):
    """The cloud side: client port as NatsServer, JetStream domain "cloud", a leafnode port."""

    def __init__(self, workdir: Path, pki: TestPKI):
        super().__init__(workdir, pki)
        self.leaf_port = free_port()

    def _config_lines(self) -> list[str]:
        leafnodes = {
            "listen": f"{LOOPBACK}:{self.leaf_port}",
            "no_advertise": True,
            "tls": {
                "cert_file": str(self.pki.server.cert),
                "key_file": str(self.pki.server.key),
                "ca_file": str(self.pki.ca),
                "verify": True,
                "timeout": 2,
            },
        }
        jetstream = {"store_dir": str(self.workdir / "js"), "domain": "cloud"}
        return [
            'server_name: "hub"',
            *super()._config_lines(),
            f"jetstream: {json.dumps(jetstream)}",
            f"leafnodes: {json.dumps(leafnodes)}",
        ]


class LeafServer(NatsServer):
    """The site's leaf node: JetStream domain ``domain`` on disk (kept across restarts)."""

    def __init__(
        self,
        workdir: Path,
        pki: TestPKI,
        hub: HubServer,
        client: CertFiles,
        *,
        domain: str = "edge-site",
        max_file_store: str = "1G",
    ):
        super().__init__(workdir, pki)
        self.hub = hub
        self.client = client
        self.domain = domain
        self.max_file_store = max_file_store

    def _config_lines(self) -> list[str]:
        jetstream = {
            "store_dir": str(self.workdir / "js"),
            "domain": self.domain,
            "max_file_store": self.max_file_store,
        }
        local = ["dimse.v1.queue.>", "dimse.v1.dead.>", "$O.>"]  # as roles/nats_server
        remote = {
            "urls": [f"tls://localhost:{self.hub.leaf_port}"],
            "deny_exports": local,
            "deny_imports": local,
            "tls": {
                "cert_file": str(self.client.cert),
                "key_file": str(self.client.key),
                "ca_file": str(self.pki.ca),
                "timeout": 2,
            },
        }
        return [
            f"server_name: {json.dumps('leaf-' + self.domain)}",
            *super()._config_lines(),
            f"jetstream: {json.dumps(jetstream)}",
            f"leafnodes: {json.dumps({'remotes': [remote], 'reconnect': '1s'})}",
        ]

    def leaf_connected(self) -> bool:
        return bool(self.varz("leafz").get("leafnodes"))
