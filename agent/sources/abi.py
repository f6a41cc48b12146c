"""Python mirror of probes/include/events.h, and the names the objects must contain.

Classes are named after the C structs; tests/unit/test_abi.py checks sizes, field names
and offsets against the BTF of abi.bpf.o, and the names below against net.bpf.o.
DECODERS is the one table from event kind to its structure.
"""
from __future__ import annotations

import ctypes
import enum
from pathlib import Path

from ctypes import c_uint8 as u8, c_uint16 as u16, c_uint32 as u32, c_uint64 as u64

PROBES_DIR = Path(__file__).resolve().parent.parent / "probes"
NET_OBJECT = PROBES_DIR / "net.bpf.o"
ABI_OBJECT = PROBES_DIR / "abi.bpf.o"

DISTINCT_BITS = 1024
DISTINCT_WORDS = DISTINCT_BITS // 64


class NetProg(enum.StrEnum):
    XDP = "handle_xdp"
    INET_SOCK_SET_STATE = "handle_inet_sock_set_state"
    TCP_SEND_RESET = "handle_tcp_send_reset"


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


RODATA_VAR = "net_cfg"
SIZED_MAPS = (NetMap.SOURCES, NetMap.SERVICES, NetMap.REMOTES)  # max_entries from config


class EventKind(enum.IntEnum):
    NET_SOURCE = 1
    NET_SERVICE = 2
    TCP_ESTABLISHED = 3
    TCP_RESET = 4


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
    _fields_ = [("window_ns", u64), ("netns_ino", u32), ("pad0", u32)]


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


# Every struct shared with C, for the ABI test.
SHARED_STRUCTS = (event_header, addr_key, service_key, source_stats, service_stats,
                  remote_stats, net_thresholds, net_config, net_source_event,
                  net_service_event, tcp_remote_event)

DECODERS: dict[int, type[ctypes.Structure]] = {
    EventKind.NET_SOURCE: net_source_event,
    EventKind.NET_SERVICE: net_service_event,
    EventKind.TCP_ESTABLISHED: tcp_remote_event,
    EventKind.TCP_RESET: tcp_remote_event,
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
