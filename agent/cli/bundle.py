"""`swarm-agent bundle apply PATH | list | rollback`: the CLI's side of the ApplyBundle,
ListBundles and RollbackBundle calls (agent/bundles.py). PATH is a directory holding
rules/*.yaml and optional config parts (anomaly.yaml: the part "anomaly"), or one rule
file. Output and exit codes as in client.py: a bundle the agent refuses for what it is
exits 2, one whose rule set does not load (FILE:LINE: reason) or nothing to roll back
exits 6; either way nothing changed."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

from agent.bundles import MAX_BYTES, MAX_FILES
from agent.cli.client import EXIT_OK, EXIT_USAGE, Client, CommandError, _print_json, _table, \
    to_dict
from agent.proto.swarm.control.v1 import control_pb2 as pb


def add_parsers(add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    sp = add("bundle", "rule/model-config bundles: apply one (checked whole, atomic, "
             "versioned), list them, roll back to the previous one")
    sp.add_argument("action", nargs="?", choices=("list", "apply", "rollback"), default="list",
                    help="list (default); apply PATH; rollback (to the bundle before the "
                    "one in force, or to none)")
    sp.add_argument("path", nargs="?", default="",
                    help="apply: a directory of rules/*.yaml and optional anomaly.yaml, or "
                    "one rule file")
    sp.add_argument("--label", default="", help="apply: your name for this version")
    sp.add_argument("--comment", default="", help="why, for the record")


def read_bundle(path: str) -> tuple[list[pb.BundleFile], list[pb.BundleFile]]:
    """(rule files, config parts) of `path`; CommandError (exit 2) with one sentence."""
    if not path:
        raise CommandError("bundle apply needs a PATH: a directory (rules/*.yaml, "
                           "anomaly.yaml) or one rule file", EXIT_USAGE)
    p = Path(path)
    if p.is_dir():
        rules = sorted((p / "rules").glob("*.yaml")) if (p / "rules").is_dir() else []
        parts = sorted(p.glob("*.yaml"))
    elif p.is_file():
        rules, parts = [p], []
    else:
        raise CommandError(f"bundle {path}: no such file or directory", EXIT_USAGE)
    if len(rules) + len(parts) > MAX_FILES:
        raise CommandError(f"bundle {path}: {len(rules) + len(parts)} files; at most "
                           f"{MAX_FILES}", EXIT_USAGE)
    total, out = 0, ([], [])
    for files, kind in ((rules, 0), (parts, 1)):
        for f in files:
            try:
                if not f.is_file():
                    raise CommandError(f"bundle file {f} is not a regular file", EXIT_USAGE)
                total += f.stat().st_size
                if total > MAX_BYTES:
                    raise CommandError(f"bundle {path} is over {MAX_BYTES} bytes (1 MiB)",
                                       EXIT_USAGE)
                data = f.read_bytes()
            except OSError as e:
                raise CommandError(f"cannot read {f}: {e.strerror}", EXIT_USAGE) from None
            out[kind].append(pb.BundleFile(name=f.name if kind == 0 else f.stem, content=data))
    if not out[0] and not out[1]:
        raise CommandError(f"bundle {path} holds no rules/*.yaml and no config part",
                           EXIT_USAGE)
    return out


def bundle(c: Client, args: argparse.Namespace) -> int:
    if args.action == "apply":
        rules, parts = read_bundle(args.path)
        done = c.call("ApplyBundle", pb.ApplyBundleRequest(
            rules=rules, parts=parts, label=args.label, comment=args.comment))
        if args.json:
            _print_json(to_dict(done))
        else:
            b = done.bundle
            print(f"bundle {b.number} {b.version}" + (f" ({b.label})" if b.label else "")
                  + f" in force: {len(done.rules)} rules, rule set {done.ruleset_version}")
        return EXIT_OK
    if args.action == "rollback":
        done = c.call("RollbackBundle", pb.RollbackBundleRequest(comment=args.comment))
        if args.json:
            _print_json(to_dict(done))
        else:
            now = f"bundle {done.in_force}" if done.in_force else "no bundle (the packaged " \
                "rules and rules_extra)"
            print(f"bundle {done.rolled_back} rolled back; in force: {now}, rule set "
                  f"{done.ruleset_version}")
        return EXIT_OK
    found = c.call("ListBundles", pb.ListBundlesRequest())
    if args.json:
        _print_json(to_dict(found))
        return EXIT_OK
    print(format_bundles(found))
    return EXIT_OK


def format_bundles(found: pb.ListBundlesResponse) -> str:
    lines = []
    if found.problem:
        lines.append(f"degraded: {found.problem}")
    if not found.bundles:
        lines.append("no bundles: the packaged rules and rules_extra are in use")
        return "\n".join(lines)
    rows = [[("* " if b.in_force else "  ") + str(b.number), b.version, b.label,
             time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(b.applied_at)) if b.applied_at
             else "", b.by, str(b.previous or "-"),
             ", ".join([*b.files, *(f"[{p}]" for p in b.parts)]) or b.problem, b.comment]
            for b in found.bundles]
    lines.append(_table(["  #", "VERSION", "LABEL", "APPLIED (UTC)", "BY", "PREVIOUS",
                         "FILES", "COMMENT"], rows))
    return "\n".join(lines)


COMMANDS: dict[str, Callable[[Client, argparse.Namespace], int]] = {"bundle": bundle}
