"""File policy: the open latency tax of a marked file, and denied open -> incident latency.

    sudo .venv/bin/python bench/file_policy.py                 # 2000 opens, 20 denials
    sudo .venv/bin/python bench/file_policy.py --quick --json  # 300 opens, 5 denials
    sudo .venv/bin/python bench/file_policy.py --busy          # the tax again under an exec storm

It builds a lab (swarmlab.lab) and runs `swarm-agent run` for the victim namespace with
agent/rules/files.yaml and one file rule: a temp directory's files (a directory mark plus
an inode mark per file) denied to a throw-away cgroup and everything below it.

Tax: a process outside the rule's cgroups (the opener is allowed, as nearly every open of
a marked file is) opens and closes a marked file and an unmarked file of the same kind in
the same file system, alternately, timing each open(2)+close(2) with CLOCK_MONOTONIC in
the opener itself. Every open of the marked file waits for the agent's answering thread;
the unmarked one never does. The run is invalid when the agent's answer counter did not
grow by at least the number of marked opens (the mark was not in force: the figure would
measure nothing), or when a marked open failed.

With --busy the tax is measured a second time while a shell in the victim namespace execs
`/bin/sh -c :` in a loop (bounded by the measurement): the agent's process probe reads every
exec and its detector takes each event, so the answering thread competes with the agent's
own loop for the interpreter (the GIL) -- the case the idle figure hides.

Incident: per sample a fresh cgroup below the denied one (its own scope, so its own
incident) starts a process that reads CLOCK_MONOTONIC just before it opens the denied file;
the latency is from that instant to the incident first seen in the agent's SQLite store
(polled every 5 ms, read-only). A sample is invalid -- listed, never averaged in -- when
the open was not refused (EPERM), when its incident existed before, or none came in 10 s.
Exit status 1 when any run or sample is invalid. Everything it made is removed at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.enforce.cgroup import cgroup2_mount  # noqa: E402
from agent.state.store import Store  # noqa: E402
from swarmlab.breachlab import throwaway_cgroup  # noqa: E402
from swarmlab.figures import pct  # noqa: E402
from swarmlab.lab import Lab  # noqa: E402
from swarmlab.scenario import AgentProcess  # noqa: E402

RULES = Path(__file__).resolve().parents[1] / "agent" / "rules" / "files.yaml"
# With --busy, beside files.yaml: a rule that takes every exec event and never fires, so
# the agent's process probe reads each exec and its detector evaluates it (load, no act).
_LOAD_RULE = """rules:
  - id: bench.exec_load
    version: 1
    class: suspicious_activity
    severity: low
    action: report
    description: bench load only; never fires
    match:
      - event: proc.exec
        where:
          exe: {eq: /nonexistent/swarm-bench-never}
"""
TIMEOUT_S = 10.0
_TAX = r"""
import json, os, sys, time
marked, unmarked, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = {"marked": [], "unmarked": [], "failed": 0}
for i in range(2 * n):
    path, key = (marked, "marked") if i % 2 == 0 else (unmarked, "unmarked")
    t0 = time.monotonic_ns()
    try:
        os.close(os.open(path, os.O_RDONLY))
    except OSError:
        out["failed"] += 1
        continue
    out[key].append((time.monotonic_ns() - t0) / 1e3)
print(json.dumps(out))
"""
_DENIED = r"""
import json, os, sys, time
t0 = time.monotonic_ns()
try:
    os.close(os.open(sys.argv[1], os.O_RDONLY)); r = "opened"
except OSError as e:
    r = os.strerror(e.errno)
