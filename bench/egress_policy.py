"""Egress policy: packets that left (target 0) and attempt -> incident latency.

    sudo .venv/bin/python bench/egress_policy.py                 # 20 workloads
    sudo .venv/bin/python bench/egress_policy.py --quick --json  # 5

It builds a lab (swarmlab.lab) and runs `swarm-agent run` for the victim namespace with
agent/rules/egress.yaml and an egress policy for N throw-away cgroups (one scope each, so
each workload's first attempt opens its own incident): the metadata address and TCP port
3333 (a mining pool's stratum port) anywhere. The attacker namespace plays the outside
world: 169.254.169.254 and a pool on port 3333, with its own nft counter of every packet
that arrives for either (the receiving side's view, independent of the agent).

Per workload, a process started in its cgroup takes CLOCK_MONOTONIC (system-wide, the
same clock this process reads) just before its first attempt, then tries a TCP connect
to 169.254.169.254:80, a UDP datagram to it, and a TCP connect to the pool. The latency
is from that instant to the incident first seen in the agent's SQLite store (polled
every 5 ms, read-only), so it includes the agent's counter poll (policy.egress_poll_s,
reported), at a random phase of that poll. A control process outside the cgroups must reach both destinations (else the
path is broken and "0 packets left" means nothing: the run is invalid).

A sample is invalid -- listed, never averaged in -- when an attempt succeeded, when its
incident existed before the attempt, or when none came within 10 s. Exit status 1 when
any packet left or any sample is invalid. Everything it made is removed at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.enforce.cgroup import cgroup2_mount  # noqa: E402
from agent.state.store import Store  # noqa: E402
from swarmlab.breachlab import throwaway_cgroup  # noqa: E402
from swarmlab.lab import Lab, serving, sh, spawn_in  # noqa: E402
from swarmlab.scenario import AgentProcess  # noqa: E402

METADATA, POOL_PORT = "169.254.169.254", 3333
RULES = Path(__file__).resolve().parents[1] / "agent" / "rules" / "egress.yaml"
TIMEOUT_S = 10.0
_LISTEN = ("import socket,sys\nfor a,p in ((sys.argv[1],80),(sys.argv[2],3333)):\n"
           "  s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
           "  s.bind((a,p)); s.listen(64); globals()['k%d'%p]=s\n"
           "print('ready',flush=True)\nimport time\ntime.sleep(3600)\n")
_ATTEMPT = r"""
import json, socket, sys, time
meta, pool = sys.argv[1], sys.argv[2]
t0 = time.monotonic_ns()
out = {"t0_ns": t0, "t0_wall": time.time()}
def tcp(addr, port):
    s = socket.socket(); s.settimeout(0.5)
    try:
        s.connect((addr, port)); return "connected"
    except OSError as e:
        return e.strerror or type(e).__name__
    finally:
        s.close()
out["metadata_tcp"] = tcp(meta, 80)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.sendto(b"x", (meta, 53)); out["metadata_udp"] = "sent"
except OSError as e:
    out["metadata_udp"] = e.strerror
