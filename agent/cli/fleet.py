"""`swarm-agent fleet [--refused] [--all] [--limit N] [--json]`: the fleet decisions in
force on this node (blocks the mesh decided for the whole fleet, signed and verified
here), or with --refused the decisions this agent refused and why. ListFleet over the
control API."""
from __future__ import annotations

import argparse
import json
import time
from typing import Callable

from agent.cli.client import EXIT_OK, Client, _ago, _print_json, _table, to_dict
from agent.proto.swarm.control.v1 import control_pb2 as pb


def add_parsers(add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    sp = add("fleet", "fleet decisions in force here (blocks decided by the mesh for every "
             "node), or --refused: those this agent refused and why")
    sp.add_argument("--refused", action="store_true", help="the refused decisions, newest first")
    sp.add_argument("--all", action="store_true", help="every block in force (default: 100)")
    sp.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")


def fleet(c: Client, args: argparse.Namespace) -> int:
    limit = 100_000 if args.all else args.limit
    got = c.call("ListFleet", pb.ListFleetRequest(limit=limit, refused=args.refused))
    if args.json:
        _print_json(to_dict(got))
    else:
        print(format_fleet(got, args.refused))
    return EXIT_OK


def _who(provenance_json: str) -> str:
    try:
        p = json.loads(provenance_json or "{}")
    except ValueError:
        return "?"
    if p.get("kind") == "operator":
        return f"operator {p.get('operator', '?')}"
    nodes = p.get("nodes") or []
    return f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}" + (
        f" ({', '.join(p.get('rules') or [])})" if p.get("rules") else "")


def format_fleet(got: pb.ListFleetResponse, refused: bool) -> str:
    if not got.enabled:
        return "fleet decisions are off (no fleet.nats_url in the config)"
    head = (f"fleet: {'connected' if got.connected else 'NOT connected'}, stream seq "
            f"{got.seq} applied (lag {got.lag}), {got.in_force} blocks in force"
            + (f"; last error: {got.last_error}" if got.last_error else ""))
    if refused:
        if not got.refusals:
            return head + "\nno refused decisions"
        rows = [[_ago(r.at), str(r.seq), r.target or "-", r.reason, r.detail[:80]]
                for r in got.refusals]
        return head + "\n" + _table(["AT", "SEQ", "TARGET", "REASON", "DETAIL"], rows)
    if not got.decisions:
        return head
    now = time.time()
    rows = [[d.target, f"{max(0.0, d.expires_at - now):.0f} s", str(d.seq), _who(d.provenance_json),
             d.reason[:60]] for d in got.decisions]
    more = got.in_force - len(got.decisions)
    return (head + "\n" + _table(["TARGET", "LEFT", "SEQ", "DECIDED BY", "REASON"], rows)
            + (f"\n... and {more} more (--all)" if more > 0 else ""))


COMMANDS: dict[str, Callable[[Client, argparse.Namespace], int]] = {"fleet": fleet}
