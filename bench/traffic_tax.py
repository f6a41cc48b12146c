"""The traffic tax: what the network probe costs the traffic it watches, per attach mode.

    sudo .venv/bin/python bench/traffic_tax.py [--modes auto,tc,native,generic]
        [--pairs 5] [--seconds 4] [--flood 100000] [--quick] [--json]

One lab: two namespaces joined by a veth pair (a0 in `attacker` <-> v0 in `victim`; the
root namespace is never touched). For each attach mode, `--pairs` alternating pairs of
runs of one bulk TCP stream (iperf3, `--seconds` long, attacker -> victim): first without
the agent, then with the agent running in the victim (`probes.attach_mode` = the mode,
the sender's networks allowlisted so nothing is mitigated), started and stopped around
each run so that both sides see the same machine. Reported per mode: median and spread
(min..max) of each side and the tax, 1 - median(with) / median(without); a mode whose
runs on one side spread over more than 10% of their median is flagged noisy (the tax is
not resolved at that noise: re-run it on a quiet machine). Beside the rates: the CPU
seconds the sender's and receiver's processes spent per GB moved (iperf3's own
accounting, which a busy machine disturbs less than the wall clock; softirq work that
ksoftirqd picks up is in neither) and its tax.

Per-packet cost: a flood of 64-byte UDP datagrams to a closed port (unsolicited: parsed,
looked up, counted) with the agent running, BPF run-time statistics on (BPF_ENABLE_STATS,
held by a file descriptor: the kernel turns them off when this process ends, no sysctl
to restore), the ingress program's ns per packet from the kernel's own counters
(run_time_ns / run_cnt of the program attached to v0), and the flood's delivered pps
without and with the agent (the Python sender sets that pace). In the same agent run, one
bulk stream: how many times the program ran per GB, its ns per run and ms per GB.

A run is invalid, listed with its reason, left out of every median and the exit status
is 1: iperf3 failed or moved nothing, the agent's ingress program is not at the hook the
mode names (read from the kernel: `ip link` for XDP, the agent's tcx link or the clsact
filter for tc), the agent mitigated something or died, or fewer than 3 valid pairs remain.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarmlab import attacks  # noqa: E402
from swarmlab.lab import Lab, sh, spawn_in, wait_for  # noqa: E402
from swarmlab.scenario import AgentProcess  # noqa: E402

PORT = 5201
# The hook each mode must give a veth (agent/sources/ingress.py: veth prefers tc).
EXPECTED = {"auto": "tc", "tc": "tc", "native": "native", "generic": "generic"}
SYS_BPF = {"x86_64": 321, "aarch64": 280}
TARGET_PCT = 5     # the tax a bulk stream may pay (issue 9)
NOISE_PCT = 10     # a side whose runs spread wider than this cannot resolve the target
BPF_ENABLE_STATS = 32


def enable_bpf_stats() -> int:
    """An fd holding the kernel's BPF run-time statistics on (closed: back off)."""
    libc = ctypes.CDLL(None, use_errno=True)
    attr = ctypes.create_string_buffer(16)   # union bpf_attr.enable_stats: type 0 = RUN_TIME
    fd = libc.syscall(SYS_BPF[platform.machine()], BPF_ENABLE_STATS, attr, 16)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "BPF_ENABLE_STATS")
    return fd


def hook(lab: Lab, agent_pid: int | None) -> tuple[str | None, int | None]:
    """(native | generic | tc | None, program id) of what runs at v0's ingress, from the
    kernel: XDP from `ip link`, tc from the agent's tcx link or a clsact filter."""
    link = json.loads(sh("ip", "-j", "-d", "link", "show", "v0", ns=lab.victim).stdout)[0]
    for xdp in link.get("xdp", {}).get("attached", []) or [link.get("xdp", {})]:
        if xdp.get("prog"):
            return {1: "native", 2: "generic"}.get(xdp.get("mode"), "other"), xdp["prog"]["id"]
    if agent_pid is not None:
        for fd in Path(f"/proc/{agent_pid}/fdinfo").iterdir():
            info = fd.read_text()
            if "link_type:\ttcx" in info and f"ifindex:\t{link['ifindex']}\n" in info \
                    and "attach_type:\t46 " in info:        # ingress (47: the egress program)
                return "tc", int(re.search(r"prog_id:\t(\d+)", info).group(1))
    filters = json.loads(sh("tc", "-j", "filter", "show", "dev", "v0", "ingress",
                            ns=lab.victim, check=False).stdout or "[]")
    for f in filters:
        prog = f.get("options", {}).get("prog", {})
        if prog.get("name") == "handle_tc_ingress":
            return "tc", prog["id"]
    return None, None


def prog_stats(prog_id: int) -> tuple[int, int]:
    info = json.loads(sh("bpftool", "-j", "prog", "show", "id", str(prog_id)).stdout)
    return info.get("run_time_ns", 0), info.get("run_cnt", 0)


