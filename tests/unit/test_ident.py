"""What the process probe resolves on the host before it fills its kernel maps: executables
and watched files by (dev, ino), through breach.host_root when the agent runs in a
container, and the kernel's leaf-first dentry walk turned into a path."""
from __future__ import annotations

import os
from pathlib import Path

from agent.config import Breach, Config
from agent.sources import abi
import shutil
import subprocess
import sys

from agent.sources.ident import (file_id, id_text, patterns, resolve, resolve_exes, walked_path,
                                 watch_lists)


def _host(tmp_path: Path) -> Path:
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/dpkg").write_bytes(b"\x7fELF")
    (tmp_path / "usr/bin/dpkg-copy").write_bytes(b"\x7fELF")
    (tmp_path / "etc/sudoers.d").mkdir(parents=True)
    (tmp_path / "etc/shadow").write_text("root:*:1::::::\n")
    (tmp_path / "etc/sudoers.d/admins").write_text("%adm ALL=(ALL) ALL\n")
    return tmp_path


def test_host_root_resolves_the_hosts_files_under_their_host_paths(tmp_path):
    host = _host(tmp_path)
    cfg = Config(breach=Breach(host_root=str(host), package_managers=("/usr/bin/dpkg",),
                               shells=(), services=(), service_managers=(), admin_tools=(),
                               bpf_loaders=(), credential_paths=("/etc/shadow*", "/etc/sudoers*"),
                               read_paths=()))
    pats = patterns(cfg)
    r = resolve(cfg, pats)
    dpkg = file_id(os.stat(host / "usr/bin/dpkg"))
    assert r.exes == {dpkg: ("/usr/bin/dpkg", frozenset({"package_managers"}))}
    shadow = file_id(os.stat(host / "etc/shadow"))
    admins = file_id(os.stat(host / "etc/sudoers.d/admins"))
    assert r.paths[shadow] == "/etc/shadow" and r.paths[admins] == "/etc/sudoers.d/admins"
    etc, sudoers_d = file_id(os.stat(host / "etc")), file_id(os.stat(host / "etc/sudoers.d"))
    assert {(etc, "shadow", False), (etc, "sudoers", False), (sudoers_d, "", False)} <= set(r.dirs)
    assert r.dirs[(etc, "", False)].rule_id == abi.CREATIONS_ID   # creations beside them
    assert watch_lists(cfg, pats)[:2] == [["credential_paths"], ["credential_paths"]]
    # the same config seen from "/" finds none of these files
    plain = resolve(Config(breach=Breach(**{**cfg.breach.__dict__, "host_root": "/"})), pats)
    assert dpkg not in plain.exes and shadow not in plain.files


def test_kernel_dev_encoding_and_ids():
    st = os.stat("/")
    dev, ino = file_id(st)
    assert (dev >> 20, dev & 0xFFFFF, ino) == (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    assert id_text((dev, ino)) == f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}:{ino}"


def test_walked_path_is_whole_or_none():
    raw = b"shadow\0etc\0" + b"\0" * 10
    assert walked_path(raw, 11, abi.WALK_COMPLETE, abi.WALK_COMPLETE) == "/etc/shadow"
    assert walked_path(raw, 11, abi.WALK_TRUNCATED, abi.WALK_COMPLETE) is None
    assert walked_path(b"", 0, abi.WALK_COMPLETE, abi.WALK_COMPLETE) == "/"


def test_a_replaced_executable_keeps_its_identity_while_it_runs(tmp_path):
    """dpkg upgrading dpkg: the old inode stays the package manager while it runs."""
    pm = tmp_path / "pm"
    shutil.copy(os.path.realpath(sys.executable), pm)
    cfg = Config(breach=Breach(package_managers=(str(pm),), shells=(), services=(),
                               service_managers=(), admin_tools=(), bpf_loaders=(),
                               remote_access=(), debuggers=(), loaders=()))
    running = subprocess.Popen([str(pm), "-c", "import time; time.sleep(30)"])
    try:
        first = resolve(cfg, [])
        old_id = file_id(os.stat(pm))
        shutil.copy(os.path.realpath(sys.executable), tmp_path / "pm.new")
        os.rename(tmp_path / "pm.new", pm)                 # the upgrade
        new_id = file_id(os.stat(pm))
        assert new_id != old_id and set(resolve_exes(cfg)) == {new_id}
        second = resolve(cfg, [], first)
        assert set(second.exes) == {old_id, new_id}
        assert second.exes[old_id][1] == frozenset({"package_managers"})
    finally:
        running.kill()
        running.wait()
    assert set(resolve(cfg, [], second).exes) == {new_id}   # gone with its last process


def test_default_credential_paths_leave_roots_known_hosts_alone(tmp_path):
    """root's `ssh newhost` appends /root/.ssh/known_hosts: no breach. Its keys and the
    files sshd runs or reads at login are watched (inode and directory+name)."""
    from agent.breach_defaults import CREDENTIAL_PATHS
    ssh = tmp_path / "root/.ssh"
    ssh.mkdir(parents=True)
    for name in ("known_hosts", "authorized_keys", "rc", "config"):
        (ssh / name).write_text("x\n")
    cfg = Config(breach=Breach(host_root=str(tmp_path), credential_paths=CREDENTIAL_PATHS,
                               read_paths=()))
    r = resolve(cfg, patterns(cfg))
    watched = set(r.paths.values())
    assert {"/root/.ssh/authorized_keys", "/root/.ssh/rc"} <= watched
    assert "/root/.ssh/known_hosts" not in watched
    d = file_id(os.stat(ssh))
    assert (d, "", False) not in r.dirs or r.dirs[(d, "", False)].rule_id == abi.CREATIONS_ID
    assert (d, "environment", True) in r.dirs     # watched before it exists
