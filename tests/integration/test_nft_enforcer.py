"""NftEnforcer against the real kernel in lab namespaces: real handshakes from the attacker
namespace, assertions on `nft -j list table inet swarm_agent` in the victim."""
from __future__ import annotations

import ipaddress
import json
import socket
import sys
import time
from typing import Callable, Iterator

import pytest

from agent.config import Allowlist, Config, Enforce, RateLimit, Reroute
from agent.enforce.base import AllowlistedError, EnforceError, UnsupportedMitigation
from agent.enforce.nft import NftEnforcer
from swarmlab.lab import Lab, netns, serving, sh, wait_for
from agent.model import Mitigation, MitigationKind
from tests.integration.nftlab import connect, listener, reaches, wait_reaches

pytestmark = pytest.mark.privileged
PORT = 8080


def mit(kind: MitigationKind, target: str, lifetime_s: float | None = 600.0) -> Mitigation:
    now = time.time()
    return Mitigation(kind, target, now, None if lifetime_s is None else now + lifetime_s)


def block(target: str, lifetime_s: float | None = 600.0) -> Mitigation:
    return mit(MitigationKind.BLOCK_IP, target, lifetime_s)


def kernel_elements(lab: Lab, set_name: str) -> dict[str, float | None]:
    """{element text: remaining seconds or None} of one set, from `nft -j list`."""
    out = sh("nft", "-j", "list", "set", "inet", "swarm_agent", set_name, ns=lab.victim).stdout
    (s,) = [o["set"] for o in json.loads(out)["nftables"] if "set" in o]
    result = {}
    for item in s.get("elem", []):
        if isinstance(item, dict) and "elem" in item:
            result[json.dumps(item["elem"]["val"])] = float(item["elem"].get("expires", 0))
        else:
            result[json.dumps(item)] = None
    return result


@pytest.fixture
def enforcer(lab: Lab) -> Iterator[Callable[..., NftEnforcer]]:
    """Runs the test thread inside the victim namespace and builds NftEnforcers there; every
    one built is removed afterwards (the lab then deletes the namespaces)."""
    built: list[NftEnforcer] = []

    def make(**enforce: object) -> NftEnforcer:
        allow = enforce.pop("allowlist", Allowlist())
        e = NftEnforcer(Config(allowlist=allow, enforce=Enforce(**enforce)))  # type: ignore[arg-type]
        built.append(e)
        return e

    with netns(lab.victim):
        yield make
        for e in built:
            e.remove()
            e.close()


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_block_stops_handshake_and_lift_restores(lab, enforcer, v6):
    e = enforcer()
    e.setup([], time.time())
    victim, attacker = lab.addr("victim", v6), lab.addr("attacker", v6)
    with listener(lab.victim, victim, PORT):
        assert connect(lab.attacker, victim, PORT) == "ok"
        m = block(attacker)
        e.apply(m, time.time())
        assert not reaches(lab.attacker, victim, PORT)
        assert len(kernel_elements(lab, "block_v6" if v6 else "block_v4")) == 1
        e.lift(m)
        assert connect(lab.attacker, victim, PORT) == "ok"


def test_cidr_block_matches_inside_not_outside(lab, enforcer):
    outside = f"10.{lab.subnet}.0.77"
    sh("ip", "addr", "add", f"{outside}/24", "dev", "a0", ns=lab.attacker)
    e = enforcer()
    e.setup([block(f"10.{lab.subnet}.0.0/28")], time.time())
    victim = lab.addr("victim")
    with listener(lab.victim, victim, PORT):
        assert not reaches(lab.attacker, victim, PORT, src=lab.addr("attacker"))
        assert reaches(lab.attacker, victim, PORT, src=outside)


def test_allowlist_refused_and_wins_over_covering_block(lab, enforcer):
    friend = f"10.{lab.subnet}.0.77"
    sh("ip", "addr", "add", f"{friend}/24", "dev", "a0", ns=lab.attacker)
    e = enforcer(allowlist=Allowlist(management=(f"{friend}/32",)))
    e.setup([], time.time())
    for target in (friend, "127.0.0.1", "::1", lab.addr("victim")):
        assert e.is_allowlisted(target)
        with pytest.raises(AllowlistedError):
            e.apply(block(target), time.time())
    assert kernel_elements(lab, "block_v4") == {}
    e.apply(block(f"10.{lab.subnet}.0.0/24"), time.time())
    victim = lab.addr("victim")
    with listener(lab.victim, victim, PORT):
        assert reaches(lab.attacker, victim, PORT, src=friend)
        assert not reaches(lab.attacker, victim, PORT, src=lab.addr("attacker"))


