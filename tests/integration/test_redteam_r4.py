"""Red-team round 4 on issue 10 (egress policy, GPU authorization, rules reload): each test
fails on the code as it was attacked and passes once the finding is fixed. Real kernel
objects throughout: cgroup v2 groups, network namespaces, nftables, processes.

R4-1  GPU authorization judged from a cgroup namespace (the shipped DaemonSet: not
      privileged, so containerd's CRI (like Docker and Podman) gives it its own cgroup namespace on a
      cgroup v2 node): every authorized job reads as "/../..." and is a violation.
R4-2  Egress policy off between the two transactions of every table (re)creation (agent
      start or restart, reconcile after drift): a workload hammering the metadata
      address gets packets out.
R4-3  The default `metadata` rule names /machine.slice (libvirt, nspawn, podman) but none
      of their bridges: a VM or a bridged podman container reaches 169.254.169.254.
R4-6  A GPU device opened through io_uring (IORING_OP_OPENAT) is no gpu.open: an
      unauthorized workload gets its device files, and a context, unseen by the kernel side.
R4-7  A container on a macvlan network (Docker's macvlan driver, Multus macvlan/ipvlan in
      GPU clusters) sends from its own namespace straight out of the host's uplink: no
      hook of the host's nftables sees it, and it reaches 169.254.169.254.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.config import Config
from agent.enforce.egress import Scope
from agent.enforce.nft import NftEnforcer
from agent.policyconfig import METADATA_V4, EgressRule, Policy
from swarmlab.breachlab import throwaway_cgroup
from swarmlab.lab import netns, sh, spawn_in, wait_for
from tests.integration.nftlab import connect, listener
from tests.integration.test_egress_policy import METADATA, PORT, arrived, cgroup_path, metadata_service
from tests.integration.test_gpu_authorization import (  # noqa: F401 (fixtures)
    incidents_of, lib, path_of, script, start_agent, workloads)

pytestmark = pytest.mark.privileged
REPO = Path(__file__).resolve().parents[2]

# -- R4-1 -------------------------------------------------------------------------------------

_JUDGE_FROM_NAMESPACE = r"""
import json, sys
from agent.gpugrant import GpuPolicy, Grant
from agent.sources import gpuproc
pid, granted = int(sys.argv[1]), sys.argv[2]
rec = gpuproc.identify(pid)
policy = GpuPolicy(grants=(Grant(granted, "all"),))
print(json.dumps({"record": rec, "verdict": policy.verdict(
    {**rec, "gpu_uuid": "GPU-r4", "gpu_index": 0})}))
"""


def test_r4_1_authorized_job_is_no_violation_to_an_agent_in_a_cgroup_namespace():
    """The agent in its own cgroup namespace (as the DaemonSet runs it: privileged false on
    a cgroup v2 node), a GPU job in a cgroup the config authorizes: the job must not be
    judged a violation (it is killed with gpu.on_violation kill). Found: /proc/PID/cgroup
    is rendered relative to the reader's cgroup namespace ("/../job"), so no grant and no
    system cgroup ever matches; the exact kill compares the same relative path and kills."""
    with throwaway_cgroup("swa-r4ns") as outer:
        agent_cg, job_cg = outer / "agent", outer / "job"
        agent_cg.mkdir()
        job_cg.mkdir()
        job = subprocess.Popen(["sh", "-c", f'echo $$ > "{job_cg}/cgroup.procs" && exec sleep 30'])
        try:
            wait_for(lambda: str(job.pid) in (job_cg / "cgroup.procs").read_text(), 5.0)
            judge = subprocess.run(
                ["sh", "-c", f'echo $$ > "{agent_cg}/cgroup.procs" && exec unshare --cgroup "$0" "$@"',
                 sys.executable, "-c", _JUDGE_FROM_NAMESPACE, str(job.pid), cgroup_path(job_cg)],
                capture_output=True, text=True, timeout=30, cwd=REPO)
            assert judge.returncode == 0, judge.stderr
            seen = json.loads(judge.stdout)
        finally:
            job.kill()
            job.wait(timeout=5)
    rec, verdict = seen["record"], seen["verdict"]
    violation = (rec.get("resolved") is True and verdict.get("authorized") is False
                 and verdict.get("system") is False and str(rec.get("cgroup")).startswith("/"))
    assert not violation, (f"an authorized job ({cgroup_path(job_cg)}) judged a violation by an "
                           f"agent in a cgroup namespace: cgroup read as {rec.get('cgroup')!r}, "
                           f"verdict {verdict}")


# -- R4-2 -------------------------------------------------------------------------------------

_HAMMER = r"""
import os, socket, sys, time
addr, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
print("ready", flush=True)
end, n = time.monotonic() + 20.0, 0
while time.monotonic() < end and not os.path.exists(stop):
    for _ in range(200):
        try:
            s.sendto(b"x", (addr, port))
        except OSError:
            pass
        n += 1
