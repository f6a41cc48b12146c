"""Legitimate-client success under each flood: the response must fit the evidence.

    sudo .venv/bin/python bench/legit_success.py [--runs 3 | --quick] [--cases a,b] [--json]

Each run: fresh namespaces and a fresh agent (swarmlab.scenario.Scenario), a real client in
its own namespace on its own link opening CLIENT_RATE connections/s to the victim's echo
server (connect, send a line, read the reply; 0.5 s timeout) while a flood runs, and again
for AFTER_S seconds after it. Reported per case: the client's success ratio during and
after, the mitigations the agent put in force, the victim's TcpExt.ListenOverflows +
ListenDrops during the flood and its conntrack entries at the end. The forged cases carry
the client's own address (raw packets from the attacker namespace); `random_source` uses
4000 spoofed addresses; `own_*` floods come from the attacker's real address. `--no-agent`
runs the same without the agent (the kernel alone: SYN cookies).

Two figures, kept apart: *legitimate-client success* (the fraction of the client's
connections during the flood that succeeded) and *attacker containment* (the fraction of
the flood's packets sent after the mitigation was in force -- without the agent: of the
whole flood -- that did not reach the service: swarmlab.meter counts what passed the
agent's table; none for forged floods, whose packets carry the client's address). A run is
invalid (listed, left out of the figures) when the client could not connect before the
attack, made no attempt during it, the mitigation never came, or came after the flood's
last packet; more than --max-invalid of a case's runs invalid: exit 1.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarmlab import attacks, figures  # noqa: E402
from swarmlab.lab import Lab, sh  # noqa: E402
from swarmlab.meter import ServiceMeter  # noqa: E402
from swarmlab.scenario import SERVICE_PORT, Scenario, _wall_to_mono_ns  # noqa: E402

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
        # The client must get through before the attack, or its figure during it says nothing.
        pre = attacks.run(client_ns, "benign", timeout_s=30, target=target, port=SERVICE_PORT,
                          rate=CLIENT_RATE, count=3, duration_s=1, timeout_ms=500)
        before = netstat(s.lab.victim)
        proto = "udp" if "udp" in pattern else "tcp"
        # Forged floods carry the client's own address: their packets cannot be told apart
        # from the client's, so no containment figure for them.
        meter = None if forged else ServiceMeter(s.lab.victim, proto, opts["port"], [client])
        with meter or contextlib.nullcontext():
            during = attacks.start(client_ns, "benign", target=target, port=SERVICE_PORT,
                                   rate=CLIENT_RATE, duration_s=FLOOD_S, timeout_ms=500)
            flood = attacks.run(s.lab.attacker, pattern, timeout_s=120, target=target,
                                duration_s=FLOOD_S, **opts, **extra)
            if meter is not None:
                meter.stop()
        d = attacks.result(during, timeout_s=60)
        a = attacks.run(client_ns, "benign", timeout_s=60, target=target, port=SERVICE_PORT,
                        rate=CLIENT_RATE, duration_s=AFTER_S, timeout_ms=500)
        ct = sh("cat", "/proc/sys/net/netfilter/nf_conntrack_count", ns=s.lab.victim, check=False)
        mitigations, mitigated_ns = [], None
        if agent:
            with s.agent.store() as store:
                names = {client: "CLIENT", s.lab.addr("attacker"): "ATTACKER"}
                mitigations = sorted({f"{m.kind} {names.get(m.target, m.target)}"
                                      for m in store.mitigations()})
                # The attack's own mitigation: one of an incident the flood opened (not a
                # mitigation of the client, unless the flood carried the client's address).
                answering = {m.incident_id for m in store.mitigations()
                             if m.incident_id and (forged or m.target != client)}
                done = [i.mitigated_at for i in store.incidents()
                        if i.mitigated_at and i.id in answering]
                mitigated_ns = _wall_to_mono_ns(min(done)) if done else None
        run = {"case": case, "agent": agent, "sent": flood["sent"], "rate_pps": flood["rate_pps"],
               "before": ratio(pre), "during": ratio(d), "during_n": d["successes"] + d["failures"],
               "after": ratio(a), "listen_drops": netstat(s.lab.victim) - before,
               "conntrack": int(ct.stdout) if ct.returncode == 0 else 0,
               "mitigations": mitigations,
               "mitigated_ms": (None if mitigated_ns is None or not flood.get("first_packet_mono_ns")
                                else round((mitigated_ns - flood["first_packet_mono_ns"]) / 1e6, 1))}
        run.update(contained(meter, flood, mitigated_ns if agent else None))
        run["invalid"] = invalid(run, agent, meter is not None)
        return run


def contained(meter: ServiceMeter | None, flood: dict, mitigated_ns: int | None) -> dict:
    """Attacker containment: the fraction of the flood sent after the mitigation (without the
    agent: the whole flood) that did not reach the service (swarmlab.meter counts what did)."""
    first, last = flood.get("first_packet_mono_ns"), flood.get("last_packet_mono_ns")
    if meter is None or not first or not last:
        return {"containment": None, "reached_after": None, "sent_after": None}
    at = mitigated_ns if mitigated_ns is not None else first
    counted = meter.since(at)
    if counted is None:
        return {"containment": None, "reached_after": None, "sent_after": 0.0}
    sample_ns, reached = counted
    sent = figures.sent_after(flood["sent"], first, last, max(at, sample_ns))
    return {"containment": figures.containment(reached, sent), "reached_after": reached,
            "sent_after": round(sent)}


def invalid(run: dict, agent: bool, metered: bool) -> str | None:
    """Why the run measured nothing, or None (swarmlab.figures has the general rules)."""
    if run["before"] == 0:
        return "the legitimate client never connected before the attack"
    if run["during_n"] == 0:
        return "the legitimate client made no attempt during the attack"
    if not run["sent"]:
        return "the attack sent no packet"
    if agent and run["mitigated_ms"] is None:
        return "the mitigation never came"
    if agent and run["mitigated_ms"] < -figures.SKEW_NS / 1e6:
        return "mitigated before the attack's first packet: it answers something else"
    if metered and run["containment"] is None:
        return "the mitigation came after the attack's last packet: nothing left to contain"
    return None


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
    ap.add_argument("--quick", action="store_true", help="1 run per case")
    ap.add_argument("--max-invalid", type=float, default=figures.MAX_INVALID_FRACTION,
                    help="fail (exit 1) when more than this fraction of a case's runs is invalid")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        print(f"unknown case {', '.join(unknown)}; one of {', '.join(CASES)}", file=sys.stderr)
        return 2
    runs_per = 1 if args.quick else args.runs
    if args.real_work:
        for agent in (True, False):
            print(json.dumps(real_work(agent)))
        return 0
    rows, failed = [], []
    for case in args.cases.split(","):
        for agent in ([True, False] if args.no_agent else [True]):
            runs = [one_run(case, agent) for _ in range(runs_per)]
            valid, bad = figures.split(runs)
            held = [r["containment"] for r in valid if r["containment"] is not None]
            row = {"case": case, "agent": agent, "runs": len(runs), "valid": len(valid),
                   "invalid": bad,
                   "rate_pps": statistics.median(r["rate_pps"] or 0 for r in runs),
                   "during_min": min((r["during"] for r in valid), default=None),
                   "during_median": statistics.median([r["during"] for r in valid]) if valid else None,
                   "after_min": min((r["after"] for r in valid), default=None),
                   "containment_min": min(held, default=None),
                   "containment_median": statistics.median(held) if held else None,
                   "reached_after": [r["reached_after"] for r in valid],
                   "sent_after": [r["sent_after"] for r in valid],
                   "listen_drops_max": max(r["listen_drops"] for r in runs),
                   "conntrack_max": max(r["conntrack"] for r in runs),
                   "mitigations": sorted({m for r in runs for m in r["mitigations"]})}
            if figures.too_many_invalid(row["runs"], len(bad), args.max_invalid):
                failed.append(f"{case} (agent {'on' if agent else 'off'})")
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"cases": rows, "failed": failed}, indent=2))
        return 1 if failed else 0
    print("| flood | agent | valid runs | flood rate (pkt/s) | legit client during: min / median "
          "| client after: min | attacker containment: min / median "
          "| listen overflows+drops | conntrack entries | mitigations |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {'on' if r['agent'] else 'off'} | {r['valid']}/{r['runs']} | "
              f"{r['rate_pps']:.0f} | {_pct(r['during_min'])} / {_pct(r['during_median'])} | "
              f"{_pct(r['after_min'])} | {_pct(r['containment_min'], 2)} / "
              f"{_pct(r['containment_median'], 2)} | {r['listen_drops_max']} | "
              f"{r['conntrack_max']} | {', '.join(r['mitigations']) or '-'} |")
    return figures.print_invalid(
        ((f"{r['case']} (agent {'on' if r['agent'] else 'off'})", r["invalid"]) for r in rows),
        failed, args.max_invalid)


def _pct(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}%}"


if __name__ == "__main__":
    sys.exit(main())