def test_mesh_and_fleet_servers_are_never_blocked_here_either(lab, enforcer):
    """The daemon hands the mesh's and the NATS servers' addresses over as infrastructure
    (no allowlist.mesh configured): refused as targets, and accepted before a covering
    block; one met after setup is refused at once and in the table after a reconcile."""
    mesh, nats = f"10.{lab.subnet}.0.77", f"10.{lab.subnet}.0.78"
    for addr in (mesh, nats):
        sh("ip", "addr", "add", f"{addr}/24", "dev", "a0", ns=lab.attacker)
    e = enforcer()
    e.infrastructure[:] = [ipaddress.ip_network(mesh)]
    e.setup([], time.time())
    covering = block(f"10.{lab.subnet}.0.0/24")
    e.apply(covering, time.time())
    e.infrastructure.append(ipaddress.ip_network(nats))      # met on connecting
    for target in (mesh, nats):
        with pytest.raises(AllowlistedError):
            e.apply(block(target), time.time())
    victim = lab.addr("victim")
    with listener(lab.victim, victim, PORT):
        assert reaches(lab.attacker, victim, PORT, src=mesh)
        assert not reaches(lab.attacker, victim, PORT, src=nats)
        e.reconcile([covering], time.time())
        assert reaches(lab.attacker, victim, PORT, src=nats)
        assert not reaches(lab.attacker, victim, PORT, src=lab.addr("attacker"))


def test_invalid_targets_and_kinds_change_nothing(lab, enforcer):
    e = enforcer()
    e.setup([block("192.0.2.1")], time.time())
    before = sh("nft", "-j", "list", "table", "inet", "swarm_agent", ns=lab.victim).stdout
    with pytest.raises(EnforceError, match="not an IP address or CIDR"):
        e.apply(block("10.0.0.300"), time.time())
    with pytest.raises(EnforceError, match="not a service"):
        e.apply(mit(MitigationKind.RATE_LIMIT_SERVICE, "icmp/7"), time.time())
    with pytest.raises(UnsupportedMitigation):
        e.apply(mit(MitigationKind.KILL_PROCESS, "1234"), time.time())
    with pytest.raises(UnsupportedMitigation, match="reroute"):
        e.apply(mit(MitigationKind.REROUTE, "192.0.2.9"), time.time())
    # A batch the kernel refuses part of: the valid half must not be applied either.
    good = {"add": {"element": {"family": "inet", "table": "swarm_agent", "name": "block_v4",
                                "elem": ["192.0.2.2"]}}}
    bad = {"add": {"element": {"family": "inet", "table": "swarm_agent", "name": "no_such_set",
                               "elem": ["192.0.2.3"]}}}
    with pytest.raises(EnforceError) as info:
        e._send([good, bad])
    assert info.value.batch == {"nftables": [good, bad]}
    assert sh("nft", "-j", "list", "table", "inet", "swarm_agent", ns=lab.victim).stdout == before


def _udp_received(lab: Lab, count: int) -> int:
    """Send `count` datagrams attacker -> victim; how many arrived (bounded wait)."""
    import socket

    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)      # created in the victim
    rx.bind((lab.addr("victim"), 0))
    rx.setblocking(False)
    with netns(lab.attacker):
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    got = 0
    with rx, tx:
        for _ in range(count):
            tx.sendto(b"x", rx.getsockname())
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                rx.recv(16)
                got += 1
            except BlockingIOError:
                if got >= count:
                    break
                time.sleep(0.01)
    return got


def test_rate_limit_lets_the_configured_rate_through(lab, enforcer):
    e = enforcer(rate_limit=RateLimit(packets_per_second=10, burst=10))
    e.setup([], time.time())
    assert _udp_received(lab, 200) == 200
    e.apply(mit(MitigationKind.RATE_LIMIT, lab.addr("attacker")), time.time())
    got = _udp_received(lab, 200)
    assert 5 <= got <= 40, got          # burst plus what the rate refills in ~1 s


