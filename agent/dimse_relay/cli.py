"""Command line: ``dimse-relay run|check-config|status|queue``."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path

from dimse_relay import __version__
from dimse_relay.config import ConfigError, load_config

EXIT_CONFIG = 2


def _load(path: str) -> object:
    try:
        return load_config(Path(path))
    except ConfigError as exc:
        for line in exc.errors:
            # Errors that carry their own file:line location are printed as they are.
            own = line.startswith((path, str(Path(path))))
            print(line if own else f"{path}: {line}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    print(f"{args.config}: configuration is valid")
    del cfg
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from dimse_relay.agent import run
    from dimse_relay.config import AgentConfig

    cfg = _load(args.config)
    assert isinstance(cfg, AgentConfig)
    try:
        run(cfg)
    except OSError as exc:
        print(f"dimse-relay: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


# The readiness fields of /status (agent.ready) that must all be true.
_READINESS_CHECKS = (
    "nats_connected",
    "listeners_bound",
    "targets_subscribed",
    "subscriptions_permitted",
    "edge_queue_ready",
)


def cmd_status(args: argparse.Namespace) -> int:
    url = args.url
    if args.config:
        from dimse_relay.config import AgentConfig

        cfg = _load(args.config)
        assert isinstance(cfg, AgentConfig)
        url = f"http://{cfg.http.host}:{cfg.http.port}"
    try:
        with urllib.request.urlopen(f"{url}/status", timeout=5) as rsp:  # noqa: S310
            data = json.loads(rsp.read())
    except OSError as exc:
        print(f"dimse-relay: agent at {url} not reachable: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(f"agent {data['agent']} {data['version']}  ready={data['ready']}")
        if not data["ready"]:
            failing = [k for k in _READINESS_CHECKS if data.get(k) is False]
            if data.get("ready_requires_targets") and data.get("targets_reachable") is False:
                failing.append("targets_reachable")
            print(f"  not ready: {', '.join(f'{k}=false' for k in failing) or 'unknown'}")
        print(f"  NATS: connected={data['nats_connected']} server={data['nats_server']}")
        for lst in data["listeners"]:
            print(
                f"  listener {lst['ae_title']} :{lst['port']} -> {lst['relays_to']} ({lst['mode']})"
            )
        reach = data.get("target_reachability") or {}
        for tgt in data["targets"]:
            probe = reach.get(tgt["ae_title"]) or {}
            reachable = probe.get("reachable")
            state = "?" if reachable is None else "reachable" if reachable else "UNREACHABLE"
            why = f" ({probe['reason']})" if probe.get("reason") else ""
            print(f"  target {tgt['ae_title']} -> {tgt['called']}@{tgt['scp']}  {state}{why}")
        print(f"  open target sessions: {data['target_sessions']}")
    return 0 if data["ready"] else 3


def _cmd_queue(args: argparse.Namespace) -> int:
    from dimse_relay.config import AgentConfig
    from dimse_relay.queue_cli import cmd_queue

    cfg = _load(args.config)
    assert isinstance(cfg, AgentConfig)
    return cmd_queue(cfg, args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dimse-relay", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dimse-relay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run one agent")
    p_run.add_argument("--config", "-c", required=True)
    p_run.set_defaults(func=cmd_run)
    p_check = sub.add_parser("check-config", help="validate a configuration file")
    p_check.add_argument("config")
    p_check.set_defaults(func=cmd_check_config)
    p_status = sub.add_parser("status", help="show a running agent's state")
    p_status.add_argument("--config", "-c")
    p_status.add_argument("--url", default="http://127.0.0.1:9102")
    p_status.add_argument("--json", action="store_true")
    p_status.set_defaults(func=cmd_status)
    from dimse_relay.queue_cli import add_parser

    add_parser(sub)
    sub.choices["queue"].set_defaults(func=_cmd_queue)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
