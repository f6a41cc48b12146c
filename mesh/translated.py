"""IPv6 networks that carry IPv4 inside them, for the policy's allowlist (mesh/policy.py).

A v6 target in one of these forms names IPv4 parties: checking it only against the v6
rules would let a "/48" reach all of IPv4 (a NAT64 prefix), or block an allowlisted v4
host in another spelling (6to4 2002:AABB:CCDD::/48 is the host AA.BB.CC.DD). So:

- 6to4 (2002::/16, RFC 3056): the IPv4 inside is bits 16-47, a fixed place; the target
  is judged as that IPv4 network too (the v4 allowlist and the v4 prefix limit), so a
  6to4 attacker stays blockable while an allowlisted v4 host is not, in either spelling.
- NAT64 (64:ff9b::/96 well-known, 64:ff9b:1::/48 local use, RFC 6052/8215), Teredo
  (2001::/32, RFC 4380), IPv4-mapped (::ffff:0:0/96) and IPv4-compatible (::/96): where
  the IPv4 sits depends on a translator's configuration (local-use NAT64 may embed it
  at /32../96), is obfuscated (Teredo's client), or the form never appears on the wire
  as a peer's source; these are refused outright. An operator blocks the IPv4 itself.
"""
from __future__ import annotations

import ipaddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Refused outright, whatever the config says (label, network); policy.ALWAYS_ALLOWED
# includes them. ::/96 comes after ::/128 and ::1/128 there, so those keep their labels.
REFUSED: tuple[tuple[str, str], ...] = (
    ("IPv4-mapped", "::ffff:0:0/96"),
    ("IPv4-compatible (deprecated)", "::/96"),
    ("IPv4-translated (NAT64)", "64:ff9b::/96"),
    ("IPv4-translated (local-use NAT64)", "64:ff9b:1::/48"),
    ("Teredo (IPv4 tunnelled)", "2001::/32"),
)

SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")


def embedded_v4(net: Network) -> ipaddress.IPv4Network | None:
    """The IPv4 network a 6to4 network stands for (2002:c633:640a::/48 ->
    198.51.100.10/32, 2002:c633::/32 -> 198.51.0.0/16); None for anything else. A 6to4
    network wider than /16 + 32 covers the v4 addresses its prefix fixes."""
    if net.version != 6 or not net.subnet_of(SIX_TO_FOUR):
        return None
    bits = int(net.network_address) >> 80 & 0xFFFFFFFF
    plen = min(net.prefixlen - 16, 32)
    return ipaddress.IPv4Network((bits, plen), strict=False)
