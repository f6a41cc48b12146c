"""The `swarm-agent` command.

Exit codes: 0 success, 1 runtime failure, 2 bad input (config, arguments), 3 agent not
running (status). Users see one sentence, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from agent import __version__, config
from agent.config import ConfigError

EXIT_FAILURE, EXIT_USAGE, EXIT_NOT_RUNNING = 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="swarm-agent",
        description="Swarm node security agent: detects attacks with eBPF and mitigates them with nftables.")
    p.add_argument("--version", action="version", version=f"swarm-agent {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", metavar="FILE",
                        help=f"YAML config (default: {config.SYSTEM_CONFIG} if present, else built-in defaults)")

    run = sub.add_parser("run", help="run the agent in the foreground (in this network namespace)")
    with_config(run)
    run.add_argument("--dry-run", action="store_true", help="detect and record, change nothing on the host")

    st = sub.add_parser("status", help="probes, active mitigations and incidents by class")
    with_config(st)
    st.add_argument("--json", action="store_true", help="machine-readable output")

    cl = sub.add_parser("cleanup", help="remove the agent's nftables table (and nothing else)")
    with_config(cl)

    demo = sub.add_parser("demo", help="attack a throw-away victim namespace and show the timeline")
    demo.add_argument("--patterns", default=None,
                      help="comma-separated attacks to run (default: all); see --list")
    demo.add_argument("--list", action="store_true", help="list the attack patterns and exit")
    demo.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _load_config(path: str | None) -> config.Config:
    if path is None and config.SYSTEM_CONFIG.is_file():
        path = str(config.SYSTEM_CONFIG)
    return config.load(path)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"swarm-agent: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def cmd_run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from agent import daemon, logs
    from agent.enforce.base import EnforceError

    cfg = _load_config(args.config)
    if args.dry_run:
        cfg = replace(cfg, dry_run=True)
    if os.geteuid() != 0:
        print("swarm-agent: run needs root (or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN)", file=sys.stderr)
        return EXIT_USAGE
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

    cfg = _load_config(args.config)
    try:
        NftEnforcer(cfg).remove()
    except EnforceError as e:
        print(f"swarm-agent: {e}", file=sys.stderr)
        return EXIT_FAILURE
    print("removed table inet swarm_agent")
    return 0


def read_status(cfg: config.Config) -> dict:
    """What the agent last published plus the database's view; works when it is down."""
    from agent.state.store import Store

    out: dict = {"running": False, "agent": None}
    try:
        agent = json.loads(cfg.status_path.read_text())
    except (OSError, ValueError):
        agent = None
    if agent:
        out["agent"] = agent
        out["running"] = bool(agent.get("ready")) and _alive(agent.get("pid"))
    if cfg.db_path.exists():
        now = time.time()
        store = Store(cfg.db_path)
        try:
            out["mitigations"] = [_mitigation_dict(m, now) for m in store.active_mitigations(now)]
            out["incidents_by_class"] = store.counts_by_class()
        finally:
            store.close()
    else:
        out["mitigations"], out["incidents_by_class"] = [], {}
    return out


def _alive(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return Path(f"/proc/{pid}").exists()


def _mitigation_dict(m, now: float) -> dict:
    return {"id": m.id, "kind": str(m.kind), "target": m.target, "state": str(m.state),
            "remaining_s": None if m.expires_at is None else round(m.remaining_s(now), 1),
            "incident": m.incident_id, "reason": m.reason}


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _load_config(args.config)
    st = read_status(cfg)
    if args.json:
        print(json.dumps(st, indent=2, default=str))
    else:
        print(format_status(st))
    return 0 if st["running"] else EXIT_NOT_RUNNING


def format_status(st: dict) -> str:
    agent = st.get("agent") or {}
    lines = []
    if st["running"]:
        up = time.time() - agent.get("started_at", time.time())
        mode = " (dry run)" if agent.get("dry_run") else ""
        lines.append(f"agent: running{mode}, pid {agent['pid']}, up {up:.0f} s, version {agent['version']}")
    else:
        lines.append("agent: not running (showing the last recorded state)")
    lines.append("probes:")
    for name, p in sorted((agent.get("probes") or {}).items()):
        reason = f" - {p['reason']}" if p.get("reason") else ""
        lines.append(f"  {name:<28} {p['state']}{reason}")
    if not agent.get("probes"):
        lines.append("  (none reported)")
    if agent.get("ringbuf_losses"):
        lines.append(f"  ring buffer losses: {agent['ringbuf_losses']}")
    lines.append("incidents by class:")
    counts = st.get("incidents_by_class") or {}
    for cls, n in sorted(counts.items()):
        lines.append(f"  {cls:<20} {n['total']} total, {n['open']} open, {n['mitigated']} mitigated, "
                     f"{n['escalated']} escalated, deadline missed {n['deadline_missed']}")
    if not counts:
        lines.append("  (none)")
    mits = st.get("mitigations") or []
    lines.append(f"active mitigations: {len(mits)}")
    for m in mits:
        left = "no expiry" if m["remaining_s"] is None else f"{m['remaining_s']:.0f} s left"
        lines.append(f"  {m['kind']:<18} {m['target']:<28} {m['state']:<8} {left}")
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.cli import demo

    return demo.main(args)


COMMANDS = {"run": cmd_run, "status": cmd_status, "cleanup": cmd_cleanup, "demo": cmd_demo}

if __name__ == "__main__":
    sys.exit(main())
