"""`swarm-agent rules` and `swarm-agent rules reload`: the CLI's side of the ListRules and
ReloadRules calls (agent/rulereload.py). Output and exit codes as in client.py: a reload
the agent rejects (FILE:LINE: reason; the rules in use stay) exits 6."""
from __future__ import annotations

import argparse
from typing import Callable

from agent.cli.client import EXIT_OK, Client, _ago, _print_json, _table, to_dict
from agent.proto.swarm.control.v1 import control_pb2 as pb


def add_parsers(add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    sp = add("rules", "the rules in use with their versions and hit counts; "
             "`rules reload` re-reads every rule file (as SIGHUP does)")
    sp.add_argument("action", nargs="?", choices=("list", "reload"), default="list",
                    help="list (default) or reload: a bad file is rejected whole with file, "
                    "line and reason (exit 6) and the rules in use stay")


def rules(c: Client, args: argparse.Namespace) -> int:
    """`rules`: the rules in use with versions and hits; `rules reload`: re-read them."""
    if args.action == "reload":
        done = c.call("ReloadRules", pb.ReloadRulesRequest())
        if args.json:
            _print_json(to_dict(done))
        else:
            how = "reloaded" if done.changed else "reloaded, unchanged"
            print(f"rules {how}: {len(done.rules)} rules, version {done.ruleset_version} "
                  f"(in use {done.took_s * 1e3:.1f} ms after the request)")
        return EXIT_OK
    listing = c.call("ListRules", pb.ListRulesRequest())
    if args.json:
        _print_json(to_dict(listing))
    else:
        print(format_rules(listing))
    return EXIT_OK


def format_rules(listing: pb.ListRulesResponse) -> str:
    rs = listing.ruleset
    models = sum(r.id.startswith("anomaly.") for r in listing.rules)   # listed beside them
    lines = [f"rule set {rs.version}: {len(listing.rules) - models} rules"
             + (f" (and {models} anomaly detectors)" if models else "")
             + f", loaded {_ago(rs.loaded_at)}, {rs.reloads} reloads, {rs.reload_failures} rejected"]
    if rs.last_error:
        lines.append(f"last rejected reload ({_ago(rs.last_error_at)}): {rs.last_error}")
    rows = [[f"{r.id}@{r.version}", r.event_class, r.severity,
             r.action + (f"/{r.scope}" if r.scope else ""), str(r.hits),
             str(r.false_positives), str(r.suppressed), _ago(r.last_hit_at),
             r.source] for r in listing.rules]
    lines.append(_table(["RULE", "CLASS", "SEVERITY", "ACTION", "HITS", "FALSE POS",
                         "SUPPRESSED", "LAST HIT", "FROM"], rows))
    if listing.retired_hits:
        lines.append("hits of rules no longer in use: " + ", ".join(
            f"{name} {n}" for name, n in sorted(listing.retired_hits.items())))
    return "\n".join(lines)


COMMANDS: dict[str, Callable[[Client, argparse.Namespace], int]] = {"rules": rules}
