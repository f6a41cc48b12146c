"""The exec policy: from the exec of a denied program to that process killed, and what
judging every exec costs.

    sudo .venv/bin/python bench/exec_policy.py                  # 30 runs, 3 x 2000 execs
    sudo .venv/bin/python bench/exec_policy.py --quick --json   # 8 runs, 3 x 500 execs

Latency: `swarm-agent run` in a lab namespace (swarmlab.lab) with the exec rules
(agent/rules/exec.yaml) and policy.exec_denied_paths naming a copied `sleep`. Each run
starts a Python process in the agent's namespace and a fresh cgroup, which reads its
CLOCK_MONOTONIC (t0) just before it execve()s the denied program, and writes it to a
pipe first; *killed* is when this process sees it end (its pidfd readable, waited on in
poll(): no polling interval added), on the same clock. A run is invalid -- listed with
its reason, never averaged in -- when the process is not killed within 5 s, dies of
anything but SIGKILL, gives no t0, or no incident is recorded for its cgroup; the bench
exits 1 then (swarmlab.figures.print_invalid).

Cost: execs per second of a shell loop of /bin/true (in the agent's namespace, so its
execs are the agent's to judge) with the network rules only (the kernel's exec_policy
map off: these execs never leave the kernel) and with the exec rules too (map on: every
exec goes to user space, its executable hashed -- a cache hit after the first). One
agent, switched by `swarm-agent rules reload` between loops, off and on alternately
(3 pairs: drift on a shared machine hits both alike); medians, and every pair listed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import select
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.sources.cgroups import cgroup2_mount  # noqa: E402
from swarmlab.breachlab import throwaway_cgroup  # noqa: E402
from swarmlab.figures import pct, print_invalid, too_many_invalid  # noqa: E402
from swarmlab.lab import Lab, wait_for  # noqa: E402
from swarmlab.scenario import AgentProcess  # noqa: E402

RULES = Path(__file__).resolve().parents[1] / "agent" / "rules"
LIMIT_S = 5.0
# t0 goes out before the exec: the kill may come before anything the program writes
LAUNCH = ("import os, sys, time; os.write(1, b'%d\\n' % time.monotonic_ns()); "
          "os.execv(sys.argv[1], [sys.argv[1], '600'])")


def rel(cg: Path) -> str:
    return "/" + str(cg.relative_to(cgroup2_mount()))


def in_cgroup(cg: Path):
    cg.mkdir(exist_ok=True)
    return lambda: (cg / "cgroup.procs").write_text(str(os.getpid()))


def ended_at(pid: int, timeout_s: float) -> float | None:
    """CLOCK_MONOTONIC when `pid` ended (its pidfd readable), None on timeout."""
    fd = os.pidfd_open(pid)
    try:
        p = select.poll()
        p.register(fd, select.POLLIN)
        return time.monotonic() if p.poll(timeout_s * 1000) else None
    finally:
        os.close(fd)


def incident_of(db: Path, entity: str) -> bool:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute("SELECT 1 FROM incidents WHERE entity = ?", (entity,)).fetchone() \
            is not None
    finally:
        con.close()


def reload_rules(agent: AgentProcess) -> None:
    subprocess.run([sys.executable, "-m", "agent.cli.main", "rules", "reload", "--config",
                    str(agent.config_path)], check=True, capture_output=True, timeout=60)


def agent_with(lab: Lab, work: Path, rules: Path, policy: str) -> AgentProcess:
    work.mkdir()
    agent = AgentProcess(lab.victim, work, extra_config=f"rules_file: {rules}\npolicy:\n{policy}")
    agent.start()
    return agent


def one_run(lab: Lab, cg: Path, denied: Path, db: Path) -> dict:
    p = subprocess.Popen(["ip", "netns", "exec", lab.victim, sys.executable, "-c", LAUNCH,
                          str(denied)], stdout=subprocess.PIPE, preexec_fn=in_cgroup(cg))
    try:
        line = p.stdout.readline()
        end = ended_at(p.pid, LIMIT_S)
        t0 = int(line) / 1e9 if line.strip() else None
    finally:
        p.kill()
        p.wait()
    entity = f"cgroup:{rel(cg)}"
    why = ("no t0 from the process" if t0 is None else
           f"not killed within {LIMIT_S:.0f} s" if end is None else
           f"ended with {p.returncode}, not SIGKILL" if p.returncode != -9 else None)
    if why is None:
        try:
            wait_for(lambda: incident_of(db, entity), 5)
        except TimeoutError:
            why = "no incident recorded"
    return {"invalid": why, "killed_ms": None if why else round((end - t0) * 1e3, 2)}


def exec_rate(lab: Lab, cg: Path, n: int) -> float:
    """execs/s of a shell loop of n /bin/true, in the agent's namespace and cgroup `cg`."""
    loop = f"i=0; while [ $i -lt {n} ]; do /bin/true; i=$((i+1)); done"
    t = time.monotonic()
    subprocess.run(["ip", "netns", "exec", lab.victim, "sh", "-c", loop], check=True,
                   preexec_fn=in_cgroup(cg), timeout=600)
    return n / (time.monotonic() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--execs", type=int, default=2000, help="execs per cost loop")
    ap.add_argument("--quick", action="store_true", help="8 runs, 500 execs per loop")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    runs, execs = (8, 500) if args.quick else (args.runs, args.execs)
    results, pairs = [], []
    with tempfile.TemporaryDirectory(prefix="exec-bench-") as tmp, Lab() as lab, \
            throwaway_cgroup("swa-execbench") as outer:
        home = Path("/var/lib") / f"swa-execbench-{os.getpid()}"
        rules = Path(tmp) / "rules"
        rules.mkdir()
        shutil.copy2(RULES / "network.yaml", rules)
        shutil.copy2(RULES / "exec.yaml", rules)
        try:
            home.mkdir()
            denied = home / "denied"
            shutil.copy2(shutil.which("sleep") or "/bin/sleep", denied)
            policy = (f"  exec_denied_paths: [\"{denied}\"]\n"
                      f"  exec_denied_sha256: [\"{'0' * 64}\"]\n"    # hashing on, no match
                      "  exec_workload_cgroups: [\"/nowhere\"]\n")
            agent = agent_with(lab, Path(tmp) / "agent", rules, policy)
            try:
                for n in range(runs):
                    results.append(one_run(lab, outer / f"run-{n}", denied, agent.db_path))
                for i in range(3):
                    pair = {}
                    for state in ("off", "on"):
                        if state == "off":
                            (rules / "exec.yaml").rename(Path(tmp) / "exec.yaml")
                        else:
                            (Path(tmp) / "exec.yaml").rename(rules / "exec.yaml")
                        reload_rules(agent)
                        pair[state] = round(exec_rate(lab, outer / f"loop-{i}-{state}", execs))
                    pairs.append(pair)
            finally:
                agent.stop()
        finally:
            shutil.rmtree(home, ignore_errors=True)
    rates = {"network_rules_only": statistics.median(p["off"] for p in pairs),
             "exec_rules": statistics.median(p["on"] for p in pairs)}
    killed = [r["killed_ms"] for r in results if not r["invalid"]]
    invalid = [{"run": i, "reason": r["invalid"]} for i, r in enumerate(results) if r["invalid"]]
    failed = ["exec -> killed"] if too_many_invalid(len(results), len(invalid), 0.0) else []
    out = {"bench": "exec_policy", "machine": platform.node(), "cpus": os.cpu_count(),
           "runs": runs, "valid": len(killed), "invalid": invalid,
           "killed_ms": {"p50": pct(killed, 0.5), "p95": pct(killed, 0.95),
                         "max": max(killed) if killed else None},
           "execs_per_s": {k: round(v) for k, v in rates.items()},
           "exec_cost_fraction": round(1 - rates["exec_rules"] / rates["network_rules_only"], 3),
           "exec_rate_pairs": pairs,
           "samples_ms": killed}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"exec of a denied program -> killed: p50 {out['killed_ms']['p50']} ms, p95 "
              f"{out['killed_ms']['p95']} ms, max {out['killed_ms']['max']} ms "
              f"({len(killed)}/{runs} valid runs)")
        print(f"execs/s of a /bin/true loop: {out['execs_per_s']['network_rules_only']} with "
              f"the network rules only, {out['execs_per_s']['exec_rules']} with the exec rules "
              f"(every exec judged: {out['exec_cost_fraction']:.1%} fewer; pairs off/on "
              + ", ".join(f"{p['off']}/{p['on']}" for p in pairs) + ")")
    return print_invalid([("exec -> killed", invalid)], failed, 0.0) or (0 if killed else 1)


if __name__ == "__main__":
    raise SystemExit(main())
