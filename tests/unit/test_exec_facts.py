"""The exec policy's facts (agent/sources/execfacts.py), what the rules need of the probe
(agent/detect/execpolicy.py) and its config keys."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import Config, ConfigError, Policy, validate
from agent.detect.execpolicy import needs
from agent.detect.rules import Detector, load_rules
from agent.sources import abi
from agent.sources.execfacts import ExeHasher, location, own_mount_devs

TMP_DEV, SHM_DEV, ROOT_DEV = 41, 42, 8 << 20 | 1


@pytest.mark.parametrize("walked,nature,dev,expected", [
    ("/memfd:payload", abi.EXE_MEMFD | abi.EXE_UNLINKED, 5, "memfd"),
    ("/tmp/x", abi.EXE_UNLINKED, ROOT_DEV, "deleted"),     # unlinked wins over the path
    ("/tmp/x", 0, ROOT_DEV, "tmp"),
    ("/var/tmp/a/b", 0, ROOT_DEV, "tmp"),
    ("/dev/shm/x", 0, SHM_DEV, "shm"),
    ("/opt/bind-of-tmp/x", 0, TMP_DEV, "tmp"),              # a bind mount of /tmp elsewhere
    ("/srv/bind-of-shm/x", 0, SHM_DEV, "shm"),
    ("/tmpfoo/x", 0, ROOT_DEV, ""),                         # not below /tmp
    ("/usr/bin/true", 0, ROOT_DEV, ""),
    (None, 0, ROOT_DEV, ""),                                # a truncated walk: no path
])
def test_location_from_the_kernels_facts(walked, nature, dev, expected):
    assert location(walked, nature, dev, frozenset({TMP_DEV}), frozenset({SHM_DEV})) == expected


def test_own_mount_devs_skips_directories_on_the_root_filesystem(tmp_path):
    (tmp_path / "d").mkdir()
    assert own_mount_devs(("/d", "/missing"), str(tmp_path)) == frozenset()


def _self_exe() -> tuple[tuple[int, int], bytes]:
    st = os.stat("/proc/self/exe")
    return ((os.major(st.st_dev) << 20) | os.minor(st.st_dev), st.st_ino), \
        Path(os.path.realpath(sys.executable)).read_bytes()


def test_hash_of_the_file_a_process_runs_is_cached_by_inode():
    exe, data = _self_exe()
    h = ExeHasher(max_bytes=len(data) + 1, entries=2)
    assert h.digest(os.getpid(), exe) == (hashlib.sha256(data).hexdigest(), "ok")
    assert h.digest(os.getpid(), exe)[1] == "ok" and h.hashed == 1      # cached


def test_hash_outcomes_when_it_cannot_or_must_not_read():
    exe, data = _self_exe()
    assert ExeHasher(max_bytes=len(data) - 1).digest(os.getpid(), exe) == (None, "too_large")
    assert ExeHasher(1 << 30).digest(os.getpid(), (exe[0], exe[1] + 1)) == (None, "changed")
    assert ExeHasher(1 << 30).digest(2 ** 22 + 7, exe) == (None, "gone")


def test_hash_cache_is_bounded():
    exe, _ = _self_exe()
    other = subprocess.Popen(["sleep", "30"])
    try:
        st = os.stat(f"/proc/{other.pid}/exe")
        h = ExeHasher(1 << 30, entries=1)
        h.digest(os.getpid(), exe)
        h.digest(other.pid, ((os.major(st.st_dev) << 20) | os.minor(st.st_dev), st.st_ino))
        assert len(h._cache) == 1
        h.digest(os.getpid(), exe)            # evicted by the other file: read again
        assert h.hashed == 3
    finally:
        other.kill()
        other.wait()


def test_the_kernel_filter_is_on_only_while_a_rule_can_fire():
    rules = load_rules()
    empty = Detector(rules, validate(Config(policy=Policy(exec_workload_cgroups=()))))
    # the default deny lists are empty, no workload cgroups: nothing needs every exec
    assert empty.exec_needs.every_exec is False and empty.exec_needs.hash_exes is False
    default = Detector(rules, validate(Config()))
    assert default.exec_needs.every_exec is True and default.exec_needs.hash_exes is False
    # the writable location rule alone: the kernel's prefilter, not every exec
    assert default.exec_needs.writable_only is True
    denying = Detector(rules, validate(Config(policy=Policy(exec_denied_users=(7,)))))
    assert denying.exec_needs.every_exec and not denying.exec_needs.writable_only
    hashing = Detector(rules, validate(Config(policy=Policy(exec_denied_sha256=("a" * 64,)))))
    assert hashing.exec_needs.every_exec and hashing.exec_needs.hash_exes
    network_only = [r for r in rules if not r.id.startswith("policy.")]
    assert needs(network_only, {}).every_exec is False


@pytest.mark.parametrize("policy,sentence", [
    (Policy(exec_denied_sha256=("ABC",)), "is not a SHA-256"),
    (Policy(exec_denied_paths=("usr/bin/nc",)), "is not an absolute path"),
    (Policy(exec_denied_containers=("xyz",)), "is not a container id"),
    (Policy(exec_workload_cgroups=("/",)), "below the root"),
    (Policy(exec_writable_action="nuke"), "exec_writable_action must be one of"),
    (Policy(exec_writable_action="freeze", exec_workload_cgroups=("/system.slice",)),
     "covers /system.slice, the host's own services"),
])
def test_bad_exec_policy_values_are_one_sentence(policy, sentence):
    with pytest.raises(ConfigError, match=sentence):
        validate(Config(policy=policy))


def test_rules_extra_is_loaded_after_the_packaged_rules_when_present(tmp_path):
    cfg = Config(rules_extra=str(tmp_path / "missing"))
    assert cfg.rule_paths == [cfg.rules_path]            # a missing directory: none
    (tmp_path / "empty").mkdir()
    assert Config(rules_extra=str(tmp_path / "empty")).rule_paths == [cfg.rules_path]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.yaml").write_text("rules: []\n")
    assert Config(rules_extra=str(tmp_path / "d")).rule_paths == [cfg.rules_path,
                                                                   tmp_path / "d"]
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="is not a directory"):
        validate(Config(rules_extra=str(tmp_path / "f")))


def test_policy_execs_take_the_urgent_lane_only_while_a_deny_list_is_filled():
    from agent.detect import triage
    from agent.model import Event
    fields = {"pid": 7, "uid": 1000, "euid": 1000, "cgroup": "/kubepods.slice/p/c",
              "exe_known": True, "exe_path": "/opt/x/miner", "reason": ["policy"]}
    ev = Event("proc.exec", "pid:7", 1, 1, fields)
    rules = load_rules()
    assert not triage.urgent(Detector(rules, validate(Config())), ev)
    denying = Detector(rules, validate(Config(policy=Policy(exec_denied_paths=("/opt/x/*",)))))
    assert denying.exec_needs.severe and triage.urgent(denying, ev)
    other = Event("proc.exec", "pid:7", 1, 1, {**fields, "exe_path": "/usr/bin/true"})
    assert not triage.urgent(denying, other)
