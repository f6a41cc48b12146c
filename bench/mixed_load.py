"""The hot path under sustained mixed load: a packet flood, an exec storm and a port scan
at once, against the real agent; threshold-to-enforced latency, queue depth and drops.

    sudo .venv/bin/python bench/mixed_load.py [--duration-s 30] [--sender c|python] [--senders 1] [--json]
    sudo .venv/bin/python bench/mixed_load.py --quick        # 6 s, for a smoke run

One Scenario (swarmlab.scenario: attacker/victim namespaces over a veth pair, the agent in
the victim, an echo server on SERVICE_PORT). For --duration-s, at once:
- `--senders` processes flood the victim with SYNs from spoofed sources (as fast as each
  can: by default synblast, a sendmmsg sender in C, 2000 sources; `--sender python` the
  Python generator, 4000 sources; the achieved rate is what the victim's interface
  received, from its own counters): the XDP probe aggregates them in the kernel and signals per-source and
  per-service threshold crossings, every one of which the agent must decide and answer;
- `--exec-loops` shells in the victim's namespace exec `/bin/sh -c :` in a loop (shells
  are always reported by the process probe), each exec one event through the queue;
- after a second, a TCP connect scan from the attacker's own address (blocked once
  verified).
Reported: packets/s received, net and exec events that reached user space (and what the
queue dropped, by kind), the queue's high-water mark and capacity, events that failed,
ring-buffer losses, and signal-to-enforced p50/p99/max over every mitigation applied:
from the kernel's timestamp of the event that crossed the threshold (`signal_at` in the
mitigation_applied entry) to the agent's clock once the nft change returned (the entry's
time), both on the agent's wall clock. The run is INVALID (exit 1, reasons listed) when
the flood stayed under --min-pps, the exec storm under --min-execs-per-s, nothing was
mitigated, or the scan was not blocked -- never averaged in silently.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarmlab import attacks  # noqa: E402
from swarmlab.attacks import blast  # noqa: E402
from swarmlab.attacks.floods import default_spoof_cidr  # noqa: E402
from swarmlab.lab import sh, spawn_in  # noqa: E402
from swarmlab.scenario import SERVICE_PORT, Scenario, proc_stat  # noqa: E402

STORM = 'end=$(($(date +%s) + {s})); while [ $(date +%s) -lt $end ]; do ' \
        'for i in 1 2 3 4 5 6 7 8 9 10; do /bin/sh -c :; done; done'


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[max(0, min(len(values) - 1, round(q * (len(values) - 1))))]


def rx_packets(ns: str) -> int:
    """Packets received by every interface of `ns` but loopback (the kernel's counters)."""
    links = json.loads(sh("ip", "-j", "-s", "link", "show", ns=ns).stdout)
    return sum(link["stats64"]["rx"]["packets"] for link in links if link["ifname"] != "lo")


def agent_status(sc: Scenario) -> dict:
    done = subprocess.run([sys.executable, "-m", "agent.cli.main", "status", "--json",
                           "--config", str(sc.agent.config_path)],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"status failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def latencies_ms(sc: Scenario) -> tuple[list[float], dict[str, float]]:
    """signal -> enforced of every applied mitigation; and of each block, by target."""
    out, blocks = [], {}
    with sc.agent.store() as store:
        for m in store.mitigations():
            if not m.incident_id:
                continue
            for e in store.incident_events(m.incident_id):
                if e.kind == "mitigation_applied" and e.data.get("mitigation_id") == m.id \
                        and e.data.get("signal_at") is not None:
                    ms = round((e.at - e.data["signal_at"]) * 1000, 2)
                    out.append(ms)
                    if m.kind.value == "block_ip":
                        blocks[m.target] = ms
    return out, blocks


def run(args: argparse.Namespace) -> dict:
    sc = Scenario(f"probes:\n  queue_events: {args.queue}\n")
    with sc:
        lab, target = sc.lab, sc.target(False)
        rx0, t0 = rx_packets(lab.victim), time.monotonic()
        _, cpu0 = proc_stat(sc.agent.pid)
        storms = [spawn_in(lab.victim, "sh", "-c", STORM.format(s=int(args.duration_s)))
                  for _ in range(args.exec_loops)]
        if args.sender == "c":
            base = default_spoof_cidr(target).split("/")[0]
            floods = [blast.start(lab.attacker, target, SERVICE_PORT, base, sources=2000,
                                  duration_s=args.duration_s) for _ in range(args.senders)]
        else:
            floods = [attacks.start(lab.attacker, "distributed_syn_flood", target=target,
                                    port=SERVICE_PORT, sources=4000, seed=n,
                                    duration_s=args.duration_s,
                                    count=int(args.duration_s * 2_000_000))
                      for n in range(args.senders)]
        time.sleep(1.0)
        scan = attacks.run(lab.attacker, "port_scan", timeout_s=60, target=target,
                           ports="1000-3000", duration_s=min(4.0, args.duration_s))
        collect = blast.result if args.sender == "c" else attacks.result
        sent = [collect(p, timeout_s=args.duration_s + 60) for p in floods]
        for p in storms:
            try:
                p.wait(args.duration_s + 60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        elapsed = time.monotonic() - t0
        rx = rx_packets(lab.victim) - rx0
        rss, cpu1 = proc_stat(sc.agent.pid)
        time.sleep(1.0)       # what is queued now is decided within the deadline anyway
        st = agent_status(sc)
        lat, blocks = latencies_ms(sc)
    c = {k: int(v) for k, v in st.get("counters", {}).items()}    # int64 comes as text
    net_events = sum(n for k, n in c.items() if k.startswith("events.net."))
    execs = c.get("events.proc.exec", 0) + c.get("events.dropped.proc.exec", 0) + \
        c.get("events.dropped_urgent.proc.exec", 0)
    result = {
        "duration_s": round(elapsed, 1), "senders": args.senders,
        "packets_sent": sum(r.get("sent") or 0 for r in sent),
        "rx_pps": round(rx / elapsed),
        "net_events_to_user_space": net_events,
        "exec_events_per_s": round(execs / elapsed),
        "events": {k[len("events."):]: n for k, n in c.items()
                   if k.startswith("events.") and not k.startswith(("events.dropped", "events.failed"))},
        "dropped": {k[len("events.dropped."):]: n for k, n in c.items()
                    if k.startswith("events.dropped.")},
        # events that matched a severe rule (agent.detect.triage): each one a detection lost
        "dropped_urgent": {k[len("events.dropped_urgent."):]: n for k, n in c.items()
                           if k.startswith("events.dropped_urgent.")},
        "queue": {"capacity": c.get("queue.capacity"), "depth_max": c.get("queue.depth_max")},
        "failed": {"events": c.get("events.failed", 0), "findings": c.get("findings.failed", 0)},
        "ringbuf_losses": int(st.get("ringbuf_losses") or 0),
        "mitigations": len(lat),
        "signal_to_enforced_ms": {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99),
                                  "max": max(lat) if lat else None},
        "scan_blocked_ms": blocks.get(sc.lab.addr("attacker")),
        "scan_report": {k: scan.get(k) for k in ("sent", "rate_pps")},
        "agent_peak_rss_mb": round((rss or 0) / 1024, 1),
        "agent_cpu_s": None if cpu0 is None or cpu1 is None else round(cpu1 - cpu0, 2),
    }
    invalid = []
    if result["rx_pps"] < args.min_pps:
        invalid.append(f"flood reached {result['rx_pps']} packets/s, under --min-pps "
                       f"{args.min_pps}")
    if result["exec_events_per_s"] < args.min_execs_per_s:
        invalid.append(f"exec storm reached {result['exec_events_per_s']} execs/s, under "
                       f"--min-execs-per-s {args.min_execs_per_s}")
    if not lat:
        invalid.append("nothing was mitigated")
    if result["scan_blocked_ms"] is None:
        invalid.append("the scan was not blocked")
    result["valid"], result["invalid_because"] = not invalid, invalid
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration-s", type=float, default=30.0)
    ap.add_argument("--sender", choices=("c", "python"), default="c",
                    help="flood generator: c (swarmlab/attacks/synblast.c, sendmmsg) or python")
    ap.add_argument("--senders", type=int, default=1, help="flood processes")
    ap.add_argument("--exec-loops", type=int, default=2, help="shells exec'ing in a loop")
    ap.add_argument("--queue", type=int, default=16384, help="probes.queue_events")
    ap.add_argument("--min-pps", type=int, default=200_000)
    ap.add_argument("--min-execs-per-s", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="6 s instead of --duration-s")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.duration_s = 6.0
    r = run(args)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        lat = r["signal_to_enforced_ms"]
        print(f"{r['duration_s']} s: {r['rx_pps']} packets/s received "
              f"({r['net_events_to_user_space']} net events to user space), "
              f"{r['exec_events_per_s']} execs/s")
        print(f"queue: max depth {r['queue']['depth_max']} of {r['queue']['capacity']}, "
              f"dropped {r['dropped'] or 'none'} (urgent lane: {r['dropped_urgent'] or 'none'}), "
              f"failed {r['failed']}, "
              f"ring-buffer losses {r['ringbuf_losses']}")
        print(f"signal -> enforced over {r['mitigations']} mitigations: p50 {lat['p50']} ms, "
              f"p99 {lat['p99']} ms, max {lat['max']} ms; scan blocked in "
              f"{r['scan_blocked_ms']} ms")
        print(f"agent: peak RSS {r['agent_peak_rss_mb']} MB, CPU {r['agent_cpu_s']} s")
        print("VALID" if r["valid"] else "INVALID: " + "; ".join(r["invalid_because"]))
    return 0 if r["valid"] else 1


if __name__ == "__main__":
    sys.exit(main())
