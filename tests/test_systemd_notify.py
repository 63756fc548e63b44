"""The agent speaks systemd's notify protocol: READY=1 once up, WATCHDOG=1 pings while its
NATS loop answers (Type=notify, WatchdogSec= in the unit), STOPPING=1 on SIGTERM."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from tests.harness import LOOPBACK
from tests.harness.agents import AgentProcess, nats_section
from tests.harness.nats import NatsServer
from tests.harness.pki import TestPKI


def test_ready_watchdog_and_stopping_notifications(
    tmp_path: Path, pki: TestPKI, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(0.2)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # pings every 0.2 s
    agent = AgentProcess(
        "notify",
        tmp_path,
        {
            "nats": nats_section(nats_server.url, pki, pki.client("cloud")),
            "http": {"ready_requires_targets": False},  # no SCP behind the target
            "targets": [{"ae_title": "NOTIFYSCP", "host": LOOPBACK, "port": 9}],
        },
    ).start()
    received: list[str] = []
    try:
        deadline = time.monotonic() + 5
        while received.count("WATCHDOG=1") < 3 and time.monotonic() < deadline:
            try:
                received.append(sock.recv(256).decode())
            except TimeoutError:
                pass
    finally:
        agent.stop()
    deadline = time.monotonic() + 2
    while "STOPPING=1" not in received and time.monotonic() < deadline:
        try:
            received.append(sock.recv(256).decode())
        except TimeoutError:
            pass
    sock.close()
    assert received[0] == "READY=1", received
    assert received.count("WATCHDOG=1") >= 3, received
    assert "STOPPING=1" in received, received


def test_incomplete_transfers_left_by_a_crash_are_removed_at_start(
    tmp_path: Path, pki: TestPKI, nats_server: NatsServer
) -> None:
    """A killed agent can leave half-written datasets (patient data) in its work_dir; the next
    start deletes them before serving."""
    work = tmp_path / "work"
    for sub in ("incoming", "spool", "retrieved"):
        (work / sub).mkdir(parents=True)
        (work / sub / "dataset-left.dcm").write_bytes(b"partial")
    agent = AgentProcess(
        "restart",
        tmp_path,
        {
            "nats": nats_section(nats_server.url, pki, pki.client("cloud")),
            "http": {"ready_requires_targets": False},  # no SCP behind the target
            "targets": [{"ae_title": "RESTARTSCP", "host": LOOPBACK, "port": 9}],
        },
    ).start()
    try:
        for sub in ("incoming", "spool", "retrieved"):
            assert list((work / sub).iterdir()) == [], sub
        assert any(
            line.get("msg") == "removed incomplete transfers left by a previous run"
            and line.get("files") == 3
            for line in agent.log_lines()
        )
    finally:
        agent.stop()
