"""Red-team round 6 (egress: table netdev swarm_agent_uplink). Each test fails on the code
as attacked and passes once the finding is fixed. Real namespaces, links and nftables.

R6NET-1  The uplink chain flushed (or its rules deleted): reconcile only asks whether the
         chain exists, so a macvlan container reaches the metadata service again for
         good, and no drift is reported.
R6NET-2  A macvlan container that takes the host's own address as its source passes the
         uplink table (`ip saddr != { host's }`): it reaches the metadata service,
         answers included (its ARP traffic points the neighbour at its own MAC).
R6NET-3  The uplink lines ignore which interfaces a rule names: a host that routes for
         others (a routed VM, a Calico-style pod, a LAN behind it) has every forwarded
         packet to a denied destination dropped, though the rule names only docker0.
R6NET-4  More than 256 Ethernet links (containers' veths): the uplink chain's device list
         passes the kernel's cap, nft refuses, setup raises and every reconcile raises
         before it repairs anything (a deleted inet table stays deleted).
R6NET-5  agent/cgroupview.py, an agent in its own cgroup namespace whose cgroup2 mount is
         the namespace's own: _locate answers "/" (host namespace) and host_path turns
         "/../job" into "/job", a path that is not the job's (documented: None).
R6NET-6  A macvlan container's packet socket (CAP_NET_RAW, Docker's default) bound to
         another protocol sends IPv4 frames whose skb->protocol is not IPv4: the uplink's
         `ip daddr` never matches and they reach the metadata address.
R6NET-7  The host's own traffic from an address it got since the last reconcile (DHCP,
         IPv6 temporary address, VIP) is dropped by the uplink table as a workload's.
R6NET-8  Node isolation does not reach a macvlan container of the isolated node: it keeps
         talking to any address (the uplink hook carries the egress policy only).
R6NET-9  The uplink table deleted is made again by reconcile but reported as no drift.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.cgroupview import cgroup2_mount
from agent.config import Allowlist, Config
from agent.enforce.nft import NftEnforcer
from agent.model import Mitigation, MitigationKind
from agent.policyconfig import EgressRule, Policy
from swarmlab.breachlab import throwaway_cgroup
from swarmlab.lab import netns, sh, wait_for
from tests.integration.nftlab import connect, listener
from tests.integration.test_egress_policy import METADATA, PORT, arrived, cgroup_path, metadata_service

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.privileged


def _macvlan_container(lab, addr: str) -> str:
    ctr = f"swa-ctr-{lab.tag}"
    sh("ip", "netns", "add", ctr)
    lab.namespaces.append(ctr)
    lab._prepare(ctr)
    sh("ip", "link", "add", "mv0", "link", "v0", "type", "macvlan", "mode", "bridge", ns=lab.victim)
    sh("ip", "link", "set", "mv0", "netns", ctr, ns=lab.victim)
    sh("ip", "addr", "add", f"{addr}/24", "dev", "mv0", ns=ctr)
    sh("ip", "link", "set", "mv0", "up", ns=ctr)
    sh("ip", "route", "add", f"{METADATA}/32", "via", lab.addr("attacker"), ns=ctr)
    return ctr


def test_r6net_1_flushed_uplink_chain_is_repaired(lab):
    metadata_service(lab, lab.attacker, lab.addr("attacker"))
    ctr = _macvlan_container(lab, f"10.{lab.subnet}.0.77")
    with listener(lab.attacker, METADATA, PORT, "secret"):
        with netns(lab.victim):
            e = NftEnforcer(Config())
            e.setup([], time.time())
        try:
            assert connect(ctr, METADATA, PORT) is None          # the uplink table works
            sh("nft", "flush", "chain", "netdev", "swarm_agent_uplink", "egress", ns=lab.victim)
            with netns(lab.victim):
                drift = e.reconcile([], time.time())
            got = connect(ctr, METADATA, PORT)
            assert got is None, (
                f"after `nft flush chain netdev swarm_agent_uplink egress` and a reconcile "
                f"(drift reported: {drift}), a macvlan container read {got!r} from the "
                f"metadata service: reconcile only checks that the chain exists")
        finally:
            with netns(lab.victim):
                e.remove()
                e.close()


def test_r6net_2_container_forging_host_address_reaches_metadata(lab):
    metadata_service(lab, lab.attacker, lab.addr("attacker"))
    host = lab.addr("victim")
    ctr = _macvlan_container(lab, host)        # the container takes the host's address
    with listener(lab.attacker, METADATA, PORT, "secret"):
        with netns(lab.victim):
            e = NftEnforcer(Config())
            e.setup([], time.time())
        try:
            got = None
            for _ in range(3):
                got = connect(ctr, METADATA, PORT) or got
            assert got is None and arrived(lab.attacker) == 0, (
                f"a macvlan container using the host's address {host} as its source read "
                f"{got!r} from the metadata service ({arrived(lab.attacker)} packets "
                f"arrived) under the default policy")
        finally:
            with netns(lab.victim):
                e.remove()
                e.close()


@pytest.mark.xfail(strict=True, reason="known limit, named in the README (Policy: egress): the uplink hook cannot tell a packet the host routes for a neighbour (no NAT) from a macvlan workload's; both have a foreign source")
def test_r6net_3_routed_neighbour_not_named_by_rule_is_not_dropped(lab):
    """The victim routes for a LAN namespace (no NAT) over link v9; a rule denies the
    attacker's port for what comes in on docker0 only. The LAN's traffic is no one the
    rule names, yet the uplink table drops it at v0's egress."""
    lan = f"swa-lan-{lab.tag}"
    sh("ip", "netns", "add", lan)
    lab.namespaces.append(lan)
    lab._prepare(lan)
    sh("ip", "link", "add", "l0", "type", "veth", "peer", "name", "v9", ns=lab.victim)
    sh("ip", "link", "set", "l0", "netns", lan, ns=lab.victim)
    net = f"10.{lab.subnet}.9"
    sh("ip", "addr", "add", f"{net}.1/24", "dev", "v9", ns=lab.victim)
    sh("ip", "link", "set", "v9", "up", ns=lab.victim)
    sh("ip", "addr", "add", f"{net}.2/24", "dev", "l0", ns=lan)
    sh("ip", "link", "set", "l0", "up", ns=lan)
    sh("ip", "route", "add", "default", "via", f"{net}.1", ns=lan)
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=lab.victim)
    sh("ip", "route", "add", f"{net}.0/24", "via", lab.addr("victim"), ns=lab.attacker)
    target = lab.addr("attacker")
    rule = EgressRule(name="no-port-for-docker", destinations=(f"{target}/32",), ports=(PORT,),
                      proto="tcp", interfaces=("docker0",))
    cfg = dataclasses.replace(Config(), policy=Policy(egress=(rule,)))
    with listener(lab.attacker, target, PORT, "public"):
        assert connect(lan, target, PORT) == "public"    # the routed path works
        with netns(lab.victim):
            e = NftEnforcer(cfg)
            e.setup([], time.time())
        try:
            got = connect(lan, target, PORT)
            if got != "public":     # whose drop: without the uplink table it passes
                sh("nft", "delete", "table", "netdev", "swarm_agent_uplink", ns=lab.victim)
                assert connect(lan, target, PORT) == "public"
            assert got == "public", (
                "a routed LAN host (in on v9, not docker0) lost its connection to "
                f"{target}:{PORT} once a rule naming only docker0 was enforced: the uplink "
                "table drops every forwarded packet whose source is not the host's")
        finally:
            with netns(lab.victim):
                e.remove()
                e.close()


