"""The CLI's side of the control API: connect (local socket or --remote with mTLS), call,
map gRPC statuses to exit codes and one-sentence messages, print tables or JSON.

Every command function takes the parsed arguments and the config and returns an exit
code; `run(command, args, cfg)` turns any control error into its message and code.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
import time
from typing import Any, Callable

import grpc
from google.protobuf import json_format

from agent.cli import tls
from agent.cli.text import clean, cleaned
from agent.config import Config
from agent.model import MitigationKind, verdict
from agent.proto.swarm.control.v1 import control_pb2 as pb
from agent.proto.swarm.control.v1 import control_pb2_grpc

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_NOT_RUNNING = 0, 1, 2, 3
EXIT_NOT_FOUND, EXIT_DENIED, EXIT_REFUSED = 4, 5, 6
EXIT_CODES_HELP = """exit codes (scripts can rely on them):
  0  success
  1  failure inside the agent (or anything unexpected)
  2  bad input: arguments, config, an invalid or refused address, lifetime, oversized
     or control-character text
  3  the agent is not running (or cannot be reached with --remote)
  4  not found: no such incident, mitigation, cgroup, interface or peer (or the demo, which
     only a source checkout has)
  5  permission denied: not root (run and cleanup too), the TLS handshake refused (with
     the reason), or this identity's role may not do that
  6  refused: an allowlisted target, an incident already closed, a rules reload or
     bundle rejected (file:line: reason; the rules in use stay), nothing to roll back,
     an isolation without allowlist (unless --force), the agent's own cgroup"""
_STATUS_EXIT = {
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_USAGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED: EXIT_USAGE,
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_DENIED,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION: EXIT_REFUSED,
    grpc.StatusCode.UNAVAILABLE: EXIT_NOT_RUNNING,
}


