"""Time to isolate, end to end through a real agent (`swarm-agent run` in a lab victim with
its probes, detector, responder and enforcers), from the breach to the kernel enforcing it.

node / service: a service (swarmlab.breachlab.Service) whose executable is listed in
breach.services spawns /bin/sh; clock start = CLOCK_MONOTONIC just before the spawn.
A prober in the attacker namespace sends a numbered UDP datagram every ~0.5 ms to the
service's echo all along; "in force" = send time of the first datagram never answered.
Node: the service runs in the root cgroup (the rule falls back to the node). Service: it
runs in a throw-away cgroup; also the time until cgroup.events says `frozen 1`.
peer: a TCP port scan through a wireguard-go tunnel; clock start = the scan's first
packet; "in force" = the attacker's peer gone from the victim's device (UAPI, polled
every ~1 ms). Each run is released over the control API, its incident resolved, and
traffic seen flowing again before the next.

    sudo .venv/bin/python bench/breach_latency.py [--runs 10] [--json]
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402

from swarmlab import attacks  # noqa: E402
from swarmlab.breachlab import (CutProber, Service, agent_config, cgroup_path,  # noqa: E402
                             scoped_rules, service_name, throwaway_cgroup, wireguard_pair)
from agent.enforce.cgroup import cgroup2_mount  # noqa: E402
from agent.enforce.wgapi import open_device  # noqa: E402
from swarmlab.lab import Lab, netns, wait_for  # noqa: E402
from agent.proto.swarm.control.v1 import control_pb2 as pb  # noqa: E402
from agent.proto.swarm.control.v1 import control_pb2_grpc  # noqa: E402
from swarmlab.scenario import AgentProcess  # noqa: E402

PORT = 9200


def first_unanswered_ns(ns: str, addr: str, act: Callable[[], int],
                        limit_s: float = 10.0) -> tuple[int, int]:
    """(start ns returned by act(), send time of the first datagram never answered)."""
    with CutProber(ns, addr, PORT, interval_s=0.0005, send_limit_s=limit_s + 1.0,
                   clock=time.monotonic_ns) as probe:
        probe.wait_answering(5.0)
        start = act()
        # Cut once nothing sent in the last 0.3 s came back.
        wait_for(lambda: probe.silent_for(600), limit_s, 0.01)
    cut = probe.first_unanswered()
    assert cut is not None     # silent_for() held: datagrams followed the last answer
    return start, cut


class Control:
    """The agent's control API on its local socket."""

    def __init__(self, agent: AgentProcess):
        self.ch = grpc.insecure_channel(f"unix:{agent.workdir}/run/control.sock")
        self.stub = control_pb2_grpc.ControlStub(self.ch)

    def release_and_resolve(self, target: str) -> None:
        self.stub.Release(pb.ReleaseRequest(target=target), timeout=10)
        for i in self.stub.ListIncidents(pb.ListIncidentsRequest(states=["escalated"])).incidents:
            self.stub.ResolveIncident(pb.ResolveIncidentRequest(id=i.id, comment="bench"))

    def recorded_ms(self) -> float | None:
        """The agent's own first-evidence -> mitigated time of the newest incident."""
        (i,) = self.stub.ListIncidents(pb.ListIncidentsRequest(limit=1)).incidents
        return (i.mitigated_at - i.first_seen_at) * 1000 if i.mitigated_at else None


def run_agent(lab: Lab, tmp: Path, name: str, extra: str = "") -> AgentProcess:
    agent = AgentProcess(lab.victim, tmp, agent_config(name, scoped_rules(tmp / "rules"), extra))
    agent.start()
    return agent


def bench_node(lab: Lab, tmp: Path, runs: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"node: exec -> traffic cut": [], "node: agent's record": []}
    name, victim = service_name(), lab.addr("victim")
    agent = run_agent(lab, tmp, name, "allowlist:\n  management: [192.0.2.0/24]\n")
    try:
        with Service(lab.victim, name, victim, PORT, cgroup2_mount()) as svc:
            api = Control(agent)
            for _ in range(runs):
                start, cut = first_unanswered_ns(lab.attacker, victim, svc.breach)
                out["node: exec -> traffic cut"].append((cut - start) / 1e6)
                out["node: agent's record"].append(api.recorded_ms())
                api.release_and_resolve("node")
                time.sleep(0.2)
    finally:
        agent.stop()
    return out


