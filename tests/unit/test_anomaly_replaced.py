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
    r, node = Replacements(64), Known(64)
    node.exes.add("sha256:" + DPKG)
    if case != "unknown_old":
        node.exes.add("sha256:" + OLD)
    t = 100
    path = {"user_path": "/home/ops/bin/sync", "local_path": "/usr/local/bin/curl"}.get(
        case, "/usr/bin/curl")
    if case == "package_manager_before":
        r.exec(_f("/usr/bin/dpkg", DPKG, "259:2:7", uid=0), node, t * S)
    r.exec(_f(path, OLD, "259:2:100"), node, (t + 10) * S)
    if case not in ("no_package_manager", "package_manager_before"):
        uid = 1000 if case == "user_dpkg" else 0       # `dpkg -l` by a user installs nothing
        r.exec(_f("/usr/bin/dpkg", DPKG, "259:2:7", uid=uid), node, (t + 20) * S)
    when = t + 30 + (REPLACE_WITHIN_S + 1 if case == "too_late" else 0)
    # a package writes a new file (inode) and renames it; "in_place": the old inode rewritten
    dev = {"other_device": "259:3:555", "in_place": "259:2:100"}.get(case, "259:2:555")
    kw = {"container": "c" * 64} if case == "container" else {}
    took = r.exec(_f(path, NEW, dev, **kw), node, when * S)
    assert (took == "sha256:" + OLD) is (case == "upgrade")
    assert (("sha256:" + NEW) in node.exes) is (case == "upgrade")
    # kept across a restart: the history and the package manager's last run
    back = Replacements(64, r.dump())
    assert back.dump() == r.dump()


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


def test_a_file_changed_in_place_while_the_agent_was_down_is_news():
    """A root service's program under /usr/lib ran before as another file: the run of the
    changed file after a restart is no "first run" of a package's program (the path's
    history is in the engine's state), so it is news as before (newexe: news or not, and
    nothing else, decides)."""
    import json
    eng = AnomalyEngine(config(), "n")
    evs = benign(7, 0, 1800)
    for t in range(100, 1700, 60):
        evs.append(ev("proc.exec", t, "pid:1", exe="/usr/lib/acme/collect", exe_id="259:2:100",
                      exe_sha256=OLD, cgroup=SVC, uid=0))
    replay(eng, evs, 0, 1800)
    back = AnomalyEngine.restore(config(), "n",
                                 json.loads(json.dumps(eng.snapshot())), now_mono_ns=eng.now)
    later = benign(8, 1800, 2400) + [
        ev("proc.exec", 2000, "pid:1", exe="/usr/lib/acme/collect", exe_id="259:2:100",
           exe_sha256=NEW, cgroup=SVC, uid=0)]
    found = replay(back, later, 1800, 2400)
    assert [f for _, f in found if f.rule_id == "anomaly.newexe"
            and NEW in str(f.evidence.get("scope"))]
