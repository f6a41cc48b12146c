"""Triage at enqueue: which lane of the event queue (agent.sources.queue) an event takes,
and whose it is.

Urgent: the event already matches a `where` rule of high or critical severity
(Detector.severe). Those cannot be produced in bulk without each one being a real
detection -- a shell or a non-system executable with a TCP/UDP socket on stdin, stdout
or stderr (breach.reverse_shell: a reverse shell wired without dup is seen ONLY as its
exec), a shell below a network-facing service, a socket dup'd onto stdio, a write to a
credential file, a module or BPF load outside the allowed, a ptrace of another user's
process -- so a flood of ordinary events (an exec storm: `while :; do sh -c :; done`)
can never push them out. A socket on stdio alone is not enough (`true </dev/tcp/...` is
cheap and detects nothing); the rule's own tests decide.

Running the rules twice for every exec of a storm would halve what the consumer keeps up
with, so each kind first passes a cheap necessary condition of its severe rules (HINTS);
only events that pass are tested against the rules. A kind not in HINTS is always tested
(the rare ones: module and BPF loads, stdio dups, stdio correlations). Network events
(kernel threshold crossings, already aggregated per source) are never urgent: they are a
kind of their own, which an exec storm cannot push out.

Owner: the cgroup of a process event (a tenant's container or job), else its uid, else
none (network events). The queue is fair between (kind, owner), so one tenant's storm
pushes out only its own events. Not the uid alone: tenants' containers commonly run as
the same uids (0, 1000), and a user namespace hands one tenant thousands of them.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable, Mapping

from agent.detect.rules import Detector
from agent.model import Event

Fields = Mapping[str, Any]

# A necessary condition of every high/critical rule on the kind (agent/rules/breach.yaml);
# keep in step with the rules: tests/unit/test_event_queue.py checks each shipped severe
# rule's cases against it.
HINTS: dict[str, Callable[[Fields], bool]] = {
    "proc.exec": lambda f: bool(f.get("stdio_inet")) or bool(f.get("service_cgroup"))
    or "services" in (f.get("ancestors_are") or ()),
    "proc.exit": lambda f: False,
    "file.open": lambda f: bool(f.get("write")) and bool(f.get("watch_lists")),
    "proc.ptrace": lambda f: f.get("result") == 0,
}


def urgent(detector: Detector, event: Event) -> bool:
    """Whether `event` goes to the urgent lane (never raises on malformed fields)."""
    hint = HINTS.get(event.kind)
    try:
        if hint is not None and not hint(event.fields) and not _exec_policy(detector, event):
            return False
        return detector.severe(event)
    except Exception:   # noqa: BLE001 -- triage must not lose the event; the detector decides
        return False


def _exec_policy(detector: Detector, event: Event) -> bool:
    """An exec the kernel sent for the exec policy, while a severe exec policy rule can
    fire (agent/rules/exec.yaml: a deny list is filled): any exec may be its violation.
    With the lists empty an exec storm costs the rules once, as before."""
    return event.kind == "proc.exec" and detector.exec_needs.severe \
        and "policy" in (event.fields.get("reason") or ())


def owner(event: Event) -> Hashable:
    f = event.fields
    cgroup = f.get("cgroup_id") or f.get("cgroup")
    if cgroup:
        return ("cgroup", cgroup)
    uid = f.get("uid")
    return ("uid", uid) if uid is not None else None
