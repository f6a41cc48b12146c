"""Python mirror of probes/include/events.h, and the names the objects must contain.

Classes are named after the C structs; tests/unit/test_abi.py checks sizes, field names
and offsets against the BTF of abi.bpf.o, and the names below against net.bpf.o and
proc.bpf.o.
DECODERS is the one table from event kind to its structure.
"""
from __future__ import annotations

import ctypes
import enum
from pathlib import Path

from ctypes import c_uint8 as u8, c_uint16 as u16, c_uint32 as u32, c_uint64 as u64

PROBES_DIR = Path(__file__).resolve().parent.parent / "probes"
NET_OBJECT = PROBES_DIR / "net.bpf.o"
PROC_OBJECT = PROBES_DIR / "proc.bpf.o"
ABI_OBJECT = PROBES_DIR / "abi.bpf.o"
ACTIVITY_OBJECT = PROBES_DIR / "activity.bpf.o"

DISTINCT_BITS = 1024
DISTINCT_WORDS = DISTINCT_BITS // 64
WINDOW_RESETTING = (1 << 64) - 1   # window_start_ns while a CPU resets the entry


class NetProg(enum.StrEnum):
    XDP = "handle_xdp"
    INET_SOCK_SET_STATE = "handle_inet_sock_set_state"
    TCP_SEND_RESET = "handle_tcp_send_reset"
    TC_EGRESS = "handle_tc_egress"
    TC_INGRESS = "handle_tc_ingress"   # the XDP program's verdicts at tc (sources/ingress.py)


# program -> (tracepoint category, tracepoint name)
NET_TRACEPOINTS = {
    NetProg.INET_SOCK_SET_STATE: ("sock", "inet_sock_set_state"),
    NetProg.TCP_SEND_RESET: ("tcp", "tcp_send_reset"),
}


class NetMap(enum.StrEnum):
    SOURCES = "sources"
    SERVICES = "services"
    REMOTES = "remotes"
    THRESHOLDS = "thresholds"
    ALERTS = "alerts"
    LOSSES = "losses"
    RODATA = ".rodata"   # holds `net_cfg` (struct net_config) at offset 0
    UNPARSED = "unparsed"   # per-CPU u64 per enum parse_failure
    EXCHANGES = "exchanges"   # UDP peers this host sent to (kernel-only key)
    VERDICTS = "verdicts"     # per-CPU packets seen by XDP: [0] solicited, [1] unsolicited
    VERIFIED = "verified"     # per remote: resets drawn by SYN-proxy-verified handshakes


RODATA_VAR = "net_cfg"
SIZED_MAPS = (NetMap.SOURCES, NetMap.SERVICES, NetMap.REMOTES, NetMap.EXCHANGES,
              NetMap.VERIFIED)  # max_entries from config


class EventKind(enum.IntEnum):
    NET_SOURCE = 1
    NET_SERVICE = 2
    TCP_ESTABLISHED = 3
    TCP_RESET = 4
    PROC_EXEC = 5
    PROC_EXIT = 6
    FILE_OPEN = 7
    MODULE_LOAD = 8
    PTRACE = 9
    BPF_PROG_LOAD = 10
    STDIO_DUP = 11
    PROC_STDIO = 12
    GPU_OPEN = 13
    FLOW_CONNECT = 14
    FLOW_CLOSE = 15
    FLOW_LISTEN = 16
    EXEC_NEW = 17


class Reason(enum.IntEnum):
    SYNS = 1
    PACKETS = 2
    UDP = 3
    PORTS = 4
    SVC_SYNS = 5
    SVC_PACKETS = 6
    SVC_UDP = 7
    CONNS = 8
    RESETS = 9
    VERIFIED_RESETS = 10


class ParseFailure(enum.IntEnum):
    """Why the XDP parser could not follow a packet (enum parse_failure, the index of
    map `unparsed`)."""
    TRUNCATED = 1
    CHAIN_TOO_LONG = 2
    UNKNOWN_HEADER = 3
    VLAN_DEPTH = 4
    BAD_HEADER = 5


