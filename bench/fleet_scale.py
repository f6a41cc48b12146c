"""Fleet decisions at scale: one nats-server and one mesh service on this machine, >= 1,000
simulated nodes and a handful of real agents following the decision stream.

    sudo .venv/bin/python bench/fleet_scale.py [--subscribers 1000] [--agents 5]
                                               [--decisions 20] [--json]

What runs (bench/fleet_hub.py builds it in throw-away namespaces and removes it all):
- nats-server (config from mesh.natsconf, JetStream on disk in a temp dir) and the mesh
  service (`python -m mesh run`: signing, SQLite store, policy min_nodes 2 of
  min_providers 2, stage_s 0), the mesh's NATS connection and its reporting API local;
- `--subscribers` simulated nodes in `--workers` processes (+ one process in a namespace of
  its own holding the `--partition` group): each the agent's real FleetSubscriber with its
  own NATS connection, ordered consumer, cursor and SQLite store (on tmpfs: the nodes'
  disks are not what is measured), enforcing into an in-memory set (bench/fleet_sim.py);
- `--agents` real `swarm-agent run` in namespaces enforcing into their own nftables,
  observed through `nft -j monitor` in their namespace.

Each decision: node prop-a (provider-a) proposes a target over the mesh reporting API
(mutual TLS), then node prop-b (provider-b) proposes it too: that second proposal completes
the corroboration. Propagation is from just before the second proposal is sent to the
moment each node put the block in force (simulated: its enforcer's change() returned
after the SQLite commit; real agents: nftables announced the element). One clock:
CLOCK_REALTIME of this machine (time.time in every process).

Phases: connect all; idle (what following costs); `--decisions` in sequence; a partition
of the `--partition` group for `--partition-s` while `--during` decisions are made, then
catch-up; a reconnect storm (nats-server restarted: everyone reconnects at once) and one
decision after it. Memory and CPU of nats-server and the mesh service from /proc.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agent.fleet.decision import subject_for  # noqa: E402
from bench.fleet_hub import NATS_IP, SUBNET, AgentNode, Hub, Nats, Proposer, proc_usage  # noqa: E402
from bench.fleet_report import delta, human, summary  # noqa: E402
from swarmlab.lab import sh  # noqa: E402


def wait(pred: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval_s)
    return pred()


class Worker:
    """One bench/fleet_sim.py process; ask() sends a command and waits for its line."""

    def __init__(self, spec: dict[str, Any], log: Path, prefix: tuple[str, ...] = ()):
        self.count = spec["count"]
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "bench.fleet_sim",
                                      json.dumps(spec)], cwd=REPO, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:       # type: ignore[union-attr]
            self.lines.put(line)

    def reply(self, timeout_s: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                return json.loads(self.lines.get(timeout=0.5))
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
        raise RuntimeError(f"simulated-node worker {self.proc.pid} did not answer "
                           f"(exit status {self.proc.poll()})")

    def ask(self, op: str, **kw: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")   # type: ignore[union-attr]
        self.proc.stdin.flush()                                       # type: ignore[union-attr]
        return self.reply()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask("stop")
                self.proc.wait(20)
            except (RuntimeError, OSError, subprocess.TimeoutExpired, ValueError):
                self.proc.kill()
                self.proc.wait(5)


class Bench:
    def __init__(self, args: argparse.Namespace, hub: Hub, tmp: Path, shm: Path):
        self.args, self.hub, self.tmp, self.shm = args, hub, tmp, shm
        self.nats = Nats(tmp / "nats")
        self.mesh: Any = None
        self.proposer: Proposer | None = None
        self.workers: list[Worker] = []
        self.part: Worker | None = None
        self.part_ns = ""
        self.agents: list[AgentNode] = []
        self.t0: dict[str, float] = {}
        self.out: dict[str, Any] = {}
        self._next = 0

    # -- set-up -----------------------------------------------------------------------------
    def start_mesh(self) -> None:
        from tests.meshkit import MeshProcess, node_cert, write_config
        from tests.meshrecv import make_certs
        certs = make_certs(self.tmp / "certs")
        props = {n: node_cert(certs, n, n, f"provider-{n[-1]}") for n in ("prop-a", "prop-b")}
        pw = self.tmp / "mesh.password"
        pw.write_text(self.nats.users["mesh"].password + "\n")
        pw.chmod(0o600)
        self.keydir = self.tmp / "keys"
        cfg = write_config(self.tmp / "mesh.yaml", certs, f"sqlite:///{self.tmp / 'mesh.db'}",
                           extra=f"""
