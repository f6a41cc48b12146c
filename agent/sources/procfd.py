"""What /proc says about processes' open files and sockets, for agent.sources.stdio:
one snapshot of every process's fd links (who holds which pipe, fifo, socket, pty
master), the connected TCP/UDP sockets of a network namespace, and executables verified
by inode. Read only; every read tolerates a process that is gone."""
from __future__ import annotations

import ipaddress
import os
import stat
from dataclasses import dataclass, field

MAX_LINKS = 200_000       # fd links read per snapshot of /proc; beyond it the snapshot is partial
TCP_LISTEN, TCP_CLOSE = 0x0A, 0x07
NET_TABLES = ("tcp", "tcp6", "udp", "udp6")


def user_dev(kdev: int) -> int:
    """A kernel dev_t (major << 20 | minor) as stat(2)'s st_dev."""
    return os.makedev(kdev >> 20, kdev & 0xFFFFF)


def verified_exe(pid: int, dev: int | None = None, ino: int | None = None) -> str | None:
    """The executable path of `pid` when the path's (dev, inode) is the process's: the
    kernel's when given (kernel dev_t), else what /proc/PID/exe holds. None when the
    process is gone, or its path now names another file (replaced, renamed, deleted)."""
    try:
        path = os.readlink(f"/proc/{pid}/exe")
        if dev is None or ino is None:
            held = os.stat(f"/proc/{pid}/exe")
            dev, ino = held.st_dev, held.st_ino
        else:
            dev = user_dev(dev)
        on_disk = os.stat(path)
    except OSError:
        return None
    return path if (on_disk.st_dev, on_disk.st_ino) == (dev, ino) else None


def comm(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().rstrip("\n")
    except OSError:
        return None


def access(pid: int, fd: int) -> int | None:
    """O_ACCMODE of an open fd (0 read, 1 write, 2 both), from /proc/PID/fdinfo."""
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("flags:"):
                    return int(line.split()[1], 8) & 3
    except (OSError, ValueError, IndexError):
        pass
    return None


def tty_index(pid: int, fd: int) -> int | None:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("tty-index:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _addr(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    # /proc/net prints each 32-bit word in host (little-endian) order
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(raw))


@dataclass
class Conn:
    remote: str
    port: int
    inbound: bool


@dataclass
class NetTable:
    """The connected TCP/UDP sockets of one network namespace, by inode."""

    conns: dict[int, Conn] = field(default_factory=dict)        # remote, not loopback; "*": any
    loopback: dict[int, tuple] = field(default_factory=dict)    # inode -> (local, remote)
    by_ends: dict[tuple, int] = field(default_factory=dict)     # (local, remote) -> inode


@dataclass
class Snapshot:
    """One pass over /proc/*/fd: every process's fd links, and who holds what."""

    fds: dict[int, list[tuple[int, str]]] = field(default_factory=dict)
    holders: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # link -> (pid, fd)
    partial: bool = False
    _net: dict[str, NetTable] = field(default_factory=dict)    # netns -> its sockets

    @classmethod
    def take(cls, max_links: int = MAX_LINKS) -> "Snapshot":
        snap, links = cls(), 0
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            try:
                entries = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue          # gone, or a kernel thread
            mine = snap.fds.setdefault(pid, [])
            for entry in entries:
                links += 1
                if links > max_links:
                    snap.partial = True
                    return snap
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{entry}")
                except OSError:
                    continue
                mine.append((int(entry), link))
                snap.holders.setdefault(link, []).append((pid, int(entry)))
        return snap

    def _sockets(self, pid: int) -> tuple[set[int], NetTable]:
        inodes = {int(link[8:-1]) for _, link in self.fds.get(pid, ())
                  if link.startswith("socket:[")}
        if not inodes:
            return inodes, NetTable()
        try:
            netns = os.readlink(f"/proc/{pid}/ns/net")
        except OSError:
            return set(), NetTable()
        if netns not in self._net:
            self._net[netns] = _read_net(pid)
        return inodes, self._net[netns]

    def connections(self, pid: int) -> list[Conn]:
        """The remote, non-loopback TCP/UDP connections among `pid`'s sockets."""
        inodes, table = self._sockets(pid)
        return [table.conns[i] for i in sorted(inodes) if i in table.conns]

    def loopback_peers(self, pid: int) -> set[int]:
        """Processes at the other end of `pid`'s loopback TCP connections (a local relay)."""
        inodes, table = self._sockets(pid)
        out = set()
        for i in inodes & table.loopback.keys():
            local, remote = table.loopback[i]
            other = table.by_ends.get((remote, local))
            if other is not None:
                out.update(p for p, _ in self.holders.get(f"socket:[{other}]", ()))
        out.discard(pid)
        return out


def _endpoint(hex_ep: str) -> tuple[ipaddress._BaseAddress, int]:
    addr, port = hex_ep.rsplit(":", 1)
    ip = ipaddress.ip_address(_addr(addr))
    return getattr(ip, "ipv4_mapped", None) or ip, int(port, 16)


def _read_net(pid: int) -> NetTable:
    """pid's namespace's connected sockets (tcp, tcp6, udp, udp6 of /proc/PID/net), and
    its bound, unconnected UDP sockets not on loopback: they reach any address ("*:0")."""
    rows = []
    unconnected: list[int] = []
    listening: set[int] = set()
    for table in NET_TABLES:
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f, None)
                for line in f:
                    cols = line.split()
                    if len(cols) < 10:
                        continue
                    local, remote = _endpoint(cols[1]), _endpoint(cols[2])
                    state, inode, tcp = int(cols[3], 16), int(cols[9]), table.startswith("tcp")
                    if tcp and state == TCP_LISTEN:
                        listening.add(local[1])
                    elif not (tcp and state == TCP_CLOSE) and remote[1] != 0:
                        rows.append((tcp, local, remote, inode))
                    elif not tcp and local[1] != 0 and not local[0].is_loopback:
                        unconnected.append(inode)     # sendto() anyone: `socat UDP-SENDTO`
        except (OSError, ValueError):
            continue
    out = NetTable()
    for tcp, local, remote, inode in rows:
        if remote[0].is_unspecified:
            continue
        if remote[0].is_loopback:
            if tcp:
                out.loopback[inode] = (local, remote)
                out.by_ends[(local, remote)] = inode
            continue
        out.conns[inode] = Conn(str(remote[0]), remote[1], tcp and local[1] in listening)
    for inode in unconnected:
        out.conns[inode] = Conn("*", 0, False)
    return out


def fifo_id(pid: int, fd: int) -> tuple[int, int] | None:
    """(st_dev, st_ino) of a pipe or fifo open at pid's fd; None for anything else."""
    try:
        st = os.stat(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISFIFO(st.st_mode) else None


def fifo_kernel_id(pid: int, fd: int) -> tuple[int, int] | None:
    """(the kernel's dev_t: the superblock's, inode) of a fifo open at pid's fd, as the
    process probe reports it (stat's st_dev is a btrfs subvolume's own); None for
    anything else."""
    from agent.sources.ident import file_id
    path = f"/proc/{pid}/fd/{fd}"
    try:
        st = os.stat(path)
    except OSError:
        return None
    return file_id(st, path, mountinfo=f"/proc/{pid}/mountinfo") if stat.S_ISFIFO(st.st_mode) \
        else None
