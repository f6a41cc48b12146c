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

Per run, from the clock start: *kernel event* (the probe's timestamp on the event the rule
fired on), *detected* (the detector's decision, the incident's detected_at), *mitigated*
(the agent's record: its first mitigation's transaction returned; for the peer that is the
scan's challenge), *applying* (the responder created the isolating mitigation: isolate_node,
isolate_service, remove_peer), *frozen 1* (service) and *cut*
(the prober's first unanswered datagram; the peer: seen removed). A run is invalid (listed,
left out of the percentiles; swarmlab.figures) when the prober was never answered before
the breach, nothing was detected or mitigated, the cut came before the mitigation could be
in force, or never came; more than --max-invalid of a scope's runs invalid: exit 1.

    sudo .venv/bin/python bench/breach_latency.py [--runs 10 | --quick] [--json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402

from swarmlab import attacks, figures  # noqa: E402
from swarmlab.breachlab import (CutProber, Service, agent_config, cgroup_path,  # noqa: E402
                             scoped_rules, service_name, throwaway_cgroup, wireguard_pair)
from agent.enforce.cgroup import cgroup2_mount  # noqa: E402
from agent.enforce.wgapi import open_device  # noqa: E402
from swarmlab.lab import Lab, netns, wait_for  # noqa: E402
from agent.proto.swarm.control.v1 import control_pb2 as pb  # noqa: E402
from agent.proto.swarm.control.v1 import control_pb2_grpc  # noqa: E402
from swarmlab.scenario import AgentProcess, _wall_to_mono_ns  # noqa: E402

PORT = 9200


def first_unanswered_ns(ns: str, addr: str, act: Callable[[], int],
                        limit_s: float = 10.0) -> tuple[int | None, int | None, bool]:
    """(start ns returned by act(), send time of the first datagram never answered, whether
    the prober was answered before act()); (None, None, False) when it never was."""
    with CutProber(ns, addr, PORT, interval_s=0.0005, send_limit_s=limit_s + 1.0,
                   clock=time.monotonic_ns) as probe:
        try:
            probe.wait_answering(5.0)
        except TimeoutError:
            return None, None, False
        start = act()
        # Cut once nothing sent in the last 0.3 s came back.
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: probe.silent_for(600), limit_s, 0.01)
    return start, probe.first_unanswered(), True


class Control:
    """The agent's control API on its local socket."""

    def __init__(self, agent: AgentProcess):
        self.ch = grpc.insecure_channel(f"unix:{agent.workdir}/run/control.sock")
        self.stub = control_pb2_grpc.ControlStub(self.ch)

    def release_and_resolve(self, target: str) -> None:
        try:
            self.stub.Release(pb.ReleaseRequest(target=target), timeout=10)
        except grpc.RpcError as e:   # nothing in force: that run is invalid, the next goes on
            if e.code() is not grpc.StatusCode.NOT_FOUND:
                raise
        for i in self.stub.ListIncidents(pb.ListIncidentsRequest(states=["escalated"])).incidents:
            self.stub.ResolveIncident(pb.ResolveIncidentRequest(id=i.id, comment="bench"))

    def judge(self, start_ns: int | None, end_ns: int | None, answering: bool,
              since_s: float, kind: str) -> dict[str, float | str | None]:
        """This run's figures from the newest incident (detected: the detector's decision;
        kernel: the event it decided on; applying: the responder created the `kind`
        mitigation that cuts; mitigated: the incident's first mitigation in force), all ms
        from start_ns, and why the run is invalid (swarmlab.figures) or None."""
        listed = self.stub.ListIncidents(pb.ListIncidentsRequest(limit=1)).incidents
        i = listed[0] if listed and listed[0].detected_at >= since_s else None
        detail = self.stub.GetIncident(pb.GetIncidentRequest(id=i.id)) if i else None
        lags = [json.loads(e.data_json or "{}").get("event_to_decision_ms")
                for e in (detail.timeline if detail else []) if e.kind == "finding"]
        lag_ms = next((v for v in lags if v is not None), None)
        detected = _wall_to_mono_ns(i.detected_at) if i else None
        applied = [m.created_at for m in (detail.mitigations if detail else [])
                   if m.state in ("active", "lifted", "expired") and m.kind == kind]
        marks = figures.Marks(
            first_packet=start_ns, probe_first_ok=(start_ns - 1) if answering and start_ns else None,
            detected=detected, applying=_wall_to_mono_ns(min(applied)) if applied else None,
            mitigated=_wall_to_mono_ns(i.mitigated_at) if i and i.mitigated_at else None,
            cut_off=end_ns, expect_cut_off=True,
            kernel_event=None if lag_ms is None or detected is None else detected - int(lag_ms * 1e6))

        def ms(mono: int | None) -> float | None:
            return None if mono is None or start_ns is None else (mono - start_ns) / 1e6
        return {"kernel event": ms(marks.kernel_event), "detected": ms(marks.detected),
                "mitigated": ms(marks.mitigated), "applying": ms(marks.applying), "cut": ms(end_ns),
                "invalid": figures.invalid_reason(marks)}


def run_agent(lab: Lab, tmp: Path, name: str, extra: str = "") -> AgentProcess:
    agent = AgentProcess(lab.victim, tmp, agent_config(name, scoped_rules(tmp / "rules"), extra))
    agent.start()
    return agent


Runs = list[dict]