print(n, flush=True)
"""


def test_r4_2_no_packet_leaves_while_the_agent_restarts(lab, tmp_path):
    """A workload sends to the metadata address without pause while the agent (re)creates
    its table, as it does at every start and after drift (NftEnforcer.setup/_recreate).
    Found: the table is replaced in one transaction and the egress rules are added in a
    later one (agent/enforce/nft.py _recreate -> _send_egress), so in between the egress
    chains are empty and packets reach the metadata service."""
    metadata_service(lab, lab.attacker, lab.addr("attacker"))
    with throwaway_cgroup("swa-r4egress") as cg:
        rule = EgressRule(name="metadata", cgroups=(cgroup_path(cg),), destinations=(METADATA_V4,))
        with netns(lab.victim):
            e = NftEnforcer(Config(policy=Policy(egress=(rule,))))
        try:
            with netns(lab.victim):
                e.setup([], time.time())
            assert arrived(lab.attacker) == 0

            def hammer(stop: Path, during) -> int:
                sender = spawn_in(lab.victim, sys.executable, "-c", _HAMMER, METADATA,
                                  str(PORT), str(stop), cgroup=cg)
                try:
                    assert sender.stdout is not None and sender.stdout.readline().strip() == "ready"
                    with netns(lab.victim):
                        during()
                finally:
                    stop.touch()
                    sent = int(sender.communicate(timeout=30)[0].strip() or 0)
                assert sent > 0
                return sent

            # The steady state holds: a second of sending, not one packet arrives.
            hammer(tmp_path / "stop0", lambda: time.sleep(1.0))
            assert arrived(lab.attacker) == 0
            # Ten agent starts (each: NftEnforcer.setup) while it sends.
            sent = hammer(tmp_path / "stop1",
                          lambda: [e.setup([], time.time()) for _ in range(10)])
            leaked = arrived(lab.attacker)
            assert leaked == 0, (f"{leaked} of {sent} packets to {METADATA} from a denied cgroup "
                                 "left while the agent's table was recreated")
        finally:
            with netns(lab.victim):
                e.remove()
                e.close()


# -- R4-3 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bridge", ["virbr0", "podman0"])
def test_r4_3_default_policy_covers_the_bridges_of_the_machines_it_names(lab, bridge):
    """The default config (METADATA: cgroups include /machine.slice, "libvirt/nspawn
    machines", and rootful podman's libpod scopes): a VM or container bridged behind libvirt's
    default network (virbr0) or podman's (podman0) sends from its own kernel or namespace,
    so only the forward hook's interface match can see it. Found: the default interfaces
    (docker0, br-*, cni0, cali*, lxc*) name neither, so it reaches the metadata service."""
    meta = lab.add_attacker(1)
    metadata_service(lab, meta, lab.addr("attacker", link=1))
    sh("ip", "route", "add", f"10.{lab.subnet}.0.0/24", "via", lab.addr("victim", link=1), ns=meta)
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=lab.victim)
    for args in (("down",), ("name", bridge), ("up",)):
        sh("ip", "link", "set", "v0" if args != ("up",) else bridge, *args, ns=lab.victim)
    with listener(meta, METADATA, PORT, "secret"), \
            listener(meta, lab.addr("attacker", link=1), PORT, "public"), netns(lab.victim):
        e = NftEnforcer(Config())
        try:
            e.setup([], time.time())
            assert connect(lab.attacker, lab.addr("attacker", link=1), PORT) == "public"
            got = connect(lab.attacker, METADATA, PORT)
            assert got is None and arrived(meta) == 0, (
                f"a guest behind {bridge} read {got!r} from the metadata service "
                f"({arrived(meta)} packets arrived) under the default policy")
        finally:
            e.remove()
            e.close()


# -- R4-6 -------------------------------------------------------------------------------------

def test_r4_6_device_open_through_io_uring_is_seen(lab, lib, script, workloads, tmp_path):
    """As test_gpu_authorization's device-open test (gpu.device_major 1, /dev/full standing
    in for /dev/nvidia0; the stand-in NVML lists nobody): one unauthorized workload opens
    the device with open(2) -- killed, the probe works -- and another through io_uring's
    IORING_OP_OPENAT. Found: the second is never reported (probes/proc.bpf.c watches the
    open syscalls' exits only) and keeps the device open; the README's limit on io_uring
    opens is written for watched files, not for GPU devices."""
    opener = tmp_path / "uring_open"
    subprocess.run(["cc", "-O2", "-o", str(opener), str(Path(__file__).with_name("uring_open.c"))],
                   check=True, timeout=60)
    ok_cg, plain_cg, uring_cg = workloads / "train", workloads / "plain", workloads / "uring"
    agent = start_agent(lab, lib, tmp_path, authorized=(
        f"  device_major: 1\n  authorized:\n    - workload: {path_of(ok_cg)}\n"
        f"      gpus: [0]\n"))
    procs = []
    try:
        for cg, argv in ((plain_cg, ["sh", "-c", "exec 3</dev/full; exec sleep 300"]),
                         (uring_cg, [str(opener), "/dev/full"])):
            cg.mkdir()
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", lab.victim, *argv], stdout=subprocess.PIPE, text=True,
                preexec_fn=lambda cg=cg: (cg / "cgroup.procs").write_text(str(os.getpid()))))
        plain, uring = procs
        assert plain.wait(10) == -9                       # the probe is there and acts
        line = uring.stdout.readline() if uring.stdout is not None else ""
        # it opened the device ("fd N"), or was killed for it before it could say so
        assert line.startswith("fd ") or uring.wait(10) == -9, line
        try:
            uring.wait(5)
        except subprocess.TimeoutExpired:
            pass
        seen = incidents_of(agent, f"cgroup:{path_of(uring_cg)}")
        assert uring.poll() is not None or seen, (
            "a process of a workload with no GPU grant holds the GPU device it opened "
            "through io_uring: no gpu.open, no incident, not killed")
    finally:
        for p in procs:
            p.kill()
            p.wait()
        agent.stop()


# -- R4-7 -------------------------------------------------------------------------------------

def test_r4_7_macvlan_container_cannot_reach_metadata(lab):
    """The default policy on the "host" (the victim namespace, uplink v0); a "container"
    namespace attached to the uplink by a macvlan, as Docker's macvlan driver and Multus
    attach them. Found: its packets leave through the uplink without passing the host's
    output or forward hook (the only hooks agent/enforce/egress.py uses), so the metadata
    service answers it; the README names no such limit. (A netdev egress hook on the
    uplink sees them.)"""
    metadata_service(lab, lab.attacker, lab.addr("attacker"))
    ctr = f"swa-ctr-{lab.tag}"
    sh("ip", "netns", "add", ctr)
    lab.namespaces.append(ctr)
    lab._prepare(ctr)
    sh("ip", "link", "add", "mv0", "link", "v0", "type", "macvlan", "mode", "bridge", ns=lab.victim)
    sh("ip", "link", "set", "mv0", "netns", ctr, ns=lab.victim)
    sh("ip", "addr", "add", f"10.{lab.subnet}.0.77/24", "dev", "mv0", ns=ctr)
    sh("ip", "link", "set", "mv0", "up", ns=ctr)
    sh("ip", "route", "add", f"{METADATA}/32", "via", lab.addr("attacker"), ns=ctr)
    with listener(lab.attacker, METADATA, PORT, "secret"), \
            listener(lab.attacker, lab.addr("attacker"), PORT, "public"):
        with netns(lab.victim):
            e = NftEnforcer(Config())
            e.setup([], time.time())
        try:
            assert connect(ctr, lab.addr("attacker"), PORT) == "public"   # the link works
            got = connect(ctr, METADATA, PORT)
            assert got is None and arrived(lab.attacker) == 0, (
                f"a macvlan container read {got!r} from the metadata service "
                f"({arrived(lab.attacker)} packets arrived) under the default policy")
            with netns(lab.victim):
                counted = e.egress_counts()
            assert counted.get(Scope("metadata", "uplink"), 0) >= 1, counted
            # the host itself, through the same link, still reaches it
            assert connect(lab.victim, METADATA, PORT) == "secret"
        finally:
            with netns(lab.victim):
                e.remove()
                e.close()
