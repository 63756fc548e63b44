"""The example inventory passes the collection's preflight; broken ones fail naming the variable.

Runs playbooks/preflight.yml for real (ansible-playbook) against inventories/example: the checks
are evaluated on the controller, so no host has to exist.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ANSIBLE = Path(sys.executable).parent / "ansible-playbook"
SITES = yaml.safe_load((ROOT / "inventories/example/group_vars/all/main.yml").read_text())[
    "dimse_relay_sites"
]

pytestmark = pytest.mark.skipif(not ANSIBLE.exists(), reason="ansible (deploy extra) not installed")


def preflight(tmp_path: Path, sites: dict | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [str(ANSIBLE), "-i", "inventories/example", "playbooks/preflight.yml"]
    if sites is not None:
        extra = tmp_path / "extra.json"
        extra.write_text(json.dumps({"dimse_relay_sites": sites}))
        cmd += ["-e", f"@{extra}"]
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0")
    env["PATH"] = f"{ANSIBLE.parent}:{env.get('PATH', '')}"
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_example_inventory_passes_preflight(tmp_path: Path) -> None:
    result = preflight(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "failed=0" in result.stdout


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda s: s["stmarys"]["listeners"][0].update(ae_title="AI_ROUTER_WITH_A_LONG_NAME"),
            "dimse_relay_sites.stmarys.listeners[0].ae_title: AE title 'AI_ROUTER_WITH_A_LONG_NAME'"
            " is longer than 16 characters",
        ),
        (
            lambda s: s["riverside"]["targets"].append(
                {"ae_title": "SMH_PACS", "host": "x", "port": 1}
            ),
            "AE title 'SMH_PACS' is already served by",
        ),
        (
            lambda s: s["cloud"]["listeners"][1].update(port=11112),
            "dimse_relay_sites.cloud.listeners[1].port: port 11112 is already used",
        ),
        (
            lambda s: s.pop("riverside"),
            "host relay.riverside.example.org: dimse_relay_site 'riverside' names a site missing",
        ),
        (
            lambda s: s["stmarys"]["listeners"][0].update(port=9102),
            "relay_agent_http_port 9102 is also the port of listener(s) ['AI_ROUTER'] of"
            " dimse_relay_sites.stmarys.listeners",
        ),
        (
            # St Mary's agent shares its host with the site's leaf node (client port 4222)
            lambda s: s["stmarys"]["listeners"][0].update(port=4222),
            "listener port(s) [4222] of dimse_relay_sites.stmarys.listeners are used by"
            " nats-server on this host",
        ),
    ],
)
def test_broken_inventory_fails_before_any_change(tmp_path: Path, change, message: str) -> None:
    sites = copy.deepcopy(SITES)
    change(sites)
    result = preflight(tmp_path, sites)
    assert result.returncode != 0
    out = " ".join(result.stdout.split())
    assert message in out, result.stdout[-3000:]
    # Nothing but checks ran: the PKI, NATS and agent plays never started.
    assert "Issue the CA" not in result.stdout
