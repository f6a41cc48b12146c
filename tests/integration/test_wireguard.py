"""WireGuard peer quarantine against real wireguard-go: two nodes (the lab's attacker and
victim namespaces) joined by a tunnel over the lab's veth; the enforcer runs in the victim."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from agent.enforce.base import UnsupportedMitigation
from agent.enforce.wgapi import UAPI_DIR, NotWireGuard, WireGuardError
from agent.enforce.wireguard import WireGuardEnforcer, target_of
from swarmlab.lab import Lab, netns, sh, wait_for
from agent.model import Mitigation, MitigationKind
from tests.conftest import skip_unsupported
from tests.integration.nftlab import connect, listener, wait_reaches

pytestmark = pytest.mark.privileged
PORT, WG_PORT = 8080, 51820


@dataclass
class Node:
    ns: str
    ifname: str
    public_key: str
    tunnel_addr: str
    underlay_addr: str


def _genkey(tmp: Path, name: str) -> tuple[Path, str]:
    private = sh("wg", "genkey").stdout.strip()
    path = tmp / f"{name}.key"
    path.write_text(private + "\n")
    path.chmod(0o600)
    return path, sh("wg", "pubkey", input=private + "\n").stdout.strip()


@dataclass
class Tunnel:
    attacker: Node
    victim: Node
    psk: str


@pytest.fixture
def tunnel(lab: Lab, tmp_path: Path) -> Iterator[Tunnel]:
    """wireguard-go in both lab namespaces (interface names unique per test: the UAPI
    socket directory is shared by every namespace), peered over the veth with a preshared
    key and keepalive. The daemons are killed and their sockets removed after."""
    for tool in ("wireguard-go", "wg"):
        if shutil.which(tool) is None:
            skip_unsupported(f"needs {tool} (apt-get install wireguard-go wireguard-tools)")
    procs: list[subprocess.Popen[bytes]] = []
    nodes = {}
    env = {**os.environ, "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
    try:
        for side, octet in (("attacker", 1), ("victim", 2)):
            ns = getattr(lab, side)
            ifname = f"wg{side[0]}{lab.tag}"
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, "wireguard-go", "-f", ifname],
                                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_for(lambda: (UAPI_DIR / f"{ifname}.sock").is_socket(), 10.0)
            key, pub = _genkey(tmp_path, side)
            nodes[side] = Node(ns, ifname, pub, f"10.{lab.subnet}.200.{octet}", lab.addr(side))
            sh("wg", "set", ifname, "private-key", str(key), "listen-port", str(WG_PORT), ns=ns)
            sh("ip", "addr", "add", f"{nodes[side].tunnel_addr}/24", "dev", ifname, ns=ns)
            sh("ip", "link", "set", ifname, "up", ns=ns)
        psk = sh("wg", "genpsk").stdout.strip()
        (tmp_path / "psk").write_text(psk + "\n")
        for me, other in (("attacker", "victim"), ("victim", "attacker")):
            o = nodes[other]
            sh("wg", "set", nodes[me].ifname, "peer", o.public_key, "preshared-key", str(tmp_path / "psk"),
               "endpoint", f"{o.underlay_addr}:{WG_PORT}", "persistent-keepalive", "25",
               "allowed-ips", f"{o.tunnel_addr}/32,fd00:{lab.subnet:x}:200::{1 if other == 'attacker' else 2}/128",
               ns=nodes[me].ns)
        yield Tunnel(nodes["attacker"], nodes["victim"], psk)
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=5)
        for n in nodes.values():
            with contextlib.suppress(FileNotFoundError):
                (UAPI_DIR / f"{n.ifname}.sock").unlink()


@pytest.fixture
def wg(lab: Lab, tmp_path: Path) -> Iterator[WireGuardEnforcer]:
    """A WireGuardEnforcer used from the victim namespace (the test thread is moved there)."""
    with netns(lab.victim):
        yield WireGuardEnforcer(tmp_path / "state", allowlist=("192.0.2.0/24",))


def tunnel_up(t: Tunnel) -> str | None:
    return connect(t.attacker.ns, t.victim.tunnel_addr, PORT, timeout_s=1.0)


def test_remove_peer_cuts_the_tunnel_and_restore_brings_it_back(lab, tunnel, wg, tmp_path):
    t, ifname = tunnel, tunnel.victim.ifname
    with listener(lab.victim, t.victim.tunnel_addr, PORT, "tunnel"):
        wait_reaches(t.attacker.ns, t.victim.tunnel_addr, PORT, True, timeout_s=10)
        assert wg.interfaces() == [ifname]
        (before,) = wg.peers(ifname)
        assert before.public_key == t.attacker.public_key and before.preshared_key == t.psk
        assert before.persistent_keepalive_s == 25
        assert before.endpoint == f"{t.attacker.underlay_addr}:{WG_PORT}"
        assert wg.peer_for_address(t.attacker.tunnel_addr) == (ifname, t.attacker.public_key)
        assert wg.peer_for_address(f"fd00:{lab.subnet:x}:200::1") == (ifname, t.attacker.public_key)
        assert wg.peer_for_address("198.51.100.7") is None

        removed = wg.remove_peer(ifname, t.attacker.public_key)
        assert removed == before and wg.peers(ifname) == []
        saved = json.loads((tmp_path / "state" / "wireguard-peers.json").read_text())
        assert saved[ifname][t.attacker.public_key]["preshared_key"] == t.psk
        assert oct((tmp_path / "state" / "wireguard-peers.json").stat().st_mode & 0o777) == "0o600"
        assert tunnel_up(t) is None
        assert wg.peer_for_address(t.attacker.tunnel_addr) is None

        assert wg.restore_peer(ifname, t.attacker.public_key) == before
        assert wg.peers(ifname) == [before] and wg.saved() == {}
        wait_reaches(t.attacker.ns, t.victim.tunnel_addr, PORT, True, timeout_s=10)


def test_enforcer_contract_quarantine_reconcile_lift(lab, tunnel, wg):
    t, ifname = tunnel, tunnel.victim.ifname
    now = time.time()
    m = Mitigation(MitigationKind.REMOVE_PEER, target_of(ifname, t.attacker.public_key), now, now + 600)
    with listener(lab.victim, t.victim.tunnel_addr, PORT, "tunnel"):
        wait_reaches(t.attacker.ns, t.victim.tunnel_addr, PORT, True, timeout_s=10)
        wg.apply(m, now)
        assert tunnel_up(t) is None
        assert not wg.reconcile([m], time.time())
        # Someone puts the peer back by hand: reconcile quarantines it again.
        sh("wg", "set", ifname, "peer", t.attacker.public_key, "allowed-ips", f"{t.attacker.tunnel_addr}/32",
           ns=lab.victim)
        drift = wg.reconcile([m], time.time())
        assert drift.elements_removed == [f"peer:{m.target}"] and wg.peers(ifname) == []
        # Lifted while the agent was away: reconcile with nothing desired restores it.
        assert wg.reconcile([], time.time()).elements_added == [f"peer:{m.target}"]
        wait_reaches(t.attacker.ns, t.victim.tunnel_addr, PORT, True, timeout_s=10)
        wg.apply(m, time.time())
        wg.lift(m)
        wg.lift(m)          # already restored: no error
        assert len(wg.peers(ifname)) == 1
        with pytest.raises(UnsupportedMitigation):
            wg.apply(Mitigation(MitigationKind.BLOCK_IP, "192.0.2.1", now, None), now)


def test_bad_input_changes_nothing(lab, tunnel, wg, tmp_path):
    t, ifname = tunnel, tunnel.victim.ifname
    before = wg.peers(ifname)
    unknown = sh("wg", "pubkey", input=sh("wg", "genkey").stdout).stdout.strip()
    cases = [((ifname, unknown), WireGuardError, "has no peer"),
             (("v0", t.attacker.public_key), NotWireGuard, "not a WireGuard interface"),
             (("nope0", t.attacker.public_key), WireGuardError, "no interface named"),
             ((ifname, "not-a-key"), WireGuardError, "not a WireGuard public key"),
             # The attacker's interface: its socket exists, but it serves another namespace.
             ((t.attacker.ifname, t.victim.public_key), WireGuardError, "no interface named")]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            wg.remove_peer(*args)
    with pytest.raises(WireGuardError, match="no saved configuration"):
        wg.restore_peer(ifname, t.attacker.public_key)
    with pytest.raises(WireGuardError, match="expected IFNAME:PUBLIC_KEY"):
        wg.apply(Mitigation(MitigationKind.REMOVE_PEER, "no-colon", time.time(), None), time.time())
    assert wg.peers(ifname) == before and wg.saved() == {}
    assert not (tmp_path / "state" / "wireguard-peers.json").exists()


def test_allowlisted_peer_is_never_removed(lab, tunnel, tmp_path):
    t, ifname = tunnel, tunnel.victim.ifname
    with netns(lab.victim):
        wg = WireGuardEnforcer(tmp_path / "state", allowlist=(f"10.{lab.subnet}.200.0/24",))
        assert wg.is_allowlisted(target_of(ifname, t.attacker.public_key))
        from agent.enforce.base import AllowlistedError

        with pytest.raises(AllowlistedError, match="never removed"):
            wg.remove_peer(ifname, t.attacker.public_key)
        assert len(wg.peers(ifname)) == 1