def test_r6net_4_many_links_do_not_turn_the_egress_policy_off(lab):
    """A node with more than 256 Ethernet links (the host side veth of each container: a
    busy Docker host, a tenant that starts containers): every one goes into the uplink
    chain's device list, which the kernel caps at 256 (NFT_NETDEVICE_MAX, "File too
    large"). Found: setup raises, and every later reconcile raises at the uplink table
    before it repairs anything: a macvlan container reaches the metadata service and a
    deleted inet table is never made again."""
    metadata_service(lab, lab.attacker, lab.addr("attacker"))
    ctr = _macvlan_container(lab, f"10.{lab.subnet}.0.77")
    batch = "".join(f"link add r6a{i} type veth peer name r6b{i}\n" for i in range(130))
    sh("ip", "-batch", "-", ns=lab.victim, input=batch)
    with listener(lab.attacker, METADATA, PORT, "secret"):
        with netns(lab.victim):
            e = NftEnforcer(Config())
        try:
            errors = []
            with netns(lab.victim):
                try:
                    e.setup([], time.time())
                except Exception as err:  # noqa: BLE001 -- what the daemon sees
                    errors.append(f"setup: {err}")
            sh("nft", "delete", "table", "inet", "swarm_agent", ns=lab.victim)
            with netns(lab.victim):
                try:
                    e.reconcile([], time.time())
                except Exception as err:  # noqa: BLE001
                    errors.append(f"reconcile: {err}")
            got = connect(ctr, METADATA, PORT)
            tables = sh("nft", "list", "tables", ns=lab.victim).stdout
            assert not errors and got is None and "inet swarm_agent\n" in tables + "\n", (
                f"with 260 more links on the host: {errors}; a macvlan container read "
                f"{got!r} from the metadata service; tables after a reconcile: {tables!r}")
        finally:
            with netns(lab.victim):
                e.remove()
                e.close()