def bench_node(lab: Lab, tmp: Path, runs: int) -> dict[str, Runs]:
    name, victim = service_name(), lab.addr("victim")
    agent = run_agent(lab, tmp, name, "allowlist:\n  management: [192.0.2.0/24]\n")
    out: Runs = []
    try:
        with Service(lab.victim, name, victim, PORT, cgroup2_mount()) as svc:
            api = Control(agent)
            for _ in range(runs):
                since = time.time()
                start, cut, answering = first_unanswered_ns(lab.attacker, victim, svc.breach)
                out.append(api.judge(start, cut, answering, since, "isolate_node"))
                api.release_and_resolve("node")
                time.sleep(0.2)
    finally:
        agent.stop()
    return {"node: exec -> traffic cut": out}


def bench_service(lab: Lab, tmp: Path, runs: int) -> dict[str, Runs]:
    name, victim = service_name(), lab.addr("victim")
    agent = run_agent(lab, tmp, name)
    out: Runs = []
    try:
        with throwaway_cgroup() as cg, Service(lab.victim, name, victim, PORT, cg) as svc:
            api, events = Control(agent), cg / "cgroup.events"
            for _ in range(runs):
                frozen: list[int] = []

                def breach() -> int:
                    start = svc.breach()
                    with contextlib.suppress(TimeoutError):
                        wait_for(lambda: "frozen 1" in events.read_text(), 10.0, 0.0005)
                        frozen.append(time.monotonic_ns())
                    return start
                since = time.time()
                start, cut, answering = first_unanswered_ns(lab.attacker, victim, breach)
                run = api.judge(start, cut, answering, since, "isolate_service")
                run["frozen 1"] = (frozen[0] - start) / 1e6 if frozen and start else None
                if run["invalid"] is None and run["frozen 1"] is None:
                    run["invalid"] = "the cgroup never froze"
                out.append(run)
                api.release_and_resolve(cgroup_path(cg))
                wait_for(lambda: "frozen 0" in events.read_text(), 5.0)
                time.sleep(0.2)
    finally:
        agent.stop()
    return {"service: exec -> traffic cut": out}


def bench_peer(lab: Lab, tmp: Path, runs: int) -> dict[str, Runs]:
    out: Runs = []
    with wireguard_pair(lab, tmp) as wg:
        agent = run_agent(lab, tmp, service_name())
        try:
            api = Control(agent)
            with Service(lab.victim, service_name(), wg.victim_tunnel, PORT, cgroup2_mount()):
                for _ in range(runs):
                    answering = echo(lab.attacker, wg.victim_tunnel)
                    since = time.time()
                    removed = watch_peer_removed(lab.victim, wg.victim_if, wg.attacker_key)
                    scan = attacks.run(lab.attacker, "port_scan", timeout_s=30,
                                       target=wg.victim_tunnel, ports="1000-3000",
                                       duration_s=2, timeout_ms=200)
                    out.append(api.judge(scan.get("first_packet_mono_ns"), removed(),
                                         answering, since, "remove_peer"))
                    api.release_and_resolve(wg.target)
                    wait_for(lambda: echo(lab.attacker, wg.victim_tunnel), 10.0)
        finally:
            agent.stop()
    return {"peer: first scan packet -> peer removed": out}


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

    def result() -> int | None:
        t.join()
        return seen[0] if seen else None      # None: not removed within 20 s (invalid run)
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


FIGURES = ("kernel event", "detected", "mitigated", "applying", "frozen 1", "cut")


def summary(runs: Runs) -> dict:
    """median / p95 / max per figure over the valid runs; the invalid ones with their reason."""
    valid, invalid = figures.split(runs)
    out: dict = {"runs": len(runs), "valid": len(valid), "invalid": invalid}
    for key in FIGURES:
        vals = [r[key] for r in valid if r.get(key) is not None]
        if vals:
            out[key] = {k: (round(v, 1) if isinstance(v, float) else v)
                        for k, v in figures.spread(vals).items()}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="3 runs per scope")
    ap.add_argument("--max-invalid", type=float, default=figures.MAX_INVALID_FRACTION,
                    help="fail (exit 1) when more than this fraction of a scope's runs is invalid")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results: dict[str, dict] = {}
    for bench in (bench_node, bench_service, bench_peer):
        with Lab() as lab, tempfile.TemporaryDirectory() as tmp:
            for name, runs in bench(lab, Path(tmp), 3 if args.quick else args.runs).items():
                results[name] = summary(runs)
                print(json.dumps({name: results[name]}), file=sys.stderr, flush=True)
    failed = [n for n, r in results.items()
              if figures.too_many_invalid(r["runs"], len(r["invalid"]), args.max_invalid)]
    if args.json:
        print(json.dumps({"scopes": results, "failed": failed}, indent=1))
        return 1 if failed else 0
    print("ms from the breach (exec; the peer: the scan's first packet), median / p95 / max "
          "over the valid runs")
    print(f"{'measure':42} {'valid':>5} " + " ".join(f"{k:>20}" for k in FIGURES))
    for name, r in results.items():
        cells = [f"{r[k]['median']} / {r[k]['p95']} / {r[k]['max']}" if k in r else "-"
                 for k in FIGURES]
        print(f"{name:42} {r['valid']:>2}/{r['runs']:<2} " + " ".join(f"{c:>20}" for c in cells))
    return figures.print_invalid(((n, r["invalid"]) for n, r in results.items()), failed,
                                 args.max_invalid)


if __name__ == "__main__":
    sys.exit(main())
