"""The collection's Kubernetes roles in render-only mode, and what a pod would see.

``render`` runs playbooks/k8s.yml with ``nats_k8s_render_dir`` and ``relay_agent_k8s_render_dir``
set (the roles write every object as YAML instead of applying it). ``validate`` checks an object
against the offline Kubernetes schemas of kubernetes-validate, and the cert-manager objects (no
schema there) against the fields cert-manager documents. ``write_mounts`` lays a Secret's keys
out as the projected volume of a pod would.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from . import REPO

ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"


def run_playbook(
    inventory: Path | str, playbook: str, extra: dict[str, Any], workdir: Path, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """ansible-playbook from the checkout (ansible.cfg puts the collection on the path)."""
    workdir.mkdir(parents=True, exist_ok=True)
    extra_file = workdir / f"extra-{len(list(workdir.glob('extra-*.json')))}.json"
    extra_file.write_text(json.dumps(extra))
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0")
    env["PATH"] = f"{ANSIBLE_PLAYBOOK.parent}:{env.get('PATH', '')}"
    env["ANSIBLE_LOCAL_TEMP"] = str(workdir / "ansible-tmp")
    return subprocess.run(
        [str(ANSIBLE_PLAYBOOK), "-i", str(inventory), playbook, "-e", f"@{extra_file}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def render_cmd_extra(out: Path, pki_dir: Path, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "pki_dir": str(pki_dir),
        "nats_k8s_render_dir": str(out),
        "relay_agent_k8s_render_dir": str(out),
        **extra,
    }


def load_rendered(out: Path) -> dict[str, bytes]:
    """File name -> bytes of every rendered object."""
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.yaml"))}


def objects(out: Path) -> list[dict[str, Any]]:
    return [yaml.safe_load(data) for data in load_rendered(out).values()]


def find(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(objs, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


# --- cert-manager (cert-manager.io/v1), fields as documented in its API reference -------------

CERTIFICATE_SPEC = {
    "secretName": str,
    "secretTemplate": dict,
    "commonName": str,
    "dnsNames": list,
    "ipAddresses": list,
    "uris": list,
    "emailAddresses": list,
    "subject": dict,
    "literalSubject": str,
    "duration": str,
    "renewBefore": str,
    "renewBeforePercentage": int,
    "usages": list,
    "privateKey": dict,
    "issuerRef": dict,
    "isCA": bool,
    "keystores": dict,
    "revisionHistoryLimit": int,
    "additionalOutputFormats": list,
    "encodeUsagesInRequest": bool,
    "nameConstraints": dict,
    "otherNames": list,
}
SUBJECT_FIELDS = {
    "organizations",
    "countries",
    "organizationalUnits",
    "localities",
    "provinces",
    "streetAddresses",
    "postalCodes",
    "serialNumber",
}
KEY_USAGES = {
    "signing",
    "digital signature",
    "content commitment",
    "key encipherment",
    "key agreement",
    "data encipherment",
    "cert sign",
    "crl sign",
    "encipher only",
    "decipher only",
    "any",
    "server auth",
    "client auth",
    "code signing",
    "email protection",
    "s/mime",
    "ipsec end system",
    "ipsec tunnel",
    "ipsec user",
    "timestamping",
    "ocsp signing",
    "microsoft sgc",
    "netscape sgc",
}
ISSUER_TYPES = {"acme", "ca", "selfSigned", "vault", "venafi"}
CA_ISSUER_FIELDS = {"secretName", "crlDistributionPoints", "ocspServers", "issuingCertificateURLs"}
GO_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def check_cert_manager(obj: dict[str, Any]) -> None:
    """Raise AssertionError unless ``obj`` uses only documented cert-manager v1 fields."""
    assert obj["apiVersion"] == "cert-manager.io/v1", obj["apiVersion"]
    assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}, set(obj)
    meta = obj["metadata"]
    assert DNS1123.match(meta["name"]) and DNS1123.match(meta["namespace"]), meta
    spec = obj["spec"]
    if obj["kind"] == "Certificate":
        unknown = set(spec) - set(CERTIFICATE_SPEC)
        assert not unknown, f"unknown Certificate fields {unknown}"
        for key, value in spec.items():
            assert isinstance(value, CERTIFICATE_SPEC[key]), (key, value)
        assert DNS1123.match(spec["secretName"]), spec["secretName"]
        assert set(spec["issuerRef"]) <= {"name", "kind", "group"} and spec["issuerRef"]["name"]
        assert spec["issuerRef"].get("kind", "Issuer") in {"Issuer", "ClusterIssuer"}
        assert set(spec.get("usages", [])) <= KEY_USAGES, spec.get("usages")
        assert set(spec.get("subject", {})) <= SUBJECT_FIELDS, spec.get("subject")
        assert set(spec.get("secretTemplate", {})) <= {"annotations", "labels"}
        key = spec.get("privateKey", {})
        assert set(key) <= {"algorithm", "encoding", "size", "rotationPolicy"}, key
        assert key.get("algorithm", "RSA") in {"RSA", "ECDSA", "Ed25519"}
        assert key.get("rotationPolicy", "Always") in {"Never", "Always"}
        if key.get("algorithm") == "ECDSA":
            assert key.get("size", 256) in {256, 384, 521}
        for field in ("duration", "renewBefore"):
            if field in spec:
                assert GO_DURATION.match(spec[field]), (field, spec[field])
        assert spec.get("commonName") or spec.get("dnsNames") or spec.get("subject")
        assert len(spec.get("commonName", "")) <= 64
    elif obj["kind"] in ("Issuer", "ClusterIssuer"):
        assert len(set(spec) & ISSUER_TYPES) == 1 and set(spec) <= ISSUER_TYPES, spec
        if "ca" in spec:
            assert set(spec["ca"]) <= CA_ISSUER_FIELDS and spec["ca"]["secretName"]
    else:
        raise AssertionError(f"unexpected cert-manager kind {obj['kind']}")


def validate(obj: dict[str, Any], versions: tuple[str, ...]) -> None:
    """kubernetes-validate (strict: unknown fields are errors) for each version; cert-manager
    objects by hand."""
    import kubernetes_validate

    if obj["apiVersion"].startswith("cert-manager.io/"):
        check_cert_manager(obj)
        return
    for version in versions:
        kubernetes_validate.validate(obj, version, strict=True)


def secret_data(secret: dict[str, Any]) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in secret.get("data", {}).items()}


def write_mounts(volume: dict[str, Any], objs: list[dict[str, Any]], target: Path) -> None:
    """Lay the Secrets of a projected volume out as the kubelet would mount them."""
    target.mkdir(parents=True, exist_ok=True)
    for source in volume["projected"]["sources"]:
        secret = one(objs, "Secret", source["secret"]["name"])
        data = secret_data(secret)
        for item in source["secret"]["items"]:
            path = target / item["path"]
            path.write_bytes(data[item["key"]])
            path.chmod(0o600)
