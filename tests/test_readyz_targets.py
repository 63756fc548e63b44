"""/readyz reports whether the targets are reachable (probe.py), against real parts: a DCMTK
storescp that is stopped and started again, a TCP peer that never answers, file-system roots
that disappear or are read-only, HTTP servers with and without TLS, and real agents on a real
TLS nats-server."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from tests.harness import LOOPBACK
from tests.harness.agents import AgentProcess, nats_section, relay_pair
from tests.harness.dicom import DcmtkStoreSCP, PynetdicomSCP, pynetdicom_echo
from tests.harness.nats import NatsServer
from tests.harness.pki import TestPKI
from tests.harness.ports import free_port

from dimse_relay.config import ConfigError, parse_config

INTERVAL_S = 0.5
TIMEOUT_S = 2.0
FAST_PROBES = {"target_probe_interval_s": INTERVAL_S, "target_probe_timeout_s": TIMEOUT_S}
# A change of state shows in /readyz within one interval plus one probe (its timeout and the
# prober's grace), with room for a loaded machine.
DETECT_S = INTERVAL_S + TIMEOUT_S + 2 + 5


def readyz(agent: AgentProcess) -> tuple[int, dict[str, Any]]:
    code, body = agent.http_get("/readyz")
    return code, json.loads(body)


def wait_for(what: str, check: Callable[[], bool], timeout: float, agent: AgentProcess) -> float:
    """Poll ``check`` until it holds; returns how long that took."""
    started = time.monotonic()

    def holds() -> bool:
        try:
            return check()
        except OSError:  # the agent's HTTP endpoint is not up yet
            return False

    while not holds():
        if time.monotonic() - started > timeout:
            raise AssertionError(
                f"{what}: not after {timeout} s: {readyz(agent)}\n{agent.log_tail()}"
            )
        time.sleep(0.05)
    return time.monotonic() - started


def probe_of(agent: AgentProcess, aet: str) -> dict[str, Any]:
    return readyz(agent)[1]["target_reachability"][aet]


def log_count(agent: AgentProcess, msg: str) -> int:
    return sum(1 for line in agent.log_lines() if line.get("msg") == msg)


def test_config_keys_defaults_and_bounds(pki: TestPKI) -> None:
    edge = pki.client("edge")
    base = {
        "nats": {
            "servers": ["tls://localhost:4222"],
            "tls": {"ca_file": str(pki.ca), "cert_file": str(edge.cert), "key_file": str(edge.key)},
        },
        "targets": [{"ae_title": "PACS", "host": "pacs", "port": 104}],
    }
    http = parse_config(base).http
    assert (http.target_probe_interval_s, http.target_probe_timeout_s) == (30.0, 5.0)
    assert http.ready_requires_targets is True
    bad = {
        "target_probe_interval_s": 0,
        "target_probe_timeout_s": -1,
        "ready_requires_targets": "sometimes",
    }
    with pytest.raises(ConfigError) as err:
        parse_config({**base, "http": bad})
    text = "\n".join(err.value.errors)
    for key in bad:
        assert f"http.{key}:" in text, text


@pytest.fixture
def scp_relay(
    tmp_path: Path, pki: TestPKI, nats_server: NatsServer
) -> Iterator[tuple[AgentProcess, AgentProcess, int, DcmtkStoreSCP, PynetdicomSCP]]:
    """A cloud agent with two SCP targets (DCMTK storescp PACS, pynetdicom OTHER) probed every
    0.5 s, and an edge agent with listeners for both."""
    dcmtk = DcmtkStoreSCP(tmp_path / "pacs", "PACS").start()
    other = PynetdicomSCP("OTHER").start()
    cloud, edge, port = relay_pair(tmp_path, nats_server.url, pki, "PACS", dcmtk.port)
    cloud.config["targets"].append({"ae_title": "OTHER", "host": LOOPBACK, "port": other.port})
    cloud.config["http"].update(FAST_PROBES)
    edge.config["listeners"].append({"ae_title": "OTHER", "bind": LOOPBACK, "port": port})
    try:
        cloud.start()
        edge.start()
        yield cloud, edge, port, dcmtk, other
    finally:
        edge.stop()
        cloud.stop()
        dcmtk.stop()
        other.stop()


def test_scp_down_makes_agent_unready_and_back_ready_again(scp_relay) -> None:
    cloud, _edge, port, dcmtk, other = scp_relay
    code, body = readyz(cloud)
    assert code == 200, body
    assert body["targets_reachable"] is True and body["ready_requires_targets"] is True
    pacs = body["target_reachability"]["PACS"]
    assert pacs["kind"] == "scp" and pacs["reachable"] is True, pacs
    assert 0 <= pacs["checked_age_s"] < 5
    assert "reason" not in pacs
    assert cloud.metric("dimse_relay_targets_unreachable") == 0
    # The probe associated as the relay does: the target's called AE title, and (no
    # calling_ae_title configured) the probe's own calling AE title.
    assert "DIMSE_RELAY" in other.calling_aets

    dcmtk.stop()
    took = wait_for("PACS unreachable", lambda: readyz(cloud)[0] == 503, DETECT_S, cloud)
    assert took < DETECT_S
    code, body = readyz(cloud)
    assert body["targets_reachable"] is False
    assert body["nats_connected"] and body["targets_subscribed"] and body["listeners_bound"]
    pacs = body["target_reachability"]["PACS"]
    assert pacs["reachable"] is False and pacs["reason"].startswith("cannot connect"), pacs
    assert "refused" in pacs["reason"].lower(), pacs
    assert body["target_reachability"]["OTHER"]["reachable"] is True
    assert cloud.metric("dimse_relay_targets_unreachable") == 1
    status = json.loads(cloud.http_get("/status")[1])
    assert status["ready"] is False and status["target_reachability"]["PACS"]["reachable"] is False

    # Several intervals pass: the state change was logged once, pynetdicom's connection errors
    # of the probes not at all.
    time.sleep(6 * INTERVAL_S)
    assert readyz(cloud)[0] == 503
    assert log_count(cloud, "target unreachable") == 1, cloud.log_tail()
    warning = next(x for x in cloud.log_lines() if x.get("msg") == "target unreachable")
    assert warning["level"] == "warning" and warning["kind"] == "scp"
    assert "target" not in warning  # AE titles only at debug level (docs/operations.md)
    text = cloud.log_path.read_text()
    assert "TCP Initialisation Error" not in text and "unable to connect" not in text

    # The agent keeps serving while the PACS is down: the other target relays, the PACS gets
    # the relay's failure status (not a hang), /healthz answers.
    assert pynetdicom_echo(port, "OTHER")[0] == 0x0000
    assert pynetdicom_echo(port, "PACS")[0] == 0x0110
    assert cloud.http_get("/healthz")[0] == 200
    assert cloud.proc is not None and cloud.proc.poll() is None

    restarted = DcmtkStoreSCP(dcmtk.workdir, "PACS", port=dcmtk.port).start()
    try:
        wait_for("PACS reachable again", lambda: readyz(cloud)[0] == 200, DETECT_S, cloud)
        assert probe_of(cloud, "PACS")["reachable"] is True
        assert cloud.metric("dimse_relay_targets_unreachable") == 0
        assert log_count(cloud, "target reachable again") == 1
        assert pynetdicom_echo(port, "PACS")[0] == 0x0000
    finally:
        restarted.stop()


def test_report_only_stays_ready_while_reporting_the_target_down(
    tmp_path: Path, pki: TestPKI, nats_server: NatsServer
) -> None:
    dead = free_port()  # nothing listens here
    agent = AgentProcess(
        "report-only",
        tmp_path,
        {
            "nats": nats_section(nats_server.url, pki, pki.client("cloud")),
            "http": {**FAST_PROBES, "ready_requires_targets": False},
            "targets": [{"ae_title": "GONE", "host": LOOPBACK, "port": dead}],
        },
    ).start()
    try:
        wait_for(
            "GONE probed", lambda: probe_of(agent, "GONE")["checked_age_s"] is not None, 10, agent
        )
        code, body = readyz(agent)
        assert code == 200, body
        assert body["targets_reachable"] is False and body["ready_requires_targets"] is False
        assert body["target_reachability"]["GONE"]["reachable"] is False
        assert body["target_reachability"]["GONE"]["reason"].startswith("cannot connect")
        assert agent.metric("dimse_relay_targets_unreachable") == 1
        assert json.loads(agent.http_get("/status")[1])["ready"] is True
    finally:
        agent.stop()


def test_first_probe_runs_at_start_not_after_the_interval(
    tmp_path: Path, pki: TestPKI, nats_server: NatsServer
) -> None:
    scp = PynetdicomSCP("HOURLY").start()
    agent = AgentProcess(
        "hourly",
        tmp_path,
        {
            "nats": nats_section(nats_server.url, pki, pki.client("cloud")),
            "http": {"target_probe_interval_s": 3600},
            "targets": [
                {
                    "ae_title": "HOURLY",
                    "host": LOOPBACK,
                    "port": scp.port,
                    "called_ae_title": "HOURLY",
                    "calling_ae_title": "RELAY_CALLS",
                }
            ],
        },
    )
    try:
        agent.start(timeout=20)  # waits for /readyz 200: the target was probed at start
        assert probe_of(agent, "HOURLY")["reachable"] is True
        # a configured calling_ae_title is what the probe (like the relay) uses
        assert scp.calling_aets == ["RELAY_CALLS"]
    finally:
        agent.stop()
        scp.stop()


def test_target_that_comes_up_after_the_agent_is_found_within_seconds(
    tmp_path: Path, pki: TestPKI, nats_server: NatsServer
) -> None:
    """The lab's order (SCPs started after the agents): an unreachable target is probed again
    after 5 s, not after the (here hour-long) interval."""
    port = free_port()
    agent = AgentProcess(
        "late-scp",
        tmp_path,
        {
            "nats": nats_section(nats_server.url, pki, pki.client("cloud")),
            "http": {"target_probe_interval_s": 3600, "target_probe_timeout_s": TIMEOUT_S},
            "targets": [{"ae_title": "LATE", "host": LOOPBACK, "port": port}],
        },
    ).start(wait_ready=False)
    scp = PynetdicomSCP("LATE", port=port)
    try:
        wait_for(
            "LATE probed", lambda: probe_of(agent, "LATE")["checked_age_s"] is not None, 10, agent
        )
        assert readyz(agent)[0] == 503
        scp.start()
        took = wait_for("LATE reachable", lambda: readyz(agent)[0] == 200, 5 + TIMEOUT_S + 5, agent)
        assert took < 5 + TIMEOUT_S + 5
    finally:
        agent.stop()
        scp.stop()


def test_silent_scp_times_out_without_blocking_the_relay(
    tmp_path: Path, pki: TestPKI, nats_server: NatsServer
) -> None:
    """A peer that accepts TCP connections and never answers: the probe gives up after its
    timeout; meanwhile relayed associations and /readyz are as fast as ever."""
    silent = socket.socket()
    silent.bind((LOOPBACK, 0))
    silent.listen(64)  # connections complete in the backlog; nothing is ever read
    other = PynetdicomSCP("OTHER").start()
    timeout_s = 3.0
    cloud, edge, port = relay_pair(tmp_path, nats_server.url, pki, "OTHER", other.port)
    cloud.config["targets"].append(
        {"ae_title": "SILENT", "host": LOOPBACK, "port": silent.getsockname()[1]}
    )
    cloud.config["http"].update(
        target_probe_interval_s=INTERVAL_S, target_probe_timeout_s=timeout_s
    )
    try:
        cloud.start(wait_ready=False)
        edge.start()
        # the edge being ready says nothing about the cloud's HTTP endpoint: wait until it answers
        wait_for("cloud HTTP endpoint up", lambda: readyz(cloud)[0] in (200, 503), 20, cloud)
        # the first probe of SILENT is still waiting for an answer: relay and /readyz are fast
        started = time.monotonic()
        code, body = readyz(cloud)
        assert time.monotonic() - started < 0.5
        for _ in range(3):
            status, elapsed = pynetdicom_echo(port, "OTHER")
            assert status == 0x0000 and elapsed < 1.0, elapsed
        wait_for(
            "SILENT reported",
            lambda: probe_of(cloud, "SILENT")["checked_age_s"] is not None,
            timeout_s + 8,
            cloud,
        )
        code, body = readyz(cloud)
        assert code == 503
        silent_probe = body["target_reachability"]["SILENT"]
        assert silent_probe["reachable"] is False
        assert silent_probe["reason"] == "no answer to the association request", silent_probe
        assert body["target_reachability"]["OTHER"]["reachable"] is True
        assert cloud.proc is not None and cloud.proc.poll() is None
    finally:
        edge.stop()
        cloud.stop()
        other.stop()
        silent.close()


@contextlib.contextmanager
def read_only_dir(path: Path) -> Iterator[Path]:
    """A directory nobody can create files in: as root (who writes through 0555) a read-only
    tmpfs mounted there, otherwise mode 0555."""
    path.mkdir(parents=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_filesystem_root_missing_or_read_only_is_unreachable(
    tmp_path: Path, pki: TestPKI, nats_server: NatsServer
) -> None:
    ok_root, gone_root = tmp_path / "ok", tmp_path / "gone"

    def fs(aet: str, root: Path) -> dict[str, Any]:
        return {"ae_title": aet, "kind": "filesystem", "filesystem": {"root": str(root)}}

    with read_only_dir(tmp_path / "ro") as ro_root:
        agent = AgentProcess(
            "fs-probe",
            tmp_path / "agent",
            {
                "nats": nats_section(nats_server.url, pki, pki.client("cloud")),
                "http": FAST_PROBES,
                "targets": [fs("FSOK", ok_root), fs("FSRO", ro_root), fs("FSGONE", gone_root)],
            },
        ).start(wait_ready=False)
        try:
            wait_for(
                "all probed",
                lambda: all(
                    p["checked_age_s"] is not None
                    for p in readyz(agent)[1]["target_reachability"].values()
                ),
                10,
                agent,
            )
            code, body = readyz(agent)
            assert code == 503, body
            probes = body["target_reachability"]
            assert probes["FSOK"] == {"kind": "filesystem", "reachable": True} | {
                "checked_age_s": probes["FSOK"]["checked_age_s"]
            }
            assert probes["FSRO"]["reachable"] is False
            assert probes["FSRO"]["reason"] in (
                "root directory not writable",
                "cannot create a file in root (EROFS)",
                "cannot create a file in root (EACCES)",
            ), probes["FSRO"]
            assert probes["FSGONE"]["reachable"] is True
            assert agent.metric("dimse_relay_targets_unreachable") == 1

            gone_root.rmdir()  # the sink created it at start, empty
            wait_for(
                "FSGONE missing",
                lambda: probe_of(agent, "FSGONE").get("reason") == "root directory missing",
                DETECT_S,
                agent,
            )
            assert agent.metric("dimse_relay_targets_unreachable") == 2
            gone_root.mkdir()
            wait_for("FSGONE back", lambda: probe_of(agent, "FSGONE")["reachable"], DETECT_S, agent)
            # probing leaves nothing behind in the roots
            assert list(ok_root.iterdir()) == [] and list(gone_root.iterdir()) == []
        finally:
            agent.stop()


class _AnyAnswer:
    """An HTTP(S) server answering every request with 404, recording what it got."""

    def __init__(self, tls: tuple[Path, Path] | None = None):
        outer = self
        self.requests: list[tuple[str, str, str | None]] = []

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                outer.requests.append((self.command, self.path, self.headers.get("Authorization")))
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_HEAD = do_GET = do_OPTIONS = do_POST = _any

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.httpd = ThreadingHTTPServer((LOOPBACK, free_port()), Handler)
        self.httpd.daemon_threads = True
        self.scheme = "http"
        if tls is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://localhost:{self.httpd.server_address[1]}/dicom-web"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_dicomweb_reachable_with_any_http_answer_using_the_sinks_settings(
    tmp_path: Path, pki: TestPKI, nats_server: NatsServer
) -> None:
    plain = _AnyAnswer()
    tls = _AnyAnswer(tls=(pki.server.cert, pki.server.key))
    token = tmp_path / "token"
    token.write_text("probe-token\n")

    def web(aet: str, **cfg: Any) -> dict[str, Any]:
        return {"ae_title": aet, "kind": "dicomweb", "dicomweb": cfg}

    agent = AgentProcess(
        "web-probe",
        tmp_path / "agent",
        {
            "nats": nats_section(nats_server.url, pki, pki.client("cloud")),
            "http": {**FAST_PROBES, "ready_requires_targets": False},
            "targets": [
                web("WEB404", url=plain.url, auth={"type": "bearer", "token_file": str(token)}),
                web("WEBTLS", url=tls.url, ca_file=str(pki.ca)),
                web("WEBUNTRUSTED", url=tls.url),  # system CAs only
                web("WEBDOWN", url=f"http://127.0.0.1:{free_port()}/dicom-web"),
            ],
        },
    ).start()
    try:
        wait_for(
            "all probed",
            lambda: all(
                p["checked_age_s"] is not None
                for p in readyz(agent)[1]["target_reachability"].values()
            ),
            10,
            agent,
        )
        probes = readyz(agent)[1]["target_reachability"]
        assert probes["WEB404"]["reachable"] is True and probes["WEB404"]["note"] == "HTTP 404"
        assert probes["WEBTLS"]["reachable"] is True, probes["WEBTLS"]
        assert probes["WEBUNTRUSTED"] == {
            "kind": "dicomweb",
            "reachable": False,
            "checked_age_s": probes["WEBUNTRUSTED"]["checked_age_s"],
            "reason": "TLS verification failed",
        }
        assert probes["WEBDOWN"]["reachable"] is False
        assert probes["WEBDOWN"]["reason"].startswith("no HTTP response"), probes["WEBDOWN"]
        # a HEAD on the DICOMweb root, with the sink's credentials
        assert ("HEAD", "/dicom-web", "Bearer probe-token") in plain.requests
        assert agent.metric("dimse_relay_targets_unreachable") == 2
    finally:
        agent.stop()
        plain.stop()
        tls.stop()
