"""The agent's work under exactly the capabilities the unit keeps (CAPABILITIES, the
unit's CapabilityBoundingSet=): both probes load and attach, another user's /proc/PID/fd,
fdinfo and exe are read, the SYN proxy's sysctl is written. Run with setpriv in the lab's
victim network namespace (nsenter: the host's /sys and tracefs, as under systemd). Each
of the last capabilities removed in turn shows what it is for: the same step fails."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.sources.capability import CAPABILITIES
from tests.integration.test_proc_probe import require_proc_probe

pytestmark = pytest.mark.privileged
REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534

SCRIPT = """
import json, os, sys
from agent.config import Config, Probes
from agent.enforce.nft import TCP_LOOSE
from agent.sources.net import NetProbe
from agent.sources.proc import ProcProbe
from agent.sources.capability import missing_capabilities

pid, tmp = int(sys.argv[1]), sys.argv[2]
out = {"missing": missing_capabilities()}
net = NetProbe(Probes(), ["v0"], {"syns": 200})
try:
    net.open()
    out["net"] = net.status()
finally:
    net.close()
proc = ProcProbe(Config(state_dir=tmp, probes=Probes(process_owners=tmp + "/owners")))
try:
    proc.open()
    out["proc"] = proc.status()
finally:
    proc.close()


def attempt(name, step):
    try:
        step()
        out[name] = "ok"
    except OSError as e:
        out[name] = e.strerror


attempt("fd", lambda: os.readlink(f"/proc/{pid}/fd/" + os.listdir(f"/proc/{pid}/fd")[0]))
attempt("fdinfo", lambda: open(f"/proc/{pid}/fdinfo/0").read())
attempt("exe", lambda: os.readlink(f"/proc/{pid}/exe"))
attempt("netns", lambda: os.stat(f"/proc/{pid}/ns/net"))


def loose():      # the value it has, written back: nothing changes
    value = open(TCP_LOOSE).read()
    with open(TCP_LOOSE, "w") as f:
        f.write(value)


attempt("tcp_loose", loose)


def fanotify():   # a permission-event group: the file policy's
    from agent.enforce.fanotify import _init
    os.close(_init())


attempt("fanotify", fanotify)
print(json.dumps(out))
"""


def run_with(lab, caps: list[str], pid: int, tmp: Path) -> dict:
    bounding = ",".join(["-all", *("+" + c.removeprefix("CAP_").lower() for c in caps)])
    cmd = ["nsenter", f"--net=/run/netns/{lab.victim}", "setpriv", f"--bounding-set={bounding}",
           "--inh-caps=-all", sys.executable, "-c", SCRIPT, str(pid), str(tmp)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture
def nobody_sleep():
    """A process of another user (sleep as nobody); killed after the test."""
    p = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                          "sleep", "60"], stdin=subprocess.DEVNULL)
    yield p.pid
    p.kill()
    p.wait()


@pytest.fixture
def conntrack(lab):
    """nf_conntrack loaded (the victim namespace then has its sysctls): a ct rule in a
    scratch table of the victim namespace, removed at once, loads it if need be."""
    subprocess.run(["ip", "netns", "exec", lab.victim, "nft",
                    "add table inet ct_probe; add chain inet ct_probe c; "
                    "add rule inet ct_probe c ct state established accept; "
                    "delete table inet ct_probe"], check=True, timeout=30)


def test_everything_works_with_exactly_the_units_capabilities(lab, nobody_sleep, conntrack,
                                                              setpriv, tmp_path):
    require_proc_probe()
    out = run_with(lab, list(CAPABILITIES), nobody_sleep, tmp_path)
    assert out["missing"] == []
    not_loaded = {k: v for k, v in {**out["net"], **out["proc"]}.items()
                  if v["state"] != "loaded"}
    # this kernel has no module:module_load tracepoint (built without modules' one)
    assert set(not_loaded) <= {"handle_module_load"}, not_loaded
    assert [out[k] for k in ("fd", "fdinfo", "exe", "netns", "tcp_loose", "fanotify")] == ["ok"] * 6


def test_without_sys_admin_no_file_policy(lab, nobody_sleep, setpriv, tmp_path):
    out = run_with(lab, [c for c in CAPABILITIES if c != "CAP_SYS_ADMIN"], nobody_sleep, tmp_path)
    assert out["missing"] == ["CAP_SYS_ADMIN"]
    assert out["fanotify"].startswith("fanotify: refused (EPERM): no CAP_SYS_ADMIN"), out


@pytest.mark.parametrize("dropped, fails", [
    ("CAP_SYS_PTRACE", ("fdinfo", "exe", "netns")),
    ("CAP_DAC_READ_SEARCH", ("fd",)),
])
def test_each_proc_capability_is_needed(lab, nobody_sleep, setpriv, tmp_path, dropped, fails):
    require_proc_probe()
    out = run_with(lab, [c for c in CAPABILITIES if c != dropped], nobody_sleep, tmp_path)
    assert out["missing"] == [dropped]
    assert {k: out[k] for k in fails} == {k: "Permission denied" for k in fails}


def test_without_perfmon_the_tracepoints_do_not_load(lab, nobody_sleep, setpriv, tmp_path):
    require_proc_probe()
    # CAP_SYS_ADMIN is the older, wider grant of the same (the kernel accepts either)
    out = run_with(lab, [c for c in CAPABILITIES if c not in ("CAP_PERFMON", "CAP_SYS_ADMIN")],
                   nobody_sleep, tmp_path)
    assert out["proc"]["handle_sched_process_exec"]["state"] != "loaded"
    assert out["net"]["handle_inet_sock_set_state"]["state"] != "loaded"
