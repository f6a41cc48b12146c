"""The file an exec runs besides its executable (issue 10 item 2, red-team R5EXEC-2/4).

The kernel's `mm->exe_file` is the interpreter of a `#!` script and the dynamic loader
when the loader is run as a program (`/lib64/ld-linux-x86-64.so.2 ./miner`): the path,
hash and location of what really runs are another file's. That file is judged too, as
`target_path`, `target_location` and `target_sha256`:
- a script: the file named by the exec's filename (what the caller passed to execve)
  when it is not the executable the kernel ran;
- the loader run as a program (its kernel-walked path's name is a loader's:
  ld-linux*.so*, ld-musl-*.so*, ld.so): the program named by its first argument that is
  not one of its options.
The name is the caller's, but it is resolved here in the process's own root and working
directory to the file behind it (a regular file only, opened O_PATH first: a FIFO or a
device is never opened for reading), and that file's identity, location and bytes are
judged, not the name. What a process could do with it: make the agent judge another
file than its interpreter reads a moment later (a rename in between) -- the same race
the interpreter itself has; and, in a container, an absolute symlink resolves against
the host's root. A copied and renamed loader is not recognised (its own exe_location
still is judged). Documented in the README.
"""
from __future__ import annotations

import ctypes
import os
import re
import stat
import threading
from typing import Any, Callable

from agent.sources import abi, execfacts

LOADER_RE = re.compile(r"^ld(?:-linux(?:-[A-Za-z0-9_-]+)?|-musl-[A-Za-z0-9_]+)?\.so(?:\.\d+)*$")
# glibc's ld.so options that take a value (ld.so --help), musl's --library-path/--preload
_LOADER_VALUE_OPTS = {"--library-path", "--inhibit-rpath", "--audit", "--preload", "--argv0",
                      "--glibc-hwcaps-prepend", "--glibc-hwcaps-mask"}
_libc = ctypes.CDLL(None, use_errno=True)


def loader_program(argv: list[str]) -> str | None:
    """The program a loader run as a program is asked to run: its first argument that is
    not an option (nor an option's value); None for --list, --verify, --help..."""
    i = 1
    while i < len(argv):
        a = argv[i]
        if a == "--":
            return argv[i + 1] if i + 1 < len(argv) else None
        if a in _LOADER_VALUE_OPTS:
            i += 2
            continue
        if a.startswith("--"):
            if a in ("--list", "--verify", "--help", "--version", "--list-tunables",
                     "--list-diagnostics"):
                return None
            i += 1
            continue
        return a
    return None


def is_loader(exe_path: str | None) -> bool:
    return bool(exe_path) and bool(LOADER_RE.match(os.path.basename(exe_path)))


def _magic(fd: int) -> int:
    buf = ctypes.create_string_buffer(128)     # struct statfs; f_type is its first long
    if _libc.fstatfs(fd, buf) != 0:
        return 0
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


_FD_NAME = re.compile(r"^/(?:dev/fd|proc/self/fd|proc/thread-self/fd)/(\d+)(/.*)?$")
TARGET_TIMEOUT_S = 0.1      # how long the loop waits for a target to be opened and read
MAX_STUCK = 4               # looks still hanging (a workload's FUSE daemon holding them)
_stuck = 0                  # ... now; past MAX_STUCK no target is looked at (unjudged)
_stuck_lock = threading.Lock()


def stuck() -> int:
    """Looks at targets still hanging (status says degraded past MAX_STUCK)."""
    with _stuck_lock:
        return _stuck