def bench_service(lab: Lab, tmp: Path, runs: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"service: exec -> traffic cut": [],
                                   "service: exec -> frozen 1": [], "service: agent's record": []}
    name, victim = service_name(), lab.addr("victim")
    agent = run_agent(lab, tmp, name)
    try:
        with throwaway_cgroup() as cg, Service(lab.victim, name, victim, PORT, cg) as svc:
            api, events = Control(agent), cg / "cgroup.events"
            for _ in range(runs):
                frozen: list[int] = []

                def breach() -> int:
                    start = svc.breach()
                    wait_for(lambda: "frozen 1" in events.read_text(), 10.0, 0.0005)
                    frozen.append(time.monotonic_ns())
                    return start
                start, cut = first_unanswered_ns(lab.attacker, victim, breach)
                out["service: exec -> traffic cut"].append((cut - start) / 1e6)
                out["service: exec -> frozen 1"].append((frozen[0] - start) / 1e6)
                out["service: agent's record"].append(api.recorded_ms())
                api.release_and_resolve(cgroup_path(cg))
                wait_for(lambda: "frozen 0" in events.read_text(), 5.0)
                time.sleep(0.2)
    finally:
        agent.stop()
    return out


def bench_peer(lab: Lab, tmp: Path, runs: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"peer: first scan packet -> peer removed": [],
                                   "peer: agent's record": []}
    with wireguard_pair(lab, tmp) as wg:
        agent = run_agent(lab, tmp, service_name())
        try:
            api = Control(agent)
            with Service(lab.victim, service_name(), wg.victim_tunnel, PORT, cgroup2_mount()):
                for _ in range(runs):
                    removed = watch_peer_removed(lab.victim, wg.victim_if, wg.attacker_key)
                    scan = attacks.run(lab.attacker, "port_scan", timeout_s=30,
                                       target=wg.victim_tunnel, ports="1000-3000",
                                       duration_s=2, timeout_ms=200)
                    gone = removed()
                    out["peer: first scan packet -> peer removed"].append(
                        (gone - scan["first_packet_mono_ns"]) / 1e6)
                    out["peer: agent's record"].append(api.recorded_ms())
                    api.release_and_resolve(wg.target)
                    wait_for(lambda: echo(lab.attacker, wg.victim_tunnel), 10.0)
        finally:
            agent.stop()
    return out


def watch_peer_removed(ns: str, ifname: str, key: str) -> Callable[[], int]:
    """Start polling the device; the returned function waits for the removal time (ns)."""
    seen: list[int] = []

    def poll() -> None:
        with netns(ns):
            dev = open_device(ifname)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if all(p.public_key != key for p in dev.peers()):
                    seen.append(time.monotonic_ns())
                    return
                time.sleep(0.001)
    t = threading.Thread(target=poll)
    t.start()

    def result() -> int:
        t.join()
        if not seen:
            raise RuntimeError("the peer was not removed within 20 s")
        return seen[0]
    return result


def echo(ns: str, addr: str) -> bool:
    with netns(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.settimeout(0.3)
        try:
            s.sendto((0).to_bytes(8, "big"), (addr, PORT))
            return bool(s.recv(16))
        except OSError:
            return False


def summary(values_ms: list[float]) -> dict[str, float]:
    ms = sorted(values_ms)
    p95 = ms[min(len(ms) - 1, max(0, round(0.95 * len(ms)) - 1))]
    return {"runs": len(ms), "median_ms": round(statistics.median(ms), 1),
            "p95_ms": round(p95, 1), "max_ms": round(ms[-1], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    for bench in (bench_node, bench_service, bench_peer):
        with Lab() as lab, tempfile.TemporaryDirectory() as tmp:
            for name, values in bench(lab, Path(tmp), args.runs).items():
                results[name] = summary([v for v in values if v is not None])
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"{'measure':42} {'runs':>4} {'median ms':>10} {'p95 ms':>8} {'max ms':>8}")
    for name, r in results.items():
        print(f"{name:42} {r['runs']:>4} {r['median_ms']:>10} {r['p95_ms']:>8} {r['max_ms']:>8}")


if __name__ == "__main__":
    main()