PARSE_FAILURES = 6   # entries of map `unparsed`


class _S(ctypes.Structure):
    _pack_ = 8


class event_header(_S):
    _fields_ = [("kind", u32), ("size", u32), ("ts_ns", u64)]


class addr_key(_S):
    _fields_ = [("addr", u8 * 16), ("family", u32)]


class service_key(_S):
    _fields_ = [("dport", u16), ("proto", u8), ("pad0", u8)]


class source_stats(_S):
    _fields_ = [("window_start_ns", u64), ("packets", u64), ("bytes", u64), ("syns", u64),
                ("udp", u64), ("alerted", u64), ("port_bits", u64 * DISTINCT_WORDS),
                ("ports", u32), ("dport", u16), ("proto", u8), ("pad0", u8)]


class service_stats(_S):
    _fields_ = [("window_start_ns", u64), ("packets", u64), ("syns", u64), ("udp", u64),
                ("alerted", u64), ("source_bits", u64 * DISTINCT_WORDS),
                ("sources", u32), ("pad0", u32)]


class remote_stats(_S):
    _fields_ = [("window_start_ns", u64), ("conns", u64), ("resets", u64), ("alerted", u64)]


class net_thresholds(_S):
    _fields_ = [(name, u64) for name in (
        "syns", "packets", "udp", "port_bits", "conns", "resets",
        "svc_syns", "svc_packets", "svc_udp", "svc_source_bits")]


class net_config(_S):
    _fields_ = [("window_ns", u64), ("netns_ino", u32), ("drop_unparsable", u32)]


class net_source_event(_S):
    _fields_ = [("hdr", event_header), ("addr", u8 * 16), ("family", u32), ("reason", u32),
                ("window_start_ns", u64), ("packets", u64), ("bytes", u64), ("syns", u64),
                ("udp", u64), ("port_bits", u32), ("dport", u16), ("proto", u8), ("pad0", u8)]


class net_service_event(_S):
    _fields_ = [("hdr", event_header), ("window_start_ns", u64), ("packets", u64),
                ("syns", u64), ("udp", u64), ("source_bits", u32), ("reason", u32),
                ("dport", u16), ("proto", u8), ("pad0", u8 * 5)]


class tcp_remote_event(_S):
    _fields_ = [("hdr", event_header), ("addr", u8 * 16), ("family", u32), ("reason", u32),
                ("window_start_ns", u64), ("count", u64), ("dport", u16), ("pad0", u8 * 6)]


# --- process probe (proc.bpf.c) ------------------------------------------------------

COMM_LEN, PATH_LEN, ARGS_LEN, MODULE_NAME_LEN = 16, 256, 256, 64
NAME_LEN, ANCESTORS = 64, 8
EXE_PROGRAM, EXE_SERVICE, EXE_MANAGER, EXE_PACKAGER = 1, 2, 4, 8  # enum exe_flag
EXEC_REASONS = {1: "program", 2: "service_child", 4: "socket_stdio", 8: "all",
                16: "service_cgroup", 32: "package_manager", 64: "policy"}
EXE_UNLINKED, EXE_MEMFD, EXE_IN_WRITABLE, EXE_DEEP = 1, 2, 4, 8   # enum exe_nature
EXEC_POLICY_OFF, EXEC_POLICY_ALL, EXEC_POLICY_WRITABLE = 0, 1, 2   # enum exec_policy_mode
STDIO_NOT_SOCKET = 0xFFFF
PATH_EXACT, PATH_READS, PATH_CREATIONS = 1, 2, 4  # enum path_flag
CREATIONS_ID = 0xFFFFFFFF
OPEN_SYSCALLS = {1: "openat", 2: "openat2", 3: "open", 4: "creat", 5: "open_by_handle_at",
                 6: "io_uring"}