nats:
  url: {self.nats.url}
  user: mesh
  password_file: {pw}
signing:
  private_key: {self.keydir / 'decisions.key'}
policy:
  min_nodes: 2
  min_providers: 2
  rate_limit: 1000000
  stage_s: 0
""")
        self.mesh = MeshProcess(cfg)
        self.mesh.cli("keygen", "--dir", str(self.keydir))
        self.mesh.start()
        self.proposer = Proposer(certs, props, self.mesh.port)

    def spec(self, index: int, count: int) -> dict[str, Any]:
        return {"index": index, "count": count, "url": self.nats.url, "user": "node",
                "password": self.nats.users["node"].password,
                "key": str(self.keydir / "decisions.pub"), "state_dir": str(self.shm),
                "allow": f"{SUBNET}.0/24", "ramp_s": self.args.ramp_s}

    def start_workers(self) -> None:
        a = self.args
        rest = a.subscribers - a.partition
        per = [rest // a.workers + (1 if i < rest % a.workers else 0) for i in range(a.workers)]
        for i, n in enumerate(per):
            if n:
                self.workers.append(Worker(self.spec(i, n), self.tmp / f"worker{i}.log"))
        if a.partition:
            self.part_ns, _ = self.hub.node_ns("part", 200)
            self.part = Worker(self.spec(len(per), a.partition), self.tmp / "worker-part.log",
                               prefix=("ip", "netns", "exec", self.part_ns))
            self.workers.append(self.part)
        for w in self.workers:
            w.reply(timeout_s=120)      # its stores are open and its subscribers started

    def status(self) -> dict[str, Any]:
        total: dict[str, Any] = {}
        for w in self.workers:
            for k, v in w.ask("status").items():
                total[k] = total.get(k, 0) + v
        return total

    def usage(self) -> dict[str, Any]:
        st = self.status()
        return {"at": time.time(), "nats": proc_usage(self.nats.pid),
                "nats_counters": self.nats.counters(), "mesh": proc_usage(self.mesh.proc.pid),
                "sims": {"rss_mib": round(st.get("rss_kib", 0) / 1024, 1),
                         "cpu_s": st.get("cpu_s", 0.0)},
                "agents": [proc_usage(a.pid()) for a in self.agents]}

    # -- one decision -----------------------------------------------------------------------
    def target(self, base: str) -> str:
        self._next += 1
        return f"{ipaddress.IPv4Address(base) + self._next}/32"

    def decide(self, target: str) -> None:
        """prop-a proposes, then prop-b completes the corroboration (t0 is just before)."""
        assert self.proposer is not None
        self.proposer.propose("prop-a", target)
        self.t0[target] = time.time()
        self.proposer.propose("prop-b", target)

    def everywhere(self, target: str, workers: list[Worker] | None = None,
                   agents: bool = True) -> bool:
        ws = self.workers if workers is None else workers
        if agents and any(target not in a.seen for a in self.agents):
            return False
        return all(w.ask("count", target=target)["applied"] >= w.count for w in ws)

    def times(self, targets: list[str], workers: list[Worker] | None = None) -> list[dict]:
        """Per simulated node: {target: [received, in force]}."""
        out: list[dict] = []
        for w in (self.workers if workers is None else workers):
            out += w.ask("times", targets=targets)["times"]
        return out

    def propagation(self, targets: list[str], workers: list[Worker] | None = None,
                    agents: bool = True) -> dict[str, Any]:
        """Seconds from t0 (the proposal completing corroboration) to: stored on the stream
        (JetStream's timestamp), handed to each simulated node's apply(), in force there,
        in force on the last simulated node, in the nftables of each real agent."""
        stored = self.nats.stored_at([subject_for(t) for t in targets])
        per_sub = self.times(targets, workers)
        received, in_force, last, missing = [], [], [], 0
        for t in targets:
            got = [s[t][1] - self.t0[t] for s in per_sub if t in s and s[t][1] is not None]
            received += [s[t][0] - self.t0[t] for s in per_sub if t in s and s[t][0] is not None]
            missing += len(per_sub) - len(got)
            in_force += got
            if got:
                last.append(max(got))
        res: dict[str, Any] = {
            "decisions": len(targets), "nodes": len(per_sub),
            "on_stream": summary([stored[subject_for(t)] - self.t0[t] for t in targets]),
            "sims_received": summary(received), "sims_in_force": summary(in_force),
            "last_sim_in_force": summary(last), "sims_missing": missing}
        if agents and self.agents:
            real = [a.seen[t] - self.t0[t] for a in self.agents for t in targets if t in a.seen]
            res["agents_in_force"] = summary(real)
            res["agents_missing"] = len(self.agents) * len(targets) - len(real)
        return res

    # -- phases -----------------------------------------------------------------------------
    def connect(self) -> None:
        before = self.usage()
        self.start_workers()
        ok = wait(lambda: self.status()["connected"] >= self.args.subscribers, 240, 0.5)
        connected = self.usage()
        time.sleep(self.args.settle_s)      # the last consumers created, snapshots loaded
        self.out["connect"] = {"subscribers": self.args.subscribers, "all_connected": ok,
                               "seconds": round(connected["at"] - before["at"], 1),
                               "before": before, "connected": connected,
                               **delta(before, connected)}

    def idle(self) -> None:
        a = self.usage()
        time.sleep(self.args.idle_s)
        self.out["idle"] = delta(a, self.usage())

    def sequence(self) -> None:
        a = self.usage()
        targets, late = [], []
        for _ in range(self.args.decisions):
            t = self.target("203.0.113.0")
            self.decide(t)
            if not wait(lambda: self.everywhere(t), 30, 0.05):
                late.append(t)
            targets.append(t)
            time.sleep(self.args.gap_s)
        self.out["sequence"] = {**self.propagation(targets), "not_everywhere_in_30s": late,
                                **delta(a, self.usage())}

    def partition(self) -> None:
        a = self.args
        if not self.part:
            return
        port = self.nats.url.rsplit(":", 1)[1]
        rules = f"""table inet fleet_partition {{
  chain out {{ type filter hook output priority 0; ip daddr {NATS_IP} tcp dport {port} drop; }}
  chain in {{ type filter hook input priority 0; ip saddr {NATS_IP} tcp sport {port} drop; }}
}}
"""
        sh("nft", "-f", "-", ns=self.part_ns, input=rules)
        cut = time.time()
        targets = []
        try:
            for k in range(a.during):
                time.sleep(max(0.0, cut + 3 + k * (a.partition_s - 6) / max(1, a.during) - time.time()))
                t = self.target("198.51.100.0")
                self.decide(t)
                targets.append(t)
            others = [w for w in self.workers if w is not self.part]
            for t in targets:
                wait(lambda: self.everywhere(t, others), 30, 0.1)
            time.sleep(max(0.0, cut + a.partition_s - time.time()))
            at_heal = self.part.ask("status")   # failed sessions so far: the backoff reached
        finally:
            healed = time.time()        # the earliest the link could carry a packet again
            sh("nft", "delete", "table", "inet", "fleet_partition", ns=self.part_ns)
        ok = wait(lambda: all(self.everywhere(t, [self.part], agents=False) for t in targets),
                  a.catch_up_timeout_s, 0.1)
        per_sub = self.times(targets, [self.part])
        done = [s for s in per_sub if all(t in s and s[t][1] is not None for t in targets)]
        caught = [max(s[t][1] for t in targets) - healed for s in done]
        connects = self.part.ask("connects")["connects"]
        reconn = [min(c for c in cs if c >= healed) - healed for cs in connects
                  if any(c >= healed for c in cs)]
        self.out["partition"] = {
            "group": a.partition, "seconds": round(healed - cut, 1), "decisions": len(targets),
            "all_caught_up": ok, "caught_up_after_heal": summary(caught),
            "reconnected_after_heal": summary(reconn),
            "failed_sessions_per_node_at_heal": round(at_heal["failures"] / a.partition, 1),
            "had_all_before_heal": sum(1 for s in done if max(s[t][1] for t in targets) < healed),
            "rest_of_fleet": self.propagation(targets, [w for w in self.workers if w is not self.part])}

    def storm(self) -> None:
        """nats-server restarted (SIGTERM, started again on the same store): every node
        loses its connection at once and comes back with its jittered backoff."""
        before = self.usage()
        log_at = len(self.mesh.log.read_text())
        stop = time.time()
        self.nats.stop()
        ready = self.nats.start()
        # following again = its consumer exists on the new server (the restarted server
        # has none of the old ones): every simulated node and every real agent
        everyone = self.args.subscribers + len(self.agents)
        ok = wait(lambda: self.nats.counters()["consumers"] >= everyone,
                  self.args.catch_up_timeout_s, 0.05)
        all_back = time.time()
        server = {**proc_usage(self.nats.pid), **self.nats.counters()}   # the new process
        # the mesh's own client reconnects too (every reconnect_time_wait, 1 s); a decision
        # made before it has is published by the service's retry loop a second later
        mesh_back = wait(lambda: "reconnected to" in self.mesh.log.read_text()[log_at:], 30, 0.1)
        connects = []
        for w in self.workers:
            connects += w.ask("connects")["connects"]
        first = [min(c for c in cs if c >= stop) - ready for cs in connects
                 if any(c >= stop for c in cs)]
        t = self.target("192.0.2.0")
        self.decide(t)
        wait(lambda: self.everywhere(t), 30, 0.05)
        self.out["storm"] = {
            "restart_s": round(ready - stop, 2), "all_following": ok,
            "sims_reconnected_after_ready": summary(first),
            "all_following_after_ready_s": round(all_back - ready, 2), "mesh_reconnected": mesh_back,
            "nats_until_all_back": server, "nats_before_restart": before["nats"],
            "decision_after": self.propagation([t])}

    def decided(self) -> None:
        """From the mesh's own record: proposal (t0) -> decision issued (policy passed)."""
        rows = self.mesh.cli("decisions", "--json", "--limit", "100000")
        d = [r["issued_at"] - self.t0[r["target"]] for r in rows if r["target"] in self.t0]
        self.out["proposal_to_decided"] = summary(d)

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        for ag in self.agents:
            ag.stop()
        if self.proposer:
            self.proposer.close()
        if self.mesh is not None:
            self.mesh.stop()
        self.nats.stop()

    def run(self) -> dict[str, Any]:
        a = self.args
        self.nats.start()
        self.start_mesh()
        for i in range(a.agents):
            ag = AgentNode(self.hub, i, self.tmp / f"agent{i}", self.nats,
                           self.keydir / "decisions.pub")
            self.agents.append(ag)
            ag.start()
        wait(lambda: all(ag.cursor() is not None for ag in self.agents), 60, 0.2)
        self.connect()
        self.idle()
        self.sequence()
        self.partition()
        self.storm()
        self.decided()
        self.out["end"] = self.usage()
        return self.out


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subscribers", type=int, default=1000)
    ap.add_argument("--agents", type=int, default=5)
    ap.add_argument("--decisions", type=int, default=20)
    ap.add_argument("--workers", type=int, default=4, help="processes for the simulated "
                    "nodes outside the partition group (default 4)")
    ap.add_argument("--partition", type=int, default=100, help="simulated nodes cut off")
    ap.add_argument("--partition-s", type=float, default=30.0)
    ap.add_argument("--during", type=int, default=5, help="decisions made during the partition")
    ap.add_argument("--idle-s", type=float, default=20.0)
    ap.add_argument("--settle-s", type=float, default=5.0, help="quiet time after connecting")
    ap.add_argument("--gap-s", type=float, default=0.5, help="pause between decisions")
    ap.add_argument("--ramp-s", type=float, default=5.0, help="each worker starts its nodes over this")
    ap.add_argument("--catch-up-timeout-s", type=float, default=90.0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.partition >= a.subscribers:
        ap.error("--partition must be below --subscribers")
    return a


def _interrupted(*_: object) -> None:
    raise KeyboardInterrupt     # SIGTERM cleans up like Ctrl-C


def main() -> None:
    args = parse()
    if os.geteuid() != 0:
        raise SystemExit("fleet_scale: run as root (namespaces, nftables)")
    hub = Hub()
    hub.enter()             # first: every thread and child of this process lives in the hub
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    signal.signal(signal.SIGTERM, _interrupted)
    tmp = Path(tempfile.mkdtemp(prefix="fleet-scale-"))
    shm = Path(tempfile.mkdtemp(prefix="fleet-scale-", dir="/dev/shm"))
    bench = Bench(args, hub, tmp, shm)
    started = time.time()
    try:
        out = bench.run()
    except BaseException:
        print(f"fleet_scale: failed; logs were in {tmp}", file=sys.stderr)
        raise
    finally:
        bench.close()
        hub.close()
        shutil.rmtree(shm, ignore_errors=True)
        if not os.environ.get("FLEET_SCALE_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)
    out["run_s"] = round(time.time() - started, 1)
    out["machine"] = {"cores": os.cpu_count(), "kernel": os.uname().release,
                      "nats_server": subprocess.run(["nats-server", "--version"], capture_output=True,
                                                    text=True).stdout.strip()}
    out["args"] = vars(args)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(human(out))


if __name__ == "__main__":
    main()