print(json.dumps({"t0_ns": t0, "result": r}))
"""


def in_cgroup(cg: Path | None, *argv: str) -> dict:
    pre = f'echo $$ > "{cg}/cgroup.procs" && ' if cg else ""
    out = subprocess.run(["sh", "-c", pre + 'exec "$0" "$@"', *argv], capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout)


def counters(agent: AgentProcess) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-m", "agent.cli.main", "status", "--json", "--config",
                          str(agent.config_path)], capture_output=True, text=True, timeout=60)
    return {k: int(v) for k, v in json.loads(out.stdout)["counters"].items()}


def incident_seen_ms(db: Path, entity: str) -> float | None:
    with contextlib.closing(Store(db, readonly=True)) as store:
        found = store.incidents(entity=entity)
    return time.monotonic_ns() / 1e6 if found else None


def summary(values: list[float]) -> dict:
    return {"p50": _r(pct(values, 0.5)), "p95": _r(pct(values, 0.95)),
            "p99": _r(pct(values, 0.99)), "n": len(values)}


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def measure_tax(agent: AgentProcess, data: Path, opens: int, invalid: list[dict], name: str) -> dict:
    before = counters(agent)["files.answered"]
    tax = in_cgroup(None, sys.executable, "-c", _TAX, str(data / "marked" / "secret"),
                    str(data / "free"), str(opens))
    answered = counters(agent)["files.answered"] - before
    if tax["failed"]:
        invalid.append({"run": name, "reason": f"{tax['failed']} allowed opens failed"})
    if answered < opens:
        invalid.append({"run": name, "reason": f"the agent answered {answered} of {opens} "
                                               "marked opens: the mark was not in force"})
    marked, unmarked = summary(tax["marked"]), summary(tax["unmarked"])
    both = marked["n"] and unmarked["n"]
    return {"marked": marked, "unmarked": unmarked, "agent_answered": answered,
            "tax_p50": _r(marked["p50"] - unmarked["p50"]) if both else None,
            "tax_p95": _r(marked["p95"] - unmarked["p95"]) if both else None}


def exec_storm(ns: str) -> subprocess.Popen:
    """Execs of a shell (a watched program: the kernel side passes each to the agent),
    for at most 120 s."""
    return subprocess.Popen(["ip", "netns", "exec", ns, "sh", "-c",
                             "end=$(($(date +%s) + 120)); while [ $(date +%s) -lt $end ]; do "
                             + "/bin/sh -c :; " * 8 + "done"])


def run(opens: int, denials: int, busy: bool) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="swarm-files-bench-"))
    data = Path(tempfile.mkdtemp(prefix="swarm-files-data-"))
    (data / "marked").mkdir()
    (data / "marked" / "secret").write_text("key")
    (data / "free").write_text("free")
    invalid: list[dict] = []
    incident_ms: list[float] = []
    with contextlib.ExitStack() as stack, Lab() as lab:
        denied = stack.enter_context(throwaway_cgroup("swa-filebench"))
        path = "/" + str(denied.relative_to(cgroup2_mount()))
        rules = tmp / "rules"
        rules.mkdir()
        shutil.copy(RULES, rules / "files.yaml")
        if busy:
            (rules / "load.yaml").write_text(_LOAD_RULE)
        cfg = (f"rules_file: {rules}\npolicy:\n  files:\n"
               f"    - {{name: bench, paths: [{data}/marked/], cgroups: [{path}]}}\n")
        agent = AgentProcess(lab.victim, tmp, cfg)
        agent.start()
        stack.callback(agent.stop)
        tax = {"idle": measure_tax(agent, data, opens, invalid, "tax")}
        if busy:
            storm = exec_storm(lab.victim)
            try:
                time.sleep(1.0)
                before = counters(agent).get("events.proc.exec", 0)
                tax["busy"] = measure_tax(agent, data, opens, invalid, "tax_busy")
                seen = counters(agent).get("events.proc.exec", 0) - before
            finally:
                storm.kill()
                storm.wait()
            tax["busy"]["agent_exec_events_during"] = seen
            if seen < opens // 10:      # the storm did not reach the agent: nothing measured
                invalid.append({"run": "tax_busy", "reason": f"the agent took {seen} events "
                                                             "during the storm"})
        for i in range(denials):
            job = denied / f"job{i}"
            job.mkdir()
            entity = f"file:bench:cgroup:{path}/job{i}"
            if incident_seen_ms(agent.db_path, entity) is not None:
                invalid.append({"run": i, "reason": "incident before the attempt"})
                continue
            r = in_cgroup(job, sys.executable, "-c", _DENIED, str(data / "marked" / "secret"))
            seen = None
            deadline = time.monotonic() + TIMEOUT_S
            while seen is None and time.monotonic() < deadline:
                seen = incident_seen_ms(agent.db_path, entity)
                if seen is None:
                    time.sleep(0.005)
            if r["result"] != "Operation not permitted":
                invalid.append({"run": i, "reason": f"the open was not refused: {r['result']}"})
            elif seen is None:
                invalid.append({"run": i, "reason": f"no incident within {TIMEOUT_S:.0f} s"})
            else:
                incident_ms.append(seen - r["t0_ns"] / 1e6)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(data, ignore_errors=True)
    return {
        "opens_each": opens, "open_close_us": tax,
        "denied_open_to_incident_ms": summary(incident_ms),
        "invalid": invalid,
        "host": {"kernel": platform.release(), "python": platform.python_version()},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="300 opens and 5 denials instead of 2000 and 20")
    ap.add_argument("--busy", action="store_true", help="measure the tax again under an exec storm")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = ap.parse_args()
    result = run(300, 5, args.busy) if args.quick else run(2000, 20, args.busy)
    if args.json:
        print(json.dumps(result))
    else:
        for name, o in result["open_close_us"].items():
            print(f"open+close, allowed, agent {name}, {result['opens_each']} each (us): marked p50 "
                  f"{o['marked']['p50']} p95 {o['marked']['p95']} p99 {o['marked']['p99']}; unmarked "
                  f"p50 {o['unmarked']['p50']} p95 {o['unmarked']['p95']} p99 {o['unmarked']['p99']}; "
                  f"tax p50 {o['tax_p50']} p95 {o['tax_p95']}")
        d = result["denied_open_to_incident_ms"]
        print(f"denied open -> incident: p50 {d['p50']} ms, p95 {d['p95']} ms over {d['n']} workloads")
        for bad in result["invalid"]:
            print(f"INVALID {bad['run']}: {bad['reason']}")
    return 1 if result["invalid"] else 0


if __name__ == "__main__":
    sys.exit(main())