OPEN_MATCHES = {1: "file", 2: "dir", 3: "name"}  # enum open_match
WALK_COMPLETE, WALK_TRUNCATED = 1, 2              # enum walk_flag
CTX_SERVICE_CGROUP, CTX_REPARENTED = 1, 2        # enum ctx_flag
FMODE_WRITE, FMODE_CREATED = 0x2, 0x100000
UNSET_ID = 0xFFFFFFFF                             # loginuid / sessionid not set


class ProcProg(enum.StrEnum):
    EXEC = "handle_sched_process_exec"
    EXIT = "handle_sched_process_exit"
    OPENAT = "handle_sys_exit_openat"
    OPENAT2 = "handle_sys_exit_openat2"
    OPEN = "handle_sys_exit_open"
    CREAT = "handle_sys_exit_creat"
    OPEN_BY_HANDLE = "handle_sys_exit_open_by_handle_at"
    MODULE_LOAD = "handle_module_load"
    PTRACE_ENTER = "handle_sys_enter_ptrace"
    PTRACE_EXIT = "handle_sys_exit_ptrace"
    BPF = "handle_sys_enter_bpf"
    AGENT_EXIT = "handle_agent_exit"
    EXEC_STDIO = "handle_exec_stdio"
    DUP_EXIT = "handle_sys_exit_dup"
    DUP2_EXIT = "handle_sys_exit_dup2"
    DUP3_EXIT = "handle_sys_exit_dup3"
    FCNTL_ENTER = "handle_sys_enter_fcntl"
    FCNTL_EXIT = "handle_sys_exit_fcntl"
    COMPAT_EXIT = "handle_compat_sys_exit"
    IO_URING_OPEN = "handle_io_uring_complete"


PROC_TRACEPOINTS = {
    ProcProg.EXEC: ("sched", "sched_process_exec"),
    ProcProg.EXIT: ("sched", "sched_process_exit"),
    ProcProg.OPENAT: ("syscalls", "sys_exit_openat"),
    ProcProg.OPENAT2: ("syscalls", "sys_exit_openat2"),
    ProcProg.OPEN: ("syscalls", "sys_exit_open"),
    ProcProg.CREAT: ("syscalls", "sys_exit_creat"),
    ProcProg.OPEN_BY_HANDLE: ("syscalls", "sys_exit_open_by_handle_at"),
    ProcProg.MODULE_LOAD: ("module", "module_load"),
    ProcProg.PTRACE_ENTER: ("syscalls", "sys_enter_ptrace"),
    ProcProg.PTRACE_EXIT: ("syscalls", "sys_exit_ptrace"),
    ProcProg.BPF: ("syscalls", "sys_enter_bpf"),
    ProcProg.AGENT_EXIT: ("sched", "sched_process_exit"),
    ProcProg.EXEC_STDIO: ("sched", "sched_process_exec"),
    ProcProg.DUP_EXIT: ("syscalls", "sys_exit_dup"),
    ProcProg.DUP2_EXIT: ("syscalls", "sys_exit_dup2"),
    ProcProg.DUP3_EXIT: ("syscalls", "sys_exit_dup3"),
    ProcProg.FCNTL_ENTER: ("syscalls", "sys_enter_fcntl"),
    ProcProg.FCNTL_EXIT: ("syscalls", "sys_exit_fcntl"),
    ProcProg.COMPAT_EXIT: ("raw_syscalls", "sys_exit"),    # tp_btf (PROC_RAW)
    ProcProg.IO_URING_OPEN: ("io_uring", "io_uring_complete"),    # tp_btf (PROC_RAW)
}
# BTF raw tracepoints (tp_btf): no perf record is built and their arguments are read by
# plain loads, which matters on a tracepoint that fires for every syscall of the host.
PROC_RAW = frozenset({ProcProg.COMPAT_EXIT, ProcProg.IO_URING_OPEN})


