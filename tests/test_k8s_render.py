"""The Kubernetes roles (nats_k8s, relay_agent_k8s) without a cluster.

Every object is rendered by the real roles (render-only mode: ``*_render_dir``) for several
inventories and validated with kubernetes-validate (strict) for the oldest and newest
Kubernetes it has schemas for; cert-manager objects against cert-manager's documented fields.
The same inventory renders the same bytes. The host role's nats-server.conf, whose template the
ConfigMap shares, still renders byte for byte what it rendered before (tests/golden).
"""

from __future__ import annotations

import concurrent.futures
import filecmp
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.harness import REPO
from tests.harness.k8s import (
    ANSIBLE_PLAYBOOK,
    find,
    load_rendered,
    objects,
    one,
    render_cmd_extra,
    run_playbook,
    validate,
)

pytestmark = pytest.mark.skipif(
    not ANSIBLE_PLAYBOOK.exists(), reason="ansible (deploy extra) not installed"
)

kubernetes_validate = pytest.importorskip("kubernetes_validate")
from kubernetes_validate.utils import all_versions  # noqa: E402

_KNOWN = sorted(set(all_versions()), key=lambda v: tuple(map(int, v.split("."))))
VERSIONS = (_KNOWN[0], _KNOWN[-1])  # the oldest and newest schemas kubernetes-validate has
INVENTORY = REPO / "inventories/example-k8s"

# name -> extra vars on top of inventories/example-k8s (websocket ingress, PKI, 3 replicas)
VARIANTS: dict[str, dict[str, Any]] = {
    "ingress-pki-3": {},
    "loadbalancer-certmanager-3": {
        "nats_k8s_tls_source": "cert-manager",
        "relay_agent_k8s_tls_source": "cert-manager",
        "nats_k8s_edge_access": "loadbalancer",
        "nats_k8s_client_service_type": "ClusterIP",
        "nats_k8s_leafnode_load_balancer_source_ranges": ["203.0.113.0/28"],
    },
    "loadbalancer-pki-1": {"nats_k8s_replicas": 1, "nats_k8s_edge_access": "loadbalancer"},
    "none-clusterissuer-1": {
        "nats_k8s_replicas": 1,
        "nats_k8s_edge_access": "none",
        "nats_k8s_create_namespace": True,
        "nats_k8s_tls_source": "cert-manager",
        "relay_agent_k8s_tls_source": "cert-manager",
        "nats_k8s_cert_manager_issuer_ref": {
            "name": "hospital-ca",
            "kind": "ClusterIssuer",
            "group": "cert-manager.io",
        },
        "relay_agent_k8s_cert_manager_issuer_ref": {
            "name": "hospital-ca",
            "kind": "ClusterIssuer",
            "group": "cert-manager.io",
        },
        "nats_k8s_image_pull_secrets": ["registry"],
        "relay_agent_k8s_image_pull_secrets": ["registry"],
    },
}


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The collection's PKI role, run for the example-k8s inventory."""
    work = tmp_path_factory.mktemp("k8s-pki")
    result = run_playbook(INVENTORY, "playbooks/pki.yml", {"pki_dir": str(work / "pki")}, work)
    assert result.returncode == 0, result.stdout[-4000:]
    return work / "pki"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory, pki_dir: Path) -> dict[str, Path]:
    """Every variant rendered (concurrently), plus the first one a second time."""
    work = tmp_path_factory.mktemp("k8s-render")
    jobs = {**VARIANTS, "ingress-pki-3-again": VARIANTS["ingress-pki-3"]}

    def run(name: str) -> tuple[str, Any]:
        out = work / name
        extra = render_cmd_extra(out, pki_dir, jobs[name])
        return name, run_playbook(INVENTORY, "playbooks/k8s.yml", extra, work / f"{name}-tmp")

    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(pool.map(run, jobs))
    for name, result in results.items():
        assert result.returncode == 0, f"{name}:\n{result.stdout[-4000:]}"
    return {name: work / name for name in jobs}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_object_validates(rendered: dict[str, Path], variant: str) -> None:
    objs = objects(rendered[variant])
    kinds = {o["kind"] for o in objs}
    assert {"StatefulSet", "ConfigMap", "Service", "PodDisruptionBudget", "Deployment"} <= kinds
    for obj in objs:
        try:
            validate(obj, VERSIONS)
        except Exception as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc}")


