"""The collection's filters (plugins/filter/relay.py) agree with the agent's subject rules."""

from __future__ import annotations

import importlib.util
import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dimse_relay import subjects

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("relay_filters", ROOT / "plugins/filter/relay.py")
assert _spec and _spec.loader
relay = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(relay)

AET_CHARS = "".join(c for c in map(chr, range(0x20, 0x7F)) if c != "\\")


@pytest.mark.parametrize("char", list(AET_CHARS.replace(" ", "")))
def test_every_character_encodes_like_the_agent(char: str) -> None:
    aet = f"A{char}B"
    assert relay.aet_subject_token(aet) == subjects.encode_aet(aet)
    assert subjects.decode_aet(relay.aet_subject_token(aet)) == aet


@given(st.text(alphabet=AET_CHARS, min_size=1, max_size=16).filter(lambda s: s.strip(" ")))
def test_random_ae_titles_encode_like_the_agent(aet: str) -> None:
    token = relay.aet_subject_token(aet)
    assert token == subjects.encode_aet(aet)
    assert not set(token) - set(string.ascii_letters + string.digits + "_-~")


def test_padding_is_stripped_and_empty_is_refused() -> None:
    assert relay.aet_subject_token("  PACS  ") == "PACS"
    with pytest.raises(ValueError):
        relay.aet_subject_token("   ")


SITES = {
    "hosp": {
        "zone": "edge",
        "listeners": [{"ae_title": "CLOUD.AI", "port": 11112}],
        "targets": [{"ae_title": "HOSP PACS", "host": "10.0.0.5", "port": 104}],
    },
    "cloud": {
        "zone": "cloud",
        "listeners": [{"ae_title": "PACS", "remote_ae_title": "HOSP PACS", "port": 11112}],
        "targets": [{"ae_title": "CLOUD.AI", "host": "127.0.0.1", "port": 11113}],
    },
    "other": {"zone": "edge", "targets": [{"ae_title": "OTHER", "host": "h", "port": 104}]},
}


def test_permissions_follow_the_agents_subjects() -> None:
    hosp = relay.relay_site_permissions(SITES, "hosp", "dimse")
    ai = subjects.aet_root("dimse", "CLOUD.AI")
    pacs = subjects.aet_root("dimse", "HOSP PACS")
    assert hosp["publish"]["allow"] == [
        subjects.open_subject("dimse", "CLOUD.AI"),
        f"{ai}.session.>",
        "_INBOX.cloud.>",
    ]
    assert hosp["subscribe"]["allow"] == ["_INBOX.hosp.>", f"{pacs}.open", f"{pacs}.session.>"]
    cloud = relay.relay_site_permissions(SITES, "cloud", "dimse")
    # The cloud listener relays to the far AET (remote_ae_title), not its local name.
    assert f"{pacs}.open" in cloud["publish"]["allow"]
    assert "_INBOX.hosp.>" in cloud["publish"]["allow"]
    assert f"{ai}.open" in cloud["subscribe"]["allow"]


def test_a_site_without_peers_gets_nothing_it_does_not_need() -> None:
    other = relay.relay_site_permissions(SITES, "other", "dimse")
    assert other["publish"] == {"deny": [">"]}
    # A target-only site still needs its own reply inbox: the agent's target side makes NATS
    # requests too (a real target-only agent was refused "_INBOX.<site>.<id>.*" and went unready).
    assert other["subscribe"]["allow"] == [
        "_INBOX.other.>",
        "dimse.v1.aet.OTHER.open",
        "dimse.v1.aet.OTHER.session.>",
    ]


