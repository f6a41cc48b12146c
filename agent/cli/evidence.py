"""How `swarm-agent incident ID` shows an investigation: the finding's summary and drivers
(the anomaly models' evidence) and the latest evidence bundle (agent/respond/evidence.py)
readably; `--json` gives everything whole. A process's comm and cmdline are shown as its
own claim: it can set them to anything."""
from __future__ import annotations

import json
from typing import Any

from agent.cli.text import clean
from agent.proto.swarm.control.v1 import control_pb2 as pb

SHOWN = 40      # processes, sockets and events shown; --json has them all


def _data(e: pb.TimelineEntry) -> dict[str, Any]:
    try:
        d = json.loads(e.data_json or "{}")
    except ValueError:
        return {}
    return d if isinstance(d, dict) else {}


def format_findings(timeline: list[pb.TimelineEntry]) -> list[str]:
    """Summary and drivers of each finding line that has them."""
    out = []
    for e in timeline:
        ev = _data(e).get("evidence") if e.kind == "finding" else None
        if not isinstance(ev, dict) or not (ev.get("summary") or ev.get("drivers")):
            continue
        out.append(f"finding {clean(str(_data(e).get('rule', '')))}: "
                   f"{clean(str(ev.get('summary') or ''))}")
        if "score" in ev:
            out.append(f"  score {ev.get('score')} (threshold {ev.get('threshold')}, false "
                       f"alarm rate {ev.get('false_alarm_rate')} per window)")
        for d in (ev.get("drivers") or [])[:8]:
            if isinstance(d, dict):
                out.append(f"  driver {clean(str(d.get('feature')))}: {d.get('value')} "
                           f"(baseline {d.get('baseline')}, contribution "
                           f"{d.get('contribution')})")
    return out


def format_latest(timeline: list[pb.TimelineEntry]) -> list[str]:
    bundles = [e for e in timeline if e.kind == "evidence"]
    if not bundles:
        return []
    b = _data(bundles[-1])
    lines = [f"evidence (collected {len(bundles)} time(s), latest shown; --json for all):"]
    if b.get("truncated"):
        lines.append("  truncated: " + clean("; ".join(map(str, b["truncated"]))))
    t = b.get("targets") or {}
    lines.append(f"  workloads: {', '.join(map(clean, map(str, t.get('cgroups') or []))) or '-'}"
                 f"; pids named: {', '.join(map(str, t.get('pids') or [])) or '-'}")
    procs = b.get("processes") or []
    lines.append(f"  processes ({len(procs)}; comm and cmdline are the process's own claim):")
    for depth, p in _tree(procs)[:SHOWN]:
        lines.append(f"    {'  ' * depth}{'(parent) ' if p.get('ancestor') else ''}"
                     f"{p.get('pid')} ppid {p.get('ppid')} uid {p.get('uid')} "
                     f"exe {clean(str(p.get('exe')))} [claims: {clean(str(p.get('comm')))}: "
                     f"{clean(str(p.get('cmdline'))[:120])}]")
    for name in ("listening", "connections"):
        socks = b.get(name) or []
        lines.append(f"  {name.replace('listening', 'listening sockets')} ({len(socks)}):")
        for s in socks[:SHOWN]:
            far = "" if name == "listening" else f" -> {s.get('remote')}:{s.get('remote_port')}"
            lines.append(f"    {s.get('proto')} {s.get('local')}:{s.get('local_port')}{far} "
                         f"{s.get('state')} pid {s.get('pid')}")
    recent = b.get("recent") or []
    lines.append(f"  recent events ({len(recent)}):")
    lines += [f"    {clean(json.dumps(r, sort_keys=True, default=str))[:160]}"
              for r in recent[-SHOWN:]]
    gpus = b.get("gpu_processes") or []
    lines.append(f"  GPU processes ({len(gpus)}):")
    lines += [f"    pid {g.get('pid')} gpu {g.get('gpu_index', g.get('gpu_uuid'))} memory "
              f"{g.get('used_memory_bytes')} cgroup {clean(str(g.get('cgroup')))}"
              for g in gpus[:SHOWN] if isinstance(g, dict)]
    return lines


def _tree(procs: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    by_pid = {p.get("pid"): p for p in procs if isinstance(p, dict)}
    kids: dict[Any, list] = {}
    roots = []
    for p in by_pid.values():
        (kids.setdefault(p.get("ppid"), []) if p.get("ppid") in by_pid
         and p.get("ppid") != p.get("pid") else roots).append(p)
    out: list[tuple[int, dict[str, Any]]] = []
    seen: set = set()

    def walk(p: dict[str, Any], depth: int) -> None:
        if p.get("pid") in seen:
            return
        seen.add(p.get("pid"))
        out.append((depth, p))
        for c in kids.get(p.get("pid"), []):
            walk(c, depth + 1)
    for r in roots:
        walk(r, 0)
    return out
