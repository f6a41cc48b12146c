"""Rule reload time: from the request to the new rule set in use, on a running agent.

    sudo .venv/bin/python bench/rule_reload.py                 # 40 reloads per path
    sudo .venv/bin/python bench/rule_reload.py --quick --json  # 10 per path
    sudo .venv/bin/python bench/rule_reload.py --flood         # with a SYN flood and an exec storm

It builds a lab (swarmlab.lab), runs `swarm-agent run` for the victim namespace on a copy
of the packaged network rules, and alternates two versions of that file (the SYN-flood
threshold differs, so every reload changes the set's version), each written atomically
(rename) before the request. Two paths, each sample on this process's CLOCK_MONOTONIC:

- api: ReloadRules over the local control socket, from sending the request to its
  answer (sent after the switch). The agent's own figure (`took_s`: from its receipt of
  the request to the new set in use, its CLOCK_MONOTONIC) is reported beside it.
- sighup: from kill(SIGHUP) to GetStatus first showing the new version (polled every
  millisecond, so up to a poll's round trip above the true figure).

A sample is invalid -- counted and listed, never averaged in -- when the version the
agent reports in use is not the one computed here from the file written (a reload that
was lost, half applied or raced), or when a reload is rejected. --flood runs a bounded
SYN flood (findings) and an exec storm in the victim (process events) during the
reloads; the events and findings the agent processed are reported. Exit
status 1 when any sample is invalid. Everything it made is removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.detect.ruleset import load_ruleset  # noqa: E402
from agent.proto.swarm.control.v1 import control_pb2 as pb  # noqa: E402
from agent.proto.swarm.control.v1 import control_pb2_grpc  # noqa: E402
from swarmlab import attacks  # noqa: E402
from swarmlab.lab import Lab  # noqa: E402
from swarmlab.scenario import NETWORK_RULES, SERVICE_PORT, AgentProcess  # noqa: E402

POLL_S = 0.001
TIMEOUT_S = 10.0
# Shells: executables the process probe reports at every exec (the config's `shells`).
EXEC_STORM = "i=0; while [ $i -lt 50000 ]; do sh -c :; i=$((i+1)); done"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def summary(samples: list[float]) -> dict:
    return {"samples": len(samples), "p50_ms": percentile(samples, 0.5),
            "p95_ms": percentile(samples, 0.95), "max_ms": percentile(samples, 1.0)}


class Variants:
    """Two versions of the rules file, written in turn (atomically); `next()` writes one
    and returns the version the agent must report for it."""

    def __init__(self, path: Path):
        self.path = path
        base = NETWORK_RULES.read_text()
        assert "syns_per_s: 200}" in base, "the packaged net.syn_flood threshold moved"
        self.texts = [base, base.replace("syns_per_s: 200}", "syns_per_s: 201}")]
        self.n = 0

    def next(self) -> str:
        self.n += 1
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(self.texts[self.n % 2])
        os.rename(tmp, self.path)
        return load_ruleset(self.path).version


def bench_api(stub, variants: Variants, n: int, invalid: list[str]) -> dict:
    rtt, agent_took = [], []
    for i in range(n):
        want = variants.next()
        t0 = time.monotonic()
        try:
            answer = stub.ReloadRules(pb.ReloadRulesRequest(), timeout=TIMEOUT_S)
        except grpc.RpcError as e:
            invalid.append(f"api #{i}: rejected: {e.details()}")
            continue
        t1 = time.monotonic()
        in_use = stub.GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT_S).ruleset.version
        if answer.ruleset_version != want or in_use != want:
            invalid.append(f"api #{i}: wrote {want}, answer {answer.ruleset_version}, "
                           f"status {in_use}")
            continue
        rtt.append((t1 - t0) * 1e3)
        agent_took.append(answer.took_s * 1e3)
    return {"round_trip": summary(rtt), "agent_took": summary(agent_took)}


def bench_sighup(stub, pid: int, variants: Variants, n: int, invalid: list[str]) -> dict:
    samples = []
    for i in range(n):
        want = variants.next()
        t0 = time.monotonic()
        os.kill(pid, signal.SIGHUP)
        seen = ""
        while time.monotonic() - t0 < TIMEOUT_S:
            st = stub.GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT_S)
            seen = st.ruleset.version
            if seen == want:
                samples.append((time.monotonic() - t0) * 1e3)
                break
            time.sleep(POLL_S)
        else:
            invalid.append(f"sighup #{i}: wrote {want}, still {seen} after {TIMEOUT_S:g} s "
                           f"({st.ruleset.last_error or 'no error'})")
    return {"to_status": summary(samples)}


def run(args: argparse.Namespace, tmp: Path) -> dict:
    n = 10 if args.quick else args.reloads
    rules = tmp / "rules.yaml"
    rules.write_text(NETWORK_RULES.read_text())
    invalid: list[str] = []
    with Lab() as lab:
        agent = AgentProcess(lab.victim, tmp, f"rules_file: {rules}\n")
        agent.start()
        flood: list = []
        try:
            if args.flood:
                server = attacks.start_server(lab.victim, SERVICE_PORT, duration_s=120)
                # Events for the consumer: a SYN flood (kernel threshold crossings and
                # findings) and an exec storm in the victim (a process event per exec),
                # each bounded in count and time.
                flood = [attacks.start(lab.attacker, "syn_flood", target=lab.addr("victim"),
                                       port=SERVICE_PORT, rate=20000, count=1_200_000,
                                       duration_s=60),
                         subprocess.Popen(["timeout", "60", "ip", "netns", "exec", lab.victim,
                                           "sh", "-c", EXEC_STORM])]
                time.sleep(0.5)
            with grpc.insecure_channel(f"unix:{tmp}/run/control.sock") as ch:
                stub = control_pb2_grpc.ControlStub(ch)
                for _ in range(5):
                    stub.GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT_S)
                variants = Variants(rules)
                api = bench_api(stub, variants, n, invalid)
                hup = bench_sighup(stub, agent.pid, variants, n, invalid)
                counters = stub.GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT_S).counters
                findings = sum(v for k, v in counters.items() if k.startswith("findings.net."))
                events = sum(v for k, v in counters.items()
                             if k.startswith(("events.net.", "events.tcp.", "events.proc.")))
        finally:
            for proc in flood:
                proc.kill()
                proc.wait()
            if args.flood:
                server.kill()
                server.wait()
            agent.stop()
    if args.flood and not (findings and events > 10 * n):
        invalid.append(f"--flood: {findings} findings, {events} events: the reloads were "
                       "not made while events and findings were processed")
    return {"reloads_per_path": n, "flood": args.flood, "findings_during_run": findings,
            "events_during_run": events,
            "api": api, "sighup": hup, "invalid": invalid}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reloads", type=int, default=40, help="reloads per path (default 40)")
    ap.add_argument("--quick", action="store_true", help="10 reloads per path")
    ap.add_argument("--flood", action="store_true",
                    help="run a bounded SYN flood at the victim during the reloads")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("rule_reload: needs root (it builds network namespaces)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="swarm-bench-reload-"))
    try:
        out = run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"machine": f"{platform.node()} {platform.release()} {os.cpu_count()} cpus",
           "command": " ".join(["bench/rule_reload.py", *sys.argv[1:]]), **out,
           "valid": not out["invalid"]}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for name, s in (("api round trip", out["api"]["round_trip"]),
                        ("api, agent's own took_s", out["api"]["agent_took"]),
                        ("sighup -> status shows it", out["sighup"]["to_status"])):
            print(f"{name:<28} n={s['samples']:<4} p50 {s['p50_ms']} ms  p95 {s['p95_ms']} ms"
                  f"  max {s['max_ms']} ms")
        for line in out["invalid"]:
            print(f"INVALID: {line}")
    return 0 if out["valid"] else 1


if __name__ == "__main__":
    sys.exit(main())
