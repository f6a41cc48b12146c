"""Rules: YAML in, validated frozen rules out, and a pure detector over them.

Two kinds of condition: `thresholds` on kernel counter alerts (network rules), and
`where` field tests on process events (breach rules, agent/detect/match.py). A breach
rule names the `scope` it isolates: `node`, or `service` (the event's cgroup).

A rule fires on one event when every threshold of one of its conditions holds. Rate
thresholds (`*_per_s`) are per second; count thresholds (`ports`, `sources`) are distinct
counts per kernel window. The detector does no I/O and reads no clock: `now_mono_ns` is
given, so every rule is testable from a file (tests/rules/*.cases).
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from agent.config import Breach, Config, breach_lists
from agent.configcheck import YEAR_S
from agent.detect import match
from agent.detect import execpolicy
from agent.gpugrant import GpuPolicy
from agent.policyconfig import EXEC_LIST_NAMES, exec_lists
from agent.model import Event, EventClass, Finding, Severity
from agent.yamlsafe import Lines


class RuleError(ValueError):
    """An invalid rule file; the message names the file, line, rule and key and is meant
    for the operator. `file` and `line` say the same for programs (None: not known)."""

    def __init__(self, message: str, file: str | None = None, line: int | None = None):
        super().__init__(message)
        self.file, self.line = file, line


# event kind -> threshold name -> (event field, per second?, kernel threshold key)
METRICS: dict[str, dict[str, tuple[str, bool, str]]] = {
    "net.source": {
        "syns_per_s": ("syns", True, "syns"),
        "packets_per_s": ("packets", True, "packets"),
        "udp_per_s": ("udp", True, "udp"),
        "ports": ("ports", False, "ports"),
    },
    "net.service": {
        "syns_per_s": ("syns", True, "svc_syns"),
        "packets_per_s": ("packets", True, "svc_packets"),
        "udp_per_s": ("udp", True, "svc_udp"),
        "sources": ("sources", False, "svc_sources"),
    },
    "tcp.established": {"conns_per_s": ("conns", True, "conns")},
    "tcp.reset": {"resets_per_s": ("resets", True, "resets")},
    # Resets drawn by handshakes a SYN proxy verified: a challenged source's own doing.
    "tcp.verified_reset": {"resets_per_s": ("resets", True, "resets")},
}
KERNEL_KEYS = ("syns", "packets", "udp", "ports", "conns", "resets",
               "svc_syns", "svc_packets", "svc_udp", "svc_sources")
# Evidence an off-path sender cannot forge (README "The response fits the evidence"):
# completed handshakes, resets drawn by handshakes that answered the SYN proxy's cookie,
# and a local process's own actions. Every other kind -- a source's SYN, packet and UDP
# counts, ports probed by SYNs, resets drawn by SYNs, a service's many-source counts --
# can be sent in a victim's name. Listed by what is proven, so a new kind is forgeable
# until someone says otherwise.
UNFORGEABLE_EVENTS = frozenset({"tcp.established", "tcp.verified_reset", *match.FIELDS})
SOURCE_ACTIONS = ("block", "rate_limit", "reroute", "challenge")
SERVICE_ACTIONS = ("rate_limit_service", "challenge_service")
PROCESS_ACTIONS = ("kill", "freeze")   # policy rules: the process / its cgroup
ACTIONS = (*SOURCE_ACTIONS, *SERVICE_ACTIONS, "isolate", "report", *PROCESS_ACTIONS,
           "investigate")   # investigate: an escalated investigation, no mitigation
SCOPES = ("node", "service")   # what an `isolate` rule cuts off
LIST_NAMES = {f.name for f in fields(Breach)} | EXEC_LIST_NAMES
EXEMPTIONS = ("management", "mesh", "load_balancers")
# Copied into a finding's evidence when the event carries them.
EVIDENCE_FIELDS = ("packets", "bytes", "syns", "udp", "ports", "sources", "conns", "resets",
                   "reason", "dport", "proto", "family", "window_ns")

_RULE_KEYS = {"id", "version", "class", "severity", "event", "thresholds", "match",
              "action", "ttl_s", "exempt", "description", "scope", "where"}
RULES_MAX_BYTES = 1 << 20   # per file; the packaged ones are a few KiB
MAX_THRESHOLD = 1_000_000_000   # per second or per window: beyond any NIC, within u64 x window
MAX_TTL_S = YEAR_S              # nftables element timeouts
MAX_VERSION = 1_000_000
SEVERE = (Severity.HIGH, Severity.CRITICAL)
GPU_HEALTH_EVENTS = ("gpu.xid", "gpu.ecc", "gpu.throttle")
GPU_JUDGED_EVENTS = ("gpu.process", "gpu.open")   # by the GPU authorizations in force
_ID_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$")


@dataclass(frozen=True)
class Condition:
    """One event kind and the thresholds (or field tests) that must all hold on it."""

    event: str
    thresholds: tuple[tuple[str, float], ...]
    where: tuple[match.Test, ...] = ()


@dataclass(frozen=True)
class Rule:
    id: str
    version: int
    event_class: EventClass
    severity: Severity
    conditions: tuple[Condition, ...]
    action: str
    ttl_s: float | None = None
    exempt: tuple[str, ...] = ()     # allowlist groups whose sources never match
    description: str = ""
    scope: str | None = None         # isolate rules: "node" or "service"
    source: str = field(default="", compare=False)   # "FILE:LINE" it was read from

    @property
    def name(self) -> str:
        return f"{self.id}@{self.version}"

    @property
    def unforgeable(self) -> bool:
        """Whether every condition rests on evidence nobody can forge off-path (a rule
        with `match` fires on any one of them, and a finding does not say which)."""
        return all(c.event in UNFORGEABLE_EVENTS for c in self.conditions)


def load_rules(path: str | Path | Sequence[str | Path] | None = None) -> list[Rule]:
    """Read and validate a rules file, every *.yaml of a directory, or a list of either
    (None: the packaged defaults); ids must be unique across all; raises RuleError naming
    file, line and reason (agent.detect.ruleset.load_ruleset, which also versions them)."""
    from agent.detect.ruleset import load_ruleset

    return list(load_ruleset(path).rules)


def parse_rules(data: Any, origin: str = "rules", lines: Mapping[int, Lines] | None = None
                ) -> list[Rule]:
    """Validate `{"rules": [...]}` as read from YAML; raises RuleError naming rule and key,
    and with `lines` (agent.yamlsafe.parse) the line in `origin`."""
    if not isinstance(data, dict) or set(data) != {"rules"} or not isinstance(data["rules"], list):
        raise RuleError(f"{origin}: must be a mapping with one key, 'rules', holding a list",
                        origin, None)
    rules: list[Rule] = []
    seen: dict[str, str] = {}
    for index, item in enumerate(data["rules"]):
        at = _Where(origin, (lines or {}).get(id(item)))
        rule = _parse_rule(item, at, index)
        if rule.id in seen:
            raise at.error(f"rule {rule.id}: duplicate id (first at {seen[rule.id]})", "id")
        seen[rule.id] = at.at("id")
        rules.append(rule)
    return rules


class _Where:
    """A rule's place in its file: `at(key)` is "FILE:LINE" of that key (or of the rule)."""

    def __init__(self, origin: str, lines: Lines | None):
        self.origin, self.lines = origin, lines

    def line(self, key: str | None = None) -> int | None:
        if self.lines is None:
            return None
        return self.lines.keys.get(key, self.lines.line) if key else self.lines.line

    def at(self, key: str | None = None) -> str:
        line = self.line(key)
        return f"{self.origin}:{line}" if line else self.origin

    def error(self, reason: str, key: str | None = None) -> RuleError:
        return RuleError(f"{self.at(key)}: {reason}", self.origin, self.line(key))


