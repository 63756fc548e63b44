"""Filters shared by the dimse_relay.deploy roles.

The NATS permissions the collection renders must name exactly the subjects the agent uses, so
``aet_subject_token`` re-implements ``dimse_relay.subjects.encode_aet`` (the collection must work
on a controller that does not have the agent installed). tests/test_ansible_filters.py checks
that both agree on every printable ASCII character and on random AE titles.
"""

from __future__ import annotations

import re
import string
from typing import Any

DOCUMENTATION = ""  # documented per filter in the YAML files next to this module

_SAFE = frozenset(string.ascii_letters + string.digits + "_-")
_SITE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
SUBJECT_VERSION = "v1"
LISTENER_KEYS = (
    "ae_title",
    "remote_ae_title",
    "bind",
    "port",
    "mode",
    "allowed_calling_aets",
    "max_associations",
    "max_pdu",
    "timeouts",
)
TARGET_KEYS = (
    "ae_title",
    "host",
    "port",
    "called_ae_title",
    "calling_ae_title",
    "max_sessions",
    "max_pdu",
    "timeouts",
    "kind",
    "filesystem",
    "dicomweb",
)
TARGET_KINDS = ("scp", "filesystem", "dicomweb")
LISTENER_MODES = ("sync", "queued")
# The agent's queue section (dimse_relay.config.QueueConfig), per site.
QUEUE_KEYS = (
    "stream",
    "dead_letter_stream",
    "object_bucket",
    "domain",
    "replicas",
    "max_bytes",
    "max_items",
    "inline_max_bytes",
    "object_chunk_bytes",
    "duplicate_window_s",
    "max_attempts",
    "backoff_initial_s",
    "backoff_max_s",
    "concurrency",
    "ack_wait_s",
    "write_timeout_s",
    "stats_interval_s",
)
QUEUE_DEFAULT_NAMES = {
    "stream": "DIMSE_QUEUE",
    "dead_letter_stream": "DIMSE_DEAD",
    "object_bucket": "DIMSE_OBJECTS",
}
_JS_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class FilterError(ValueError):
    pass


def aet_subject_token(ae_title: str) -> str:
    """One NATS subject token for an AE title (same rule as dimse_relay.subjects.encode_aet)."""
    if not isinstance(ae_title, str):
        raise FilterError(f"aet_subject_token: expected a string, got {type(ae_title).__name__}")
    stripped = ae_title.strip(" ")
    if not stripped:
        raise FilterError("aet_subject_token: empty AE title")
    try:
        raw = stripped.encode("ascii")
    except UnicodeEncodeError:
        raise FilterError(f"aet_subject_token: AE title is not ASCII: {ae_title!r}") from None
    return "".join(chr(b) if chr(b) in _SAFE else f"~{b:02X}" for b in raw)


def _far_aet(listener: dict[str, Any]) -> str:
    return str(listener.get("remote_ae_title") or listener["ae_title"]).strip(" ")


def relay_inbox_prefix(site: str) -> str:
    """The reply-inbox prefix of a site's agents: only that site may subscribe below it."""
    return f"_INBOX.{site}"


def _queue_permissions(spec: dict[str, Any], prefix: str) -> list[str]:
    """What an agent with queued listeners publishes on its own JetStream (the leaf node's):
    the API of its three assets only, their acks and flow control, and the queue subjects."""
    queue = {**QUEUE_DEFAULT_NAMES, **(spec.get("queue") or {})}
    streams = [queue["stream"], queue["dead_letter_stream"], f"OBJ_{queue['object_bucket']}"]
    api = "$JS.API" if not queue.get("domain") else f"$JS.{queue['domain']}.API"
    # STREAM.NAMES: nats-py looks up the bucket's stream by subject to read an object. No
    # STREAM.DELETE or CONSUMER.DELETE on the queue: an agent cannot drop what it queued.
    subjects = [f"{api}.INFO", f"{api}.STREAM.NAMES"]
    for index, stream in enumerate(streams):
        # Messages are removed from the queue only by acks; dead letters and objects by the
        # CLI's retry/purge and the deliverer's cleanup.
        subjects += [f"{api}.STREAM.{verb}.{stream}" for verb in ("CREATE", "UPDATE", "INFO")]
        subjects.append(f"{api}.STREAM.MSG.GET.{stream}")
        if index == 1:
            subjects.append(f"{api}.STREAM.MSG.DELETE.{stream}")
        if index == 2:
            subjects.append(f"{api}.STREAM.PURGE.{stream}")
        subjects += [
            f"{api}.CONSUMER.CREATE.{stream}",
            f"{api}.CONSUMER.CREATE.{stream}.>",
            f"{api}.CONSUMER.DURABLE.CREATE.{stream}.>",
            f"{api}.CONSUMER.INFO.{stream}.>",
            f"{api}.CONSUMER.MSG.NEXT.{stream}.>",
            f"{api}.DIRECT.GET.{stream}",
            f"{api}.DIRECT.GET.{stream}.>",
            f"$JS.ACK.{stream}.>",
            f"$JS.FC.{stream}.>",
        ]
    # Reading an object uses an ordered consumer, which nats-py deletes when done.
    subjects.append(f"{api}.CONSUMER.DELETE.{streams[2]}.>")
    subjects += [
        f"{prefix}.{SUBJECT_VERSION}.queue.>",
        f"{prefix}.{SUBJECT_VERSION}.dead.>",
        f"$O.{queue['object_bucket']}.>",
    ]
    return subjects