def _bounded(fn: Callable[[], dict]) -> dict | None:
    """fn() in a daemon thread, waited for TARGET_TIMEOUT_S: a file on a workload's own
    FUSE mount (or a hung network filesystem) can hold its open or read for ever, and the
    event loop must not wait with it. None when it did not finish in time (or too many
    earlier ones still hang)."""
    global _stuck
    with _stuck_lock:
        if _stuck >= MAX_STUCK:
            return None
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        global _stuck
        try:
            box["v"] = fn()
        except Exception:       # noqa: BLE001 -- a look that failed judges nothing
            box["v"] = {}
        finally:
            done.set()
            with _stuck_lock:
                if box.get("late"):
                    _stuck -= 1

    threading.Thread(target=run, name="exec-target", daemon=True).start()
    if done.wait(TARGET_TIMEOUT_S):
        return box.get("v")
    with _stuck_lock:
        if not done.is_set():
            box["late"] = True
            _stuck += 1
            return None
    return box.get("v")


def _open(pid: int, name: str, proc: str) -> int | None:
    """An O_RDONLY fd on the regular file `name` means in process `pid` (its root and
    working directory; /dev/fd/N and /proc/self/fd/N are its fd N), None if none."""
    m = _FD_NAME.match(name)
    if m:
        where = f"{proc}/{pid}/fd/{m.group(1)}" + (m.group(2) or "")
    elif name.startswith("/"):
        where = os.path.join(f"{proc}/{pid}/root", name.lstrip("/"))
    else:
        where = os.path.join(f"{proc}/{pid}/cwd", name)
    try:
        path_fd = os.open(where, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(path_fd).st_mode):
            return None
        return os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    finally:
        os.close(path_fd)


def target_fields(pid: int, exe_id: tuple[int, int], exe_path: str | None, filename: str,
                  argv: list[str], tmp_devs: frozenset[int], shm_devs: frozenset[int],
                  hasher: execfacts.ExeHasher | None, proc: str = "/proc",
                  loader: bool = False, truncated: bool = False) -> dict:
    """{"target_path", "target_location", "target_sha256"...} when the exec runs a file
    other than its executable (module docstring), else {}. `loader`: the executable is
    one of the config's loaders (by inode)."""
    as_loader = loader or is_loader(exe_path)
    if truncated and not as_loader:
        # the kernel's copy of the name was cut: what it names cannot be looked at
        return {"target_path": None, "target_location": "unresolved"}
    if not as_loader and filename not in argv[1:3]:
        # the kernel hands a #! script's name to its interpreter as its first argument
        # (after the #! line's one option): anything else is the interpreter run itself
        return {}
    name = loader_program(argv) if as_loader else filename
    if not name:
        return {}
    if truncated and name == filename:
        # the kernel's copy of the name was cut: what it names cannot be looked at
        return {"target_path": None, "target_location": "unresolved"}
    got = _bounded(lambda: _look(pid, name, exe_id, tmp_devs, shm_devs, hasher, proc))
    if got is None:     # not judged (no rule reads "unjudged": a stall is no evidence)
        return {"target_path": None, "target_location": "unjudged"}
    return got


def _look(pid: int, name: str, exe_id: tuple[int, int], tmp_devs: frozenset[int],
          shm_devs: frozenset[int], hasher: execfacts.ExeHasher | None, proc: str) -> dict:
    fd = _open(pid, name, proc)
    if fd is None:
        return {}
    try:
        st = os.fstat(fd)
        if st.st_ino == exe_id[1]:
            return {}                       # the executable itself: an ordinary exec
        dev = execfacts.kernel_dev(st.st_dev)
        nature = abi.EXE_UNLINKED if st.st_nlink == 0 else 0
        m = _FD_NAME.match(name)
        if m:       # the file behind its fd, as the process's namespace names it
            path = os.path.normpath(os.readlink(f"{proc}/{pid}/fd/{m.group(1)}") + (m.group(2) or ""))
        else:
            path = os.path.normpath(name if name.startswith("/") else
                                    os.path.join(os.readlink(f"{proc}/{pid}/cwd"), name))
        out = {"target_path": path,
               "target_location": execfacts.location(path, nature, dev, tmp_devs, shm_devs,
                                                     _magic(fd))}
        if hasher is not None:
            out["target_sha256"], out["target_sha256_state"] = hasher.digest_fd(fd, dev, st)
        return out
    except OSError:
        return {}
    finally:
        os.close(fd)
