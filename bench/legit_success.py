"""Legitimate-client success under each flood: the response must fit the evidence.

    sudo .venv/bin/python bench/legit_success.py [--runs 3] [--cases a,b] [--json]

Each run: fresh namespaces and a fresh agent (swarmlab.scenario.Scenario), a real client in
its own namespace on its own link opening CLIENT_RATE connections/s to the victim's echo
server (connect, send a line, read the reply; 0.5 s timeout) while a flood runs, and again
for AFTER_S seconds after it. Reported per case: the client's success ratio during and
after, the mitigations the agent put in force, the victim's TcpExt.ListenOverflows +
ListenDrops during the flood and its conntrack entries at the end. The forged cases carry
the client's own address (raw packets from the attacker namespace); `random_source` uses
4000 spoofed addresses; `own_*` floods come from the attacker's real address. `--no-agent`
runs the same without the agent (the kernel alone: SYN cookies).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarmlab import attacks  # noqa: E402
from swarmlab.lab import Lab, sh  # noqa: E402
from swarmlab.scenario import SERVICE_PORT, Scenario  # noqa: E402

CLIENT_RATE = 5
FLOOD_S = 4
AFTER_S = 3
CASES = {
    "forged_syn_flood": ("distributed_syn_flood", {"port": SERVICE_PORT, "rate": 1000}, True),
    "forged_udp_flood": ("spoofed_udp_flood", {"port": 9999, "rate": 8000}, True),
    "decoy_scan": ("decoy_scan", {"ports": "1000-2999", "rate": 2000}, True),
    "random_source": ("distributed_syn_flood", {"port": SERVICE_PORT, "rate": 15000,
                                                "sources": 4000}, False),
    "random_source_udp": ("spoofed_udp_flood", {"port": 9999, "rate": 25000,
                                                 "sources": 4000}, False),
    "own_syn_flood": ("syn_flood", {"port": SERVICE_PORT}, False),
    "own_udp_flood": ("udp_flood", {"port": 9999}, False),
}


def netstat(ns: str) -> int:
    lines = sh("cat", "/proc/net/netstat", ns=ns).stdout.splitlines()
    vals: dict[str, int] = {}
    for names, values in zip(lines[::2], lines[1::2]):
        vals.update(zip(names.split()[1:], map(int, values.split()[1:])))
    return vals["ListenOverflows"] + vals["ListenDrops"]


def ratio(out: dict) -> float:
    return out["successes"] / max(1, out["successes"] + out["failures"])


def one_run(case: str, agent: bool) -> dict:
    pattern, opts, forged = CASES[case]
    with (Scenario() if agent else _NoAgent()) as s:
        client_ns = s.lab.add_attacker(1)
        client = s.lab.addr("attacker", link=1)
        target = s.lab.addr("victim")
        extra = {"spoof_cidr": f"{client}/32", "sources": 1} if forged else {}
        before = netstat(s.lab.victim)
        during = attacks.start(client_ns, "benign", target=target, port=SERVICE_PORT,
                               rate=CLIENT_RATE, duration_s=FLOOD_S, timeout_ms=500)
        flood = attacks.run(s.lab.attacker, pattern, timeout_s=120, target=target,
                            duration_s=FLOOD_S, **opts, **extra)
        d = attacks.result(during, timeout_s=60)
        a = attacks.run(client_ns, "benign", timeout_s=60, target=target, port=SERVICE_PORT,
                        rate=CLIENT_RATE, duration_s=AFTER_S, timeout_ms=500)
        ct = sh("cat", "/proc/sys/net/netfilter/nf_conntrack_count", ns=s.lab.victim, check=False)
        mitigations = []
        if agent:
            with s.agent.store() as store:
                names = {client: "CLIENT", s.lab.addr("attacker"): "ATTACKER"}
                mitigations = sorted({f"{m.kind} {names.get(m.target, m.target)}"
                                      for m in store.mitigations()})
        return {"case": case, "agent": agent, "sent": flood["sent"], "rate_pps": flood["rate_pps"],
                "during": ratio(d), "during_n": d["successes"] + d["failures"],
                "after": ratio(a), "listen_drops": netstat(s.lab.victim) - before,
                "conntrack": int(ct.stdout) if ct.returncode == 0 else 0,
                "mitigations": mitigations}


def real_work(agent: bool) -> dict:
    """iperf3 from the attacker namespace (a peer that is not allowlisted): 4 s of TCP bulk,
    then 4 s of UDP at 200 Mbit/s; the throughput, and what the agent made of it."""
    from swarmlab.lab import spawn_in, wait_for

    with (Scenario() if agent else _NoAgent()) as s:
        target, out = s.lab.addr("victim"), {}
        for name, args in (("tcp", ["-t", "4"]), ("udp", ["-u", "-b", "200M", "-l", "1200", "-t", "4"])):
            server = spawn_in(s.lab.victim, "iperf3", "-s", "-1", "-p", "5201")
            try:
                wait_for(lambda: ":5201" in sh("ss", "-Htln", ns=s.lab.victim).stdout, 5)
                end = json.loads(sh("iperf3", "-J", "-c", target, "-p", "5201", *args,
                                    ns=s.lab.attacker, timeout=30).stdout)["end"]
            finally:
                server.kill()
                server.wait(5)
            summary = end["sum_received"] if name == "tcp" else end["sum"]
            out[f"{name}_gbps"] = round(summary["bits_per_second"] / 1e9, 2)
        if agent:
            with s.agent.store() as store:
                out["incidents"], out["mitigations"] = len(store.incidents()), len(store.mitigations())
        return {"agent": agent, **out}


class _NoAgent:
    """A Scenario's lab and echo server without the agent."""

    def __init__(self):
        self.lab, self._server = Lab(), None

    def __enter__(self):
        self.lab.create()
        self._server = attacks.start_server(self.lab.victim, SERVICE_PORT, duration_s=120)
        return self

    def __exit__(self, *exc):
        if self._server.poll() is None:
            self._server.kill()
            self._server.wait()
        self.lab.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--no-agent", action="store_true", help="also run every case without the agent")
    ap.add_argument("--real-work", action="store_true",
                    help="only measure iperf3 TCP and UDP throughput with and without the agent")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.real_work:
        for agent in (True, False):
            print(json.dumps(real_work(agent)))
        return 0
    rows = []
    for case in args.cases.split(","):
        for agent in ([True, False] if args.no_agent else [True]):
            runs = [one_run(case, agent) for _ in range(args.runs)]
            row = {"case": case, "agent": agent, "runs": len(runs),
                   "rate_pps": statistics.median(r["rate_pps"] or 0 for r in runs),
                   "during_min": min(r["during"] for r in runs),
                   "during_median": statistics.median(r["during"] for r in runs),
                   "after_min": min(r["after"] for r in runs),
                   "listen_drops_max": max(r["listen_drops"] for r in runs),
                   "conntrack_max": max(r["conntrack"] for r in runs),
                   "mitigations": sorted({m for r in runs for m in r["mitigations"]})}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("| flood | agent | flood rate (pkt/s) | client during: min / median | client after: min "
          "| listen overflows+drops | conntrack entries | mitigations |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {'on' if r['agent'] else 'off'} | {r['rate_pps']:.0f} | "
              f"{r['during_min']:.0%} / {r['during_median']:.0%} | {r['after_min']:.0%} | "
              f"{r['listen_drops_max']} | {r['conntrack_max']} | {', '.join(r['mitigations']) or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
