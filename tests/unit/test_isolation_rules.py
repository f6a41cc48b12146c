"""Pure parts of isolation and WireGuard: nft isolation text, cgroup path checks, the UAPI
protocol and the kernel (pyroute2) conversions. This kernel has no wireguard module, so the
netlink path is only checked here, on pyroute2-shaped data."""
from __future__ import annotations

import base64
from pathlib import Path

import pytest

from agent.config import Allowlist, Config
from agent.enforce.cgroup import Cgroup, CgroupError, contains, normalise
from agent.enforce.isolate import Isolation, IsolationRefused, check_node, rules_text
from agent.enforce.wgapi import (Peer, WireGuardError, check_key, kernel_peer, kernel_peer_args,
                                 parse_uapi_peers, uapi_set_peer)
from agent.model import Mitigation, MitigationKind

KEY = base64.b64encode(bytes(range(32))).decode()
PSK = base64.b64encode(bytes([7] * 32)).decode()
SVC = Cgroup(2, "/system.slice/x.service", "system.slice/x.service", Path("/sys/fs/cgroup/system.slice/x.service"))


def test_isolation_text_orders_service_drops_before_node_rules():
    iso = Isolation(True, (SVC,), ("10.9.0.0/16", "2001:db8::/32"), SVC)
    text = rules_text(iso)
    lines = text.splitlines()
    assert lines[:3] == [f"flush chain inet swarm_agent {c}" for c in ("isolate_in", "isolate_out", "isolate_fwd")]
    assert lines[3] == 'add rule inet swarm_agent isolate_in socket cgroupv2 level 2 "system.slice/x.service" counter drop'
    assert "add rule inet swarm_agent isolate_in ip saddr { 10.9.0.0/16 } accept" in lines
    assert "add rule inet swarm_agent isolate_out ip6 daddr { 2001:db8::/32 } accept" in lines
    assert lines[-1] == "add rule inet swarm_agent isolate_fwd counter drop"
    assert rules_text(Isolation()).count("add rule") == 0


def test_node_isolation_needs_an_allowlist_or_force():
    m = Mitigation(MitigationKind.ISOLATE_NODE, "node", 0, None)
    with pytest.raises(IsolationRefused, match="force"):
        check_node(m, Config())
    check_node(Mitigation(MitigationKind.ISOLATE_NODE, "node", 0, None, params={"force": True}), Config())
    check_node(m, Config(allowlist=Allowlist(mesh=("10.0.0.0/8",))))


def test_cgroup_paths():
    assert normalise("system.slice//x.service/") == "/system.slice/x.service"
    for bad in ("/a/../b", '/x"', "/a b", "/a;b"):
        with pytest.raises(CgroupError):
            normalise(bad)
    assert contains("/", "/a") and contains("/a", "/a/b") and contains("/a", "/a")
    assert not contains("/a/b", "/a") and not contains("/a", "/ab")


def test_uapi_get_and_set():
    pairs = [("private_key", "ab" * 32), ("listen_port", "51820"),
             ("public_key", base64.b64decode(KEY).hex()), ("preshared_key", base64.b64decode(PSK).hex()),
             ("endpoint", "[2001:db8::1]:51820"), ("persistent_keepalive_interval", "25"),
             ("allowed_ip", "10.0.0.2/32"), ("allowed_ip", "fd00::2/128"),
             ("public_key", "11" * 32), ("preshared_key", "0" * 64), ("allowed_ip", "10.0.0.3/32"),
             ("errno", "0")]
    a, b = parse_uapi_peers(pairs)   # type: ignore[arg-type]
    assert a == Peer(KEY, ("10.0.0.2/32", "fd00::2/128"), "[2001:db8::1]:51820", 25, PSK)
    assert b.preshared_key is None and b.endpoint is None
    req = uapi_set_peer(a)
    assert req.startswith("set=1\npublic_key=0001") and req.endswith("allowed_ip=fd00::2/128\n\n")
    assert "replace_allowed_ips=true" in req and "preshared_key=0707" in req
    with pytest.raises(WireGuardError):
        check_key("abc=")


class _Attrs(dict):
    """The shape of a decoded pyroute2 netlink entry: get_attr(name) -> value."""

    def get_attr(self, name):
        return self.get(name)


def test_kernel_conversions():
    peer = Peer(KEY, ("10.0.0.2/32",), "[2001:db8::1]:51820", 25, PSK)
    assert kernel_peer_args(peer) == {"public_key": KEY, "allowed_ips": ["10.0.0.2/32"],
                                      "persistent_keepalive": 25, "preshared_key": PSK,
                                      "endpoint_addr": "2001:db8::1", "endpoint_port": 51820}
    decoded = _Attrs(WGPEER_A_PUBLIC_KEY=KEY.encode(), WGPEER_A_PRESHARED_KEY=PSK.encode(),
                     WGPEER_A_ENDPOINT={"addr": "2001:db8::1", "port": 51820},
                     WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL=25,
                     WGPEER_A_ALLOWEDIPS=[{"addr": "10.0.0.2/32"}])
    assert kernel_peer(decoded) == peer
    zero_psk = _Attrs(decoded, WGPEER_A_PRESHARED_KEY=base64.b64encode(bytes(32)))
    assert kernel_peer(zero_psk).preshared_key is None
