"""links.without_uppers: which stacked devices the network probe leaves to the links below
them, so that a frame is judged by exactly one ingress hook."""
from agent.sources.links import LinkInfo, without_uppers

ETH0, V0, V1, BR0, VLAN, VETH = (LinkInfo(2, "eth0", "", 0, 0), LinkInfo(3, "v0", "veth", 0, 5),
                                 LinkInfo(4, "v1", "veth", 0, 5), LinkInfo(5, "br0", "bridge", 0, 0),
                                 LinkInfo(6, "br0.10", "vlan", 5, 0), LinkInfo(7, "v2", "veth", 0, 0))


def test_a_bridge_whose_ports_are_watched_is_left_to_them():
    names = ["eth0", "v0", "v1", "br0", "v2"]
    assert without_uppers(names, [ETH0, V0, V1, BR0, VETH]) == (
        ["eth0", "v0", "v1", "v2"], {"br0": ["v0", "v1"]})


def test_a_vlan_on_a_bridge_goes_with_the_bridge():
    names = ["v0", "v1", "br0", "br0.10"]
    got, skipped = without_uppers(names, [V0, V1, BR0, VLAN])
    assert got == ["v0", "v1"] and skipped == {"br0": ["v0", "v1"], "br0.10": ["br0"]}


def test_a_bridge_with_an_unwatched_port_stays_watched():
    # v1 is not watched (probes.interfaces names only v0): frames through v1 reach br0 only
    assert without_uppers(["v0", "br0"], [V0, V1, BR0]) == (["v0", "br0"], {})


def test_a_bridge_without_ports_and_plain_links_are_watched():
    assert without_uppers(["br0", "v2"], [BR0, VETH]) == (["br0", "v2"], {})
