"""The `swarm-agent` command.

Exit codes: see agent.cli.client.EXIT_CODES_HELP (0 success, 1 failure, 2 bad input,
3 agent not running, 4 not found, 5 permission denied, 6 refused). Users see one
sentence, never a traceback. Every command but run, cleanup, check-config, mesh-csr and
demo talks to the agent through the control API (agent/cli/client.py).
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from agent import __version__, config
from agent.cli import bundle, client, feedback, fleet, gpu, isolation, meshcsr, rules
from agent.cli.text import clean
from agent.config import ConfigError

EXIT_FAILURE, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_DENIED = 1, 2, 3, 5


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="swarm-agent",
        description="Swarm node security agent: detects attacks with eBPF and mitigates them with nftables.",
        epilog=client.EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"swarm-agent {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", metavar="FILE",
                        help=f"YAML config (default: {config.SYSTEM_CONFIG} if present, else built-in defaults)")

    run = sub.add_parser("run", help="run the agent in the foreground (in this network namespace)")
    with_config(run)
    run.add_argument("--dry-run", action="store_true", help="detect and record, change nothing on the host")

    _control_parsers(sub, with_config)

    cc = sub.add_parser("check-config", help="validate the config and its rules files; "
                        "changes nothing, needs no agent and no root")
    with_config(cc)

    meshcsr.add_parser(sub)

    cl = sub.add_parser("cleanup", help="remove the agent's nftables tables (and nothing else)")
    with_config(cl)

    demo = sub.add_parser("demo", help="attack a throw-away victim namespace and show the timeline")
    demo.add_argument("--patterns", default=None,
                      help="comma-separated attacks to run (default: all); see --list")
    demo.add_argument("--list", action="store_true", help="list the attack patterns and exit")
    demo.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _control_parsers(sub, with_config) -> None:
    """The control commands' subparsers (each with --config and the connection options)."""
    def add(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, epilog=client.EXIT_CODES_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        with_config(sp)
        client.add_connection_args(sp)
        return sp

    add("status", "version, uptime, probes, incidents and deadlines per class")
    sp = add("incidents", "list incidents (newest first), or --watch changes as they happen")
    sp.add_argument("--watch", action="store_true", help="live incidents, then every change")
    sp.add_argument("--state", action="append", help="only this state (repeatable)")
    sp.add_argument("--class", dest="event_class", help="only this event class")
    sp.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    sp = add("incident", "one incident with its timeline and mitigations")
    sp.add_argument("id", help="incident id (a unique prefix will do)")
    sp = add("ack", "acknowledge an incident")
    sp.add_argument("id", help="incident id (a unique prefix will do)")
    sp.add_argument("--comment", help="why, for the timeline")
    sp = add("resolve", "resolve an incident (or mark it a false positive)")
    sp.add_argument("id", help="incident id (a unique prefix will do)")
    sp.add_argument("--false-positive", action="store_true",
                    help="it was not an attack: also lift its mitigations, and keep its rules "
                    "from alerting on the same thing again (a feedback record per rule; see "
                    "`swarm-agent feedback`)")
    sp.add_argument("--comment", help="why, for the timeline (required with --false-positive "
                    "unless --no-feedback: the exception's recorded reason)")
    feedback.add_resolve_args(sp)
    sp = add("mitigations", "mitigations in force")
    sp.add_argument("--all", action="store_true", help="also lifted, expired and failed ones")
    sp.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    sp = add("block", "block (or rate-limit, or reroute) an address or CIDR")
    sp.add_argument("target", help="IPv4/IPv6 address or CIDR")
    how = sp.add_mutually_exclusive_group()
    how.add_argument("--rate-limit", action="store_true", help="rate-limit instead of block")
    how.add_argument("--reroute", action="store_true", help="reroute to the sinkhole instead")
    sp.add_argument("--ttl", type=float, metavar="S",
                    help="lifetime in seconds (default: mitigation.default_ttl_s)")
    sp.add_argument("--reason", help="why, for the record")
    sp = add("unblock", "lift the mitigations of an address or CIDR, or one by id")
    sp.add_argument("target", help="address, CIDR or mitigation id (a unique prefix will do)")
    isolation.add_parsers(add)
    rules.add_parsers(add)
    gpu.add_parsers(add)
    feedback.add_parsers(add)
    fleet.add_parsers(add)
    bundle.add_parsers(add)
    sp = add("audit", "the audit log of control calls, newest first")
    sp.add_argument("--identity", help="only calls by this identity")
    sp.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")


def _load_config(path: str | None) -> config.Config:
    if path is None and config.SYSTEM_CONFIG.is_file():
        path = str(config.SYSTEM_CONFIG)
    return config.load(path)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"swarm-agent: {clean(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def cmd_run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from agent import daemon, logs
    from agent.enforce.base import EnforceError

    # SIGHUP reloads the rules once the agent has read them (agent.daemon.run_forever);
    # until then its default (ending the process) must not apply: the rules are read anew.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if os.geteuid() != 0:
        print("swarm-agent: permission denied: run needs root (it loads BPF programs and "
              "owns an nftables table)", file=sys.stderr)
        return EXIT_DENIED
    cfg = _load_config(args.config)
    if args.dry_run:
        cfg = replace(cfg, dry_run=True)
    logs.setup(cfg.log_level)
    try:
        daemon.run_forever(cfg)
    except EnforceError as e:
        print(f"swarm-agent: cannot set up nftables: {e}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    from agent.enforce.base import EnforceError
    from agent.enforce.nft import NftEnforcer

    if os.geteuid() != 0:
        print("swarm-agent: permission denied: cleanup needs root (it removes the nftables "
              "table inet swarm_agent)", file=sys.stderr)
        return EXIT_DENIED
    cfg = _load_config(args.config)
    try:
        NftEnforcer(cfg).remove()
    except EnforceError as e:
        print(f"swarm-agent: {e}", file=sys.stderr)
        return EXIT_DENIED if "not permitted" in str(e) else EXIT_FAILURE
    print("removed table inet swarm_agent (and netdev swarm_agent_uplink, inet "
          "swarm_agent_bridge, inet swarm_agent_fleet where present)")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """Exit 0 when `run` would accept the config and its rules, 2 with the sentence if not
    (start-time checks that depend on the host, such as interfaces, are not made)."""
    from agent.detect.rules import RuleError
    from agent.detect.ruleset import load_ruleset

    cfg = _load_config(args.config)
    try:
        loaded = load_ruleset(cfg.rule_paths)
    except RuleError as e:
        raise ConfigError(str(e)) from None
    print(f"config {args.config or 'defaults'}: valid, {len(loaded.rules)} rules from "
          f"{', '.join(map(str, cfg.rule_paths))} (rule set {loaded.version})")
    return 0


def cmd_control(args: argparse.Namespace) -> int:
    """status, incidents, block, ...: one call (or a watch) over the control API."""
    # gRPC's own log lines (a failed handshake, ...) would come on top of our sentence.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    command = {**client.COMMANDS, **isolation.COMMANDS, **rules.COMMANDS,
               **gpu.COMMANDS, **feedback.COMMANDS, **fleet.COMMANDS,
               **bundle.COMMANDS}[args.command]
    return client.run(command, args, _load_config(args.config))


def cmd_demo(args: argparse.Namespace) -> int:
    """The demo's attack generators live in the checkout's lab (swarmlab/), which the
    packages leave out: a provider machine carries no attack code."""
    try:
        demo = importlib.import_module("swarmlab.demo")
    except ModuleNotFoundError as e:
        if e.name not in ("swarmlab", "swarmlab.demo"):
            raise
        print("swarm-agent: the demo is not part of the installed package (it carries no "
              "attack code); run it from a source checkout: ./install.sh, then "
              ".venv/bin/swarm-agent demo", file=sys.stderr)
        return 4
    return demo.main(args)


COMMANDS = {"run": cmd_run, "cleanup": cmd_cleanup, "demo": cmd_demo,
            "check-config": cmd_check_config, "mesh-csr": meshcsr.cmd,
            **{name: cmd_control for name in (*client.COMMANDS, *isolation.COMMANDS,
                                               *rules.COMMANDS, *gpu.COMMANDS,
                                               *feedback.COMMANDS, *fleet.COMMANDS,
                                               *bundle.COMMANDS)}}

if __name__ == "__main__":
    sys.exit(main())
