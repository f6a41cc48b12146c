"""`swarm-agent isolate` and `swarm-agent release`: the CLI's side of the Isolate and
Release calls (agent/control/isolation.py). Output and exit codes as in client.py."""
from __future__ import annotations

import argparse
from typing import Callable

from agent.cli.client import (EXIT_OK, EXIT_USAGE, Client, CommandError, _left, _print_json,
                              _unique, partial, to_dict)
from agent.proto.swarm.control.v1 import control_pb2 as pb

SCOPES = {"node": pb.NODE, "service": pb.SERVICE, "peer": pb.PEER}


def add_parsers(add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    sp = add("isolate", "isolate the node or a service (cgroup), or quarantine a WireGuard peer")
    sp.add_argument("scope", choices=sorted(SCOPES),
                    help="node: only the mesh/management allowlist gets through; service: cut "
                         "and freeze a cgroup; peer: remove a WireGuard peer (config kept)")
    sp.add_argument("target", nargs="?", default="",
                    help="service: cgroup v2 path (/system.slice/x.service); peer: IFNAME:KEY")
    sp.add_argument("--force", action="store_true",
                    help="node: isolate even though no mesh/management network is allowlisted")
    sp.add_argument("--ttl", type=float, metavar="S",
                    help="lifetime in seconds (default: mitigation.isolation_ttl_s, "
                         "null: until released)")
    sp.add_argument("--reason", help="why, for the record")
    sp = add("release", "lift an isolation or quarantine: node, a cgroup path, IFNAME:KEY or an id")
    sp.add_argument("target", help="node, /cgroup/path, IFNAME:KEY, or a mitigation id "
                                   "(a unique prefix will do)")


def isolate(c: Client, args: argparse.Namespace) -> int:
    if args.scope != "node" and not args.target:
        what = "a cgroup path" if args.scope == "service" else "IFNAME:PUBLIC_KEY"
        raise CommandError(f"isolate {args.scope} needs {what}", EXIT_USAGE)
    req = pb.IsolateRequest(scope=SCOPES[args.scope], target=args.target, force=args.force,
                            reason=args.reason or "")
    if args.ttl is not None:
        req.ttl_s = args.ttl
    m = c.call("Isolate", req)
    if args.json:
        _print_json(to_dict(m))
    else:
        print(f"{m.kind} {m.target}: {m.state}, {_left(m).replace('lifted', 'released')} "
              f"(id {m.id}, incident {m.incident_id[:12]})")
        if part := partial(m):
            print(part)
    return EXIT_OK


def release(c: Client, args: argparse.Namespace) -> int:
    given = args.target.strip()
    if given == "node" or given.startswith("/") or ":" in given:
        req = pb.ReleaseRequest(target=given)
    else:
        req = pb.ReleaseRequest(id=_isolation_id(c, given))
    lifted = c.call("Release", req).lifted
    if args.json:
        _print_json([to_dict(m) for m in lifted])
    else:
        for m in lifted:
            print(f"released {m.kind} {m.target} (id {m.id})")
    return EXIT_OK


def _isolation_id(c: Client, given: str) -> str:
    if len(given) >= 32:
        return given
    found = c.call("ListMitigations", pb.ListMitigationsRequest(states=["active", "dry_run"],
                                                                limit=1000)).mitigations
    return _unique([m.id for m in found if m.id.startswith(given)], given, "mitigation in force")


COMMANDS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "isolate": isolate, "release": release}
