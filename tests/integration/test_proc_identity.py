"""Identities a process cannot forge, against the real kernel: proc.bpf.o loaded once for
the module, real processes doing what an attacker would. Files are watched by inode, so
every spelling of a watched file's path is seen; executables are judged by inode, so a
renamed process or a copied binary is no package manager, admin tool or system shell;
a shell behind a double fork is still in its service's cgroup. Watched files are scratch
files under /tmp that the config names (never the host's /etc/shadow)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from swarmlab.breachlab import throwaway_cgroup
from agent.config import Breach, Config, Probes
from agent.detect.rules import Detector, load_rules
from agent.sources.proc import ProcProbe
from tests.conftest import skip_unsupported
from tests.integration.test_proc_probe import loaded_probe

pytestmark = pytest.mark.privileged
PY = os.path.realpath(sys.executable)
CG_PREFIX = "swa-ident"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Scratch credentials: etc/ (shadow exact, passwd* prefix), a root for useradd
    --root, a dpkg admin dir; a service executable (a copy of python) and a copied shell."""
    d = tmp_path_factory.mktemp("ident")
    (d / "etc").mkdir()
    (d / "etc/shadow").write_text("root:*:1::::::\n")
    (d / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    ua = d / "uaroot/etc"
    ua.mkdir(parents=True)
    for name, line in (("passwd", "root:x:0:0:root:/root:/bin/sh"), ("group", "root:x:0:"),
                       ("shadow", "root:*:1::::::"), ("gshadow", "root:*::")):
        (ua / name).write_text(line + "\n")
    for sub in ("dpkgdb/updates", "dpkgdb/info"):
        (d / sub).mkdir(parents=True)
    (d / "dpkgdb/status").write_text("")
    (d / "bin").mkdir()
    shutil.copy(PY, d / "bin/svc")                          # the service's executable
    shutil.copy(os.path.realpath("/bin/sh"), d / "bin/kworker")   # a shell, renamed
    shutil.copy(PY, d / "bin/dpkg")                         # python named dpkg
    shutil.copy(PY, d / "bin/mgr")                          # a service manager
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def cfg(root: Path) -> Config:
    creds = (f"{root}/etc/shadow", f"{root}/etc/passwd*", f"{root}/dpkgdb/",
             *(f"{root}/uaroot/etc/{n}*" for n in ("passwd", "group", "shadow", "gshadow")))
    return Config(state_dir=str(root / "state"), breach=Breach(
        services=(f"{root}/bin/svc",), service_cgroups=(f"/{CG_PREFIX}-*",),
        service_managers=(f"{root}/bin/mgr",),
        credential_paths=creds, read_paths=()),
        probes=Probes(process_owners=str(root / "owners")))   # not the host's registrations


@pytest.fixture(scope="module")
def probe(cfg: Config):
    yield from loaded_probe(cfg)


@pytest.fixture(scope="module")
def detector(cfg: Config) -> Detector:
    return Detector(load_rules(), cfg)


_SEEN: list = []


def events_of(probe: ProcProbe, pid: int, kind: str, count: int = 1, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while True:
        _SEEN.extend(probe.poll())
        found = [e for e in _SEEN if e.kind == kind and e.fields["pid"] == pid]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def fired(detector: Detector, events) -> set[str]:
    return {f.rule for e in events for f in detector.evaluate(e, e.mono_ns)}


def run(*argv: str, **kw) -> int:
    """Runs a child to completion; its pid."""
    child = subprocess.Popen(list(argv), **kw)
    assert child.wait(timeout=30) == 0
    return child.pid


# --- files by identity, not by spelling ---------------------------------------------------

OPENAT2 = """
import ctypes, os, sys
how = (ctypes.c_uint64 * 3)(os.O_WRONLY, 0, 0)          # struct open_how
fd = ctypes.CDLL(None, use_errno=True).syscall(437, -100, sys.argv[1].encode(), how, 24)
sys.exit(0 if fd >= 0 else 10 + ctypes.get_errno())
"""
DIRFD = """
import os, sys
d = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
os.close(os.open(sys.argv[2], os.O_WRONLY, dir_fd=d))
"""
WRITE = "import sys; open(sys.argv[1], 'a').close()"
BY_HANDLE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
class Handle(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_uint), ("type", ctypes.c_int), ("h", ctypes.c_ubyte * 128)]
h, mount_id = Handle(bytes=128), ctypes.c_int()
assert libc.name_to_handle_at(-100, sys.argv[1].encode(), ctypes.byref(h),
                              ctypes.byref(mount_id), 0) == 0, ctypes.get_errno()
mnt = os.open(os.path.dirname(sys.argv[1]), os.O_RDONLY | os.O_DIRECTORY)
fd = libc.open_by_handle_at(mnt, ctypes.byref(h), os.O_WRONLY | os.O_APPEND)
sys.exit(0 if fd >= 0 else 10 + ctypes.get_errno())
"""


def spellings(root: Path) -> dict[str, tuple[list[str], dict]]:
    etc = root / "etc"
    link = root / "link"
    if not link.exists():
        link.symlink_to(etc / "shadow")
    hard = root / "hard"
    if not hard.exists():
        os.link(etc / "shadow", hard)
    return {
        "relative": ([PY, "-c", WRITE, "shadow"], {"cwd": etc}),
        "dotdot": ([PY, "-c", WRITE, "../etc/shadow"], {"cwd": root / "bin"}),
        "dirfd": ([PY, "-c", DIRFD, str(etc), "shadow"], {}),
        "slashes": ([PY, "-c", WRITE, f"/{root}//etc//shadow"], {}),
        "dot": ([PY, "-c", WRITE, f"{etc}/./shadow"], {}),
        "symlink": ([PY, "-c", WRITE, str(link)], {}),
        "hardlink": ([PY, "-c", WRITE, str(hard)], {}),
        "openat2": ([PY, "-c", OPENAT2, str(etc / "shadow")], {}),
        # no path at all: a file handle (root; CAP_DAC_READ_SEARCH)
        "by_handle": ([PY, "-c", BY_HANDLE, str(etc / "shadow")], {}),
    }


@pytest.mark.parametrize("spelling", ["relative", "dotdot", "dirfd", "slashes", "dot", "symlink",
                                      "hardlink", "openat2", "by_handle"])
def test_every_spelling_of_a_watched_file_is_seen(probe, detector, root, spelling):
    argv, kw = spellings(root)[spelling]
    pid = run(*argv, **kw)
    [ev] = events_of(probe, pid, "file.open")
    f = ev.fields
    st = os.stat(root / "etc/shadow")
    assert f["file_id"] == f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}:{st.st_ino}"
    # the kernel's path of the dentry opened: a hard link is its own name for the inode
    want = root / ("hard" if spelling == "hardlink" else "etc/shadow")
    if spelling == "by_handle":     # no name given: any of the inode's names
        want = Path(f["path"]) if f["path"] in (str(root / "hard"), str(want)) else want
    assert (ev.subject, f["path"], f["write"]) == (str(want), str(want), True)
    assert f["match"] == "file"        # its inode is watched: first lookup
    assert f["exe"] == PY and f["exe_is"] == ["shells"]
    assert fired(detector, [ev]) == {"breach.credential_write@2"}


def test_new_file_in_a_watched_directory_and_prefix(probe, detector, root):
    """A file created under a watched prefix (passwd+: useradd's temp file) by directory
    inode and name; a read-only open of a write-only watch is not sent."""
    pid = run(PY, "-c", WRITE + "; open(sys.argv[2]).close()", "passwd+", "passwd", cwd=root / "etc")
    [ev] = events_of(probe, pid, "file.open", timeout_s=2)
    assert (ev.fields["path"], ev.fields["match"], ev.fields["created"]) == \
        (str(root / "etc/passwd+"), "dir", True)
    assert fired(detector, [ev]) == {"breach.credential_write@2"}


def test_rename_over_a_watched_file_is_attributed(probe, detector, root):
    """sed -i writes a temporary file beside the watched one and renames it over: the
    kernel reports the creation (a directory holding watched files), the next refresh
    finds the watched file's new inode and attributes the replacement to sed."""
    target, sed = root / "etc/passwd", shutil.which("sed") or "/usr/bin/sed"
    probe.refresh()
    pid = run(sed, "-i", "s/root/root/", str(target))
    [tmp] = events_of(probe, pid, "file.open")
    assert tmp.fields["created"] and tmp.fields["pattern"] is None
    assert tmp.fields["watch_lists"] == [] and fired(detector, [tmp]) == set()
    [ev] = probe.refresh()
    f = ev.fields
    assert (ev.subject, f["match"], f["replaced"], f["pid"]) == (str(target), "rename", True, pid)
    assert f["exe"] == os.path.realpath(sed)
    assert fired(detector, [ev]) == {"breach.credential_write@2"}
    assert probe.refresh() == []
    # moved in from a directory that is not watched: no writer known, still a breach
    (root / "elsewhere").write_text("root:x:0:0::/root:/bin/sh\n")
    os.rename(root / "elsewhere", target)
    [ev] = probe.refresh()
    assert ev.fields["replaced"] and "pid" not in ev.fields
    assert fired(detector, [ev]) == {"breach.credential_write@2"}
    # a new watched name moved in, and a temporary file renamed to a new watched name
    (root / "elsewhere").write_text("x\n")
    os.rename(root / "elsewhere", root / "etc/passwd.new")
    pid = run(PY, "-c", "import os; open('tmpfile', 'w').close(); os.rename('tmpfile', 'passwd.py')",
              cwd=root / "etc")
    events_of(probe, pid, "file.open")
    evs = {e.subject: e for e in probe.refresh()}
    assert set(evs) == {str(root / "etc/passwd.new"), str(root / "etc/passwd.py")}
    assert "pid" not in evs[str(root / "etc/passwd.new")].fields
    assert evs[str(root / "etc/passwd.py")].fields["pid"] == pid
    assert fired(detector, evs.values()) == {"breach.credential_write@2"}


# --- executables by identity --------------------------------------------------------------

def test_renamed_dpkg_and_python_named_dpkg_are_no_package_manager(probe, detector, root):
    rename = "import ctypes, sys; ctypes.CDLL(None).prctl(15, b'dpkg', 0, 0, 0); " + WRITE
    renamed = run(PY, "-c", rename, str(root / "etc/shadow"))
    copy = run(str(root / "bin/dpkg"), "-c", WRITE, str(root / "etc/shadow"))
    [a] = events_of(probe, renamed, "file.open")
    [b] = events_of(probe, copy, "file.open")
    assert (a.fields["comm"], a.fields["exe_is"]) == ("dpkg", ["shells"])
    assert (b.fields["comm"], b.fields["exe"], b.fields["exe_is"]) == \
        ("dpkg", str(root / "bin/dpkg"), [])
    assert fired(detector, [a]) == fired(detector, [b]) == {"breach.credential_write@2"}


def test_the_real_dpkg_is_a_package_manager(probe, detector, root):
    dpkg = shutil.which("dpkg")
    if dpkg is None:
        skip_unsupported("no dpkg on this host")
    pid = run(dpkg, f"--admindir={root}/dpkgdb", "--clear-avail")
    evs = events_of(probe, pid, "file.open", count=3, timeout_s=3)
    [start] = events_of(probe, pid, "proc.exec")          # a package manager: sent, and
    assert "package_manager" in start.fields["reason"]    # its exit brings a refresh soon
    assert events_of(probe, pid, "proc.exit") and probe._refresh_due < time.monotonic() + 1
    assert {e.fields["path"] for e in evs} >= {f"{root}/dpkgdb/available-new"}
    assert all(e.fields["exe_is"] == ["package_managers"] for e in evs)
    assert fired(detector, evs) == set()
    # a copy of dpkg itself is another inode: a breach
    shutil.copy(os.path.realpath(dpkg), root / "bin/dpkg-copy")
    pid = run(str(root / "bin/dpkg-copy"), f"--admindir={root}/dpkgdb", "--clear-avail")
    evs = events_of(probe, pid, "file.open", count=3, timeout_s=3)
    assert evs and fired(detector, evs) == {"breach.credential_write@2"}


def test_root_useradd_is_administration_and_its_copy_a_breach(probe, detector, root):
    """The host's /usr/sbin/useradd (by inode) adding a user under a scratch root, then
    userdel removing it: no breach. The same useradd copied elsewhere: a breach."""
    useradd, userdel = shutil.which("useradd"), shutil.which("userdel")
    if not useradd or not userdel or useradd not in (*Breach().admin_tools,):
        skip_unsupported("no useradd/userdel at their standard paths here")
    ua = root / "uaroot"
    pids = [run(useradd, "--root", str(ua), "scratchu"), run(userdel, "--root", str(ua), "scratchu")]
    evs = [e for pid in pids for e in events_of(probe, pid, "file.open", count=4, timeout_s=3)]
    assert {"passwd+", "shadow+"} <= {Path(e.fields["path"]).name for e in evs}
    assert all(e.fields["exe_is"] == ["admin_tools"] for e in evs)
    assert fired(detector, evs) == set()
    # useradd replaced shadow by rename: after a refresh the new inode is watched
    assert probe.refresh() == []       # shadow+ was judged when created: no replacement
    st = os.stat(ua / "etc/shadow")
    assert any(k[1] == st.st_ino for k in probe.resolved.files)
    shutil.copy(useradd, root / "bin/useradd")
    pid = run(str(root / "bin/useradd"), "--root", str(ua), "scratchv")
    evs = events_of(probe, pid, "file.open", count=4, timeout_s=3)
    assert evs and fired(detector, evs) == {"breach.credential_write@2"}


# --- service shells ------------------------------------------------------------------------

COPIED = "import subprocess, sys; subprocess.run([sys.argv[1], '-c', 'exit 0'], check=True)"
DOUBLE_FORK = """
import os, time
if os.fork() == 0:
    mid = os.getpid()
    if os.fork() == 0:
        while os.getppid() == mid:     # wait to be reparented (to init or a subreaper)
            time.sleep(0.01)
        os.execv("/bin/sh", ["sh", "-c", "exit 0"])
    os._exit(0)
os.wait()
time.sleep(0.5)
"""


def execs_where(probe: ProcProbe, pred, timeout_s: float = 10.0) -> list:
    deadline = time.monotonic() + timeout_s
    while True:
        _SEEN.extend(probe.poll())
        found = [e for e in _SEEN if e.kind == "proc.exec" and pred(e.fields)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def test_copied_shell_below_a_service(probe, detector, root):
    svc = subprocess.Popen([str(root / "bin/svc"), "-c", COPIED, str(root / "bin/kworker")])
    assert svc.wait(timeout=30) == 0
    [ev] = execs_where(probe, lambda f: f["ppid"] == svc.pid)
    f = ev.fields
    assert (f["exe"], f["exe_is"], f["parent_is"]) == (str(root / "bin/kworker"), [], ["services"])
    assert "service_child" in f["reason"]
    assert fired(detector, [ev]) == {"breach.service_shell@2"}


# An unprivileged user namespace may bind its own directory over /usr/local/bin: the
# kernel's dentry walk stops at that mount namespace's root and names the copied shell
# /usr/local/bin/kworker, a system path. The host's file at that path is not it.
MOUNTED = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
pid = os.fork()
if pid == 0:
    os.setgid(65534)
    os.setuid(65534)
    assert libc.unshare(0x10000000 | 0x00020000) == 0, ctypes.get_errno()  # NEWUSER|NEWNS
    assert libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None) == 0     # MS_REC|PRIVATE
    assert libc.mount(sys.argv[1].encode(), b"/usr/local/bin", None, 0x1000 | 0x4000,
                      None) == 0, ctypes.get_errno()                     # MS_BIND|MS_REC
    os.execv("/usr/local/bin/kworker", ["kworker", "-c", "exit 0"])
sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def test_copied_shell_below_a_service_behind_a_private_mount(probe, detector, root):
    drop = Path(tempfile.mkdtemp(prefix="swa-drop-"))     # nobody can reach it to bind it
    try:
        drop.chmod(0o755)
        shutil.copy(root / "bin/kworker", drop / "kworker")
        svc = subprocess.Popen([str(root / "bin/svc"), "-c", MOUNTED, str(drop)])
        assert svc.wait(timeout=30) == 0
    finally:
        shutil.rmtree(drop, ignore_errors=True)
    [ev] = execs_where(probe, lambda f: f["argv"] == ["kworker", "-c", "exit 0"])
    f = ev.fields
    assert (f["exe"], f["exe_claimed"], f["uid"]) == (None, "/usr/local/bin/kworker", 65534)
    assert f["exe_is"] == [] and "services" in f["ancestors_are"]
    assert fired(detector, [ev]) == {"breach.service_shell@2"}


def test_shell_behind_a_double_fork_in_a_service_cgroup(probe, detector, root):
    with throwaway_cgroup(CG_PREFIX) as cg:
        probe.refresh()                 # the agent's timer: configured cgroups resolved
        script = f'echo $$ > "{cg}/cgroup.procs" && exec "$@"'
        svc = subprocess.Popen(["sh", "-c", script, "sh", str(root / "bin/svc"), "-c",
                                DOUBLE_FORK])
        assert svc.wait(timeout=30) == 0
        name = "/" + cg.name
        evs = execs_where(probe, lambda f: f["argv"] == ["sh", "-c", "exit 0"]
                          and f["cgroup"] == name)
    [ev] = evs
    f = ev.fields
    assert f["service_cgroup"] and f["reparented"] and "services" not in f["ancestors_are"]
    assert "service_cgroup" in f["reason"] and f["ppid"] != svc.pid
    assert fired(detector, [ev]) == {"breach.service_shell@2"}


MANAGER = """
import os, sys
cg, svc, code = sys.argv[1:4]
pid = os.fork()
if pid == 0:
    with open(cg + "/cgroup.procs", "w") as f:
        f.write(str(os.getpid()))
    os.execv(svc, [svc, "-c", code])
sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


@pytest.mark.parametrize("manager", [True, False])
def test_a_service_managers_start_marks_the_cgroup(probe, detector, root, manager):
    """Not configured: the cgroup is a service's because the kernel saw a service manager
    (by inode) start a service executable in it; started by anything else it is not."""
    starter = str(root / "bin/mgr") if manager else PY
    with throwaway_cgroup("swa-unconf") as cg:
        mgr = subprocess.Popen([starter, "-c", MANAGER, str(cg), str(root / "bin/svc"),
                                DOUBLE_FORK])
        assert mgr.wait(timeout=30) == 0
        evs = execs_where(probe, lambda f: f["argv"] == ["sh", "-c", "exit 0"]
                          and f["cgroup"] == "/" + cg.name)
    [ev] = evs                      # a shell: always sent
    assert ev.fields["service_cgroup"] is manager and not ev.fields["manager_start"]
    assert "services" not in ev.fields["ancestors_are"]
    assert fired(detector, [ev]) == ({"breach.service_shell@2"} if manager else set())


def btrfs_image(tmp_path: Path) -> Iterator[Path]:
    """A btrfs filesystem on a loop device (its mount point), with a subvolume `sub`:
    stat(2)'s st_dev there is the subvolume's anonymous device, not the superblock's
    dev_t the kernel reports. Unmounted afterwards."""
    if shutil.which("mkfs.btrfs") is None or shutil.which("btrfs") is None:
        skip_unsupported("no btrfs-progs (mkfs.btrfs)")
    img, mnt = tmp_path / "btrfs.img", tmp_path / "btrfs"
    with open(img, "wb") as f:
        f.truncate(128 << 20)
    mnt.mkdir()
    subprocess.run(["mkfs.btrfs", "-q", str(img)], check=True, capture_output=True)
    if subprocess.run(["mount", "-o", "loop", str(img), str(mnt)]).returncode:
        skip_unsupported("cannot mount a btrfs loop image here")
    try:
        subprocess.run(["btrfs", "subvolume", "create", str(mnt / "sub")], check=True,
                       capture_output=True)
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.fixture
def btrfs(tmp_path):
    yield from btrfs_image(tmp_path)


def test_watched_file_and_shell_on_btrfs(btrfs, tmp_path):
    etc = btrfs / "sub/etc"
    etc.mkdir()
    (etc / "shadow").write_text("root:*:1::::::\n")
    shutil.copy(os.path.realpath("/bin/sh"), btrfs / "sub/sh")
    cfg = Config(state_dir=str(tmp_path / "state"), breach=Breach(
        shells=(str(btrfs / "sub/sh"),), credential_paths=(str(etc / "shadow"),),
        read_paths=()), probes=Probes(process_owners=str(tmp_path / "owners")))
    p = ProcProbe(cfg)
    p.open()
    try:
        pid = run(str(btrfs / "sub/sh"), "-c", f"echo x >> {etc}/shadow")
        [ev] = events_of(p, pid, "file.open")
        assert ev.fields["path"] == str(etc / "shadow") and ev.fields["exe_is"] == ["shells"]
        assert fired(Detector(load_rules(), cfg), [ev]) == {"breach.credential_write@2"}
    finally:
        p.close()


def test_watched_directory_moved_away_and_made_again(tmp_path):
    """`mv sudoers.d old; mkdir sudoers.d; echo ... > sudoers.d/x`: the new directory is
    not watched yet when x is written; the next refresh finds x in a directory that was
    watched under that path, and judges it a write by an unknown writer."""
    etc = tmp_path / "etc"
    (etc / "sudoers.d").mkdir(parents=True)
    (etc / "sudoers.d/README").write_text("#\n")
    cfg = Config(state_dir=str(tmp_path / "state"),
                 breach=Breach(credential_paths=(f"{etc}/sudoers*",), read_paths=()),
                 probes=Probes(process_owners=str(tmp_path / "owners")))  # not the host's
    p = ProcProbe(cfg)
    p.open()
    try:
        run("sh", "-c", 'mv "$0/sudoers.d" "$0/old" && mkdir "$0/sudoers.d" && '
            'echo "evil ALL=(ALL) NOPASSWD:ALL" > "$0/sudoers.d/evil"', str(etc))
        [ev] = p.refresh()
        f = ev.fields
        assert (ev.subject, f["match"], f["replaced"]) == (str(etc / "sudoers.d/evil"), "rename", True)
        assert fired(Detector(load_rules(), cfg), [ev]) == {"breach.credential_write@2"}
        assert p.refresh() == []
    finally:
        p.close()