def _parse_rule(item: Any, at: _Where, index: int) -> Rule:
    if not isinstance(item, dict):
        raise at.error(f"rule #{index + 1} must be a mapping")
    rid = item.get("id")
    if not isinstance(rid, str) or not _ID_RE.match(rid):
        raise at.error(f"rule #{index + 1}: id must look like 'net.syn_flood' (got {rid!r})",
                       "id")
    if rid.startswith("anomaly."):
        # the anomaly models' ids: feedback, hits and false-positive counts are keyed by
        # id, so a rule taking one would share them (and its verdicts) with a detector
        raise at.error(f"rule {rid}: ids starting with 'anomaly.' are the anomaly "
                       "detectors'; name the rule otherwise", "id")
    for key in item:
        if key not in _RULE_KEYS:
            raise at.error(f"rule {rid}: unknown key {key!r}", key)
    for key in ("version", "class", "severity", "action"):
        if key not in item:
            raise at.error(f"rule {rid}: missing key {key!r}")
    version = item["version"]
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise at.error(f"rule {rid}: version must be a positive integer (at most "
                       f"{MAX_VERSION})", "version")

    def checked(key: str, check: Any, *args: Any) -> Any:
        """check(*args, "FILE:LINE: rule ID") for `key`; its RuleError carries the line."""
        try:
            return check(*args, f"{at.at(key)}: rule {rid}")
        except RuleError as e:
            e.file, e.line = at.origin, at.line(key)
            raise

    cond_key = "match" if "match" in item else "where" if "where" in item else "thresholds"
    event_class = checked("class", _enum, EventClass, item["class"], "class")
    conditions = checked(cond_key, _conditions, item)
    checked("class", _check_gpu_health, event_class, item["action"], conditions)
    return Rule(
        id=rid, version=version, event_class=event_class,
        severity=checked("severity", _enum, Severity, item["severity"], "severity"),
        conditions=conditions,
        action=checked("action", _action, item),
        ttl_s=checked("ttl_s", _ttl, item.get("ttl_s")),
        exempt=checked("exempt", _exempt, item.get("exempt", [])),
        description=str(item.get("description", "")),
        scope=checked("scope", _scope, item),
        source=at.at(),
    )


