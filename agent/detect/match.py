"""Field matchers for event-by-event rules (the breach rules): `where:` in a rule file.

A condition's `where` maps event fields to tests, all of which must hold:

    where:
      exe_is: {any_in: [shells]}       # the executable IS one of the config's (by inode)
      cgroup: {glob: "@service_cgroups"}  # a named list from the config (breach_lists)
      write: true                      # a bare value: equality
      stdio_inet: {ge: 1}              # numbers: gt, ge, lt, le
      path: {glob: "@credential_paths"}  # fnmatch; "/dir/" in a named list means "/dir/*"
      uid: {ne_field: target_uid}      # compare with another field of the same event
      ancestors_are: {none_in: [package_managers]}  # list fields: any_in, none_in

Operators: eq, ne, in, not_in, glob, not_glob, prefix, not_prefix, gt, ge, lt, le,
eq_field, ne_field, any_in, none_in. A field the event lacks fails every positive test
and passes every negative one (ne, not_*, none_in): an event missing its evidence of
innocence still fires. Comparing with a missing field never holds.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from agent.config import EXE_LISTS

# Fields holding names of the config's executable lists (agent.config.EXE_LISTS).
IDENTITY_FIELDS = {"exe_is", "ancestors_are", "parent_is", "input_peer_is", "output_peer_is"}
NEGATIVE = {"ne", "not_in", "not_glob", "not_prefix", "none_in"}
LIST_OPS = {"in", "not_in", "any_in", "none_in"}
TEXT_OPS = {"glob", "not_glob", "prefix", "not_prefix"}
NUMBER_OPS = {"gt", "ge", "lt", "le"}
FIELD_OPS = {"eq_field", "ne_field"}
OPS = {"eq", "ne"} | LIST_OPS | TEXT_OPS | NUMBER_OPS | FIELD_OPS

# Event fields a `where` may test, per event kind (documented in agent/sources/proc.py).
# comm and parent_comm are the process's to set: for display, never to decide on.
_PROC = ("pid", "tid", "ppid", "uid", "euid", "cgroup_id", "cgroup", "comm", "parent_comm",
         "exe", "exe_id", "exe_is", "ancestor_exes", "ancestors_are", "parent_is",
         "loginuid", "sessionid", "service_cgroup", "reparented", "manager_start")
FIELDS: dict[str, tuple[str, ...]] = {
    "proc.exec": (*_PROC, "filename", "argv", "args", "stdin", "stdout", "stderr",
                  "stdio_inet", "reason",
                  # the exec policy's facts (agent/sources/execfacts.py)
                  "exe_path", "exe_location", "exe_fs", "exe_nlink", "exe_memfd",
                  "exe_unlinked",
                  "exe_known", "start_ticks", "container", "exe_sha256", "exe_sha256_state",
                  # what a script's interpreter or the loader run as a program runs
                  # (agent/sources/exectarget.py)
                  "target_path", "target_location", "target_sha256", "target_sha256_state",
                  "exec_ticks", "exe_st_dev"),
    "proc.exit": (*_PROC, "exit_code", "exit_status", "signal"),
    "file.open": (*_PROC, "ancestors", "path", "flags", "write", "syscall", "pattern",
                  "file_id", "dir_id", "created", "match", "watch_lists", "replaced"),
    "kernel.module_load": (*_PROC, "ancestors", "name", "taints"),
    "proc.ptrace": (*_PROC, "ancestors", "request", "result", "target_pid", "target_tgid",
                    "target_uid", "target_euid", "target_comm"),
    "bpf.prog_load": (*_PROC, "ancestors", "prog_type", "prog_name", "insn_cnt"),
    # reverse shells however they are wired (agent/sources/stdio.py)
    "proc.stdio_dup": (*_PROC, "newfd", "syscall", "family", "remote", "dport",
                       "sport", "sock_ino"),
    "proc.stdio_network": (*_PROC, "stdin", "stdout", "stderr", "input_network",
                           "output_network", "streams", "input_peer_pid", "input_peer_comm",
                           "input_peer_exe", "input_peer_is", "input_hops", "output_peer_pid",
                           "output_peer_comm", "output_peer_exe", "output_peer_is", "output_hops", "remote",
                           "inbound", "checks"),
    # the GPU source (agent/sources/gpu.py); gpu.process for GPU authorization rules
    "gpu.process": ("gpu_index", "gpu_uuid", "gpu_name", "process_type", "used_memory_bytes",
                    "pid", "resolved", "start_ticks", "cgroup", "container_id", "uid", "euid",
                    "exe", "comm", "gpu_device_fds", "netns",
                    # the detector's verdict (agent.gpugrant.GpuPolicy), not the source's
                    "authorized", "system"),
    # the process probe: an open of a GPU character device (/dev/nvidia*), at the open
    "gpu.open": (*_PROC, "major", "minor", "device", "gpu_index", "flags", "syscall",
                 "start_ticks", "container_id", "authorized", "system"),
    "gpu.xid": ("gpu_index", "gpu_uuid", "gpu_name", "xid", "repeats"),
    "gpu.ecc": ("gpu_index", "gpu_uuid", "gpu_name", "dbe_new", "ecc_dbe_volatile"),
    "gpu.throttle": ("gpu_index", "gpu_uuid", "gpu_name", "reasons", "active", "throttle_bits"),
    # drops of the egress policy (agent/egresswatch.py): applies_to is "cgroup:/path" or
    # "iif:name", with the path in cgroup or the name in interface
    "policy.egress_denied": ("policy", "applies_to", "cgroup", "interface", "packets",
                             "packets_total"),
    # opens refused by the file policy (agent/filepolicy.py): opens since the last event
    "policy.file_denied": ("policy", "cgroup", "container_id", "pid", "exe", "path", "opens",
                           "opens_total"),
}


@dataclass(frozen=True)
class Test:
    """One operator on one field; `value` may name a list ("@shells") resolved later."""

    field: str
    op: str
    value: Any


def parse_where(kind: str, where: Any, list_names: set[str], fail: Callable[[str], None]
                ) -> tuple[Test, ...]:
    """Validate a `where` mapping for events of `kind`; calls fail(message) on errors."""
    if not isinstance(where, dict) or not where:
        fail("where must be a non-empty mapping of field to test")
    known = FIELDS[kind]
    tests = []
    for name, spec in where.items():
        if name not in known:
            fail(f"unknown field {name!r} for {kind} (one of {', '.join(known)})")
        ops = spec if isinstance(spec, dict) else {"eq": spec}
        if not ops:
            fail(f"field {name}: no test")
        for op, value in ops.items():
            if name in IDENTITY_FIELDS and isinstance(value, list):
                unknown = [v for v in value if v not in EXE_LISTS]
                if unknown:
                    fail(f"field {name}: {unknown[0]!r} is not an executable list (one of "
                         f"{', '.join(EXE_LISTS)})")
            tests.append(_test(kind, name, op, value, list_names, fail))
    return tuple(tests)


def _test(kind: str, name: str, op: Any, value: Any, list_names: set[str],
          fail: Callable[[str], None]) -> Test:
    where = f"field {name}"
    if op not in OPS:
        fail(f"{where}: unknown test {op!r} (one of {', '.join(sorted(OPS))})")
    if isinstance(value, str) and value[1:] in EXE_LISTS and value.startswith("@"):
        fail(f"{where}: {value} names executables, which are judged by inode, not by a "
             f"name or path: test exe_is, parent_is or ancestors_are with "
             f"{{any_in: [{value[1:]}]}} (or none_in)")
    if isinstance(value, str) and value.startswith("@"):
        if op not in LIST_OPS | TEXT_OPS:
            fail(f"{where}: {op} cannot take a named list")
        if value[1:] not in list_names:
            fail(f"{where}: unknown list {value!r} (one of "
                 f"{', '.join('@' + n for n in sorted(list_names))})")
    elif op in LIST_OPS:
        if not isinstance(value, list) or not all(isinstance(v, (str, int)) for v in value):
            fail(f"{where}: {op} needs a list of values or a named list")
    elif op in TEXT_OPS:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            fail(f"{where}: {op} needs a string, a list of strings or a named list")
    elif op in NUMBER_OPS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(f"{where}: {op} needs a number")
    elif op in FIELD_OPS:
        if value not in FIELDS[kind]:
            fail(f"{where}: {op} names an unknown field {value!r}")
    elif isinstance(value, (list, dict)):
        fail(f"{where}: {op} needs a single value")
    return Test(name, op, tuple(value) if isinstance(value, list) else value)


def path_globs(patterns: tuple[str, ...]) -> tuple[str, ...]:
    """Watch patterns ("/dir/", "/prefix*", "*suffix") as fnmatch globs."""
    return tuple(p + "*" if p.endswith("/") else p for p in patterns)


def holds(test: Test, fields: Mapping[str, Any], lists: Mapping[str, tuple]) -> bool:
    """Whether one test holds on an event's fields (never raises)."""
    actual = fields.get(test.field)
    if actual is None:
        return test.op in NEGATIVE
    value = test.value
    if isinstance(value, str) and value.startswith("@"):
        value = lists.get(value[1:], ())
    op = test.op
    if op in FIELD_OPS:
        other = fields.get(value)
        return other is not None and (actual == other) == (op == "eq_field")
    if op in ("eq", "ne"):
        return (actual == value) == (op == "eq")
    if op in ("in", "not_in"):
        return (actual in value) == (op == "in")
    if op in ("any_in", "none_in"):
        seq = actual if isinstance(actual, (list, tuple)) else (actual,)
        return any(a in value for a in seq) == (op == "any_in")
    if op in TEXT_OPS:
        text = str(actual)
        if op.endswith("glob"):
            hit = any(fnmatch.fnmatchcase(text, p) for p in value)
        else:
            hit = any(text.startswith(p) for p in value)
        return hit != op.startswith("not_")
    if isinstance(actual, bool) or not isinstance(actual, (int, float)):
        return False
    return {"gt": actual > value, "ge": actual >= value,
            "lt": actual < value, "le": actual <= value}[op]
