"""A small ctypes binding over the system libbpf (libbpf.so.1).

Only what the probes need: open an object, size maps and fill .rodata before load, load,
attach (XDP native or generic, tc, tracepoints), read and write maps, and ring buffers. Negative
errno from libbpf becomes OSError here, once. libbpf's own log lines are kept (last 200)
so a verifier rejection can be reported with its reason.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import errno
import os
from typing import Iterator

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
BPF_XDP = 37               # enum bpf_attach_type
BPF_TCX_INGRESS = 46       # Linux 6.6
BPF_TCX_EGRESS = 47
BPF_F_BEFORE = 1 << 3      # tcx: with no relative program, first on the chain
BPF_ANY = 0

_lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
_libc = ctypes.CDLL(None)
_P = ctypes.c_void_p

_SIGS: dict[str, tuple[object, list[object]]] = {
    "bpf_object__open_file": (_P, [ctypes.c_char_p, _P]),
    "bpf_object__load": (ctypes.c_int, [_P]),
    "bpf_object__close": (None, [_P]),
    "bpf_object__find_map_by_name": (_P, [_P, ctypes.c_char_p]),
    "bpf_object__find_program_by_name": (_P, [_P, ctypes.c_char_p]),
    "bpf_map__set_max_entries": (ctypes.c_int, [_P, ctypes.c_uint32]),
    "bpf_map__initial_value": (_P, [_P, ctypes.POINTER(ctypes.c_size_t)]),
    "bpf_map__fd": (ctypes.c_int, [_P]),
    "bpf_map__key_size": (ctypes.c_uint32, [_P]),
    "bpf_map__value_size": (ctypes.c_uint32, [_P]),
    "bpf_map__max_entries": (ctypes.c_uint32, [_P]),
    "bpf_program__fd": (ctypes.c_int, [_P]),
    "bpf_program__set_autoload": (ctypes.c_int, [_P, ctypes.c_bool]),
    "bpf_program__attach_tracepoint": (_P, [_P, ctypes.c_char_p, ctypes.c_char_p]),
    "bpf_program__attach_trace": (_P, [_P]),
    "bpf_link__destroy": (ctypes.c_int, [_P]),
    "bpf_xdp_attach": (ctypes.c_int, [ctypes.c_int, ctypes.c_int, ctypes.c_uint32, _P]),
    "bpf_xdp_detach": (ctypes.c_int, [ctypes.c_int, ctypes.c_uint32, _P]),
    "bpf_link_create": (ctypes.c_int, [ctypes.c_int, ctypes.c_int, ctypes.c_int, _P]),
    "bpf_tc_hook_create": (ctypes.c_int, [_P]),
    "bpf_tc_hook_destroy": (ctypes.c_int, [_P]),
    "bpf_tc_attach": (ctypes.c_int, [_P, _P]),
    "bpf_tc_detach": (ctypes.c_int, [_P, _P]),
    "bpf_map_lookup_elem": (ctypes.c_int, [ctypes.c_int, _P, _P]),
    "bpf_map_update_elem": (ctypes.c_int, [ctypes.c_int, _P, _P, ctypes.c_uint64]),
    "bpf_map_delete_elem": (ctypes.c_int, [ctypes.c_int, _P]),
    "bpf_map_get_next_key": (ctypes.c_int, [ctypes.c_int, _P, _P]),
    "bpf_map_lookup_batch": (ctypes.c_int, [ctypes.c_int, _P, _P, _P, _P,
                                            ctypes.POINTER(ctypes.c_uint32), _P]),
    "ring_buffer__new": (_P, [ctypes.c_int, _P, _P, _P]),
    "ring_buffer__epoll_fd": (ctypes.c_int, [_P]),
    "ring_buffer__consume": (ctypes.c_int, [_P]),
    "ring_buffer__free": (None, [_P]),
    "libbpf_num_possible_cpus": (ctypes.c_int, []),
    "libbpf_probe_bpf_prog_type": (ctypes.c_int, [ctypes.c_int, _P]),
    "libbpf_set_print": (_P, [_P]),
}
for _name, (_res, _args) in _SIGS.items():
    _fn = getattr(_lib, _name)
    _fn.restype, _fn.argtypes = _res, _args
_libc.vsnprintf.restype = ctypes.c_int
_libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, _P]

# int (*)(void *ctx, void *data, size_t size)
RING_CB = ctypes.CFUNCTYPE(ctypes.c_int, _P, _P, ctypes.c_size_t)
# int (*)(enum libbpf_print_level, const char *fmt, va_list): on x86-64 and arm64 a
# va_list argument is passed as a pointer, which vsnprintf accepts unchanged.
_PRINT_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, _P)

log_lines: collections.deque[str] = collections.deque(maxlen=200)
_captures: list[list[str]] = []
# libbpf prints a rejected program's whole verifier log in one message ("-- BEGIN PROG
# LOAD LOG --" ... "-- END PROG LOAD LOG --"): room for it, and 1 KiB for every other line.
VERIFIER_LOG_BYTES = 1 << 20
_BEGIN, _END = "-- BEGIN PROG LOAD LOG --", "-- END PROG LOAD LOG --"


def _print(level: int, fmt: bytes, args: int) -> int:
    buf = ctypes.create_string_buffer(VERIFIER_LOG_BYTES if b"LOAD LOG" in fmt else 1024)
    need = _libc.vsnprintf(buf, len(buf), fmt, args)
    line = buf.value.decode(errors="replace").rstrip()
    if need >= len(buf):
        line += f"\n[{need - len(buf) + 1} more bytes of this message cut]"
    log_lines.append(line)
    for lines in _captures:
        lines.append(line)
    return 0


@contextlib.contextmanager
def captured() -> Iterator[list[str]]:
    """The libbpf messages printed inside the block, whole (log_lines keeps only the last
    200)."""
    lines: list[str] = []
    _captures.append(lines)
    try:
        yield lines
    finally:
        _captures.remove(lines)


def verifier_log(lines: list[str]) -> str | None:
    """The verifier's log of a program the kernel rejected, from captured() messages;
    None when there was none (the kernel refused the program before verifying it)."""
    for line in lines:
        start = line.find(_BEGIN)
        if start >= 0:
            end = line.find(_END, start)
            return line[start + len(_BEGIN):end if end >= 0 else None].strip("\n")
    return None


_print_cb = _PRINT_CB(_print)  # module global: libbpf keeps the pointer forever
_lib.libbpf_set_print(ctypes.cast(_print_cb, _P))


def log_tail(n: int = 20) -> str:
    return "\n".join(list(log_lines)[-n:])


def check(ret: int, what: str) -> int:
    """libbpf returns -errno; turn it into OSError with what was being done."""
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


def check_ptr(ptr: int | None, what: str) -> int:
    """libbpf 1.x returns NULL and sets errno for failed constructors."""
    if not ptr:
        err = ctypes.get_errno() or errno.EINVAL
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ptr


def num_possible_cpus() -> int:
    return check(_lib.libbpf_num_possible_cpus(), "count possible CPUs")


def probe_prog_type(prog_type: int) -> int:
    """1 supported, 0 not, <0 -errno (libbpf_probe_bpf_prog_type)."""
    return _lib.libbpf_probe_bpf_prog_type(prog_type, None)


class Map:
    def __init__(self, ptr: int, name: str):
        self.ptr, self.name = ptr, name

    @property
    def fd(self) -> int:
        return check(_lib.bpf_map__fd(self.ptr), f"fd of map {self.name}")

    @property
    def key_size(self) -> int:
        return _lib.bpf_map__key_size(self.ptr)

    @property
    def value_size(self) -> int:
        return _lib.bpf_map__value_size(self.ptr)

    def set_max_entries(self, n: int) -> None:
        check(_lib.bpf_map__set_max_entries(self.ptr, n), f"size map {self.name}")

    def set_initial_value(self, data: bytes) -> None:
        """Overwrite the start of a global-data map (.rodata) before load."""
        size = ctypes.c_size_t()
        ptr = check_ptr(_lib.bpf_map__initial_value(self.ptr, ctypes.byref(size)),
                        f"initial value of {self.name}")
        if len(data) > size.value:
            raise ValueError(f"{self.name} holds {size.value} bytes, got {len(data)}")
        ctypes.memmove(ptr, data, len(data))

    def lookup(self, key: ctypes.Structure | ctypes._SimpleCData, value) -> bool:
        """Fill `value`; False when the key is absent."""
        ret = _lib.bpf_map_lookup_elem(self.fd, ctypes.byref(key), ctypes.byref(value))
        if ret == -errno.ENOENT:
            return False
        check(ret, f"lookup in {self.name}")
        return True

    def update(self, key, value, flags: int = BPF_ANY) -> None:
        check(_lib.bpf_map_update_elem(self.fd, ctypes.byref(key), ctypes.byref(value), flags),
              f"update of {self.name}")

    def delete(self, key) -> bool:
        """Remove `key`; False when it was absent."""
        ret = _lib.bpf_map_delete_elem(self.fd, ctypes.byref(key))
        if ret == -errno.ENOENT:
            return False
        check(ret, f"delete from {self.name}")
        return True

    def items(self, key_type, value_type, batch: int = 256) -> Iterator[tuple[object, object]]:
        """Every entry, by batch lookup where the kernel has it, else key by key."""
        try:
            yield from self._batch_items(key_type, value_type, batch)
        except _NoBatch:
            yield from self._iter_items(key_type, value_type)

    def _batch_items(self, key_type, value_type, batch: int):
        keys, values = (key_type * batch)(), (value_type * batch)()
        in_b, out_b = ctypes.create_string_buffer(self.key_size), ctypes.create_string_buffer(self.key_size)
        first = True
        while True:
            count = ctypes.c_uint32(batch)
            ret = _lib.bpf_map_lookup_batch(self.fd, None if first else in_b, out_b, keys, values,
                                            ctypes.byref(count), None)
            if ret < 0 and ret not in (-errno.ENOENT,):
                if first and ret in (-errno.EINVAL, -errno.ENOTSUP, -524):  # 524: ENOTSUPP
                    raise _NoBatch()
                check(ret, f"batch lookup in {self.name}")
            for i in range(count.value):
                yield keys[i], values[i]
            if ret == -errno.ENOENT:  # the last batch
                return
            first = False
            ctypes.memmove(in_b, out_b, self.key_size)

    def _iter_items(self, key_type, value_type):
        # Entries may vanish (LRU) between get_next_key and lookup: skip those.
        key, nxt = key_type(), key_type()
        ret = _lib.bpf_map_get_next_key(self.fd, None, ctypes.byref(nxt))
        while ret == 0:
            value = value_type()
            if self.lookup(nxt, value):
                yield key_type.from_buffer_copy(nxt), value
            ctypes.memmove(ctypes.byref(key), ctypes.byref(nxt), ctypes.sizeof(key_type))
            ret = _lib.bpf_map_get_next_key(self.fd, ctypes.byref(key), ctypes.byref(nxt))
        if ret != -errno.ENOENT:
            check(ret, f"iterate {self.name}")


class _NoBatch(Exception):
    pass


class Program:
    def __init__(self, ptr: int, name: str):
        self.ptr, self.name = ptr, name

    @property
    def fd(self) -> int:
        return check(_lib.bpf_program__fd(self.ptr), f"fd of program {self.name}")

    def set_autoload(self, on: bool) -> None:
        check(_lib.bpf_program__set_autoload(self.ptr, on), f"autoload of {self.name}")

    def attach_tracepoint(self, category: str, name: str) -> "Link":
        ptr = check_ptr(_lib.bpf_program__attach_tracepoint(self.ptr, category.encode(), name.encode()),
                        f"attach {self.name} to tracepoint {category}:{name}")
        return Link(ptr)

    def attach_trace(self) -> "Link":
        """A tp_btf (BTF raw tracepoint) program: the target is in its section name."""
        ptr = check_ptr(_lib.bpf_program__attach_trace(self.ptr), f"attach {self.name}")
        return Link(ptr)


class Link:
    def __init__(self, ptr: int):
        self.ptr = ptr

    def destroy(self) -> None:
        if self.ptr:
            _lib.bpf_link__destroy(self.ptr)
            self.ptr = 0


class _LinkCreateOpts(ctypes.Structure):
    # struct bpf_link_create_opts (libbpf.h): sz, then flags; the rest stays zero
    _fields_ = [("sz", ctypes.c_size_t), ("flags", ctypes.c_uint32)]


class FdLink:
    """A BPF link made with BPF_LINK_CREATE (native XDP with XDP_FLAGS_DRV_MODE, tcx
    ingress): the kernel detaches it when its fd closes, so a killed agent leaves
    nothing attached, and it never replaces another owner's program (EBUSY, EEXIST)."""

    def __init__(self, prog: Program, ifindex: int, attach_type: int, flags: int = 0,
                 what: str = "link"):
        opts = _LinkCreateOpts(sz=ctypes.sizeof(_LinkCreateOpts), flags=flags)
        self.fd = check(_lib.bpf_link_create(prog.fd, ifindex, attach_type, ctypes.byref(opts)),
                        f"attach {prog.name} ({what}) to ifindex {ifindex}")
        self.ifindex, self.attach_type = ifindex, attach_type

    def destroy(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def native_xdp(prog: Program, ifindex: int) -> FdLink:
    """`prog` in the driver (native XDP); EOPNOTSUPP where the driver has no XDP."""
    return FdLink(prog, ifindex, BPF_XDP, XDP_FLAGS_DRV_MODE, "native XDP")


def generic_xdp(prog: Program, ifindex: int) -> FdLink:
    """`prog` as generic (skb) XDP, as a link: gone with the agent's process."""
    return FdLink(prog, ifindex, BPF_XDP, XDP_FLAGS_SKB_MODE, "generic XDP")


def tcx_ingress(prog: Program, ifindex: int) -> FdLink:
    """`prog` at tc ingress as a tcx link (Linux 6.6), first on the chain (it passes every
    packet it does not drop on to the next: a program that ends the chain before it would
    hide the link from it); EINVAL on older kernels."""
    return FdLink(prog, ifindex, BPF_TCX_INGRESS, BPF_F_BEFORE, "tcx ingress")


def tcx_egress(prog: Program, ifindex: int) -> FdLink:
    """`prog` at tc egress as a tcx link (Linux 6.6), first on the chain; EINVAL on older
    kernels."""
    return FdLink(prog, ifindex, BPF_TCX_EGRESS, BPF_F_BEFORE, "tcx egress")


BPF_TC_INGRESS = 1
BPF_TC_EGRESS = 2


class _TcHook(ctypes.Structure):
    # struct bpf_tc_hook (libbpf.h): sz first, so newer libbpf accepts this older layout
    _fields_ = [("sz", ctypes.c_size_t), ("ifindex", ctypes.c_int),
                ("attach_point", ctypes.c_int), ("parent", ctypes.c_uint32)]


class _TcOpts(ctypes.Structure):
    # struct bpf_tc_opts (libbpf.h)
    _fields_ = [("sz", ctypes.c_size_t), ("prog_fd", ctypes.c_int), ("flags", ctypes.c_uint32),
                ("prog_id", ctypes.c_uint32), ("handle", ctypes.c_uint32),
                ("priority", ctypes.c_uint32)]


BPF_TC_F_REPLACE = 1
# The one handle and priority the agent's clsact filters take: a restart after a kill -9
# replaces the dead agent's filter in place (BPF_TC_F_REPLACE) instead of adding another.
TC_HANDLE, TC_PRIORITY = 0x5741, 0x5741


class TcLink:
    """A tc (clsact) filter running `prog` on ifindex, at egress unless `ingress`;
    destroy() removes the filter and, when this link created the clsact qdisc, the
    qdisc. Unlike a BPF link, it must be destroyed from the network namespace it was
    attached in, and it outlives a killed process: the next one replaces it (TC_HANDLE)."""

    def __init__(self, prog: Program, ifindex: int, ingress: bool = False):
        self._hook = _TcHook(sz=ctypes.sizeof(_TcHook), ifindex=ifindex,
                             attach_point=BPF_TC_INGRESS if ingress else BPF_TC_EGRESS)
        ret = _lib.bpf_tc_hook_create(ctypes.byref(self._hook))
        if ret < 0 and ret != -errno.EEXIST:
            check(ret, f"create the clsact qdisc on ifindex {ifindex}")
        self._own_qdisc = ret == 0
        opts = _TcOpts(sz=ctypes.sizeof(_TcOpts), prog_fd=prog.fd, flags=BPF_TC_F_REPLACE,
                       handle=TC_HANDLE, priority=TC_PRIORITY)
        try:
            check(_lib.bpf_tc_attach(ctypes.byref(self._hook), ctypes.byref(opts)),
                  f"attach {prog.name} to tc {'ingress' if ingress else 'egress'} of "
                  f"ifindex {ifindex}")
        except OSError:
            if self._own_qdisc:
                _lib.bpf_tc_hook_destroy(ctypes.byref(self._hook))
            raise
        self._handle, self._priority = opts.handle, opts.priority
        self.ifindex = ifindex

    def destroy(self) -> None:
        if not self.ifindex:
            return
        opts = _TcOpts(sz=ctypes.sizeof(_TcOpts), handle=self._handle, priority=self._priority)
        _lib.bpf_tc_detach(ctypes.byref(self._hook), ctypes.byref(opts))
        if self._own_qdisc:
            _lib.bpf_tc_hook_destroy(ctypes.byref(self._hook))
        self.ifindex = 0


class Object:
    """An opened (then loaded) BPF object; close() frees it and everything it loaded."""

    def __init__(self, path: str):
        self.path = path
        self.ptr = check_ptr(_lib.bpf_object__open_file(path.encode(), None), f"open {path}")

    def map(self, name: str) -> Map:
        ptr = _lib.bpf_object__find_map_by_name(self.ptr, name.encode())
        if not ptr:
            raise LookupError(f"no map {name!r} in {self.path}")
        return Map(ptr, name)

    def program(self, name: str) -> Program:
        ptr = _lib.bpf_object__find_program_by_name(self.ptr, name.encode())
        if not ptr:
            raise LookupError(f"no program {name!r} in {self.path}")
        return Program(ptr, name)

    def load(self) -> None:
        check(_lib.bpf_object__load(self.ptr), f"load {os.path.basename(self.path)}")

    def close(self) -> None:
        if self.ptr:
            _lib.bpf_object__close(self.ptr)
            self.ptr = 0


class RingBuffer:
    """libbpf ring buffer over one map. consume() returns the records now available as
    bytes; the C callback only copies, so no Python exception crosses into libbpf."""

    def __init__(self, ringbuf: Map):
        self._pending: list[bytes] = []

        def trampoline(_ctx: int, data: int, size: int) -> int:
            self._pending.append(ctypes.string_at(data, size))
            return 0

        self._cb = RING_CB(trampoline)  # referenced for as long as libbpf may call it
        self.ptr = check_ptr(_lib.ring_buffer__new(ringbuf.fd, ctypes.cast(self._cb, _P), None, None),
                             f"ring buffer on {ringbuf.name}")

    @property
    def epoll_fd(self) -> int:
        return check(_lib.ring_buffer__epoll_fd(self.ptr), "ring buffer epoll fd")

    def consume(self) -> list[bytes]:
        check(_lib.ring_buffer__consume(self.ptr), "consume ring buffer")
        records, self._pending = self._pending, []
        return records

    def free(self) -> None:
        if self.ptr:
            _lib.ring_buffer__free(self.ptr)
            self.ptr = 0