def _check_gpu_health(event_class: EventClass, action: Any,
                      conditions: tuple[Condition, ...], where: str) -> None:
    """GPU health is for the operators: its rules report, and its evidence (XIDs, ECC
    errors, throttling: a tenant's own faulty job can raise some of them) feeds nothing
    else -- never a block, an isolation or a kill."""
    kinds = {c.event for c in conditions}
    if event_class is EventClass.GPU_HEALTH and (
            action != "report" or any(not k.startswith("gpu.") for k in kinds)):
        raise RuleError(f"{where}: class gpu_health takes GPU events and action report only")
    if kinds & set(GPU_HEALTH_EVENTS) and event_class is not EventClass.GPU_HEALTH:
        raise RuleError(f"{where}: {', '.join(sorted(kinds & set(GPU_HEALTH_EVENTS)))} "
                        "events are GPU health: class gpu_health, action report")


def _scope(item: dict, where: str) -> str | None:
    scope = item.get("scope")
    if (item["action"] == "isolate") != (scope is not None):
        raise RuleError(f"{where}: action isolate needs a scope, and only it takes one")
    if scope is not None and scope not in SCOPES:
        raise RuleError(f"{where}: unknown scope {scope!r} (one of {', '.join(SCOPES)})")
    return scope


def _enum(cls: Any, value: Any, key: str, where: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(v.value for v in cls)
        raise RuleError(f"{where}: unknown {key} {value!r} (one of {allowed})") from None


def _conditions(item: dict, where: str) -> tuple[Condition, ...]:
    """`event` + `thresholds`, or `match`: a list of them (any one may fire the rule)."""
    if "match" in item:
        if "event" in item or "thresholds" in item or "where" in item:
            raise RuleError(f"{where}: use either 'match' or 'event' + 'thresholds', not both")
        entries = item["match"]
        if not isinstance(entries, list) or not entries:
            raise RuleError(f"{where}: match must be a non-empty list")
        for n, entry in enumerate(entries):
            if not isinstance(entry, dict) or set(entry) - {"event", "thresholds", "where"}:
                raise RuleError(f"{where}: match #{n + 1} may hold only 'event' and "
                                "'thresholds' or 'where'")
    else:
        entries = [{k: item[k] for k in ("event", "thresholds", "where") if k in item}]
    return tuple(_condition(e, where) for e in entries)


def _condition(entry: dict, where: str) -> Condition:
    if entry.get("event") in match.FIELDS:
        if "thresholds" in entry or "where" not in entry:
            raise RuleError(f"{where}: {entry['event']} conditions take 'where', not 'thresholds'")

        def fail(message: str):
            raise RuleError(f"{where}: {message}")

        return Condition(entry["event"], (), match.parse_where(entry["event"], entry["where"],
                                                               LIST_NAMES, fail))
    if "where" in entry:
        raise RuleError(f"{where}: 'where' needs a process event "
                        f"(one of {', '.join(match.FIELDS)})")
    for key in ("event", "thresholds"):
        if key not in entry:
            raise RuleError(f"{where}: missing key {key!r}")
    kind = entry["event"]
    if kind not in METRICS:
        raise RuleError(f"{where}: unknown event {kind!r} "
                        f"(one of {', '.join([*METRICS, *match.FIELDS])})")
    th = entry["thresholds"]
    if not isinstance(th, dict) or not th:
        raise RuleError(f"{where}: thresholds must be a non-empty mapping")
    pairs = []
    for name, value in th.items():
        if name not in METRICS[kind]:
            known = ", ".join(METRICS[kind])
            raise RuleError(f"{where}: unknown threshold {name!r} for {kind} (one of {known})")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RuleError(f"{where}: threshold {name} must be a number")
        if not 0 < value <= (65536 if name == "ports" else MAX_THRESHOLD):
            raise RuleError(f"{where}: threshold {name} must be greater than 0 and at most "
                            f"{65536 if name == 'ports' else MAX_THRESHOLD} (got {value})")
        pairs.append((name, float(value)))
    return Condition(kind, tuple(pairs))


def _action(item: dict, where: str) -> str:
    action = item["action"]
    if action not in ACTIONS:
        raise RuleError(f"{where}: unknown action {action!r} (one of {', '.join(ACTIONS)})")
    kinds = [c.event for c in _conditions(item, where)]
    if action == "isolate" and any(k not in match.FIELDS for k in kinds):
        raise RuleError(f"{where}: action isolate needs process events")
    if action in PROCESS_ACTIONS and any(k not in match.FIELDS or k in GPU_HEALTH_EVENTS
                                         for k in kinds):
        raise RuleError(f"{where}: action {action} needs process events")
    if action in SERVICE_ACTIONS and any(k != "net.service" for k in kinds):
        raise RuleError(f"{where}: action {action} needs net.service events")
    if action in SOURCE_ACTIONS and any(k == "net.service" or k in match.FIELDS for k in kinds):
        raise RuleError(f"{where}: action {action} needs per-source events, not net.service")
    return action


def _ttl(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not 0 < value <= MAX_TTL_S:
        raise RuleError(f"{where}: ttl_s must be a number greater than 0 and at most "
                        f"{MAX_TTL_S} (one year)")
    return float(value)


def _exempt(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise RuleError(f"{where}: exempt must be a list")
    for name in value:
        if name not in EXEMPTIONS:
            raise RuleError(f"{where}: unknown exempt group {name!r} "
                            f"(one of {', '.join(EXEMPTIONS)})")
    return tuple(value)


def kernel_thresholds(rules: Iterable[Rule]) -> dict[str, int]:
    """Per kernel metric, the lowest threshold any rule uses (per second for rates,
    per window for counts), rounded down and at least 1; 0 when no rule uses it.

    The probe signals from the kernel when a counter reaches its value; the detector
    then checks the full rule, so a lower kernel value only costs events, never findings.
    """
    out = dict.fromkeys(KERNEL_KEYS, 0)
    for rule in rules:
        for cond in rule.conditions:
            for name, value in cond.thresholds:
                key = METRICS[cond.event][name][2]
                v = max(1, int(value))
                out[key] = v if out[key] == 0 else min(out[key], v)
    return out


class Detector:
    """Pure evaluation of rules against events.

    Contract: `evaluate` returns one Finding per rule that fires, in rule order; it never
    raises on malformed events (a subject that is not an address matches nothing), does
    no I/O and reads no clock.
    """

    def __init__(self, rules: Sequence[Rule], cfg: Config, gpu_policy: GpuPolicy | None = None):
        # gpu.process events are judged against the GPU authorizations in force (set
        # anew by the daemon whenever they change: a snapshot, so evaluation stays pure).
        self.gpu_policy = gpu_policy or GpuPolicy(cfg.gpu.authorized, cfg.gpu.system_cgroups,
                                                  cfg.gpu.system_exes)
        self._gpu_action = cfg.gpu.on_violation
        self._writable_action = cfg.policy.exec_writable_action
        self._by_kind: dict[str, list[tuple[Rule, Condition]]] = {}
        for rule in rules:
            for cond in rule.conditions:
                self._by_kind.setdefault(cond.event, []).append((rule, cond))
        self._window_s = cfg.probes.window_ms / 1000.0
        self._exempt = {name: [ipaddress.ip_network(n, strict=False)
                               for n in getattr(cfg.allowlist, name)] for name in EXEMPTIONS}
        # with the exec policy's lists (policy.exec_*: no file watches, unlike breach's)
        self._lists = {name: match.path_globs(v) if name.endswith("_paths") else v
                       for name, v in (*breach_lists(cfg).items(),
                                       *exec_lists(cfg.policy).items())}
        self.exec_needs = execpolicy.needs(rules, self._lists)   # for the process probe

    def evaluate(self, event: Event, now_mono_ns: int) -> list[Finding]:
        candidates = self._by_kind.get(event.kind)
        if not candidates:
            return []
        if event.kind in match.FIELDS:
            return self._evaluate_where(event, candidates, now_mono_ns)
        entity, addr = _entity(event)
        if entity is None:
            return []
        window_s = self._event_window_s(event)
        findings: list[Finding] = []
        fired: set[str] = set()
        for rule, cond in candidates:
            if rule.id in fired or self._is_exempt(rule, addr):
                continue
            if all(_value(event, cond, name, window_s) >= limit
                   for name, limit in cond.thresholds):
                fired.add(rule.id)
                findings.append(_finding(rule, event, entity, now_mono_ns))
        return findings

    def _evaluate_where(self, event: Event, candidates: list[tuple[Rule, Condition]],
                        now_mono_ns: int) -> list[Finding]:
        findings: list[Finding] = []
        if event.kind in GPU_JUDGED_EVENTS:
            event = replace(event, fields={
                **event.fields, **self.gpu_policy.verdict(event.fields, event.kind)})
        for rule, cond in candidates:
            if any(f.rule_id == rule.id for f in findings):
                continue
            if all(match.holds(t, event.fields, self._lists) for t in cond.where):
                finding = _scoped_finding(rule, event, now_mono_ns)
                if event.kind in GPU_JUDGED_EVENTS and finding.action == "kill":
                    finding = replace(finding, action=self._gpu_violation())
                elif rule.id == execpolicy.WRITABLE_RULE:   # policy.exec_writable_action
                    finding = replace(finding, action=self._writable_action)
                if event.kind in GPU_JUDGED_EVENTS and event.fields.get("system") is True \
                        and finding.action != "report":
                    # The host's GPU services and the agent are never acted on, whatever
                    # a rule says (one without `system: false`): reported only.
                    finding = replace(finding, action="report")
                findings.append(finding)
        return findings

    def _gpu_violation(self) -> str:
        """gpu.on_violation; auto: kill once the node is enrolled (the config grants a
        workload, or a scheduler has authorized one), report before."""
        if self._gpu_action != "auto":
            return self._gpu_action
        return "kill" if self.gpu_policy.enrolled else "report"

    def severe(self, event: Event) -> bool:
        """Whether a `where` rule of high or critical severity fires on `event` (pure, no
        finding built): what agent.detect.triage sends to the urgent lane."""
        if event.kind not in match.FIELDS:
            return False
        if event.kind in GPU_JUDGED_EVENTS:
            event = replace(event, fields={
                **event.fields, **self.gpu_policy.verdict(event.fields, event.kind)})
        return any(rule.severity in SEVERE and
                   all(match.holds(t, event.fields, self._lists) for t in cond.where)
                   for rule, cond in self._by_kind.get(event.kind, ()))

    def _event_window_s(self, event: Event) -> float:
        # Never divide by less than the configured window: a short burst reported with a
        # tiny elapsed window would otherwise look like a huge per-second rate.
        window_ns = event.fields.get("window_ns")
        if isinstance(window_ns, (int, float)) and window_ns > 0:
            return max(self._window_s, window_ns / 1e9)
        return self._window_s

    def _is_exempt(self, rule: Rule, addr: Any) -> bool:
        if addr is None:
            return False
        return any(addr.version == net.version and addr in net
                   for group in rule.exempt for net in self._exempt[group])


def _entity(event: Event) -> tuple[str | None, Any]:
    if event.kind == "net.service":
        return f"service:{event.subject.strip().lower()}", None
    try:
        addr = ipaddress.ip_address(event.subject.strip())
    except ValueError:
        return None, None
    return f"ip:{addr.compressed}", addr


def _value(event: Event, cond: Condition, name: str, window_s: float) -> float:
    field, per_second, _ = METRICS[cond.event][name]
    raw = event.fields.get(field, 0)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        return 0.0
    return raw / window_s if per_second else float(raw)


def _finding(rule: Rule, event: Event, entity: str, now_mono_ns: int) -> Finding:
    evidence: dict[str, Any] = {k: event.fields[k] for k in EVIDENCE_FIELDS if k in event.fields}
    return Finding(
        rule_id=rule.id, rule_version=rule.version, event_class=rule.event_class,
        severity=rule.severity, entity=entity, action=rule.action,
        first_mono_ns=event.first_mono_ns, detected_mono_ns=now_mono_ns,
        evidence=evidence,
    )


def _scoped_finding(rule: Rule, event: Event, now_mono_ns: int) -> Finding:
    """A breach finding: entity "node", or "cgroup:<path>" for a service-scoped rule.
    A process in the root cgroup, or one whose cgroup is unknown, is no isolatable
    service: the finding then falls back to the node (evidence says so)."""
    cgroup = event.fields.get("cgroup")
    scope = rule.scope or "node"
    evidence: dict[str, Any] = {"subject": event.subject, **event.fields}
    if scope == "service" and not (isinstance(cgroup, str) and cgroup.startswith("/")
                                   and cgroup != "/"):
        scope, evidence["scope_fallback"] = "node", f"no service cgroup ({cgroup!r})"
    evidence["scope"] = scope
    entity = f"cgroup:{cgroup}" if scope == "service" else "node"
    if rule.event_class is EventClass.GPU_HEALTH:
        # One live incident per GPU and reason (the rule), however often it repeats.
        entity = f"gpu:{event.fields.get('gpu_uuid')}:{rule.id.removeprefix('gpu.')}"
    elif event.kind in ("policy.egress_denied", "policy.file_denied"):
        # One live incident per egress rule and what it applies to (the subject); per file
        # rule and opening workload.
        entity = event.subject
    elif (event.kind in GPU_JUDGED_EVENTS or event.kind == execpolicy.EXEC and rule.event_class
          is EventClass.POLICY_VIOLATION) and isinstance(cgroup, str) and cgroup.startswith("/"):
        # A GPU authorization or exec policy violation is the workload's (its cgroup), never the node's:
        # one incident per workload, a mitigation per process.
        entity, evidence["scope"] = f"cgroup:{cgroup}", "workload"
    action = f"isolate_{scope}" if rule.action == "isolate" else rule.action
    return Finding(
        rule_id=rule.id, rule_version=rule.version, event_class=rule.event_class,
        severity=rule.severity, entity=entity, action=action,
        first_mono_ns=event.first_mono_ns, detected_mono_ns=now_mono_ns, evidence=evidence,
    )


def rules_by_name(rules: Iterable[Rule]) -> Mapping[str, Rule]:
    """Index rules by "id@version" (Finding.rule), for the responder's ttl lookup."""
    return {r.name: r for r in rules}