out["pool_tcp"] = tcp(pool, 3333)
print(json.dumps(out))
"""


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


def arrived(ns: str) -> int:
    out = json.loads(sh("nft", "-j", "list", "chain", "inet", "swa_peer", "seen", ns=ns).stdout)
    return sum(e["counter"]["packets"] for o in out["nftables"] if "rule" in o
               for e in o["rule"]["expr"] if "counter" in e)


def dropped(ns: str) -> int:
    out = json.loads(sh("nft", "-j", "list", "chain", "inet", "swarm_agent", "egress_out", ns=ns).stdout)
    return sum(e["counter"]["packets"] for o in out["nftables"] if "rule" in o
               for e in o["rule"]["expr"] if "counter" in e)


def start_attempt(ns: str, cgroup: Path | None, pool: str):
    argv = (sys.executable, "-c", _ATTEMPT, METADATA, pool)
    return spawn_in(ns, *argv, cgroup=cgroup) if cgroup else spawn_in(ns, *argv)


def attempt(ns: str, cgroup: Path | None, pool: str) -> dict:
    out, _ = start_attempt(ns, cgroup, pool).communicate(timeout=10)
    return json.loads(out)


def incident_at(db: Path, entity: str) -> tuple[float, float] | None:
    """(this process's CLOCK_MONOTONIC in ms when seen, the agent's detected_at wall s)."""
    with contextlib.closing(Store(db, readonly=True)) as store:
        found = store.incidents(entity=entity)
    return (time.monotonic_ns() / 1e6, found[0].detected_at) if found else None


def run(n: int, poll_s: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="swarm-egress-bench-"))
    samples, invalid, decided = [], [], []
    with contextlib.ExitStack() as stack, Lab() as lab:
        cgs = [stack.enter_context(throwaway_cgroup("swa-egbench")) for _ in range(n)]
        paths = ["/" + str(c.relative_to(cgroup2_mount())) for c in cgs]
        pool = lab.addr("attacker")
        sh("ip", "addr", "add", f"{METADATA}/32", "dev", "a0", ns=lab.attacker)
        sh("nft", "-f", "-", ns=lab.attacker, input=(
            "table inet swa_peer { chain seen { type filter hook prerouting priority -400; "
            f"ip daddr {METADATA} counter; tcp dport {POOL_PORT} counter; }};\n}}\n"))
        cfg = (f"rules_file: {RULES}\npolicy:\n  egress_poll_s: {poll_s}\n  egress:\n"
               f"    - {{name: metadata, cgroups: [{', '.join(paths)}], destinations: [{METADATA}/32]}}\n"
               f"    - {{name: mining, cgroups: [{', '.join(paths)}], ports: [{POOL_PORT}], proto: tcp}}\n")
        agent = AgentProcess(lab.victim, tmp, cfg)
        stack.enter_context(serving(lab.attacker, sys.executable, "-c", _LISTEN, METADATA, pool))
        agent.start()
        stack.callback(agent.stop)
        control = attempt(lab.victim, None, pool)
        control_ok = control["metadata_tcp"] == "connected" and control["pool_tcp"] == "connected"
        base = arrived(lab.attacker)      # the control's own packets
        for path, cg in zip(paths, cgs):
            entity = f"egress:metadata:cgroup:{path}"
            if incident_at(agent.db_path, entity) is not None:
                invalid.append({"cgroup": path, "why": "incident before the attempt"})
                continue
            # At a random phase of the agent's counter poll (else every attempt would
            # start just after the poll that reported the one before: the worst case).
            time.sleep(random.uniform(0, poll_s))
            # Watched while the attempt runs: a dropped SYN makes connect() wait for its
            # timeout (0.5 s here), the drop itself returns no error to TCP.
            proc = start_attempt(lab.victim, cg, pool)
            seen = None
            deadline = time.monotonic() + TIMEOUT_S
            while seen is None and time.monotonic() < deadline:
                seen = incident_at(agent.db_path, entity)
                if seen is None:
                    time.sleep(0.005)
            r = json.loads(proc.communicate(timeout=10)[0])
            if "connected" in (r["metadata_tcp"], r["pool_tcp"]) or r["metadata_udp"] == "sent":
                invalid.append({"cgroup": path, "why": f"an attempt went out: {r}"})
                continue
            if seen is None:
                invalid.append({"cgroup": path, "why": f"no incident within {TIMEOUT_S:.0f} s"})
                continue
            samples.append(seen[0] - r["t0_ns"] / 1e6)
            decided.append((seen[1] - r["t0_wall"]) * 1000)
        left = arrived(lab.attacker) - base
        drops = dropped(lab.victim)
    shutil.rmtree(tmp, ignore_errors=True)
    if not control_ok:
        invalid.append({"cgroup": "control", "why": f"the control could not reach the destinations: {control}"})
    return {
        "workloads": n, "attempts_per_workload": 3, "egress_poll_s": poll_s,
        "packets_left": left, "packets_dropped_by_agent": drops,
        "incident_ms": {"p50": percentile(samples, 0.5), "p95": percentile(samples, 0.95),
                        "max": round(max(samples), 1) if samples else None, "n": len(samples)},
        # the agent's own decision time (incident detected_at, wall clock) from the attempt
        "decided_ms": {"p50": percentile(decided, 0.5), "p95": percentile(decided, 0.95)},
        "invalid": invalid,
        "host": {"kernel": platform.release(), "python": platform.python_version()},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5 workloads instead of 20")
    ap.add_argument("--poll", type=float, default=1.0, help="policy.egress_poll_s (default 1.0, the packaged one)")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = ap.parse_args()
    result = run(5 if args.quick else 20, args.poll)
    if args.json:
        print(json.dumps(result))
    else:
        lat = result["incident_ms"]
        print(f"packets that left: {result['packets_left']} (target 0; the agent dropped "
              f"{result['packets_dropped_by_agent']})")
        print(f"attempt -> incident: p50 {lat['p50']} ms, p95 {lat['p95']} ms, max {lat['max']} ms "
              f"over {lat['n']} workloads (egress_poll_s {result['egress_poll_s']})")
        for bad in result["invalid"]:
            print(f"INVALID {bad['cgroup']}: {bad['why']}")
    return 1 if result["packets_left"] or result["invalid"] else 0


if __name__ == "__main__":
    sys.exit(main())
