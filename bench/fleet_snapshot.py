"""A snapshot of N fleet decisions (default 100,000) applied by the agent's own code path:
FleetSubscriber._apply -- verify every envelope (Ed25519), plan, ONE SQLite transaction,
ONE nftables transaction into table inet swarm_agent_fleet -- inside a throw-away network
namespace. Prints JSON: the times of each step, the elements the kernel then holds, and
this process's RSS before and after (the process runs the agent's subscriber code; the
decisions' envelopes are signed beforehand and count in "before").

    sudo .venv/bin/python -m bench.fleet_snapshot [--n 100000] [--v6-share 0.1]
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from agent import config as C
from agent.enforce.fleet import FleetEnforcer
from agent.fleet.apply import Message
from agent.fleet.decision import Decision, Signer, generate_key, load_private_key
from agent.fleet.subscriber import FleetSubscriber
from agent.state.store import Store
from swarmlab.lab import netns


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def decisions(signer: Signer, n: int, v6_share: float) -> list[Message]:
    now = time.time()
    out = []
    n6 = int(n * v6_share)
    base4 = int(ipaddress.IPv4Address("20.0.0.0"))
    base6 = int(ipaddress.IPv6Address("2001:db8::"))
    for i in range(n):
        addr = ipaddress.IPv6Address(base6 + i) if i < n6 else ipaddress.IPv4Address(base4 + 2 * i)
        d = Decision("block", f"{addr}/{128 if i < n6 else 32}", now, now + 3600, reason="bench",
                     provenance={"kind": "corroborated", "nodes": ["a", "b", "c"]})
        out.append(Message(i + 1, d.subject, signer.envelope(d)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--v6-share", type=float, default=0.1)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    generate_key(tmp / "k.pem", tmp / "k.pub")
    t = time.monotonic()
    msgs = decisions(Signer(load_private_key(tmp / "k.pem")), args.n, args.v6_share)
    sign_s = time.monotonic() - t
    ns = f"fleet-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        with netns(ns):
            cfg = C.validate(C.Config(state_dir=str(tmp / "state"), fleet=C.FleetConfig(
                nats_url="nats://127.0.0.1:4222", keys=(str(tmp / "k.pub"),))))
            (tmp / "state").mkdir()
            store = Store(cfg.db_path)
            sub = FleetSubscriber(cfg, store, FleetEnforcer(), "bench", lambda: [])
            sub.start()
            before = rss_mib()
            t = time.monotonic()
            outcome = sub._apply(msgs, True, "bench", 0)
            total_s = time.monotonic() - t
            after = rss_mib()
            snap_batch = dict(sub.last_batch)
            listed = subprocess.run(["nft", "-j", "list", "table", "inet", "swarm_agent_fleet"],
                                    capture_output=True, text=True, check=True).stdout
            elems = sum(len(o["set"].get("elem", [])) for o in json.loads(listed)["nftables"]
                        if "set" in o and o["set"]["name"].startswith("fleet_"))
            # one more decision on top of N: a live message's cost at that size
            now = time.time()
            one = Decision("block", "198.51.100.1/32", now, now + 600)
            t = time.monotonic()
            sub._apply([Message(args.n + 1, one.subject, Signer(load_private_key(tmp / "k.pem"))
                                .envelope(one))], False, "bench", args.n)
            one_s = time.monotonic() - t
            one_batch = dict(sub.last_batch)
            store.close()
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)
    print(json.dumps({"decisions": args.n, "applied": outcome.applied, "kernel_elements": elems,
                      "sign_s_beforehand": round(sign_s, 2), "apply_total_s": round(total_s, 3),
                      "snapshot_steps": {k: v for k, v in snap_batch.items() if k != "messages"},
                      "one_more_steps": {k: v for k, v in one_batch.items() if k != "messages"},
                      "one_more_decision_s": round(one_s, 4),
                      "rss_mib_before": round(before, 1), "rss_mib_after": round(after, 1)},
                     indent=2))


if __name__ == "__main__":
    main()