def relay_site_permissions(
    sites: dict[str, Any], site: str, prefix: str = "dimse", jetstream: bool = True
) -> dict:
    """Least-privilege NATS permissions for the agents (and leaf node) of one site.

    Listener side: publish the open and session subjects of the AETs it relays to, subscribe
    its own reply inbox. Target side: subscribe the open and session subjects of its own AETs,
    publish replies into the inboxes of the sites whose listeners relay to those AETs. A site
    with queued listeners also gets its edge queue's JetStream API (``jetstream``: not for
    the leaf node's own connection to the cluster, whose JetStream stays in its domain).
    """
    if site not in sites:
        raise FilterError(f"relay_site_permissions: unknown site {site!r}")
    spec = sites[site] or {}
    publish: list[str] = []
    subscribe: list[str] = []

    def root(aet: str) -> str:
        return f"{prefix}.{SUBJECT_VERSION}.aet.{aet_subject_token(aet)}"

    listeners = spec.get("listeners") or []
    for lst in listeners:
        publish += [f"{root(_far_aet(lst))}.open", f"{root(_far_aet(lst))}.session.>"]
    own = {str(t["ae_title"]).strip(" ") for t in spec.get("targets") or []}
    # The reply inbox of the site itself: listeners wait for replies there, and so do targets
    # (the agent's NATS requests, e.g. flow-control acknowledgements, reply below it).
    if listeners or own:
        subscribe.append(f"{relay_inbox_prefix(site)}.>")
    for aet in sorted(own):
        subscribe += [f"{root(aet)}.open", f"{root(aet)}.session.>"]
    # filesystem sink targets announce every stored instance (docs/sinks.md)
    for tgt in spec.get("targets") or []:
        if tgt.get("kind") == "filesystem" and (tgt.get("filesystem") or {}).get("events", True):
            token = aet_subject_token(str(tgt["ae_title"]))
            publish.append(f"{prefix}.{SUBJECT_VERSION}.events.{token}.stored")
    for other in sorted(sites):
        if any(_far_aet(lst) in own for lst in (sites[other] or {}).get("listeners") or []):
            publish.append(f"{relay_inbox_prefix(other)}.>")
    if jetstream and any(lst.get("mode") == "queued" for lst in listeners):
        publish += _queue_permissions(spec, prefix)

    def side(subjects: list[str]) -> dict[str, list[str]]:
        unique = list(dict.fromkeys(subjects))
        return {"allow": unique} if unique else {"deny": [">"]}

    return {"publish": side(publish), "subscribe": side(subscribe)}


def relay_client_dn(host: str, site: str, kind: str = "agent", org: str = "dimse-relay") -> str:
    """RFC 2253 subject of a client certificate, as nats-server's verify_and_map reads it.

    The PKI role issues the certificate with subject O=org, OU=site, CN=<kind>.<host>; NATS
    prints RDNs last first.
    """
    if kind not in ("agent", "leaf"):
        raise FilterError(f"relay_client_dn: kind must be agent or leaf, got {kind!r}")
    for name, value in (("host", host), ("site", site), ("org", org)):
        if not value or any(c in str(value) for c in ',+"\\<>;='):
            raise FilterError(f"relay_client_dn: {name} {value!r} needs no DN escaping")
    return f"CN={kind}.{host},OU={site},O={org}"


