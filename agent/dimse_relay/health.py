"""HTTP endpoint: /metrics (Prometheus), /healthz (alive), /readyz (ready to relay), /status."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dimse_relay import metrics

LOG = logging.getLogger("dimse_relay.health")


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        ready: Callable[[], tuple[bool, dict[str, Any]]],
        status: Callable[[], dict[str, Any]],
    ):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(metrics.REGISTRY), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b"ok\n", "text/plain")
                elif path == "/readyz":
                    ok, detail = outer.ready()
                    self._send(200 if ok else 503, json.dumps(detail).encode(), "application/json")
                elif path == "/status":
                    self._send(200, json.dumps(outer.status()).encode(), "application/json")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.ready = ready
        self.status = status
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self.thread.start()
        LOG.info("http endpoint listening", extra={"port": self.port})

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