def test_queued_listeners_get_their_own_queue_assets_only() -> None:
    """A site with a queued listener may use its queue's JetStream API (names from its queue
    section), never delete a stream; the leaf node's own link (jetstream=False) gets none."""
    import copy

    sites = copy.deepcopy(SITES)
    sites["hosp"]["listeners"][0]["mode"] = "queued"
    sites["hosp"]["queue"] = {"stream": "HOSP_Q"}
    allow = relay.relay_site_permissions(sites, "hosp", "dimse")["publish"]["allow"]
    assert "$JS.API.STREAM.CREATE.HOSP_Q" in allow
    assert "$JS.API.CONSUMER.MSG.NEXT.HOSP_Q.>" in allow
    assert "$JS.API.STREAM.INFO.OBJ_DIMSE_OBJECTS" in allow  # default bucket name
    assert "dimse.v1.queue.>" in allow and "$O.DIMSE_OBJECTS.>" in allow
    assert not [a for a in allow if "DELETE.HOSP_Q" in a or ".STREAM.DELETE." in a]
    assert "$JS.API.STREAM.MSG.DELETE.DIMSE_DEAD" in allow  # the CLI's retry and purge
    assert not [a for a in allow if "DIMSE_QUEUE" in a]
    leaf = relay.relay_site_permissions(sites, "hosp", "dimse", False)["publish"]["allow"]
    assert not [a for a in leaf if a.startswith("$")]
    sync = relay.relay_site_permissions(SITES, "hosp", "dimse")["publish"]["allow"]
    assert not [a for a in sync if a.startswith("$")]


def test_client_dn_matches_what_nats_prints() -> None:
    assert relay.relay_client_dn("edge1", "hosp") == "CN=agent.edge1,OU=hosp,O=dimse-relay"
    assert relay.relay_client_dn("edge1", "hosp", "leaf") == "CN=leaf.edge1,OU=hosp,O=dimse-relay"
    with pytest.raises(ValueError):
        relay.relay_client_dn("a,b", "hosp")


def test_well_formed_sites_have_no_problems() -> None:
    assert relay.relay_sites_problems(SITES) == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda s: s["hosp"]["listeners"].append({"ae_title": "X" * 17, "port": 11113}),
            "dimse_relay_sites.hosp.listeners[1].ae_title: AE title 'XXXXXXXXXXXXXXXXX' is longer",
        ),
        (
            lambda s: s["other"]["targets"].append(
                {"ae_title": "CLOUD.AI", "host": "h", "port": 1}
            ),
            "dimse_relay_sites.other.targets[1].ae_title: AE title 'CLOUD.AI' is already served by "
            "dimse_relay_sites.cloud.targets[0]",
        ),
        (
            lambda s: s["hosp"]["listeners"].append({"ae_title": "OTHER", "port": 11112}),
            "dimse_relay_sites.hosp.listeners[1].port: port 11112 is already used by "
            "dimse_relay_sites.hosp.listeners[0]",
        ),
        (
            lambda s: s["hosp"]["listeners"].append({"ae_title": "NOBODY", "port": 2000}),
            "dimse_relay_sites.hosp.listeners[1]: no site has a target for AE title 'NOBODY'",
        ),
        (lambda s: s["other"].update(zone="moon"), "dimse_relay_sites.other.zone: must be"),
        (
            lambda s: s["other"]["targets"][0].update(colour="red"),
            "dimse_relay_sites.other.targets[0]: unknown keys ['colour']",
        ),
        (
            lambda s: s["hosp"]["listeners"][0].update(mode="later"),
            "dimse_relay_sites.hosp.listeners[0].mode: must be one of ['sync', 'queued']",
        ),
        (
            lambda s: s["hosp"].update(queue={"max_byte": 1}),
            "dimse_relay_sites.hosp.queue: unknown keys ['max_byte']",
        ),
        (
            lambda s: s["hosp"].update(queue={"stream": "A.B"}),
            "dimse_relay_sites.hosp.queue.stream: JetStream names are",
        ),
    ],
)
def test_problems_name_the_variable(change, expected: str) -> None:
    import copy

    sites = copy.deepcopy(SITES)
    change(sites)
    problems = relay.relay_sites_problems(sites)
    assert any(p.startswith(expected) for p in problems), problems
