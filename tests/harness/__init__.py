"""Test harness for dimse-relay: real nats-server, real agent processes, real DICOM peers.

Everything here starts real processes on loopback ports and kills them at teardown. Shared by
the pytest suite (tests/) and the benchmark (bench/run.py).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
NATS_SERVER = VENV_BIN / "nats-server"
DIMSE_RELAY = VENV_BIN / "dimse-relay"
STORESCU = Path("/usr/bin/storescu")
STORESCP = Path("/usr/bin/storescp")
ECHOSCU = Path("/usr/bin/echoscu")
LOOPBACK = "127.0.0.1"


class PrerequisiteMissing(RuntimeError):
    """A tool the real-component tests need is not installed: the test fails, never skips."""


def require_executable(path: Path) -> Path:
    if not path.is_file():
        raise PrerequisiteMissing(
            f"{path} is missing; run `make bootstrap` (scripts/bootstrap.sh) to install it"
        )
    return path


# Every process the harness starts, so that a fixture whose setup fails half-way (or an
# interrupted run) leaves nothing behind: see kill_leftovers, called at the end of the session.
STARTED: list[subprocess.Popen[Any]] = []


def spawn(cmd: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
    proc: subprocess.Popen[Any] = subprocess.Popen(cmd, **kwargs)
    STARTED.append(proc)
    return proc


def kill_leftovers() -> int:
    """Kill harness processes still running; returns how many there were."""
    alive = [p for p in STARTED if p.poll() is None]
    for proc in alive:
        proc.kill()
    for proc in alive:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
    STARTED.clear()
    return len(alive)