class CommandError(Exception):
    """What to tell the user, and the exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.message, self.code = message, code


def add_connection_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--remote", metavar="HOST:PORT",
                    help="a remote agent's mTLS control listener (default: the local socket)")
    sp.add_argument("--cert", metavar="PEM", help="client certificate for --remote")
    sp.add_argument("--key", metavar="PEM", help="its private key")
    sp.add_argument("--ca", metavar="PEM", help="CA that signed the agent's certificate")
    sp.add_argument("--timeout", type=float, default=10.0, metavar="S",
                    help="give up on a call after this many seconds (default 10)")
    sp.add_argument("--json", action="store_true", help="machine-readable output")


class Client:
    """A ControlStub on the local socket or a remote mTLS listener; `call` raises
    CommandError with the agent's own message. Answers for human output (no --json) come
    back with their free text cleaned for the terminal (agent.cli.text)."""

    def __init__(self, cfg: Config, args: argparse.Namespace):
        self.timeout, self.args = args.timeout, args
        self.clean = not getattr(args, "json", False)
        if args.remote:
            self.where = args.remote
            try:
                creds = tls.credentials(args)
            except ValueError as e:
                raise CommandError(str(e), EXIT_USAGE) from None
            except OSError as e:
                raise CommandError(f"cannot read {e.filename}: {e.strerror}", EXIT_USAGE) from None
            self.channel = grpc.secure_channel(args.remote, creds)
        else:
            sock = cfg.control_socket
            self.where = str(sock)
            if not sock.exists():
                raise CommandError(f"the agent is not running (no control socket {sock})",
                                   EXIT_NOT_RUNNING)
            if not os.access(sock, os.R_OK | os.W_OK):
                raise CommandError(f"the control socket {sock} is for root only: run as root",
                                   EXIT_DENIED)
            self.channel = grpc.insecure_channel(f"unix:{sock}")
        self.stub = control_pb2_grpc.ControlStub(self.channel)

    def call(self, method: str, request: Any) -> Any:
        try:
            answer = getattr(self.stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise self.error(e) from None
        return cleaned(answer) if self.clean else answer

    def error(self, e: grpc.RpcError) -> CommandError:
        code = e.code()
        details = e.details() or ""
        if code is grpc.StatusCode.UNAVAILABLE and self.args.remote and \
                any(sign in details for sign in tls.HANDSHAKE_SIGNS):
            why = tls.diagnose(self.args, min(self.timeout, 10.0))
            if why is not None:
                return CommandError(f"permission denied: {why}", EXIT_DENIED)
        if code is grpc.StatusCode.UNAVAILABLE:
            return CommandError(f"the agent is not running or cannot be reached at {self.where} "
                                f"({e.details()})", EXIT_NOT_RUNNING)
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return CommandError(f"the agent at {self.where} did not answer within "
                                f"{self.timeout:g} s", EXIT_FAILURE)
        return CommandError(e.details() or code.name, _STATUS_EXIT.get(code, EXIT_FAILURE))

    def close(self) -> None:
        self.channel.close()


def run(command: Callable[[Client, argparse.Namespace], int], args: argparse.Namespace,
        cfg: Config) -> int:
    client = None
    try:
        client = Client(cfg, args)
        return command(client, args)
    except CommandError as e:
        print(f"swarm-agent: {clean(e.message)}", file=sys.stderr)
        return e.code
    finally:
        if client is not None:
            client.close()


def to_dict(msg: Any) -> dict:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True,
                                     including_default_value_fields=True)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


# -- commands --------------------------------------------------------------------------------

def status(c: Client, args: argparse.Namespace) -> int:
    st = c.call("GetStatus", pb.GetStatusRequest())
    live = c.call("ListMitigations", pb.ListMitigationsRequest(limit=1000)).mitigations
    verdicts = mitigation_verdicts(live)
    if args.json:
        _print_json({"running": True, **to_dict(st), "mitigation_verdicts": verdicts})
    else:
        print(format_status(st, verdicts))
    return EXIT_OK


def mitigation_verdicts(found: list[pb.Mitigation]) -> dict[str, int]:
    """Mitigations in force by what they mean: "unverified source: challenged" (forgeable
    evidence), "blocked", and the other kinds by name."""
    out: dict[str, int] = {}
    for m in found:
        key = verdict(MitigationKind(m.kind)) if m.kind in set(MitigationKind) else m.kind
        out[key] = out.get(key, 0) + 1
    return out


def incidents(c: Client, args: argparse.Namespace) -> int:
    if args.watch:
        return _watch(c, args)
    req = pb.ListIncidentsRequest(states=args.state or [], event_class=args.event_class or "",
                                  limit=args.limit)
    found = c.call("ListIncidents", req).incidents
    if args.json:
        _print_json([to_dict(i) for i in found])
    else:
        print(format_incidents(found))
    return EXIT_OK


def _watch(c: Client, args: argparse.Namespace) -> int:
    stream = c.stub.WatchIncidents(pb.WatchIncidentsRequest(initial=True))
    try:
        for change in stream:
            if args.json:
                print(json.dumps(to_dict(change), sort_keys=True), flush=True)
            else:
                print(format_change(cleaned(change)), flush=True)
    except grpc.RpcError as e:
        if e.code() is grpc.StatusCode.CANCELLED:
            return EXIT_OK
        raise c.error(e) from None
    finally:
        stream.cancel()
    return EXIT_OK


def incident(c: Client, args: argparse.Namespace) -> int:
    detail = c.call("GetIncident", pb.GetIncidentRequest(id=_incident_id(c, args.id)))
    if args.json:
        _print_json(to_dict(detail))
    else:
        print(format_detail(detail))
    return EXIT_OK


def ack(c: Client, args: argparse.Namespace) -> int:
    req = pb.AcknowledgeIncidentRequest(id=_incident_id(c, args.id), comment=args.comment or "")
    return _show_incident(c.call("AcknowledgeIncident", req), args, "acknowledged")


def resolve(c: Client, args: argparse.Namespace) -> int:
    from agent.cli import feedback
    req = pb.ResolveIncidentRequest(id=_incident_id(c, args.id), comment=args.comment or "",
                                    false_positive=args.false_positive)
    feedback.fill_resolve(req, args)
    done = c.call("ResolveIncident", req)
    if not args.false_positive or args.no_feedback:
        return _show_incident(done, args, done.state.replace("_", " "))
    return feedback.show_resolved(c, done, args)


def _show_incident(i: pb.Incident, args: argparse.Namespace, verb: str) -> int:
    if args.json:
        _print_json(to_dict(i))
    else:
        print(f"incident {i.id} {verb} ({i.event_class} on {i.entity}, now {i.state})")
    return EXIT_OK


def mitigations(c: Client, args: argparse.Namespace) -> int:
    req = pb.ListMitigationsRequest(states=["active", "dry_run", "lifted", "expired", "failed"]
                                    if args.all else [], limit=args.limit)
    found = c.call("ListMitigations", req).mitigations
    if args.json:
        _print_json([to_dict(m) for m in found])
    else:
        print(format_mitigations(found))
        try:        # the fleet's blocks are enforced beside these (an older agent: no call)
            fleet = c.call("ListFleet", pb.ListFleetRequest(limit=1))
        except CommandError:
            fleet = None
        if fleet is not None and fleet.enabled:
            print(f"fleet: {fleet.in_force} blocks decided by the mesh in force here "
                  "(swarm-agent fleet)")
    return EXIT_OK


def block(c: Client, args: argparse.Namespace) -> int:
    kind = pb.RATE_LIMIT if args.rate_limit else pb.REROUTE if args.reroute else pb.BLOCK
    req = pb.ApplyMitigationRequest(kind=kind, target=args.target, reason=args.reason or "")
    if args.ttl is not None:
        req.ttl_s = args.ttl
    m = c.call("ApplyMitigation", req)
    if args.json:
        _print_json(to_dict(m))
    else:
        print(f"{m.kind} {m.target}: {m.state}, {_left(m)} (id {m.id})")
    return EXIT_OK


def unblock(c: Client, args: argparse.Namespace) -> int:
    try:
        ipaddress.ip_network(args.target, strict=False)
        req = pb.LiftMitigationRequest(target=args.target)
    except ValueError:
        req = pb.LiftMitigationRequest(id=_mitigation_id(c, args.target))
    lifted = c.call("LiftMitigation", req).lifted
    if args.json:
        _print_json([to_dict(m) for m in lifted])
    else:
        for m in lifted:
            print(f"lifted {m.kind} {m.target} (id {m.id})")
    return EXIT_OK


def audit(c: Client, args: argparse.Namespace) -> int:
    entries = c.call("ListAudit", pb.ListAuditRequest(identity=args.identity or "",
                                                      limit=args.limit)).entries
    if args.json:
        _print_json([to_dict(e) for e in entries])
    else:
        print(format_audit(entries))
    return EXIT_OK


def _incident_id(c: Client, given: str) -> str:
    """A full id from a unique prefix (the tables show 12 characters)."""
    if len(given) >= 32:
        return given
    ids = [i.id for i in c.call("ListIncidents", pb.ListIncidentsRequest(limit=1000)).incidents
           if i.id.startswith(given)]
    return _unique(ids, given, "incident")


def _mitigation_id(c: Client, given: str) -> str:
    if len(given) >= 32:
        return given
    states = ["active", "dry_run"]
    found = c.call("ListMitigations", pb.ListMitigationsRequest(states=states, limit=1000))
    return _unique([m.id for m in found.mitigations if m.id.startswith(given)], given,
                   "mitigation in force")


def _unique(ids: list[str], given: str, what: str) -> str:
    if len(ids) == 1:
        return ids[0]
    if not ids:
        raise CommandError(f"no {what} with an id starting {given!r}", EXIT_NOT_FOUND)
    raise CommandError(f"{given!r} matches {len(ids)} ids; give more characters", EXIT_USAGE)


# -- human output ----------------------------------------------------------------------------

def _ago(t: float) -> str:
    if not t:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _entry(e: pb.TimelineEntry) -> str:
    """A timeline line; a finding repeated N times (one line in the store) says until when."""
    if e.kind != "finding":
        return e.text
    try:
        data = json.loads(e.data_json or "{}")
    except ValueError:
        return e.text
    if not isinstance(data, dict) or int(data.get("count") or 1) <= 1:
        return e.text
    return f"{e.text}, last at {_ago(float(data.get('last_at') or 0))}"


def partial(m: pb.Mitigation) -> str:
    """"" for a mitigation wholly in force; else what of it is in force and what was
    refused (a service isolation whose freeze the kernel refused, say)."""
    try:
        part = json.loads(m.params_json or "{}").get("partial")
    except (ValueError, AttributeError):
        return ""
    if not isinstance(part, dict):
        return ""
    return clean("partly applied: in force: " + "; ".join(map(str, part.get("in_force", [])))
                 + ". Refused: " + "; ".join(map(str, part.get("refused", []))))


def _left(m: pb.Mitigation) -> str:
    if not m.expires_at:
        return "until lifted"
    return f"{max(0.0, m.expires_at - time.time()):.0f} s left"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()
             for r in [header, *rows]]
    return "\n".join(lines)


def format_status(st: pb.Status, verdicts: dict[str, int] | None = None) -> str:
    mode = " (dry run)" if st.dry_run else ""
    ready = "running" if st.ready else "starting"
    lines = [f"agent: {ready}{mode}, pid {st.pid} on {st.host}, up {st.uptime_s:.0f} s, "
             f"version {st.version}", "probes:"]
    lines += [f"  {p.name:<28} {p.state}" + (f" - {p.reason}" if p.reason else "")
              for p in st.probes] or ["  (none reported)"]
    if st.ringbuf_losses:
        lines.append(f"  ring buffer losses: {st.ringbuf_losses}")
    rows = [[c.event_class, str(c.total), str(c.open), str(c.mitigated), str(c.escalated),
             str(c.resolved + c.false_positive), f"{c.deadline_s:g} s",
             str(c.deadline_met), str(c.deadline_missed)] for c in st.classes]
    lines.append(_table(["CLASS", "TOTAL", "OPEN", "MITIGATED", "ESCALATED", "CLOSED",
                         "DEADLINE", "MET", "MISSED"], rows))
    split = ", ".join(f"{n} {what}" for what, n in sorted((verdicts or {}).items()))
    lines.append(f"mitigations in force: {st.active_mitigations}" + (f" ({split})" if split else "")
                 + f"; rules: {len(st.rules)} ({st.ruleset.version})")
    if st.ruleset.last_error:
        lines.append(f"last rejected rules reload: {st.ruleset.last_error}")
    if "fleet.seq" in st.counters:
        c = st.counters
        refused = ", ".join(f"{k.removeprefix('fleet.refused.')} {n}" for k, n in
                            sorted(c.items()) if k.startswith("fleet.refused."))
        lines.append(f"fleet: {'connected' if c['fleet.connected'] else 'not connected'}, "
                     f"stream seq {c['fleet.seq']} applied (lag {c.get('fleet.lag', 0)}), "
                     f"{c.get('fleet.in_force', 0)} decisions in force, refused: {refused or 'none'}")
    fp = sum(n for k, n in st.counters.items() if k.startswith("false_positives."))
    kept = sum(n for k, n in st.counters.items() if k.startswith("findings_suppressed."))
    if fp or kept:
        lines.append(f"feedback: {fp} incidents marked false positive, {kept} findings "
                     "suppressed since start (per rule: swarm-agent rules)")
    b = st.ruleset.bundle
    if b.number:
        lines.append(f"bundle in force: {b.number} {b.version}" + (f" ({b.label})" if b.label
                                                                  else "") + f", by {b.by}")
    if st.ruleset.bundle_problem:
        lines.append(f"bundle: degraded: {st.ruleset.bundle_problem}")
    lines += _anomaly_lines(st.counters)
    return "\n".join(lines)


def _anomaly_lines(counters) -> list[str]:
    """One line per anomaly detector, from the counters the Status carries."""
    dets = sorted({k.split(".")[1] for k in counters
                   if k.startswith("anomaly.") and k.endswith(".alerting")})
    if not dets:
        return []
    lines = [f"anomaly detection: {counters.get('anomaly.workloads', 0)} workloads, "
             f"state {counters.get('anomaly.state_bytes', 0)} bytes"]
    for d in dets:
        c = {k: counters.get(f"anomaly.{d}.{k}", 0)
             for k in ("alerting", "windows", "hits", "shadow_hits", "deduplicated")}
        lines.append(f"  {d:<12} {'alerting' if c['alerting'] else 'shadow':<9} "
                     f"windows {c['windows']}, findings {c['hits']}, shadow {c['shadow_hits']}, "
                     f"deduplicated {c['deduplicated']}")
    return lines


def format_incidents(found: list[pb.Incident]) -> str:
    if not found:
        return "no incidents"
    rows = [[i.id[:12], i.event_class, i.state, i.severity, i.entity, _ago(i.detected_at),
             f"{i.mitigated_at - i.first_seen_at:.2f} s" if i.mitigated_at else "-",
             ",".join(i.rules)] for i in found]
    return _table(["ID", "CLASS", "STATE", "SEVERITY", "ENTITY", "DETECTED",
                   "TIME TO MITIGATE", "RULES"], rows)


def format_detail(d: pb.IncidentDetail) -> str:
    i = d.incident
    lines = [f"incident {i.id}", f"  class {i.event_class}, severity {i.severity}, "
             f"state {i.state}, entity {i.entity}", f"  {i.summary}",
             f"  first seen {_ago(i.first_seen_at)}, detected {_ago(i.detected_at)}, "
             f"mitigated {_ago(i.mitigated_at)}, closed {_ago(i.resolved_at)}"]
    if i.acknowledged_by:
        lines.append(f"  acknowledged by {i.acknowledged_by} at {_ago(i.acknowledged_at)}")
    lines.append("timeline:")
    lines += [f"  {_ago(e.at)}  {e.kind:<20} {_entry(e)}" for e in d.timeline]
    from agent.cli import evidence
    lines += evidence.format_findings(d.timeline) + evidence.format_latest(d.timeline)
    lines.append("mitigations:")
    lines += [f"  {m.id[:12]}  {m.kind:<18} {m.target:<24} {m.state:<8} {_left(m)}"
              for m in d.mitigations] or ["  (none)"]
    return "\n".join(lines)


def format_mitigations(found: list[pb.Mitigation]) -> str:
    if not found:
        return "no mitigations in force"
    rows = [[m.id[:12], m.kind, m.target, m.state + (" (partly)" if partial(m) else ""),
             _left(m) if m.state in ("active", "dry_run")
             else "-", m.incident_id[:12] or "manual", m.reason] for m in found]
    return _table(["ID", "KIND", "TARGET", "STATE", "EXPIRES", "INCIDENT", "REASON"], rows)


def format_change(ch: pb.Change) -> str:
    if ch.HasField("incident"):
        i = ch.incident
        return f"{_ago(time.time())}  incident   {i.id[:12]}  {i.state:<14} {i.event_class} {i.entity}"
    m = ch.mitigation
    return f"{_ago(time.time())}  mitigation {m.id[:12]}  {m.state:<14} {m.kind} {m.target}"


def format_audit(entries: list[pb.AuditEntry]) -> str:
    if not entries:
        return "no audit entries"
    rows = [[str(e.seq), _ago(e.at), e.identity, e.role, e.method, e.result, e.detail]
            for e in entries]
    return _table(["SEQ", "TIME", "IDENTITY", "ROLE", "CALL", "RESULT", "DETAIL"], rows)


# -- the command line ------------------------------------------------------------------------

COMMANDS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "status": status, "incidents": incidents, "incident": incident, "ack": ack,
    "resolve": resolve, "mitigations": mitigations, "block": block, "unblock": unblock,
    "audit": audit}