def _syn_burst(lab: Lab, port: int, count: int) -> int:
    """Open `count` connections at once; how many handshakes finish within 0.7 s (before
    a dropped SYN would be retransmitted)."""
    import select
    import socket

    with netns(lab.attacker):
        socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in socks:
            s.setblocking(False)
            s.connect_ex((lab.addr("victim"), port))
        done: set[int] = set()
        deadline = time.monotonic() + 0.7
        while time.monotonic() < deadline and len(done) < count:
            _, w, _ = select.select([], [s for s in socks if s.fileno() not in done], [], 0.05)
            done.update(s.fileno() for s in w if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0)
        return len(done)
    finally:
        for s in socks:
            s.close()


def test_service_rate_limit_caps_new_connections(lab, enforcer):
    import socket

    e = enforcer(service_rate_limit=RateLimit(packets_per_second=5, burst=5))
    e.setup([], time.time())
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind((lab.addr("victim"), PORT))
    srv.listen(256)
    with srv:
        assert _syn_burst(lab, PORT, 40) == 40
        e.apply(mit(MitigationKind.RATE_LIMIT_SERVICE, f"tcp/{PORT}"), time.time())
        assert (f'{{"concat": ["tcp", {PORT}]}}') in kernel_elements(lab, "svc_ratelimit")
        got = _syn_burst(lab, PORT, 40)
    assert 1 <= got <= 15, got


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_reroute_to_sinkhole(lab, enforcer, v6):
    sink = f"fd00:{lab.subnet:x}:9::9" if v6 else f"10.{lab.subnet}.9.9"
    sh("ip", "addr", "add", f"{sink}/{128 if v6 else 32}", "dev", "lo", ns=lab.victim)
    rr = Reroute(sinkhole_v6=sink) if v6 else Reroute(sinkhole_v4=sink)
    e = enforcer(reroute=rr)
    e.setup([], time.time())
    victim = lab.addr("victim", v6)
    with listener(lab.victim, victim, PORT, "real"), listener(lab.victim, sink, PORT, "sinkhole"):
        assert connect(lab.attacker, victim, PORT) == "real"
        e.apply(mit(MitigationKind.REROUTE, lab.addr("attacker", v6)), time.time())
        assert connect(lab.attacker, victim, PORT) == "sinkhole"
        # The agent's own DNAT never teaches a port as DNAT'd (a rerouted source could
        # otherwise take the SYN proxy off any port of a challenged one).
        learned = sh("nft", "list", "set", "inet", "swarm_agent", "dnat_ports", ns=lab.victim).stdout
        assert f". {PORT}" not in learned, learned


def test_reroute_mark_seen_by_a_later_rule_and_remove_leaves_other_tables(lab, enforcer):
    sh("nft", "-f", "-", ns=lab.victim, input=(
        "table inet test_other { chain input { type filter hook input priority 0; "
        "meta mark 0x10 counter; }; }"))
    e = enforcer(reroute=Reroute(mark=0x10))
    e.setup([mit(MitigationKind.REROUTE, lab.addr("attacker"))], time.time())
    victim = lab.addr("victim")
    with listener(lab.victim, victim, PORT):
        assert connect(lab.attacker, victim, PORT) == "ok"
    other = json.loads(sh("nft", "-j", "list", "table", "inet", "test_other", ns=lab.victim).stdout)
    (rule,) = [o["rule"] for o in other["nftables"] if "rule" in o]
    assert rule["expr"][-1]["counter"]["packets"] > 0
    e.remove()
    e.remove()      # absent: no error
    tables = sh("nft", "list", "tables", ns=lab.victim).stdout
    assert "test_other" in tables and "swarm_agent" not in tables


def test_elements_expire_in_the_kernel(lab, enforcer):
    e = enforcer()
    e.setup([], time.time())
    victim = lab.addr("victim")
    with listener(lab.victim, victim, PORT):
        e.apply(block(lab.addr("attacker"), lifetime_s=2.0), time.time())
        (remaining,) = kernel_elements(lab, "block_v4").values()
        assert remaining is not None and remaining <= 2
        assert not reaches(lab.attacker, victim, PORT)
        wait_for(lambda: kernel_elements(lab, "block_v4") == {}, 5.0)
        wait_reaches(lab.attacker, victim, PORT, True)