class ProcMap(enum.StrEnum):
    EVENTS = "events"
    LOSSES = "losses"
    ZEROES = "zeroes"
    WATCHED_EXES = "watched_exes"
    SERVICE_CGROUPS = "service_cgroups"
    WATCHED_FILES = "watched_files"
    WATCHED_DIRS = "watched_dirs"
    WATCHED_NAMES = "watched_names"
    WATCHED_DIR_IDS = "watched_dir_ids"
    WATCHED_NAME_LENS = "watched_name_lens"
    TRACKED = "tracked"
    PENDING_PTRACE = "pending_ptrace"
    SCRATCH = "scratch"
    FOREIGN_NETNS = "foreign_netns"
    FOREIGN_AGENTS = "foreign_agents"
    PENDING_DUPFD = "pending_dupfd"
    SYSTEM_DIRS = "system_dirs"
    EXEC_POLICY = "exec_policy"
    WRITABLE_DEVS = "writable_devs"
    WRITABLE_DIRS = "writable_dirs"
    RODATA = ".rodata"   # holds `proc_cfg` (struct proc_config) at offset 0


PROC_RODATA_VAR = "proc_cfg"


class proc_config(_S):
    _fields_ = [("agent_tgid", u32), ("all_execs", u32), ("netns_ino", u32), ("host_scope", u32),
                ("gpu_major", u32)]


class file_id(_S):
    _fields_ = [("ino", u64), ("dev", u32), ("pad0", u32)]


class dir_key(_S):
    _fields_ = [("prefixlen", u32), ("pad0", u32), ("dir", file_id), ("name", u8 * NAME_LEN)]


class name_key(_S):
    _fields_ = [("dir", u8 * NAME_LEN), ("name", u8 * NAME_LEN)]


class path_rule(_S):
    _fields_ = [("flags", u16), ("len", u16), ("id", u32)]


class proc_ctx(_S):
    _fields_ = [("cgroup_id", u64), ("pid", u32), ("tid", u32), ("ppid", u32), ("uid", u32),
                ("euid", u32), ("pad0", u32), ("comm", u8 * COMM_LEN),
                ("parent_comm", u8 * COMM_LEN), ("exe", file_id), ("loginuid", u32),
                ("sessionid", u32), ("flags", u32), ("ancestor_count", u32),
                ("ancestors", file_id * ANCESTORS), ("exe_path_len", u16),
                ("exe_path_flags", u16), ("pad1", u32), ("exe_path", u8 * PATH_LEN)]


class proc_exec_event(_S):
    _fields_ = [("hdr", event_header), ("proc", proc_ctx), ("stdio_family", u16 * 3),
                ("reason", u16), ("filename_len", u32), ("args_len", u32),
                ("args_total", u32), ("pad0", u32), ("filename", u8 * PATH_LEN),
                ("args", u8 * ARGS_LEN), ("start_ns", u64), ("exe_magic", u64),
                ("exe_nlink", u32), ("exe_nature", u16), ("pad1", u16)]


class proc_exit_event(_S):
    _fields_ = [("hdr", event_header), ("proc", proc_ctx), ("exit_code", u32), ("pad0", u32)]


class file_open_event(_S):
    _fields_ = [("hdr", event_header), ("proc", proc_ctx), ("flags", u32), ("rule_id", u32),
                ("path_len", u16), ("syscall", u16), ("rule_flags", u16),
                ("path_flags", u16), ("fmode", u32), ("match", u32), ("file", file_id),
                ("dir", file_id), ("path", u8 * PATH_LEN)]


class module_load_event(_S):
    _fields_ = [("hdr", event_header), ("proc", proc_ctx), ("taints", u32), ("pad0", u32),
                ("name", u8 * MODULE_NAME_LEN)]


class ptrace_event(_S):
    _fields_ = [("hdr", event_header), ("proc", proc_ctx), ("result", ctypes.c_int64),
                ("request", u32), ("target_pid", u32), ("target_tgid", u32),
                ("target_tid", u32), ("target_uid", u32), ("target_euid", u32),
                ("target_comm", u8 * COMM_LEN)]