def bulk(lab: Lab, seconds: float) -> tuple[float, float | None]:
    """One iperf3 TCP stream attacker -> victim: (Gbit/s received, 0 on failure; CPU
    seconds per GB moved, sender and receiver processes together)."""
    server = spawn_in(lab.victim, "iperf3", "-s", "-1", "-p", str(PORT))
    try:
        wait_for(lambda: f":{PORT}" in sh("ss", "-Htln", ns=lab.victim).stdout, 5)
        out = sh("iperf3", "-J", "-c", lab.addr("victim"), "-p", str(PORT), "-t", str(seconds),
                 ns=lab.attacker, timeout=seconds + 20, check=False)
        end = json.loads(out.stdout or "{}").get("end", {})
        received = end.get("sum_received", {})
        cpu = end.get("cpu_utilization_percent", {})
        gb = received.get("bytes", 0) / 1e9
        cpu_s = (cpu.get("host_total", 0) + cpu.get("remote_total", 0)) / 100 * \
            received.get("seconds", seconds)
        return (round(received.get("bits_per_second", 0) / 1e9, 3),
                round(cpu_s / gb, 4) if gb and cpu_s else None)
    finally:
        server.kill()
        server.wait(5)


def flood(lab: Lab, count: int) -> dict:
    """`count` 64-byte datagrams to a closed port of the victim; sent and delivered pps."""
    def noports() -> int:
        snmp = sh("cat", "/proc/net/snmp", ns=lab.victim).stdout.splitlines()
        head, vals = [line.split() for line in snmp if line.startswith("Udp:")][:2]
        return int(vals[head.index("NoPorts")])
    before = noports()
    res = attacks.run(lab.attacker, "udp_flood", timeout_s=120, target=lab.addr("victim"),
                      port=9, count=count, size=64, duration_s=60)
    time.sleep(0.2)
    delivered = noports() - before
    secs = max((res["last_packet_mono_ns"] - res["first_packet_mono_ns"]) / 1e9, 1e-3)
    return {"sent": res["sent"], "delivered": delivered, "sent_pps": round(res["sent"] / secs),
            "delivered_pps": round(delivered / secs)}


class Agent:
    """The agent in the victim for one run, with the mode and the allowlist."""

    def __init__(self, lab: Lab, mode: str):
        self.tmp = Path(tempfile.mkdtemp(prefix="swarm-tax-"))
        nets = [f"10.{lab.subnet}.0.0/24", f"fd00:{lab.subnet:x}:0::/64"]
        self.proc = AgentProcess(lab.victim, self.tmp, "probes:\n  attach_mode: " + mode +
                                 "\nallowlist:\n  management: " + json.dumps(nets) + "\n")

    def __enter__(self) -> AgentProcess:
        self.proc.start()
        return self.proc

    def __exit__(self, *exc: object) -> None:
        self.proc.stop()
        sh("rm", "-rf", str(self.tmp))


def checked(lab: Lab, agent: AgentProcess, mode: str) -> tuple[str | None, int | None]:
    """(why the run is invalid or None, the ingress program's id)."""
    got, prog = hook(lab, agent.pid)
    if got != EXPECTED[mode]:
        return f"ingress at {got}, not {EXPECTED[mode]}", prog
    return None, prog


def after(agent: AgentProcess) -> str | None:
    if agent.proc.poll() is not None:
        return "the agent died"
    with agent.store() as store:
        if store.mitigations():
            return f"the agent mitigated: {[m.target for m in store.mitigations()]}"
    return None


def measure_mode(lab: Lab, mode: str, pairs: int, seconds: float, count: int) -> dict:
    runs, invalid = [], []
    for i in range(pairs):
        without, cpu_without = bulk(lab, seconds)
        with Agent(lab, mode) as agent:
            why, _ = checked(lab, agent, mode)
            with_, cpu_with = bulk(lab, seconds)
            why = why or after(agent)
        why = why or ("iperf3 moved nothing" if not (without and with_) else None)
        (invalid if why else runs).append({
            "pair": i, "without_gbps": without, "with_gbps": with_,
            "without_cpu_s_per_gb": cpu_without, "with_cpu_s_per_gb": cpu_with,
            **({"invalid": why} if why else {})})
        print(json.dumps({"mode": mode, **(invalid if why else runs)[-1]}), file=sys.stderr, flush=True)
    out: dict = {"mode": mode, "pairs": runs, "invalid": invalid}
    if len(runs) >= 3 or (runs and pairs < 3):
        w, a = [r["without_gbps"] for r in runs], [r["with_gbps"] for r in runs]
        out.update(without={"median": statistics.median(w), "min": min(w), "max": max(w)},
                   with_agent={"median": statistics.median(a), "min": min(a), "max": max(a)},
                   tax_pct=round(100 * (1 - statistics.median(a) / statistics.median(w)), 1),
                   noise_pct=round(100 * max((max(v) - min(v)) / statistics.median(v)
                                             for v in (w, a)), 1))
        cw = [r["without_cpu_s_per_gb"] for r in runs if r["without_cpu_s_per_gb"]]
        ca = [r["with_cpu_s_per_gb"] for r in runs if r["with_cpu_s_per_gb"]]
        if cw and ca:   # CPU time is less disturbed by a busy machine than wall-clock rates
            out["cpu_s_per_gb"] = {"without": statistics.median(cw), "with_agent": statistics.median(ca)}
            out["cpu_tax_pct"] = round(100 * (statistics.median(ca) / statistics.median(cw) - 1), 1)
    if count:
        out["flood"] = per_packet(lab, mode, count, seconds)
    return out