_NAME_FROM_NAMESPACE = r"""
import json, sys
from agent import cgroupview
print(json.dumps({"root": cgroupview.namespace_root(),
                  "job": cgroupview.cgroup_of(int(sys.argv[1]))}))
"""


def test_r6net_5_agent_with_its_namespace_own_cgroup_mount_names_no_wrong_path():
    """The agent in its own cgroup namespace with the cgroup2 mount the runtime gives a
    container (the namespace's own, not the host's: a DaemonSet without the hostPath
    mount). agent/cgroupview.py's docstring: the root cannot be found there, so paths
    climbing out ("/..") are None. Found: the mount's root cgroup.procs lists the agent, so
    _locate answers "/" (the host's own namespace), and host_path normalizes "/../job"
    to "/job": a sibling job is named by a path that is not its own (a grant for its real
    path misses: an authorized job is a violation; a rule for "/job" hits a stranger)."""
    with throwaway_cgroup("swa-r6ns") as outer:
        agent_cg, job_cg = outer / "agent", outer / "job"
        agent_cg.mkdir()
        job_cg.mkdir()
        job = subprocess.Popen(["sh", "-c", f'echo $$ > "{job_cg}/cgroup.procs" && exec sleep 30'])
        try:
            wait_for(lambda: str(job.pid) in (job_cg / "cgroup.procs").read_text(), 5.0)
            inner = (f'umount {cgroup2_mount()} && mount -t cgroup2 none {cgroup2_mount()} && exec "{sys.executable}" -c '
                     f'"$0" "$@"')
            judge = subprocess.run(
                ["sh", "-c", f'echo $$ > "{agent_cg}/cgroup.procs" && exec unshare --cgroup '
                 f'--mount --propagation private sh -c \'{inner}\' "$0" "$@"',
                 _NAME_FROM_NAMESPACE, str(job.pid)],
                capture_output=True, text=True, timeout=30, cwd=REPO)
            assert judge.returncode == 0, judge.stderr
            seen = json.loads(judge.stdout)
        finally:
            job.kill()
            job.wait(timeout=5)
    real = cgroup_path(job_cg)
    assert seen["job"] in (None, real), (
        f"an agent in its own cgroup namespace, with the namespace's own cgroup2 mount, "
        f"names the job at {real} as {seen['job']!r} (namespace root found: {seen['root']!r})")


_RAW_SEND = r"""
import socket, struct, sys
dev, dst_mac, src_ip, dst_ip, port, proto = sys.argv[1:7]
port, proto = int(port), int(proto, 16)
def csum(b):
    s = sum(struct.unpack(f"!{len(b)//2}H", b))
    s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
payload = b"GET /latest/meta-data/iam/ HTTP/1.0\r\n\r\n"
udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload
hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                  socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
s.bind((dev, proto))
src_mac = s.getsockname()[4]
frame = bytes.fromhex(dst_mac.replace(":", "")) + src_mac + b"\x08\x00" + hdr + udp
for _ in range(5):
    try:
        s.send(frame)
    except OSError:          # ENOBUFS: dropped on the way (the egress hook)
        pass
"""


def test_r6net_6_raw_frame_with_another_skb_protocol_passes_the_uplink(lab):
    """A macvlan container with CAP_NET_RAW (Docker's default set) writes IPv4 frames to
    its link through a packet socket bound to another protocol (0x88b5). The kernel takes
    skb->protocol from the socket, not the frame; the uplink's `ip daddr` match (netdev
    family: meta protocol ip first) does not match, and the frame leaves as IPv4 to the
    metadata address. (Control: the same frames from a socket of protocol 0x0800 are
    dropped.) The container's kernel RSTs to the replies are dropped by the uplink table
    itself, so a user-space TCP over such frames works too."""
    metadata_service(lab, lab.attacker, lab.addr("attacker"))
    ctr = _macvlan_container(lab, f"10.{lab.subnet}.0.77")
    mac = sh("cat", "/sys/class/net/a0/address", ns=lab.attacker).stdout.strip()
    with netns(lab.victim):
        e = NftEnforcer(Config())
        e.setup([], time.time())
    try:
        def send(proto: str) -> int:
            before = arrived(lab.attacker)
            run = sh(sys.executable, "-c", _RAW_SEND, "mv0", mac, f"10.{lab.subnet}.0.77",
                     METADATA, str(PORT), proto, ns=ctr, check=False)
            assert run.returncode == 0, run.stderr
            time.sleep(0.2)
            return arrived(lab.attacker) - before
        assert send("0800") == 0            # the control: an honest skb->protocol is dropped
        leaked = send("88b5")
        assert leaked == 0, (
            f"{leaked} of 5 IPv4 frames from a macvlan container's packet socket bound to "
            f"protocol 0x88b5 reached the metadata address past table netdev swarm_agent_uplink")
    finally:
        with netns(lab.victim):
            e.remove()
            e.close()


