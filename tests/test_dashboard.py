"""docs/grafana-dashboard.json only names metrics (and labels) that a live agent exposes."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom.data
import pytest
from tests.harness import LOOPBACK, REPO
from tests.harness.agents import AgentProcess, nats_section
from tests.harness.dicom import PynetdicomSCP, pynetdicom_echo, pynetdicom_store
from tests.harness.nats import NatsServer
from tests.harness.pki import TestPKI
from tests.harness.ports import free_port

from dimse_relay import subjects

DASHBOARD = REPO / "docs" / "grafana-dashboard.json"
CT = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
METRIC = re.compile(r"\bdimse_relay_[a-z_]+")
# PromQL words that may stand before "(" or inside "by (...)" and are not labels
PROMQL_LABEL_LISTS = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
MATCHERS = re.compile(r"(dimse_relay_[a-z_]+)\{([^}]*)\}")


def exposition(agents: list[AgentProcess]) -> tuple[set[str], dict[str, set[str]]]:
    """Sample names (from samples and from the TYPE lines' suffix rules) and labels per name."""
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count")}
    for agent in agents:
        code, body = agent.http_get("/metrics")
        assert code == 200
        for line in body.decode().splitlines():
            if line.startswith("# TYPE "):
                _, _, family, kind = line.split()
                family = family.removesuffix("_total") if kind == "counter" else family
                names.update(family + s for s in suffixes.get(kind, ("",)))
            elif line and not line.startswith("#"):
                name, _, rest = line.partition("{")
                name = name.split()[0]
                names.add(name)
                found = set(re.findall(r'(\w+)="', rest)) if rest else set()
                labels.setdefault(name, set()).update(found)
    # histogram buckets carry "le" and the histogram's own labels
    return names, labels


@pytest.fixture(scope="module")
def agents(
    tmp_path_factory: pytest.TempPathFactory, pki: TestPKI, nats_server: NatsServer
) -> Iterator[list[AgentProcess]]:
    work = tmp_path_factory.mktemp("dashboard")
    scp = PynetdicomSCP("DASHSCP").start()
    cloud = AgentProcess(
        "dash-cloud",
        work / "cloud",
        {
            "nats": nats_section(nats_server.url, pki, pki.client("cloud")),
            "targets": [{"ae_title": "DASHSCP", "host": LOOPBACK, "port": scp.port}],
        },
    ).start()
    port = free_port()
    edge = AgentProcess(
        "dash-edge",
        work / "edge",
        {
            "nats": nats_section(nats_server.url, pki, pki.client("edge")),
            "listeners": [{"ae_title": "DASHSCP", "bind": LOOPBACK, "port": port}],
        },
    ).start()
    # traffic, so that the labelled series exist
    assert pynetdicom_echo(port, "DASHSCP")[0] == 0
    assert pynetdicom_store(port, "DASHSCP", [CT]) == [0]
    asyncio.run(publish_garbage(nats_server.url, pki))
    deadline = time.monotonic() + 5
    while cloud.metric("dimse_relay_wire_rejected_total") < 1:
        assert time.monotonic() < deadline, "garbage was not counted"
        time.sleep(0.05)
    yield [edge, cloud]
    edge.stop()
    cloud.stop()
    scp.stop()


async def publish_garbage(url: str, pki: TestPKI) -> None:
    """One invalid message on the relay's open subject (a wire_rejected sample)."""
    import nats

    ctx = ssl.create_default_context(cafile=str(pki.ca))
    tester = pki.client("tester")
    ctx.load_cert_chain(str(tester.cert), str(tester.key))
    nc = await nats.connect(url, tls=ctx)
    try:
        await nc.publish(subjects.open_subject("dimse", "DASHSCP"), b"garbage", reply="_INBOX.x")
        await nc.flush()
    finally:
        await nc.close()


def expressions() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [
        v["query"]["query"] if isinstance(v.get("query"), dict) else str(v.get("query", ""))
        for v in dash["templating"]["list"]
        if v["type"] == "query"
    ]
    return exprs


def test_dashboard_covers_every_agent_metric_family() -> None:
    used = {m for e in expressions() for m in METRIC.findall(e)}
    source = (REPO / "agent" / "dimse_relay" / "metrics.py").read_text()
    families = set(re.findall(r'"(dimse_relay_[a-z_]+)"', source))
    assert families, "no metrics found in metrics.py"
    for family in families:
        assert any(u.startswith(family) for u in used), f"{family} has no panel"


def test_every_dashboard_metric_and_label_exists_in_live_agents(
    agents: list[AgentProcess],
) -> None:
    names, labels = exposition(agents)
    exprs = expressions()
    assert len(exprs) >= 10
    for expr in exprs:
        for metric in METRIC.findall(expr):
            assert metric in names, f"{metric} (in {expr!r}) is not exposed by the agent"
        for metric, matcher in MATCHERS.findall(expr):
            for label in re.findall(r"(\w+)\s*=~?", matcher):
                if label == "instance":  # added by Prometheus when scraping
                    continue
                assert label in labels.get(metric, set()), (metric, label)
        for group in PROMQL_LABEL_LISTS.findall(expr):
            wanted = {g.strip() for g in group.split(",") if g.strip()} - {"instance", "le"}
            have = set().union(*(labels.get(m, set()) for m in METRIC.findall(expr)))
            assert wanted <= have, (expr, wanted - have)