@pytest.mark.parametrize("damage", ["flush ruleset", "delete table inet swarm_agent", "element"])
def test_reconcile_repairs_with_remaining_lifetime(lab, enforcer, damage):
    e = enforcer()
    desired = [block(lab.addr("attacker"), lifetime_s=100), block("192.0.2.0/24", None)]
    e.setup(desired, time.time())
    assert not e.reconcile(desired, time.time())
    if damage == "element":
        damage = f"delete element inet swarm_agent block_v4 {{ {lab.addr('attacker')} }}"
    sh("nft", *damage.split(), ns=lab.victim)
    drift = e.reconcile(desired, time.time())
    assert f"block_v4:{lab.addr('attacker')}" in drift.elements_added
    assert drift.table_recreated is ("element" not in damage)
    elems = kernel_elements(lab, "block_v4")
    remaining = elems[json.dumps(lab.addr("attacker"))]
    assert remaining is not None and 95 <= remaining <= 100
    assert elems[json.dumps({"prefix": {"addr": "192.0.2.0", "len": 24}})] is None
    assert not e.reconcile(desired, time.time())
    with listener(lab.victim, lab.addr("victim"), PORT):
        assert not reaches(lab.attacker, lab.addr("victim"), PORT)


_UDP_ECHO = r"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 51820))
print("ready", flush=True)
while True:
    d, a = s.recvfrom(2048); s.sendto(d, a)
"""


def _udp_exchange(ns: str, addr: str, count: int = 2000) -> int:
    """Datagrams answered out of `count` sent to addr:51820 from a connected socket in
    `ns`, one at a time (a live exchange: a tunnel, a QUIC flow) as fast as they come back."""
    with netns(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.connect((addr, 51820))
        s.settimeout(0.05)
        got = 0
        for _ in range(count):
            s.send(b"x" * 200)
            try:
                s.recv(2048)
                got += 1
            except OSError:
                pass
        return got


def test_a_challenged_udp_service_keeps_its_established_peers_at_full_rate(lab, enforcer):
    """A challenge of udp/PORT follows a many-source flood, which is forgeable: the
    service's live peers (a WireGuard endpoint's, a QUIC server's) must keep exchanging at
    any rate, not be cut to the per-source limit with the flood."""
    e = enforcer(challenge_rate_limit=RateLimit(packets_per_second=50, burst=50))
    e.setup([], time.time())
    vic = lab.addr("victim")
    with serving(lab.victim, sys.executable, "-c", _UDP_ECHO):
        assert _udp_exchange(lab.attacker, vic, 200) == 200
        e.apply(mit(MitigationKind.CHALLENGE_SERVICE, "udp/51820"), time.time())
        assert _udp_exchange(lab.attacker, vic) >= 1990      # 2000 in well under 2 s


def test_tcp_loose_is_restored_after_a_restart_or_crash_during_a_challenge(lab, enforcer, tmp_path):
    """The value before the first challenge outlives the process that saved it: an agent
    restarted (or crashed) while a challenge is in force, or `swarm-agent cleanup` after
    it, must not take loose=0 for the host's own setting and keep it for good."""
    loose = "/proc/sys/net/netfilter/nf_conntrack_tcp_loose"
    read = lambda: open(loose).read().strip()
    sh("sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=1", ns=lab.victim)
    m = mit(MitigationKind.CHALLENGE, lab.addr("attacker"))
    enforcer()      # the fixture's thread is in the victim namespace from here on
    built: list[NftEnforcer] = []

    def agent() -> NftEnforcer:
        built.append(NftEnforcer(Config(run_dir=str(tmp_path))))
        return built[-1]

    try:
        first = agent()
        first.setup([], time.time())
        first.apply(m, time.time())
        assert read() == "0"
        # Restart while the challenge is in force: a new enforcer takes over the table.
        second = agent()
        second.setup([m], time.time())
        assert read() == "0"
        second.lift(m)
        assert read() == "1"
        # Crash during a challenge, then `cleanup` (a fresh enforcer's remove()).
        second.apply(m, time.time())
        assert read() == "0"
        agent().remove()
        assert read() == "1"
    finally:
        for e in built:
            e.remove()
            e.close()


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_challenged_source_passes_the_syn_proxy_and_tcp_loose_follows(lab, enforcer, v6):
    vic, att = lab.addr("victim", v6), lab.addr("attacker", v6)
    loose = "/proc/sys/net/netfilter/nf_conntrack_tcp_loose"
    e = enforcer()
    e.setup([], time.time())
    with listener(lab.victim, "::" if v6 else "0.0.0.0", PORT, "hi"):
        assert connect(lab.attacker, vic, PORT) == "hi"
        with open(loose) as f:
            before = f.read().strip()
        m = mit(MitigationKind.CHALLENGE, att)
        e.apply(m, time.time())
        with open(loose) as f:
            assert f.read().strip() == "0"          # the SYN proxy's precondition
        # The address's real owner answers the cookie and still gets through, via the proxy.
        for _ in range(5):
            assert connect(lab.attacker, vic, PORT) == "hi"
        proxied = sh("cat", "/proc/net/stat/synproxy", ns=lab.victim).stdout.split("\n")[1:]
        assert sum(int(row.split()[3], 16) for row in proxied if row.strip()) >= 5   # cookie_valid
        assert kernel_elements(lab, f"challenge_v{6 if v6 else 4}")
        e.lift(m)
        with open(loose) as f:
            assert f.read().strip() == before        # restored with the last challenge
        assert connect(lab.attacker, vic, PORT) == "hi"


