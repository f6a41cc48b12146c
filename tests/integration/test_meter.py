"""The benches' containment meter (swarmlab.meter.ServiceMeter) counts both families: an
exclusion written `ip saddr != {...}` matched IPv4 only in an inet table, so an IPv6 flood
that got through whole read as contained (found by a red-team review)."""
from __future__ import annotations

import time

import pytest

from swarmlab.lab import sh
from swarmlab.meter import ServiceMeter

pytestmark = pytest.mark.privileged

SYNS = """
import socket, sys
fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
for _ in range(int(sys.argv[3])):
    s = socket.socket(fam, socket.SOCK_STREAM); s.setblocking(False)
    try: s.connect((sys.argv[1], int(sys.argv[2])))
    except BlockingIOError: pass
    s.close()
"""


def test_the_meter_counts_ipv6_attack_packets(lab):
    client = "10.254.0.9"   # the legitimate client excluded (IPv4, as bench/legit_success)
    with ServiceMeter(lab.victim, "tcp", 8080, [client]) as meter:
        for v6 in (False, True):
            sh("python3", "-c", SYNS, lab.addr("victim", v6), "8080", "20", ns=lab.attacker)
        time.sleep(0.2)
        meter.stop()
        counted = meter.samples[-1][1] - meter.samples[0][1]
    assert counted == 40, f"20 IPv4 + 20 IPv6 SYNs reached the service, the meter counted {counted}"
