"""A package manager's replacement of a host binary is not a new executable; the same new
file without a package manager run (as root) since the old file's last run, written in
place, on another device, in a container, outside the package directories, or long after
the package manager, still is."""
from __future__ import annotations

import pytest

from agent.detect.anomaly import AnomalyEngine
from agent.detect.anomaly.features import Known
from agent.detect.anomaly.replaced import REPLACE_WITHIN_S, Replacements
from tests.unit.anomaly_stream import S, benign, config, ev, replay

SVC = "/system.slice/backup.service"
APT = "/system.slice/apt-daily-upgrade.service"
OLD, NEW, DPKG = "aa" * 32, "ee" * 32, "dd" * 32


def _f(path, sha, exe_id, **kw):
    return {"exe": path, "exe_sha256": sha, "exe_id": exe_id, **kw}


@pytest.mark.parametrize("case", ["upgrade", "no_package_manager", "package_manager_before",
                                  "other_device", "container", "too_late", "unknown_old",
                                  "user_path", "local_path", "in_place", "user_dpkg"])
def test_replacement_rule(case):
    r, node, prof = Replacements(64), Known(64), Known(64)
    node.exes.add("sha256:" + DPKG)
    if case != "unknown_old":
        node.exes.add("sha256:" + OLD)
        prof.exes.add("sha256:" + OLD)
    t = 100
    path = {"user_path": "/home/ops/bin/sync", "local_path": "/usr/local/bin/curl"}.get(
        case, "/usr/bin/curl")
    if case == "package_manager_before":
        r.exec(_f("/usr/bin/dpkg", DPKG, "259:2:7", uid=0), Known(64), node, t * S)
    r.exec(_f(path, OLD, "259:2:100"), prof, node, (t + 10) * S)
    if case not in ("no_package_manager", "package_manager_before"):
        uid = 1000 if case == "user_dpkg" else 0       # `dpkg -l` by a user installs nothing
        r.exec(_f("/usr/bin/dpkg", DPKG, "259:2:7", uid=uid), Known(64), node, (t + 20) * S)
    when = t + 30 + (REPLACE_WITHIN_S + 1 if case == "too_late" else 0)
    # a package writes a new file (inode) and renames it; "in_place": the old inode rewritten
    dev = {"other_device": "259:3:555", "in_place": "259:2:100"}.get(case, "259:2:555")
    kw = {"container": "c" * 64} if case == "container" else {}
    took = r.exec(_f(path, NEW, dev, **kw), prof, node, when * S)
    assert took is (case == "upgrade")
    assert (("sha256:" + NEW) in node.exes) is (case == "upgrade")
    assert (("sha256:" + NEW) in prof.exes) is (case == "upgrade")


def test_engine_takes_an_upgraded_host_binary_as_known():
    eng = AnomalyEngine(config(detectors=["mahalanobis", "beacon", "drift"]), "n")
    evs = benign(7, 0, 1800)
    for t in range(100, 1500, 600):
        evs.append(ev("proc.exec", t, "pid:1", exe="/usr/bin/curl", exe_id="259:2:100",
                      exe_sha256=OLD, cgroup=SVC))
    evs.append(ev("proc.exec", 1550, "pid:2", exe="/usr/bin/dpkg", exe_id="259:2:7",
                  exe_sha256=DPKG, cgroup=APT, uid=0))
    evs.append(ev("proc.exec", 50, "pid:2", exe="/usr/bin/dpkg", exe_id="259:2:7",
                  exe_sha256=DPKG, cgroup=APT, uid=0))
    evs.append(ev("proc.exec", 1600, "pid:3", exe="/usr/bin/curl", exe_id="259:2:555",
                  exe_sha256=NEW, cgroup=SVC))
    found = replay(eng, evs, 0, 1800)
    assert eng.status()["replaced_exes"] == 1
    assert all(NEW not in str(f.evidence.get("scope")) for _, f in found)
    assert "sha256:" + NEW in eng.profiles[SVC].known.exes