class bpf_prog_load_event(_S):
    _fields_ = [("hdr", event_header), ("proc", proc_ctx), ("prog_type", u32),
                ("insn_cnt", u32), ("prog_name", u8 * COMM_LEN)]


# --- reverse shells however they are wired (proc.bpf.c, end) --------------------------

DUP_SYSCALLS = {1: "dup", 2: "dup2", 3: "dup3", 4: "fcntl"}   # enum dup_syscall


class StdioKind(enum.IntEnum):
    CLOSED = 0
    FILE = 1
    PIPE = 2
    FIFO = 3
    PTY = 4
    PTMX = 5
    TTY = 6
    CHAR = 7
    UNIX = 8
    INET = 9
    SOCKET = 10


class stdio_fd(_S):
    _fields_ = [("ino", u64), ("dev", u32), ("rdev", u32), ("kind", u16), ("family", u16),
                ("flags", u32)]


class stdio_dup_event(_S):
    _fields_ = [("hdr", event_header), ("proc", proc_ctx), ("exe_ino", u64), ("exe_dev", u32),
                ("newfd", u32), ("syscall", u16), ("family", u16), ("dport", u16),
                ("sport", u16), ("daddr", u8 * 16), ("sock_ino", u64)]


class proc_stdio_event(_S):
    _fields_ = [("hdr", event_header), ("proc", proc_ctx), ("fd", stdio_fd * 3),
                ("exe_ino", u64), ("exe_dev", u32), ("pad0", u32)]


class gpu_open_event(_S):
    _fields_ = [("hdr", event_header), ("proc", proc_ctx), ("start_ns", u64), ("major", u32),
                ("minor", u32), ("flags", u32), ("syscall", u16), ("pad0", u16)]


# --- activity probe (activity.bpf.c) ---------------------------------------------------

class FlowOutcome(enum.IntEnum):
    """enum flow_outcome: what a flow_event reports."""
    ESTABLISHED = 1
    REFUSED = 2
    FAILED = 3
    CLOSED = 4
    LISTENING = 5


class ActivityProg(enum.StrEnum):
    SOCK_STATE = "handle_activity_sock_state"
    SEND = "handle_activity_send"
    EXEC = "handle_activity_exec"
    AGENT_EXIT = "handle_activity_agent_exit"
    LISTEN_EXIT = "handle_activity_listen_exit"


ACTIVITY_TRACEPOINTS = {
    ActivityProg.SOCK_STATE: ("sock", "inet_sock_set_state"),
    ActivityProg.SEND: ("sock", "sock_send_length"),      # Linux >= 6.3
    ActivityProg.EXEC: ("sched", "sched_process_exec"),
    ActivityProg.AGENT_EXIT: ("sched", "sched_process_exit"),
    ActivityProg.LISTEN_EXIT: ("syscalls", "sys_exit_listen"),
}


class ActivityMap(enum.StrEnum):
    EVENTS = "events"
    LOSSES = "losses"
    FLOWS = "flows"
    FLOW_BYTES = "flow_bytes"
    CGROUPS = "cgroups"
    SEEN = "seen"
    SCRATCH = "scratch"
    ZEROES = "zeroes"
    FOREIGN_NETNS = "foreign_netns"     # the same names as ProcMap's: procscope reads them
    FOREIGN_AGENTS = "foreign_agents"
    PENDING_LISTEN = "pending_listen"   # listen() on an unbound socket, until its exit
    LISTEN_EXIT_ON = "listen_exit_on"   # [0] = 1 once handle_activity_listen_exit is attached
    RODATA = ".rodata"   # holds `act_cfg` (struct activity_config) at offset 0


ACTIVITY_RODATA_VAR = "act_cfg"


class activity_config(_S):
    _fields_ = [("window_ns", u64), ("agent_tgid", u32), ("netns_ino", u32),
                ("host_scope", u32), ("flow_cap", u32), ("exec_new_cap", u32), ("listen_cap", u32)]


