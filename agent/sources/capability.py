"""What this kernel lets the agent load: BPF program types, BTF, kprobes, BPF LSM; and
the capabilities the agent uses (CAPABILITIES: the systemd unit's bounding set, the
DaemonSet's and packaging/README.md's table are checked against it).

probe() returns name -> (ok, reason) so the loader and `swarm-agent status` can say why a
probe runs degraded. Loading a type is not the whole story (kprobes load but cannot
attach without the kprobe PMU; LSM programs need "bpf" in the active LSM list), so those
extra conditions are checked too.
"""
from __future__ import annotations

import os
from pathlib import Path

from agent.sources import libbpf

PROG_TYPES = {  # enum bpf_prog_type
    "socket_filter": 1,
    "kprobe": 2,
    "sched_cls": 3,
    "tracepoint": 5,
    "xdp": 6,
    "raw_tracepoint": 17,
    "tracing": 26,   # fentry/fexit, tp_btf
    "lsm": 29,
}


def _prog_type(type_id: int) -> tuple[bool, str]:
    ret = libbpf.probe_prog_type(type_id)
    if ret == 1:
        return True, "supported"
    if ret == 0:
        return False, "the kernel refuses this program type"
    return False, os.strerror(-ret)


def _exists(path: str, missing: str) -> tuple[bool, str]:
    return (True, "present") if Path(path).exists() else (False, missing)


def _lsm() -> tuple[bool, str]:
    ok, reason = _prog_type(PROG_TYPES["lsm"])
    if not ok:
        return ok, reason
    try:
        active = Path("/sys/kernel/security/lsm").read_text().split(",")
    except OSError as e:
        return False, f"cannot read the active LSM list: {e.strerror}"
    return ("bpf" in active, "active" if "bpf" in active else "bpf is not in the active LSM list")


def probe() -> dict[str, tuple[bool, str]]:
    """Capability name -> (ok, reason)."""
    result = {name: _prog_type(t) for name, t in PROG_TYPES.items() if name != "lsm"}
    result["lsm"] = _lsm()
    result["btf"] = _exists("/sys/kernel/btf/vmlinux", "no kernel BTF (/sys/kernel/btf/vmlinux)")
    result["kprobe_pmu"] = _exists("/sys/bus/event_source/devices/kprobe",
                                   "kernel built without the kprobe event source")
    result["tracefs"] = _exists("/sys/kernel/tracing/events", "tracefs is not mounted")
    return result


TRACEFS = Path("/sys/kernel/tracing")


def ensure_tracefs() -> str | None:
    """Mount tracefs where tracepoint attachment needs it; None on success, else why not.

    `ip netns exec` gives the agent a private mount namespace with a fresh /sys, without
    tracefs: mounting it there is invisible to the rest of the host."""
    if (TRACEFS / "events").is_dir():
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"nodev", str(TRACEFS).encode(), b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        return f"tracefs is not mounted and mounting it failed: {os.strerror(err)}"
    return None


# Every capability the agent uses, by what needs it. Root keeps only these
# (packaging/swarm-agent.service CapabilityBoundingSet=, packaging/k8s/daemonset.yaml);
# tests/unit/test_capabilities.py holds the unit, the DaemonSet and packaging/README.md to
# this table, and tests/integration/test_capabilities.py runs the probes, the /proc reads
# and the sysctl write under exactly this set.
CAPABILITIES = {
    "CAP_BPF": "load the probes: BPF programs, maps, BTF (kernel >= 5.8)",
    "CAP_PERFMON": "attach the tracepoint programs (perf events) and use the "
                   "kernel-memory-reading helpers they need",
    "CAP_NET_ADMIN": "attach XDP and tc programs, program nftables over netlink, remove "
                     "WireGuard peers, set nf_conntrack_tcp_loose for the SYN proxy",
    "CAP_KILL": "kill_process mitigations: signal (pidfd) processes of other users; stop "
                "(SIGSTOP) the processes of a cgroup whose freezer is refused",
    "CAP_SYS_PTRACE": "read other users' /proc/PID/exe, fdinfo and ns/net (stdio "
                      "correlation, executable identity, WireGuard owner); the ptrace "
                      "syscall itself stays filtered",
    "CAP_DAC_READ_SEARCH": "list other users' /proc/PID/fd (mode 0500, their own) and "
                           "resolve watched files below other users' private directories",
    "CAP_SYS_ADMIN": "the file policy: fanotify permission events (FAN_CLASS_CONTE"
                     "NT), which refuse an open while the agent judges its opener; without it the file policy is degraded",
}
_CAP_BITS = {"CAP_DAC_READ_SEARCH": 2, "CAP_KILL": 5, "CAP_NET_ADMIN": 12,
             "CAP_SYS_PTRACE": 19, "CAP_PERFMON": 38, "CAP_BPF": 39,
             "CAP_SYS_ADMIN": 21}


def missing_capabilities(status: str = "/proc/self/status") -> list[str]:
    """The CAPABILITIES this process does not hold (effective set), in table order."""
    try:
        with open(status) as f:
            eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return list(CAPABILITIES)
    return [c for c in CAPABILITIES if not eff >> _CAP_BITS[c] & 1]