def _synproxy_valid(lab: Lab) -> int:
    rows = sh("cat", "/proc/net/stat/synproxy", ns=lab.victim).stdout.split("\n")[1:]
    return sum(int(row.split()[3], 16) for row in rows if row.strip())     # cookie_valid


def test_a_challenge_never_cuts_off_dnat_or_routed_services(lab, enforcer):
    """Port 9090 of the victim is DNAT'd to a "container" namespace (Docker/Kubernetes
    published ports); port PORT is a local listener. A challenge of the client, and of the
    DNAT'd service, leave the forwarded service reachable (its SYNs keep conntrack and
    NAT) and the container's own routed connections working under tcp_loose=0, while the
    local service still goes through the SYN proxy."""
    cont = lab.add_attacker(2)
    caddr, vic, att = lab.addr("attacker", link=2), lab.addr("victim"), lab.addr("attacker")
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=lab.victim)
    sh("nft", "-f", "-", ns=lab.victim, input=f"""table ip docker {{
      chain pre {{ type nat hook prerouting priority -100; tcp dport 9090 dnat to {caddr}:8080; }}
      chain post {{ type nat hook postrouting priority 100; oifname "v2" masquerade; ip saddr {caddr} masquerade; }}
      chain filt {{ type filter hook forward priority 0; policy drop;
                   ct state established,related accept; ct state invalid drop;
                   tcp dport {{ 8080, 7171 }} accept; }}
    }}""")
    sh("ip", "route", "replace", "default", "via", lab.addr("victim", link=2), ns=cont, check=False)
    e = enforcer()
    e.setup([], time.time())
    with listener(cont, "0.0.0.0", 8080, "container"), listener(lab.victim, "0.0.0.0", PORT, "host"), \
            listener(lab.attacker, "0.0.0.0", 7171, "outside"):
        assert connect(lab.attacker, vic, 9090) == "container"
        learned = sh("nft", "list", "set", "inet", "swarm_agent", "dnat_ports", ns=lab.victim).stdout
        assert "tcp . 9090" in learned and f"tcp . {PORT}" not in learned, learned
        for m in (mit(MitigationKind.CHALLENGE, att), mit(MitigationKind.CHALLENGE_SERVICE, "tcp/9090"),
                  mit(MitigationKind.CHALLENGE_SERVICE, f"tcp/{PORT}")):
            e.apply(m, time.time())
            assert [connect(lab.attacker, vic, 9090) for _ in range(3)] == ["container"] * 3, m.kind
            assert connect(cont, att, 7171) == "outside", m.kind      # routed, from the container
            before = _synproxy_valid(lab)
            assert connect(lab.attacker, vic, PORT) == "host"
            if m.target != "tcp/9090":          # the local service is challenged too: proxied
                assert _synproxy_valid(lab) == before + 1, m.kind
            else:       # the DNAT'd service's tracked SYNs get a short conntrack timeout
                waits = sh("nft", "list", "chain", "inet", "swarm_agent", "syn_wait", ns=lab.victim).stdout
                assert e.syn_wait_refused is None and "counter packets 3 " in waits, waits
            e.lift(m)
        assert connect(lab.attacker, vic, 9090) == "container"
