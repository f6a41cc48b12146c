"""What the kernel says about the links the network probe watches, beyond their names:

- how links stack (rtnetlink, RTM_GETLINK): a frame that enters a bridge or bond port, or
  the lower link of a vlan or macvlan device, meets the ingress hook of that link first and
  then again the hook of the device above it, so watching both would judge it twice;
- which tcx programs run on a link, in order (BPF_PROG_QUERY): a program placed before
  ours that ends the chain (TC_ACT_OK) hides every packet from ours.

Both read the calling thread's network namespace (the netlink socket and the ifindex).
"""
from __future__ import annotations

import ctypes
import os
import struct

from agent.sources import libbpf

from agent.linktype import LinkInfo, dump  # noqa: F401 (rtnetlink's links: shared with the enforcer)


def lowers(names: list[str], infos: list[LinkInfo] | None = None) -> dict[str, list[str]]:
    """For each of `names` that other links stack under (a bridge or bond with ports, the
    link below a vlan), the names of the links directly below it."""
    infos = dump() if infos is None else infos
    by_index = {i.index: i.name for i in infos}
    below: dict[str, list[str]] = {}
    for i in infos:
        if i.master in by_index:
            below.setdefault(by_index[i.master], []).append(i.name)
        if i.lower in by_index:
            below.setdefault(i.name, []).append(by_index[i.lower])
    return {n: below[n] for n in names if n in below}


def without_uppers(names: list[str], infos: list[LinkInfo] | None = None
                   ) -> tuple[list[str], dict[str, list[str]]]:
    """`names` less each device every lower link of which is in `names` too (a frame that
    reaches it came up through one of them and was judged there), and what was left out:
    {upper: its lowers}. An upper with a lower that is not watched stays watched."""
    try:
        below = lowers(names, infos)
    except OSError:
        return names, {}      # cannot tell: watch all, as before
    watched = set(names)
    skipped: dict[str, list[str]] = {}
    changed = True
    while changed:          # a vlan on a bridge: the bridge goes, then the vlan on it
        changed = False
        for upper, lower in below.items():
            if upper in watched and all(n in watched or n in skipped for n in lower):
                watched.discard(upper)
                skipped[upper] = lower
                changed = True
    return [n for n in names if n in watched], skipped


# --- the tcx chain ---------------------------------------------------------------------

class _QueryOpts(ctypes.Structure):
    # struct bpf_prog_query_opts (libbpf/bpf.h)
    _fields_ = [("sz", ctypes.c_size_t), ("query_flags", ctypes.c_uint32),
                ("attach_flags", ctypes.c_uint32), ("prog_ids", ctypes.c_void_p),
                ("count", ctypes.c_uint32), ("prog_attach_flags", ctypes.c_void_p),
                ("link_ids", ctypes.c_void_p), ("link_attach_flags", ctypes.c_void_p),
                ("revision", ctypes.c_uint64)]


_lib = libbpf._lib
_lib.bpf_prog_query_opts.restype = ctypes.c_int
_lib.bpf_prog_query_opts.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
_lib.bpf_obj_get_info_by_fd.restype = ctypes.c_int
_lib.bpf_obj_get_info_by_fd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_lib.bpf_prog_get_fd_by_id.restype = ctypes.c_int
_lib.bpf_prog_get_fd_by_id.argtypes = [ctypes.c_uint32]
_INFO_ID, _INFO_NAME = 4, 64        # struct bpf_prog_info: id, name[16]


def _info(fd: int) -> bytes:
    buf = ctypes.create_string_buffer(256)
    size = ctypes.c_uint32(len(buf))
    libbpf.check(_lib.bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(size)), "program info")
    return buf.raw


def prog_id(fd: int) -> int:
    return struct.unpack_from("=I", _info(fd), _INFO_ID)[0]


def prog_name(pid: int) -> str:
    """The name of program `pid` ("?" where it cannot be read)."""
    fd = _lib.bpf_prog_get_fd_by_id(pid)
    if fd < 0:
        return "?"
    try:
        return _info(fd)[_INFO_NAME:_INFO_NAME + 16].split(b"\0", 1)[0].decode(errors="replace")
    except OSError:
        return "?"
    finally:
        os.close(fd)


def chain(ifindex: int, attach_type: int, room: int = 64) -> list[int]:
    """Program ids of the tcx chain `attach_type` on `ifindex`, in the order they run."""
    ids = (ctypes.c_uint32 * room)()
    opts = _QueryOpts(sz=ctypes.sizeof(_QueryOpts), prog_ids=ctypes.addressof(ids), count=room)
    libbpf.check(_lib.bpf_prog_query_opts(ifindex, attach_type, ctypes.byref(opts)),
                 f"query the tcx chain of ifindex {ifindex}")
    return list(ids[:min(opts.count, room)])


def before(ifindex: int, attach_type: int, ours: int) -> list[int] | None:
    """Ids of the programs that run before `ours` on the chain (None: ours is not on it)."""
    ids = chain(ifindex, attach_type)
    return ids[:ids.index(ours)] if ours in ids else None
