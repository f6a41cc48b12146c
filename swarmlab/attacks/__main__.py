"""python -m swarmlab.attacks PATTERN --target ADDR [...]: run one pattern, print one line.

Run it inside a lab namespace (`ip netns exec NS ...`); traffic patterns refuse to run in
any namespace not made by `ip netns add`. Exit codes: 0 done, 1 failed, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from swarmlab.attacks import connections, floods, server
from swarmlab.attacks.common import Options, check_options, in_named_netns

RUNNERS = {
    "syn_flood": floods.syn_flood,
    "udp_flood": floods.udp_flood,
    "conn_flood": connections.conn_flood,
    "port_scan": connections.port_scan,
    "distributed_syn_flood": floods.distributed_syn_flood,
    "benign": connections.benign,
    "lb_burst": connections.lb_burst,
    "probe": connections.probe,
    "serve": server.serve,
    "decoy_scan": floods.decoy_scan,
    "spoofed_udp_flood": floods.spoofed_udp_flood,
    "distributed_ack_flood": floods.distributed_ack_flood,
}

# Per-pattern defaults that differ from Options' own.
DEFAULTS: dict[str, dict[str, object]] = {
    "conn_flood": {"count": 10_000},
    "port_scan": {"timeout_ms": 50.0, "concurrency": 256},
    "benign": {"rate": 20.0},
    "lb_burst": {"count": 300},
    "probe": {"timeout_ms": 50.0},
    "serve": {"duration_s": 60.0},
}


HELP = {
    "port": "victim port (default 8080)",
    "count": "at most this many packets, connections or attempts (default 100000; "
             "conn_flood 10000, lb_burst 300)",
    "duration_s": "stop after this long (default 10; serve 60)",
    "rate": "per second, 0 = as fast as possible (default 0; benign 20)",
    "concurrency": "connections in flight (default 64; port_scan 256)",
    "timeout_ms": "per connection attempt (default 1000; port_scan and probe 50)",
    "interval_ms": "probe: one handshake every this long (default 10)",
    "size": "udp_flood: payload bytes (default 64)",
    "ports": "port_scan, decoy_scan: range FIRST-LAST (default 1-1024)",
    "sources": "distributed_syn_flood, distributed_ack_flood, decoy_scan, spoofed_udp_flood: how many spoofed "
               "addresses (default 2000)",
    "spoof_cidr": "distributed_syn_flood, distributed_ack_flood, decoy_scan, spoofed_udp_flood: where they come from "
                  "(default 10.N.200.0/21 or fd00:N:c8::/64 beside the target)",
    "seed": "picks the spoofed sources and sequence numbers (default 1)",
    "bind": "serve: listen address (default :: dual stack)",
    "stop_after_failures": "probe: stop after this many failures in a row (default 0: never)",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m swarmlab.attacks", description=__doc__.splitlines()[0])
    p.add_argument("pattern", choices=list(RUNNERS))
    p.add_argument("--target", default="", help="victim address; IPv4 or IPv6 picks the family")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--allow-root-netns", action="store_true",
                   help="run outside an `ip netns` namespace (never needed in the lab)")
    for f in dataclasses.fields(Options):
        if f.name not in ("pattern", "target"):
            kind = {"int": int, "float": float}.get(f.type, str)
            p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                           help=HELP.get(f.name))
    return p


def options(args: argparse.Namespace) -> Options:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Options)
             if getattr(args, f.name, None) is not None}
    return Options(**{**DEFAULTS.get(args.pattern, {}), **given})


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    opts = options(args)
    try:
        check_options(opts)
        if opts.pattern != "serve":
            if not opts.target:
                raise ValueError(f"{opts.pattern} needs --target")
            if not in_named_netns() and not args.allow_root_netns:
                raise ValueError("refusing to send attack traffic outside a named network "
                                 "namespace; run it with `ip netns exec NS`")
    except ValueError as e:
        print(f"swarmlab.attacks: {e}", file=sys.stderr)
        return 2
    try:
        outcome = RUNNERS[opts.pattern](opts)
    except (OSError, ValueError) as e:
        print(f"swarmlab.attacks: {opts.pattern} failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(json.dumps(outcome) if args.json else _summary(outcome), flush=True)
    return 0


def _summary(outcome: dict) -> str:
    if outcome["pattern"] == "serve":
        return f"serve: accepted {outcome['accepted']} connections"
    rate = outcome.get("rate_pps")
    return (f"{outcome['pattern']}: sent {outcome['sent']} to {outcome['target']}:{outcome['port']}"
            f" ({rate or 0:.0f}/s), {outcome['errors']} errors")


if __name__ == "__main__":
    sys.exit(main())
