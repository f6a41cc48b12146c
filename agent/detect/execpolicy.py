"""What the loaded rules ask of the process probe for the exec policy (issue 10 item 2).

Most execs never reach user space: the kernel emits only those the breach rules read.
A policy_violation rule on proc.exec (a deny list, exec from a writable location) judges
every exec, so while one can fire the kernel's exec_policy map is on (reason "policy");
a reload that removes the last one switches it off. While the packaged writable location
rule is the only one, the kernel sends only the execs of files that may lie where a
workload writes (EXEC_POLICY_WRITABLE, probes/proc.bpf.h: a superset that user space
narrows down); any other (a filled deny list, an operator's rule) needs every exec. Executables are hashed only while a
loaded rule reads exe_sha256 (hashing is the one costly fact).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from agent.model import EventClass, Severity

EXEC = "proc.exec"
# The packaged rule whose action the config chooses (policy.exec_writable_action).
WRITABLE_RULE = "policy.exec_writable_location"


@dataclass(frozen=True)
class ExecNeeds:
    every_exec: bool        # the kernel emits every exec (map exec_policy)
    hash_exes: bool         # proc.exec events carry exe_sha256
    severe: bool = False    # one of those rules is high or critical (the urgent lane)
    # the only live one is the writable location rule: the kernel sends only execs of
    # files a workload may have written (EXEC_POLICY_WRITABLE), not every exec
    writable_only: bool = False


POSITIVE = {"eq", "in", "glob", "prefix", "any_in"}


def _dead(cond, lists: Mapping[str, tuple]) -> bool:
    """A condition that can never hold: a positive test of an empty named list (the
    default deny lists are empty: their rules cost nothing until an operator fills them)."""
    return any(t.op in POSITIVE and isinstance(t.value, str) and t.value.startswith("@")
               and not lists.get(t.value[1:]) for t in cond.where)


# What the kernel's exec filter sends without the exec_policy map (probes/proc.bpf.c): a
# condition holding one of these positive tests only matches execs it sends anyway.
_KERNEL_LISTS = {"exe_is": {"shells", "package_managers"}, "ancestors_are": {"services"}}
_KERNEL_REASONS = {"program", "service_child", "socket_stdio", "service_cgroup",
                   "package_manager"}


def _kernel_sent(cond) -> bool:
    """Whether the kernel sends every exec `cond` can match without the exec_policy map
    (the packaged breach rules): one of its tests names what the kernel filters on."""
    for t in cond.where:
        v = t.value
        if t.field in _KERNEL_LISTS and t.op == "any_in" and isinstance(v, (list, tuple)) \
                and v and set(v) <= _KERNEL_LISTS[t.field]:
            return True
        if t.field == "service_cgroup" and t.op == "eq" and v is True:
            return True
        if t.field == "stdio_inet" and ((t.op == "ge" and v >= 1) or (t.op == "gt" and v >= 0)):
            return True
        if t.field == "cgroup" and t.op == "glob" and v == "@service_cgroups":
            return True
        if t.field == "reason" and t.op in ("any_in", "in") and isinstance(v, (list, tuple)) \
                and v and set(v) <= _KERNEL_REASONS:
            return True
    return False


def needs(rules: Iterable, lists: Mapping[str, tuple]) -> ExecNeeds:
    """What the loaded rules need, given the config's named lists: a policy rule on
    proc.exec, or a rule of any class whose condition the kernel's own filter does not
    cover (an operator's), needs every exec."""
    every = hashed = severe = False
    others = False
    for rule in rules:
        for cond in rule.conditions:
            if cond.event != EXEC or _dead(cond, lists):
                continue
            if rule.event_class is EventClass.POLICY_VIOLATION or not _kernel_sent(cond):
                every = True
                severe = severe or rule.severity in (Severity.HIGH, Severity.CRITICAL)
                others = others or rule.id != WRITABLE_RULE
            if any(t.field in ("exe_sha256", "exe_sha256_state", "target_sha256",
                               "target_sha256_state") for t in cond.where):
                hashed = True
    return ExecNeeds(every, hashed, severe, every and not others)
