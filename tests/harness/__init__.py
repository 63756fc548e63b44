"""Test harness for dimse-relay: real nats-server, real agent processes, real DICOM peers.

Everything here starts real processes on loopback ports and kills them at teardown. Shared by
the pytest suite (tests/) and the benchmark (bench/run.py).
"""

from __future__ import annotations

from pathlib import Path

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