@pytest.mark.xfail(strict=True, reason="known limit, named in the README (Policy: egress): the host's addresses in the uplink hook are re-read at each reconcile (5 s), not on every address change")
def test_r6net_7_host_traffic_from_a_new_address_is_not_dropped(lab):
    """The host gets a new address (a DHCP lease that changes, an IPv6 temporary address,
    a VIP moving in) and uses it: the uplink table still holds the addresses of the last
    reconcile (every RECONCILE_EVERY_S = 5 s, and nothing triggers one on an address
    change), so the host's own traffic to the metadata service from the new address is
    dropped as a foreign workload's (cloud-init, the node's credential refresh)."""
    metadata_service(lab, lab.attacker, lab.addr("attacker"))
    _macvlan_container(lab, f"10.{lab.subnet}.0.77")   # an uplink rule in force
    new = f"10.{lab.subnet}.0.50"
    with listener(lab.attacker, METADATA, PORT, "secret"):
        with netns(lab.victim):
            e = NftEnforcer(Config())
            e.setup([], time.time())
        try:
            assert connect(lab.victim, METADATA, PORT) == "secret"
            sh("ip", "addr", "add", f"{new}/24", "dev", "v0", ns=lab.victim)
            got = connect(lab.victim, METADATA, PORT, src=new)
            if got != "secret":     # whose drop: after a reconcile it passes
                with netns(lab.victim):
                    e.reconcile([], time.time())
                assert connect(lab.victim, METADATA, PORT, src=new) == "secret"
            assert got == "secret", (
                f"the host's own connection to the metadata service from its new address "
                f"{new} got {got!r}: the uplink table drops it until the next reconcile")
        finally:
            with netns(lab.victim):
                e.remove()
                e.close()


def test_r6net_8_isolated_node_cuts_its_macvlan_containers_too(lab):
    """Node isolation (the breach response: only the mesh and management networks reach
    the node) is made of the inet table's input/output/forward chains only; the uplink
    hook that R4-7 added for the egress policy carries none of it. Found: a container on a
    macvlan of the isolated node keeps talking to anyone (and anyone to it), though it
    runs on the breached kernel and a bridged container is cut."""
    friend = f"10.{lab.subnet}.0.99"
    sh("ip", "addr", "add", f"{friend}/24", "dev", "a0", ns=lab.attacker)
    ctr = _macvlan_container(lab, f"10.{lab.subnet}.0.77")
    attacker = lab.addr("attacker")
    with listener(lab.attacker, attacker, PORT, "outside"):
        with netns(lab.victim):
            e = NftEnforcer(dataclasses.replace(
                Config(), allowlist=Allowlist(management=(f"{friend}/32",))))
            e.setup([], time.time())
        try:
            assert connect(ctr, attacker, PORT) == "outside"       # before: it works
            now = time.time()
            with netns(lab.victim):
                e.apply(Mitigation(MitigationKind.ISOLATE_NODE, "node", now, now + 600), now)
            assert connect(lab.victim, attacker, PORT) is None      # the host is cut
            got = connect(ctr, attacker, PORT)
            assert got is None, (
                f"a macvlan container of the isolated node read {got!r} from {attacker} "
                f"(not in the isolation allowlist): node isolation does not reach the "
                f"host's links")
        finally:
            with netns(lab.victim):
                e.remove()
                e.close()


def test_r6net_9_deleting_the_uplink_table_is_reported_as_drift(lab):
    """`nft delete table netdev swarm_agent_uplink` (an intruder with root turning the
    macvlan egress policy off): reconcile makes it again but reports nothing (Drift false:
    no reconcile.tampered, no last_drift_at), while deleting table inet swarm_agent is
    reported. The window in between (up to RECONCILE_EVERY_S) leaves no trace."""
    with netns(lab.victim):
        e = NftEnforcer(Config())
        e.setup([], time.time())
    try:
        sh("nft", "delete", "table", "netdev", "swarm_agent_uplink", ns=lab.victim)
        with netns(lab.victim):
            drift = e.reconcile([], time.time())
        assert "swarm_agent_uplink" in sh("nft", "list", "tables", ns=lab.victim).stdout
        assert drift, f"the uplink table deleted and made again: reconcile reported {drift}"
    finally:
        with netns(lab.victim):
            e.remove()
            e.close()
