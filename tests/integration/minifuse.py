"""A minimal FUSE file server (the kernel's /dev/fuse protocol, 7.31) for red-team tests:
one directory holding one file; requests from processes `hang(pid)` picks are never
answered (what a tenant's own FUSE daemon -- gcsfuse, s3fs, its own code -- can do)."""
from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import threading
from typing import Callable

LOOKUP, FORGET, GETATTR, OPEN, READ, RELEASE, FLUSH, INIT = 1, 2, 3, 14, 15, 18, 25, 26
OPENDIR, RELEASEDIR, INTERRUPT, BATCH_FORGET = 27, 29, 36, 42
_IN = struct.Struct("<IIQQIIII")          # fuse_in_header
_OUT = struct.Struct("<IiQ")              # fuse_out_header
_libc = ctypes.CDLL(None, use_errno=True)


class MiniFuse:
    def __init__(self, mountpoint: str, name: str, data: bytes, hang: Callable[[int], bool]):
        self.mountpoint, self.name, self.data, self.hang = mountpoint, name.encode(), data, hang
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        opts = f"fd={self.fd},rootmode=40755,user_id=0,group_id=0,allow_other".encode()
        if _libc.mount(b"minifuse", mountpoint.encode(), b"fuse", 0, opts) != 0:
            e = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(e, os.strerror(e), mountpoint)
        self.hung = 0
        self._t = threading.Thread(target=self._serve, daemon=True)
        self._t.start()
        self.conn = os.minor(os.stat(mountpoint).st_dev)    # its /sys/fs/fuse/connections/N

    def _attr(self, ino: int) -> bytes:
        mode = (stat.S_IFDIR | 0o755) if ino == 1 else (stat.S_IFREG | 0o755)
        size = 0 if ino == 1 else len(self.data)
        return struct.pack("<QQQQQQIIIIIIIIII", ino, size, (size + 511) // 512, 0, 0, 0,
                           0, 0, 0, mode, 2 if ino == 1 else 1, 0, 0, 0, 4096, 0)

    def _reply(self, unique: int, err: int = 0, body: bytes = b"") -> None:
        try:
            os.write(self.fd, _OUT.pack(_OUT.size + len(body), -err, unique) + body)
        except OSError:
            pass

    def _serve(self) -> None:
        while True:
            try:
                buf = os.read(self.fd, 1 << 20 | 4096)
            except OSError:
                return
            ln, op, unique, node, uid, gid, pid, _ = _IN.unpack_from(buf)
            arg = buf[_IN.size:ln]
            if op in (FORGET, BATCH_FORGET, INTERRUPT):
                continue
            if op != INIT and self.hang(pid):
                self.hung += 1
                continue                 # never answered
            if op == INIT:
                major, minor, readahead, flags = struct.unpack_from("<IIII", arg)
                self._reply(unique, body=struct.pack("<IIIIHHIIHHI7I", 7, 31, readahead, 0,
                                                     16, 12, 1 << 17, 1, 32, 0, 0,
                                                     *([0] * 7)))
            elif op == LOOKUP:
                if node == 1 and arg.rstrip(b"\0") == self.name:
                    self._reply(unique, body=struct.pack("<QQQQII", 2, 0, 3600, 3600, 0, 0)
                                + self._attr(2))
                else:
                    self._reply(unique, errno.ENOENT)
            elif op == GETATTR:
                self._reply(unique, body=struct.pack("<QII", 3600, 0, 0) + self._attr(node))
            elif op in (OPEN, OPENDIR):
                self._reply(unique, body=struct.pack("<QII", 0, 0, 0))
            elif op == READ:
                fh, off, size = struct.unpack_from("<QQI", arg)
                self._reply(unique, body=self.data[off:off + size])
            elif op in (RELEASE, RELEASEDIR, FLUSH):
                self._reply(unique)
            else:
                self._reply(unique, errno.ENOSYS)

    def close(self) -> None:
        """Abort the connection (every waiting request fails with ENOTCONN), unmount."""
        ctl = "/sys/fs/fuse/connections"
        mounted_ctl = False
        if not os.path.exists(f"{ctl}/{self.conn}"):
            mounted_ctl = _libc.mount(b"fusectl", ctl.encode(), b"fusectl", 0, None) == 0
        try:
            with open(f"{ctl}/{self.conn}/abort", "w") as f:
                f.write("1")
        except OSError:
            pass
        if mounted_ctl:
            _libc.umount2(ctl.encode(), 2)
        _libc.umount2(self.mountpoint.encode(), 2)       # MNT_DETACH
        self._t.join(5)
        os.close(self.fd)
