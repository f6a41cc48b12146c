"""`swarm-agent feedback [--all]`, `swarm-agent feedback revert ID`, and the feedback
options of `swarm-agent resolve --false-positive`: the CLI's side of ListFeedback,
RevertFeedback and ResolveIncident (agent/respond/feedbackbook.py). Output and exit codes
as in client.py: a refused scope or lifetime exits 2 and changes nothing."""
from __future__ import annotations

import argparse
import time
from typing import Callable

from agent.cli.client import (EXIT_OK, EXIT_USAGE, Client, CommandError, _ago, _print_json,
                              _table, _unique, to_dict)
from agent.proto.swarm.control.v1 import control_pb2 as pb


def add_resolve_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--scope", metavar="KIND[=VALUE]",
                    help="with --false-positive: what the feedback covers: exe, address, "
                    "cgroup, container or node (default: the most specific one the incident "
                    "gives: one destination, else its executable, container or cgroup; "
                    "never the node unless asked)")
    sp.add_argument("--learn", action="store_true",
                    help="with --false-positive: teach the anomaly model this is normal, "
                    "instead of only not alerting")
    sp.add_argument("--ttl", type=float, metavar="S",
                    help="with --false-positive: the feedback's lifetime (default 30 days)")
    sp.add_argument("--force", action="store_true",
                    help="accept an address scope wider than /16 (IPv4) or /32 (IPv6), or "
                    "the root cgroup")
    sp.add_argument("--no-feedback", action="store_true",
                    help="with --false-positive: record the verdict only, change no detection")


def fill_resolve(req: pb.ResolveIncidentRequest, args: argparse.Namespace) -> None:
    if not args.false_positive and (args.scope or args.learn or args.ttl is not None
                                    or args.no_feedback or args.force):
        raise CommandError("--scope, --learn, --ttl, --force and --no-feedback go with "
                           "--false-positive", EXIT_USAGE)
    req.scope, req.learn, req.force = args.scope or "", args.learn, args.force
    req.no_feedback = args.no_feedback
    if args.ttl is not None:
        req.ttl_s = args.ttl


def show_resolved(c: Client, done: pb.Incident, args: argparse.Namespace) -> int:
    made = c.call("ListFeedback", pb.ListFeedbackRequest(incident_id=done.id, limit=100))
    if args.json:
        _print_json({**to_dict(done), "feedback": [to_dict(r) for r in made.records]})
        return EXIT_OK
    print(f"incident {done.id} marked false positive ({done.event_class} on {done.entity})")
    for r in made.records:
        print(f"feedback {r.id[:12]}: {_action(r)} for {r.rule} on {r.scope_kind} "
              f"{r.scope_value} until {_ago(r.expires_at)} "
              f"(revert: swarm-agent feedback revert {r.id[:12]})")
    return EXIT_OK


def add_parsers(add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    sp = add("feedback", "false-positive verdicts in force (scoped exceptions to one rule); "
             "`feedback revert ID` makes the rule alert again")
    sp.add_argument("action", nargs="?", choices=("list", "revert"), default="list")
    sp.add_argument("id", nargs="?", help="with revert: the record's id (a unique prefix will do)")
    sp.add_argument("--all", action="store_true", help="also reverted and expired records")
    sp.add_argument("--comment", help="with revert: why, for the incident's timeline")
    sp.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")


def feedback(c: Client, args: argparse.Namespace) -> int:
    if args.action == "revert":
        if not args.id:
            raise CommandError("feedback revert needs the record's id", EXIT_USAGE)
        done = c.call("RevertFeedback", pb.RevertFeedbackRequest(
            id=_record_id(c, args.id), comment=args.comment or ""))
        if args.json:
            _print_json(to_dict(done))
        else:
            print(f"feedback {done.id} reverted: {done.rule} alerts again on "
                  f"{done.scope_kind} {done.scope_value}")
        return EXIT_OK
    if args.id:
        raise CommandError("an id goes with `feedback revert`", EXIT_USAGE)
    found = c.call("ListFeedback", pb.ListFeedbackRequest(all=args.all, limit=args.limit))
    if args.json:
        _print_json([to_dict(r) for r in found.records])
    else:
        print(format_feedback(found.records))
    return EXIT_OK


def _record_id(c: Client, given: str) -> str:
    if len(given) >= 32:
        return given
    found = c.call("ListFeedback", pb.ListFeedbackRequest(all=True, limit=1000)).records
    return _unique([r.id for r in found if r.id.startswith(given)], given, "feedback record")


def _action(r: pb.FeedbackRecord) -> str:
    return "learn as normal" if r.action == "learn" else "do not alert"


def _state(r: pb.FeedbackRecord) -> str:
    if r.reverted_at:
        return f"reverted by {r.reverted_by}"
    return "live" if r.live else "expired"


def format_feedback(records: list[pb.FeedbackRecord]) -> str:
    if not records:
        return "no feedback records"
    now = time.time()
    rows = [[r.id[:12], f"{r.rule}@{r.rule_version}", f"{r.scope_kind}={r.scope_value}",
             r.action, _state(r), str(r.hits),
             _ago(r.expires_at) if r.expires_at > now or not r.live else "-",
             r.by, r.incident_id[:12], r.reason] for r in records]
    return _table(["ID", "RULE", "SCOPE", "ACTION", "STATE", "HITS", "EXPIRES", "BY",
                   "INCIDENT", "REASON"], rows)


COMMANDS: dict[str, Callable[[Client, argparse.Namespace], int]] = {"feedback": feedback}