def _ae_problem(where: str, value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip(" "):
        return f"{where}: AE title must be a non-empty string"
    if len(value) > 16:
        return f"{where}: AE title {value!r} is longer than 16 characters"
    if any(ord(c) < 0x20 or ord(c) > 0x7E or c == "\\" for c in value):
        return f"{where}: AE title {value!r} may only contain printable ASCII except backslash"
    return None


def relay_sites_problems(sites: Any, var: str = "dimse_relay_sites") -> list[str]:
    """Everything wrong with the sites model, one message per problem, naming the variable."""
    if not isinstance(sites, dict) or not sites:
        return [f"{var}: must be a non-empty mapping of site name to site"]
    problems: list[str] = []
    served: dict[str, str] = {}
    for name, spec in sites.items():
        here = f"{var}.{name}"
        if not isinstance(name, str) or not _SITE.match(name):
            problems.append(f"{here}: site names are lower-case letters, digits, '_' and '-'")
        spec = spec or {}
        if spec.get("zone") not in ("edge", "cloud"):
            problems.append(f"{here}.zone: must be 'edge' or 'cloud'")
        queue = spec.get("queue")
        if queue is not None:
            if not isinstance(queue, dict):
                problems.append(f"{here}.queue: must be a mapping (docs/queued-mode.md)")
            else:
                unknown = sorted(set(queue) - set(QUEUE_KEYS))
                if unknown:
                    problems.append(f"{here}.queue: unknown keys {unknown}")
                for key in QUEUE_DEFAULT_NAMES:
                    if key in queue and not _JS_NAME.match(str(queue[key])):
                        problems.append(
                            f"{here}.queue.{key}: JetStream names are letters, digits, '_' and '-'"
                        )
        ports: dict[tuple[str, int], str] = {}
        for idx, lst in enumerate(spec.get("listeners") or []):
            w = f"{here}.listeners[{idx}]"
            unknown = sorted(set(lst) - set(LISTENER_KEYS))
            if unknown:
                problems.append(f"{w}: unknown keys {unknown}")
            for key in ("ae_title", "remote_ae_title"):
                if key in lst and lst[key] is not None:
                    problem = _ae_problem(f"{w}.{key}", lst[key])
                    if problem:
                        problems.append(problem)
            if lst.get("mode", "sync") not in LISTENER_MODES:
                problems.append(f"{w}.mode: must be one of {list(LISTENER_MODES)}")
            for idx2, aet in enumerate(lst.get("allowed_calling_aets") or []):
                problem = _ae_problem(f"{w}.allowed_calling_aets[{idx2}]", aet)
                if problem:
                    problems.append(problem)
            port = lst.get("port")
            if not isinstance(port, int) or not 1 <= port <= 65535:
                problems.append(f"{w}.port: must be an integer 1-65535")
                continue
            key = (str(lst.get("bind", "0.0.0.0")), port)  # noqa: S104
            clash = [k for k in ports if k[1] == port and "0.0.0.0" in (k[0], key[0])]  # noqa: S104
            if key in ports or clash:
                other = ports.get(key) or ports[clash[0]]
                problems.append(f"{w}.port: port {port} is already used by {other}")
            ports[key] = w
        for idx, tgt in enumerate(spec.get("targets") or []):
            w = f"{here}.targets[{idx}]"
            unknown = sorted(set(tgt) - set(TARGET_KEYS))
            if unknown:
                problems.append(f"{w}: unknown keys {unknown}")
            for key in ("ae_title", "called_ae_title", "calling_ae_title"):
                if key in tgt and tgt[key] is not None:
                    problem = _ae_problem(f"{w}.{key}", tgt[key])
                    if problem:
                        problems.append(problem)
            kind = tgt.get("kind", "scp")
            if kind not in TARGET_KINDS:
                problems.append(f"{w}.kind: must be one of {list(TARGET_KINDS)}")
            elif kind == "scp":
                if not tgt.get("host"):
                    problems.append(f"{w}.host: required")
                if not isinstance(tgt.get("port"), int):
                    problems.append(f"{w}.port: must be an integer 1-65535")
            elif not isinstance(tgt.get(kind), dict):
                problems.append(f"{w}.{kind}: required for kind {kind}")
            aet = str(tgt.get("ae_title", "")).strip(" ")
            if aet in served:
                problems.append(f"{w}.ae_title: AE title {aet!r} is already served by {served[aet]}")
            else:
                served[aet] = w
    for name, spec in sites.items():
        for idx, lst in enumerate((spec or {}).get("listeners") or []):
            if "ae_title" not in lst or not isinstance(lst.get("ae_title"), str):
                continue
            far = _far_aet(lst)
            if far not in served:
                problems.append(
                    f"{var}.{name}.listeners[{idx}]: no site has a target for AE title {far!r}"
                )
    return problems


def relay_host_site_problems(hosts: list[dict[str, Any]], sites: dict[str, Any]) -> list[str]:
    """For the agent hosts' variables ``hosts``: each must name a site of ``sites`` in
    ``dimse_relay_site``; the message quotes the value given."""
    problems = []
    for host in hosts:
        name = host.get("inventory_hostname", "?")
        if "dimse_relay_site" not in host:
            problems.append(f"host {name}: dimse_relay_site is not set")
        elif host["dimse_relay_site"] not in sites:
            problems.append(
                f"host {name}: dimse_relay_site {host['dimse_relay_site']!r} names a site "
                f"missing from dimse_relay_sites (sites: {sorted(sites)})"
            )
    return problems


def nats_k8s_dns_names(name: str, namespace: str, domain: str = "cluster.local") -> list[str]:
    """DNS names a NATS server/route certificate needs in Kubernetes: the client Service
    <name> and every pod <name>-<i>.<name>-headless, short and fully qualified."""
    for what, value in (("name", name), ("namespace", namespace), ("domain", domain)):
        if not value or not re.match(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$", str(value)):
            raise FilterError(f"nats_k8s_dns_names: {what} {value!r} is not a DNS label")
    out = []
    for base in (name, f"*.{name}-headless"):
        out += [base, f"{base}.{namespace}", f"{base}.{namespace}.svc"]
        out.append(f"{base}.{namespace}.svc.{domain}")
    return out


def nats_k8s_route_urls(
    name: str, namespace: str, domain: str, replicas: int, port: int = 6222
) -> list[str]:
    """tls:// route URL of every StatefulSet pod through the headless Service."""
    return [
        f"tls://{name}-{i}.{name}-headless.{namespace}.svc.{domain}:{int(port)}"
        for i in range(int(replicas))
    ]


def relay_k8s_agent_users(agents: list[dict[str, Any]], namespace: str) -> list[dict[str, str]]:
    """NATS identity of each Kubernetes agent Deployment: its client certificate is
    CN=agent.<name>.<namespace>,OU=<site>,O=<org> (relay_client_dn of <name>.<namespace>)."""
    out = []
    for agent in agents or []:
        if "name" not in agent or "site" not in agent:
            raise FilterError(f"relay_k8s_agent_users: an agent needs name and site: {agent!r}")
        out.append({"name": f"{agent['name']}.{namespace}", "site": str(agent["site"])})
    return out


def relay_k8s_agent_certs(agents: list[dict[str, Any]], namespace: str) -> list[dict[str, Any]]:
    """The pki role's certificate entries for the Kubernetes agent Deployments: one client
    certificate agent-<name> each, subject O=<org>, OU=<site>, CN=agent.<name>.<namespace>."""
    return [
        {
            "name": f"agent-{user['name'].rsplit('.', 1)[0]}",
            "cn": f"agent.{user['name']}",
            "eku": ["clientAuth"],
            "sans": "none",
            "site": user["site"],
        }
        for user in relay_k8s_agent_users(agents, namespace)
    ]


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "aet_subject_token": aet_subject_token,
            "relay_site_permissions": relay_site_permissions,
            "relay_client_dn": relay_client_dn,
            "relay_inbox_prefix": relay_inbox_prefix,
            "relay_sites_problems": relay_sites_problems,
            "relay_host_site_problems": relay_host_site_problems,
            "nats_k8s_dns_names": nats_k8s_dns_names,
            "nats_k8s_route_urls": nats_k8s_route_urls,
            "relay_k8s_agent_users": relay_k8s_agent_users,
            "relay_k8s_agent_certs": relay_k8s_agent_certs,
        }