class act_proc(_S):
    _fields_ = [("cgroup_id", u64), ("pid", u32), ("uid", u32), ("exe", file_id),
                ("comm", u8 * COMM_LEN)]


class flow_event(_S):
    _fields_ = [("hdr", event_header), ("proc", act_proc), ("start_ns", u64),
                ("established_ns", u64), ("bytes_acked", u64), ("bytes_received", u64),
                ("saddr", u8 * 16), ("daddr", u8 * 16), ("sport", u16), ("dport", u16),
                ("family", u16), ("outcome", u16), ("err", u32), ("pad0", u32)]


class exec_new_event(_S):
    _fields_ = [("hdr", event_header), ("proc", act_proc), ("exe_path_len", u16),
                ("exe_path_flags", u16), ("pad0", u32), ("exe_path", u8 * PATH_LEN)]


class flow_bytes_key(_S):
    _fields_ = [("cgroup_id", u64), ("daddr", u8 * 16), ("dport", u16), ("proto", u8),
                ("family", u8), ("pad0", u32)]


class flow_bytes(_S):
    _fields_ = [("bytes", u64), ("sends", u64)]


class ActivityCap(enum.IntEnum):
    """enum activity_cap: the index of cgroup_activity.dropped and .in_window."""
    FLOWS = 0
    EXEC_NEW = 1
    LISTENS = 2


ACTIVITY_CAPS = 3


class cgroup_activity(_S):
    _fields_ = [("execs", u64), ("connects", u64), ("listens", u64),
                ("dropped", u64 * ACTIVITY_CAPS), ("window_start_ns", u64),
                ("in_window", u32 * ACTIVITY_CAPS), ("pad0", u32)]


# Every struct shared with C, for the ABI test.
SHARED_STRUCTS = (event_header, addr_key, service_key, source_stats, service_stats,
                  remote_stats, net_thresholds, net_config, net_source_event,
                  net_service_event, tcp_remote_event,
                  proc_config, file_id, dir_key, name_key, path_rule, proc_ctx, proc_exec_event,
                  proc_exit_event, file_open_event, module_load_event, ptrace_event,
                  bpf_prog_load_event, stdio_fd, stdio_dup_event, proc_stdio_event,
                  gpu_open_event, activity_config, act_proc, flow_event, exec_new_event,
                  flow_bytes_key, flow_bytes, cgroup_activity)

DECODERS: dict[int, type[ctypes.Structure]] = {
    EventKind.NET_SOURCE: net_source_event,
    EventKind.NET_SERVICE: net_service_event,
    EventKind.TCP_ESTABLISHED: tcp_remote_event,
    EventKind.TCP_RESET: tcp_remote_event,
    EventKind.PROC_EXEC: proc_exec_event,
    EventKind.PROC_EXIT: proc_exit_event,
    EventKind.FILE_OPEN: file_open_event,
    EventKind.MODULE_LOAD: module_load_event,
    EventKind.PTRACE: ptrace_event,
    EventKind.BPF_PROG_LOAD: bpf_prog_load_event,
    EventKind.STDIO_DUP: stdio_dup_event,
    EventKind.PROC_STDIO: proc_stdio_event,
    EventKind.GPU_OPEN: gpu_open_event,
    EventKind.FLOW_CONNECT: flow_event,
    EventKind.FLOW_CLOSE: flow_event,
    EventKind.FLOW_LISTEN: flow_event,
    EventKind.EXEC_NEW: exec_new_event,
}


def decode(record: bytes) -> ctypes.Structure | None:
    """The event structure for a ring-buffer record; None for an unknown kind or a record
    shorter than its structure (a newer or broken probe: counted by the caller)."""
    if len(record) < ctypes.sizeof(event_header):
        return None
    hdr = event_header.from_buffer_copy(record)
    cls = DECODERS.get(hdr.kind)
    if cls is None or len(record) < ctypes.sizeof(cls) or hdr.size != ctypes.sizeof(cls):
        return None
    return cls.from_buffer_copy(record)