def per_packet(lab: Lab, mode: str, count: int, seconds: float) -> dict:
    """The ingress program's own time, from the kernel's run-time statistics: per packet of
    the flood, and per run and per GB of one bulk stream (solicited: parse and socket
    lookup only; how many runs a GB takes is the hook's: per skb at tc and generic XDP,
    per frame at native XDP on a veth, which has switched off the sender's GSO)."""
    plain = flood(lab, count)
    stats_fd = enable_bpf_stats()
    try:
        with Agent(lab, mode) as agent:
            why, prog = checked(lab, agent, mode)
            t0, n0 = prog_stats(prog) if prog else (0, 0)
            watched = flood(lab, count)
            t1, n1 = prog_stats(prog) if prog else (0, 0)
            gbps, _ = bulk(lab, seconds)
            t2, n2 = prog_stats(prog) if prog else (0, 0)
            why = why or after(agent)
    finally:
        os.close(stats_fd)
    runs, gb = n1 - n0, gbps * seconds / 8
    if not why and runs < watched["delivered"]:
        why = f"the program ran {runs} times for {watched['delivered']} datagrams"
    bulk_runs = n2 - n1
    return {"ns_per_packet": round((t1 - t0) / runs, 1) if runs else None, "runs": runs,
            "without": plain, "with_agent": watched,
            "bulk": {"gb": round(gb, 2), "runs_per_gb": round(bulk_runs / gb) if gb else None,
                     "ns_per_run": round((t2 - t1) / bulk_runs, 1) if bulk_runs else None,
                     "program_ms_per_gb": round((t2 - t1) / 1e6 / gb, 2) if gb else None},
            **({"invalid": why} if why else {})}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="auto,tc,native,generic")
    ap.add_argument("--pairs", type=int, default=5, help="alternating without/with runs per mode")
    ap.add_argument("--seconds", type=float, default=4, help="length of one iperf3 run")
    ap.add_argument("--flood", type=int, default=100_000, help="datagrams in the small-packet "
                    "flood (0: none)")
    ap.add_argument("--quick", action="store_true", help="2 pairs of 2 s, a flood of at most 20,000")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.pairs, args.seconds, args.flood = 2, 2, min(args.flood, 20_000)
    modes = args.modes.split(",")
    if bad := [m for m in modes if m not in EXPECTED]:
        ap.error(f"unknown modes {bad}; one of {', '.join(EXPECTED)}")
    with Lab() as lab:
        results = [measure_mode(lab, m, args.pairs, args.seconds, args.flood) for m in modes]
    bad_runs = sum(len(r["invalid"]) + ("invalid" in r.get("flood", {})) for r in results)
    short = [r["mode"] for r in results if "tax_pct" not in r]
    if args.json:
        print(json.dumps({"results": results, "invalid_runs": bad_runs}, indent=2))
    else:
        print("| mode | without (Gbit/s) median [min..max] | with agent | tax | CPU s/GB "
              "without / with (tax) | valid pairs | ns/packet (64 B UDP flood) "
              "| flood pps delivered without / with | bulk: program runs/GB, ns/run, ms/GB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in results:
            def m(key: str) -> str:
                v = r.get(key)
                return f"{v['median']:.2f} [{v['min']:.2f}..{v['max']:.2f}]" if v else "-"
            f = r.get("flood", {})
            pps = f"{f['without']['delivered_pps']} / {f['with_agent']['delivered_pps']}" if f else "-"
            tax = f"{r['tax_pct']}%" if "tax_pct" in r else "-"
            c = r.get("cpu_s_per_gb")
            cpu = f"{c['without']:.3f} / {c['with_agent']:.3f} ({r['cpu_tax_pct']}%)" if c else "-"
            print(f"| {r['mode']} | {m('without')} | {m('with_agent')} | {tax} | {cpu} | "
                  f"{len(r['pairs'])}/{len(r['pairs']) + len(r['invalid'])} | "
                  f"{f.get('ns_per_packet', '-')}{' INVALID' if 'invalid' in f else ''} | {pps} | "
                  + (f"{b['runs_per_gb']}, {b['ns_per_run']}, {b['program_ms_per_gb']} |"
                     if (b := f.get("bulk")) else "- |"))
        for r in results:
            if r.get("noise_pct", 0) > NOISE_PCT:
                print(f"noisy ({r['mode']}): runs of one side spread over {r['noise_pct']}% of "
                      f"their median, more than the {TARGET_PCT}% target: re-run on a quiet machine")
            for bad in r["invalid"] + ([r["flood"]] if "invalid" in r.get("flood", {}) else []):
                print(f"invalid ({r['mode']}): {bad['invalid']}")
    return 1 if bad_runs or short else 0


if __name__ == "__main__":
    sys.exit(main())