def test_same_inventory_same_bytes(rendered: dict[str, Path], pki_dir: Path) -> None:
    first, again = rendered["ingress-pki-3"], rendered["ingress-pki-3-again"]
    assert load_rendered(first) == load_rendered(again)
    # and a second run into the same directory changes nothing
    extra = render_cmd_extra(first, pki_dir, VARIANTS["ingress-pki-3"])
    result = run_playbook(INVENTORY, "playbooks/k8s.yml", extra, first.parent / "rerun-tmp")
    assert result.returncode == 0, result.stdout[-4000:]
    assert "changed=0" in result.stdout, result.stdout[-2000:]


def _nats_conf(objs: list[dict[str, Any]]) -> str:
    return one(objs, "ConfigMap", "nats-config")["data"]["nats.conf"]


def test_statefulset_shape(rendered: dict[str, Path]) -> None:
    objs = objects(rendered["ingress-pki-3"])
    sts = one(objs, "StatefulSet", "nats")
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    nats = pod["containers"][0]
    assert spec["replicas"] == 3 and spec["serviceName"] == "nats-headless"
    assert spec["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} == {
        "kubernetes.io/hostname",
        "topology.kubernetes.io/zone",
    }
    assert nats["lifecycle"]["preStop"]["exec"]["command"] == [
        "nats-server",
        "-sl=ldm=/var/run/nats/nats.pid",
    ]
    assert nats["readinessProbe"]["httpGet"] == {
        "path": "/healthz?js-server-only=true",
        "port": "monitor",
    }
    assert nats["livenessProbe"]["httpGet"]["path"] == "/healthz?js-enabled-only=true"
    assert nats["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert nats["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["terminationGracePeriodSeconds"] > 30  # above lame_duck_duration
    annotations = spec["template"]["metadata"]["annotations"]
    assert {"dimse-relay/config-sha256", "dimse-relay/tls-sha256"} <= set(annotations)
    assert [c["name"] for c in pod["containers"]] == ["nats"]  # checksum strategy: no reloader
    pdb = one(objs, "PodDisruptionBudget", "nats")
    assert pdb["spec"]["maxUnavailable"] == 1
    headless = one(objs, "Service", "nats-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    conf = _nats_conf(objs)
    for i in range(3):
        assert f'"tls://nats-{i}.nats-headless.dimse-relay.svc.cluster.local:6222"' in conf
    assert "server_name: $SERVER_NAME\n" in conf
    assert 'http: "0.0.0.0:8222"' in conf and 'pid_file: "/var/run/nats/nats.pid"' in conf
    assert "advertise: " not in conf.replace("no_advertise", "")  # pods advertise their IP
    # every agent, host or Deployment, and the leaf node is a user
    for user in (
        "CN=agent.relay.stmarys.example.org,OU=stmarys,O=Example Health",
        "CN=agent.relay.riverside.example.org,OU=riverside,O=Example Health",
        "CN=agent.ai.dimse-relay,OU=cloud,O=Example Health",
        "CN=agent.archive.dimse-relay,OU=cloud,O=Example Health",
        "CN=leaf.relay.stmarys.example.org,OU=stmarys,O=Example Health",
    ):
        assert f'user: "{user}"' in conf


def test_websocket_ingress_passes_tls_through(rendered: dict[str, Path]) -> None:
    objs = objects(rendered["ingress-pki-3"])
    ingress = one(objs, "Ingress", "nats-websocket")
    path = ingress["spec"]["rules"][0]["http"]["paths"][0]
    assert (path["path"], path["pathType"]) == ("/leafnode", "Prefix")
    assert path["backend"]["service"] == {"name": "nats", "port": {"name": "websocket"}}
    assert ingress["spec"]["rules"][0]["host"] == "nats.cloud.example.org"
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/ssl-passthrough"] == "true"
    assert "tls" not in ingress["spec"]  # the ingress does not terminate TLS
    conf = _nats_conf(objs)
    ws = conf[conf.index("websocket {") :]
    assert 'listen: "0.0.0.0:8443"' in ws and "verify: true" in ws and "no_tls" not in ws
    assert not find(objs, "Service", "nats-leafnodes")
    client = one(objs, "Service", "nats")
    assert client["spec"]["type"] == "LoadBalancer"
    assert client["spec"]["loadBalancerSourceRanges"] == ["203.0.113.0/28", "198.51.100.0/28"]


def test_loadbalancer_and_cert_manager(rendered: dict[str, Path]) -> None:
    objs = objects(rendered["loadbalancer-certmanager-3"])
    lb = one(objs, "Service", "nats-leafnodes")
    assert lb["spec"]["type"] == "LoadBalancer"
    assert lb["spec"]["ports"] == [
        {
            "name": "leafnodes",
            "port": 7422,
            "targetPort": "leafnodes",
            "protocol": "TCP",
            "appProtocol": "tls",
        }
    ]
    assert not find(objs, "Ingress")
    assert "websocket {" not in _nats_conf(objs)
    # cert-manager issues the server, route and agent certificates; no key from the PKI but
    # the CA's (its Issuer signs with the collection's CA)
    certs = {o["metadata"]["name"]: o["spec"] for o in find(objs, "Certificate")}
    assert set(certs) == {
        "nats-server-tls",
        "nats-route-tls",
        "dimse-relay-ai-tls",
        "dimse-relay-archive-tls",
    }
    assert "client auth" in certs["nats-route-tls"]["usages"]
    assert "server auth" in certs["nats-route-tls"]["usages"]
    assert "*.nats-headless.dimse-relay.svc.cluster.local" in certs["nats-route-tls"]["dnsNames"]
    assert "nats.cloud.example.org" in certs["nats-server-tls"]["dnsNames"]
    ai = certs["dimse-relay-ai-tls"]
    assert ai["commonName"] == "agent.ai.dimse-relay"
    assert ai["subject"] == {"organizations": ["Example Health"], "organizationalUnits": ["cloud"]}
    assert one(objs, "Issuer", "nats-ca")["spec"] == {"ca": {"secretName": "nats-ca-issuer"}}
    tls_secrets = [o for o in find(objs, "Secret") if o["type"] == "kubernetes.io/tls"]
    assert [s["metadata"]["name"] for s in tls_secrets] == ["nats-ca-issuer"]
    # renewals happen in the cluster: the reloader sidecar, not a checksum of the Secrets
    pod = one(objs, "StatefulSet", "nats")["spec"]["template"]
    assert [c["name"] for c in pod["spec"]["containers"]] == ["nats", "reloader"]
    assert pod["spec"]["shareProcessNamespace"] is True
    args = pod["spec"]["containers"][1]["args"]
    assert args[:2] == ["-pid", "/var/run/nats/nats.pid"]
    assert "/etc/nats-server/tls/nats-server.crt" in args
    assert "dimse-relay/tls-sha256" not in pod["metadata"]["annotations"]


def test_one_replica_and_external_issuer(rendered: dict[str, Path]) -> None:
    for variant in ("loadbalancer-pki-1", "none-clusterissuer-1"):
        objs = objects(rendered[variant])
        sts = one(objs, "StatefulSet", "nats")
        assert sts["spec"]["replicas"] == 1
        assert "topologySpreadConstraints" not in sts["spec"]["template"]["spec"]
        conf = _nats_conf(objs)
        assert "cluster {" not in conf and "leafnodes {" in conf
    objs = objects(rendered["none-clusterissuer-1"])
    assert not find(objs, "Issuer") and not find(objs, "Ingress")
    assert not find(objs, "Service", "nats-leafnodes")
    assert one(objs, "Namespace", "dimse-relay")
    for cert in find(objs, "Certificate"):
        assert cert["spec"]["issuerRef"]["kind"] == "ClusterIssuer"
    assert not [o for o in find(objs, "Secret") if o["type"] == "kubernetes.io/tls"]
    sts = one(objs, "StatefulSet", "nats")
    assert sts["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "registry"}]


def test_agent_deployments(rendered: dict[str, Path]) -> None:
    objs = objects(rendered["ingress-pki-3"])
    ai = one(objs, "Deployment", "dimse-relay-ai")
    pod = ai["spec"]["template"]["spec"]
    agent = pod["containers"][0]
    assert ai["spec"]["replicas"] == 2
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert agent["resources"]["limits"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert agent["securityContext"]["readOnlyRootFilesystem"] is True
    assert agent["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}
    assert "emptyDir" in volumes["work"] and mounts["work"] == "/var/lib/dimse-relay"
    config = yaml.safe_load(one(objs, "ConfigMap", "dimse-relay-ai-config")["data"]["agent.yaml"])
    assert config["work_dir"] == "/var/lib/dimse-relay"
    # readiness does not depend on the (shared) targets by default (docs/operations.md#readiness)
    assert config["http"] == {"host": "0.0.0.0", "port": 9102, "ready_requires_targets": False}
    assert config["nats"]["servers"] == ["tls://nats.dimse-relay.svc.cluster.local:4222"]
    assert config["nats"]["inbox_prefix"] == "_INBOX.cloud"
    assert [t["ae_title"] for t in config["targets"]] == ["AI_ROUTER"]
    assert [lst["ae_title"] for lst in config["listeners"]] == ["SMH_PACS", "RVH_PACS"]
    service = one(objs, "Service", "dimse-relay-ai")
    assert [p["port"] for p in service["spec"]["ports"]] == [11112, 11113]
    ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    assert one(objs, "PodDisruptionBudget", "dimse-relay-ai")["spec"]["maxUnavailable"] == 1
    secret = one(objs, "Secret", "dimse-relay-ai-tls")
    assert secret["type"] == "kubernetes.io/tls"
    # the archive Deployment has only a target: no Service
    archive = yaml.safe_load(
        one(objs, "ConfigMap", "dimse-relay-archive-config")["data"]["agent.yaml"]
    )
    assert archive["listeners"] == [] and [t["ae_title"] for t in archive["targets"]] == [
        "CLOUD_ARCHIVE"
    ]
    assert not find(objs, "Service", "dimse-relay-archive")
    deploy = one(objs, "Deployment", "dimse-relay-archive")
    volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}
    assert volumes["work"]["emptyDir"]["sizeLimit"] == "50Gi"


def test_rendered_files_are_private(rendered: dict[str, Path]) -> None:
    for path in rendered["ingress-pki-3"].glob("*.yaml"):
        assert path.stat().st_mode & 0o077 == 0, path


@pytest.mark.parametrize("inventory", ["lab", "example"])
def test_host_nats_conf_unchanged_by_the_shared_template(tmp_path: Path, inventory: str) -> None:
    """roles/nats_server renders exactly what it rendered before nats_k8s shared its template."""
    out = tmp_path / inventory
    out.mkdir()
    result = run_playbook(
        REPO / "inventories" / inventory,
        "tests/playbooks/render_host_nats_conf.yml",
        {"render_out": str(out)},
        tmp_path / "tmp",
    )
    assert result.returncode == 0, result.stdout[-4000:]
    golden = REPO / "tests/golden/nats-server-conf" / inventory
    names = sorted(p.name for p in golden.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    _match, mismatch, errors = filecmp.cmpfiles(golden, out, names, shallow=False)
    assert mismatch == [] and errors == [], (mismatch, errors)


# --- The rendered objects, run for real ---------------------------------------------------------
#
# Three nats-server processes on loopback run the nats.conf the ConfigMap carries, with the TLS
# files laid out as the StatefulSet's projected volume mounts them, started with the
# container's args and environment (POD_NAME, SERVER_NAME=$(POD_NAME)). Pod DNS names and the
# shared ports become localhost and distinct ports through the role variables a user would set
# (nats_k8s_*_port, nats_k8s_route_urls, the mount paths): one render per node. Two agents run
# the agent.yaml of their ConfigMaps with their Secrets, and a study is relayed through them.

LOOP_AET = "LOOPSCP"
SCP_FILES = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm")


def _pod_env(container: dict[str, Any], pod_name: str) -> dict[str, str]:
    """The container's environment as the kubelet builds it ($(VAR) references expanded)."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "valueFrom" in var:
            assert var["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}, var
            env[var["name"]] = pod_name
        else:
            value = var["value"]
            for name, known in env.items():
                value = value.replace(f"$({name})", known)
            env[var["name"]] = value
    return env


@pytest.fixture(scope="module")
def loopback(tmp_path_factory: pytest.TempPathFactory):
    import os
    import subprocess

    import pydicom.data
    from tests.harness import NATS_SERVER, require_executable
    from tests.harness.agents import AgentProcess
    from tests.harness.dicom import DcmtkStoreSCP
    from tests.harness.k8s import write_mounts
    from tests.harness.ports import free_port, wait_port

    require_executable(NATS_SERVER)
    work = tmp_path_factory.mktemp("k8s-loop")
    scp = DcmtkStoreSCP(work / "scp", LOOP_AET).start()
    direct = DcmtkStoreSCP(work / "direct", LOOP_AET).start()
    listen_port = free_port()
    inventory = work / "inventory"
    (inventory / "group_vars/all").mkdir(parents=True)
    (inventory / "hosts.yml").write_text(
        yaml.safe_dump(
            {
                "all": {
                    "children": {
                        "k8s_cloud": {
                            "hosts": {
                                "k8s-test": {
                                    "ansible_connection": "local",
                                    "ansible_python_interpreter": "{{ ansible_playbook_python }}",
                                }
                            }
                        }
                    }
                }
            }
        )
    )
    (inventory / "group_vars/all/main.yml").write_text(
        yaml.safe_dump(
            {
                "pki_dir": str(work / "pki"),
                # the pods' names are localhost here; a user adds a public name the same way
                "pki_server_extra_sans": ["DNS:localhost", "IP:127.0.0.1"],
                "dimse_relay_k8s_namespace": "relay-test",
                "dimse_relay_k8s_agents": [
                    {"name": "edge", "site": "edge", "replicas": 1},
                    # its readiness waits for its SCP (entry key; the role default is off)
                    {
                        "name": "cloud",
                        "site": "cloud",
                        "replicas": 1,
                        "ready_requires_targets": True,
                    },
                ],
                "dimse_relay_sites": {
                    "edge": {
                        "zone": "edge",
                        "listeners": [{"ae_title": LOOP_AET, "port": listen_port}],
                    },
                    "cloud": {
                        "zone": "cloud",
                        "targets": [{"ae_title": LOOP_AET, "host": "127.0.0.1", "port": scp.port}],
                    },
                },
                "nats_k8s_edge_access": "loadbalancer",
                "nats_k8s_jetstream_max_file_store": "256M",
                "nats_k8s_jetstream_max_memory_store": "64M",
            }
        )
    )
    result = run_playbook(inventory, "playbooks/pki.yml", {}, work / "tmp")
    assert result.returncode == 0, result.stdout[-4000:]

    nodes = [
        {k: free_port() for k in ("client", "cluster", "monitor", "leafnode")} for _ in range(3)
    ]
    routes = [f"tls://localhost:{n['cluster']}" for n in nodes]
    servers = [f"tls://localhost:{n['client']}" for n in nodes]
    agent_names = ["edge", "cloud", "edge"]  # node i's render also lays out this agent's pod

    def render(i: int) -> Path:
        pod = work / f"nats-{i}"
        out = work / f"render-{i}"
        extra = render_cmd_extra(
            out,
            work / "pki",
            {
                "nats_k8s_client_port": nodes[i]["client"],
                "nats_k8s_cluster_port": nodes[i]["cluster"],
                "nats_k8s_monitor_port": nodes[i]["monitor"],
                "nats_k8s_leafnode_port": nodes[i]["leafnode"],
                "nats_k8s_route_urls": routes,
                "nats_k8s_config_dir": str(pod / "config"),
                "nats_k8s_tls_dir": str(pod / "tls"),
                "nats_k8s_data_dir": str(pod / "data"),
                "nats_k8s_pid_dir": str(pod / "run"),
                "relay_agent_k8s_nats_servers": servers,
                "relay_agent_k8s_tls_dir": str(work / f"agent-{agent_names[i]}" / "tls"),
                "relay_agent_k8s_work_dir": str(work / f"agent-{agent_names[i]}" / "work"),
            },
        )
        res = run_playbook(inventory, "playbooks/k8s.yml", extra, work / f"tmp-{i}")
        assert res.returncode == 0, res.stdout[-4000:]
        return out

    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        outs = list(pool.map(render, range(3)))

    procs: list[subprocess.Popen[bytes]] = []
    agents: list[AgentProcess] = []
    try:
        for i, out in enumerate(outs):
            objs = objects(out)
            sts = one(objs, "StatefulSet", "nats")
            pod_spec = sts["spec"]["template"]["spec"]
            container = pod_spec["containers"][0]
            volumes = {v["name"]: v for v in pod_spec["volumes"]}
            mounts = {m["name"]: Path(m["mountPath"]) for m in container["volumeMounts"]}
            config = one(objs, "ConfigMap", volumes["config"]["configMap"]["name"])
            mounts["config"].mkdir(parents=True)
            for key, text in config["data"].items():
                (mounts["config"] / key).write_text(text)
            write_mounts(volumes["tls"], objs, mounts["tls"])
            mounts["pid"].mkdir(parents=True)
            mounts["data"].mkdir(parents=True)
            env = {**os.environ, **_pod_env(container, f"nats-{i}")}
            check = subprocess.run(
                [str(NATS_SERVER), "-t", *container["args"]],
                capture_output=True,
                text=True,
                env=env,
            )
            assert check.returncode == 0, check.stderr + check.stdout
            log = (work / f"nats-{i}.log").open("ab")
            procs.append(
                subprocess.Popen(
                    [str(NATS_SERVER), *container["args"]], stdout=log, stderr=log, env=env
                )
            )
        for node, proc in zip(nodes, procs, strict=True):
            wait_port(node["client"], 15, proc=proc)
            wait_port(node["monitor"], 15, proc=proc)

        for i, name in ((0, "edge"), (1, "cloud")):
            objs = objects(outs[i])
            deploy = one(objs, "Deployment", f"dimse-relay-{name}")
            pod_spec = deploy["spec"]["template"]["spec"]
            container = pod_spec["containers"][0]
            volumes = {v["name"]: v for v in pod_spec["volumes"]}
            mounts = {m["name"]: Path(m["mountPath"]) for m in container["volumeMounts"]}
            write_mounts(volumes["tls"], objs, mounts["tls"])
            agent_yaml = one(objs, "ConfigMap", volumes["config"]["configMap"]["name"])
            config = yaml.safe_load(agent_yaml["data"]["agent.yaml"])
            check = subprocess.run(
                [str(REPO / ".venv/bin/dimse-relay"), "check-config", "/dev/stdin"],
                input=agent_yaml["data"]["agent.yaml"],
                capture_output=True,
                text=True,
            )
            assert check.returncode == 0, check.stdout + check.stderr
            # AgentProcess gives each agent its own loopback HTTP port and work dir (two
            # "pods" share this machine); NATS, TLS, listeners and targets are the ConfigMap's.
            assert config["http"]["ready_requires_targets"] is (name == "cloud"), config["http"]
            keep = {k: v for k, v in config.items() if k not in ("http", "work_dir")}
            keep["http"] = {"ready_requires_targets": config["http"]["ready_requires_targets"]}
            agents.append(AgentProcess(f"k8s-{name}", work / f"agent-{name}", keep).start())
        yield {
            "nodes": nodes,
            "procs": procs,
            "agents": agents,
            "scp": scp,
            "direct": direct,
            "port": listen_port,
            "files": [Path(pydicom.data.get_testdata_file(f)) for f in SCP_FILES],
            "work": work,
        }
    finally:
        for agent in agents:
            agent.stop()
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        scp.stop()
        direct.stop()


def test_configmap_nats_conf_forms_a_cluster(loopback) -> None:
    import json
    import urllib.request

    names = set()
    for node in loopback["nodes"]:
        base = f"http://127.0.0.1:{node['monitor']}"
        for _ in range(100):
            with urllib.request.urlopen(f"{base}/routez", timeout=2) as rsp:
                routez = json.loads(rsp.read())
            if {r.get("remote_name") for r in routez.get("routes") or []} >= {
                f"nats-{i}" for i in range(3)
            } - {routez["server_name"]}:
                break
            import time

            time.sleep(0.1)
        names.add(routez["server_name"])
        peers = {r.get("remote_name") for r in routez["routes"]}
        assert peers == {f"nats-{i}" for i in range(3)} - {routez["server_name"]}, routez
        with urllib.request.urlopen(f"{base}/varz", timeout=2) as rsp:
            varz = json.loads(rsp.read())
        assert varz["cluster"]["tls_required"] and varz["cluster"]["tls_verify"]
        assert varz["tls_verify"] is True
    assert names == {"nats-0", "nats-1", "nats-2"}  # server_name: $SERVER_NAME from the pod


def test_study_relayed_through_the_rendered_cluster(loopback) -> None:
    from tests.harness.dicom import dataset_bytes, storescu

    files = loopback["files"]
    direct = storescu(loopback["direct"].port, files, LOOP_AET)
    assert direct.statuses() == ["Success"] * len(files), direct.output[-2000:]
    through = storescu(loopback["port"], files, LOOP_AET)
    assert through.returncode == 0, through.output[-2000:]
    assert through.statuses() == ["Success"] * len(files), through.output[-2000:]
    relayed = loopback["scp"].files()
    expected = loopback["direct"].files()
    assert [p.name for p in relayed] == [p.name for p in expected]
    for got, want in zip(relayed, expected, strict=True):
        assert dataset_bytes(got) == dataset_bytes(want), got.name
    # the agents authenticated as their Deployments' certificate subjects (verify_and_map)
    for agent in loopback["agents"]:
        code, body = agent.http_get("/readyz")
        assert code == 200, (agent.name, body, agent.log_tail())
