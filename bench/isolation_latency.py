"""Time to isolate: from the apply call to traffic actually cut, for node isolation,
service isolation (cgroup cut + freeze) and WireGuard peer removal.

A prober in the attacker namespace sends a numbered UDP datagram every ~0.2 ms to an echo
server in the victim (over the tunnel for the peer case; inside a throw-away cgroup for the
service case). Time to cut = send time of the first datagram never answered, minus the
time apply() was called. Every run is lifted and traffic seen flowing again before the next.

    sudo .venv/bin/python bench/isolation_latency.py [--runs 20] [--json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from swarmlab.breachlab import CutProber, throwaway_cgroup, wireguard_pair  # noqa: E402
from agent.config import Allowlist, Config  # noqa: E402
from agent.enforce.cgroup import CgroupEnforcer, cgroup2_mount  # noqa: E402
from agent.enforce.nft import NftEnforcer  # noqa: E402
from agent.enforce.wireguard import WireGuardEnforcer  # noqa: E402
from swarmlab.lab import Lab, netns, serving, wait_for  # noqa: E402
from agent.model import Mitigation, MitigationKind  # noqa: E402

PORT, WG_PORT = 9000, 51821
ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(64)
    try:
        s.sendto(data, peer)
    except OSError:      # EPERM while an nft output rule drops the reply
        pass
"""


@contextlib.contextmanager
def echo(ns: str, addr: str, cgroup: Path | None = None) -> Iterator[None]:
    """A UDP echo server in `ns` (a member of `cgroup` from its start when given)."""
    with serving(ns, sys.executable, "-c", ECHO, addr, str(PORT), cgroup=cgroup):
        yield


def time_to_cut(ns: str, addr: str, apply: Callable[[], None], limit_s: float = 3.0) -> float:
    """Seconds from apply() to the first unanswered probe. A sender thread probes all along
    (~5000 datagrams per second, at most limit_s + 0.3 s), so a cut that lands in the middle
    of apply() is seen there."""
    with CutProber(ns, addr, PORT, interval_s=0.0002, send_limit_s=limit_s + 0.3,
                   clock=time.perf_counter) as probe:
        probe.wait_answering(limit_s)
        t0 = time.perf_counter()
        apply()
        time.sleep(0.3)
    cut = probe.first_unanswered()
    return float("inf") if cut is None else max(0.0, cut - t0)


def mit(kind: MitigationKind, target: str) -> Mitigation:
    now = time.time()
    return Mitigation(kind, target, now, now + 600)


def bench_node(lab: Lab, runs: int) -> list[float]:
    out = []
    with echo(lab.victim, lab.addr("victim")), netns(lab.victim):
        e = NftEnforcer(Config(allowlist=Allowlist(management=("192.0.2.0/24",))))
        e.setup([], time.time())
        try:
            for _ in range(runs):
                m = mit(MitigationKind.ISOLATE_NODE, "node")
                out.append(time_to_cut(lab.attacker, lab.addr("victim"), lambda: e.apply(m, time.time())))
                e.lift(m)
        finally:
            e.remove()
            e.close()
    return out


def bench_service(lab: Lab, runs: int) -> tuple[list[float], list[float]]:
    cut, frozen = [], []
    with throwaway_cgroup("swa-bench") as cg:
        path = "/" + str(cg.relative_to(cgroup2_mount()))
        with echo(lab.victim, lab.addr("victim"), cg), netns(lab.victim):
            e, freezer = NftEnforcer(Config()), CgroupEnforcer()
            e.setup([], time.time())
            try:
                for _ in range(runs):
                    m = mit(MitigationKind.ISOLATE_SERVICE, path)

                    def apply() -> None:
                        t0 = time.perf_counter()
                        e.apply(m, time.time())
                        freezer.apply(m, time.time())
                        wait_for(lambda: "frozen 1" in (cg / "cgroup.events").read_text(), 5.0, 0.0005)
                        frozen.append(time.perf_counter() - t0)
                    cut.append(time_to_cut(lab.attacker, lab.addr("victim"), apply))
                    freezer.lift(m)
                    e.lift(m)
            finally:
                e.remove()
                e.close()
    return cut, frozen


def bench_peer(lab: Lab, runs: int, tmp: Path) -> list[float]:
    out = []
    with wireguard_pair(lab, tmp, port=WG_PORT) as pair, \
            echo(lab.victim, pair.victim_tunnel), netns(lab.victim):
        wg = WireGuardEnforcer(tmp / "state")
        for _ in range(runs):
            m = mit(MitigationKind.REMOVE_PEER, pair.target)
            out.append(time_to_cut(lab.attacker, pair.victim_tunnel, lambda: wg.apply(m, time.time())))
            wg.lift(m)
    return out


def summary(values_s: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values_s)
    p95 = ms[min(len(ms) - 1, max(0, round(0.95 * len(ms)) - 1))]
    return {"runs": len(ms), "median_ms": round(statistics.median(ms), 2), "p95_ms": round(p95, 2),
            "max_ms": round(ms[-1], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import tempfile

    results = {}
    with Lab() as lab, tempfile.TemporaryDirectory() as tmp:
        results["node (isolate_node)"] = summary(bench_node(lab, args.runs))
        cut, frozen = bench_service(lab, args.runs)
        results["service (isolate_service: traffic cut)"] = summary(cut)
        results["service (cgroup.events frozen 1)"] = summary(frozen)
        results["peer (remove_peer, wireguard-go)"] = summary(bench_peer(lab, args.runs, Path(tmp)))
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"{'scope':42} {'runs':>4} {'median ms':>10} {'p95 ms':>8} {'max ms':>8}")
    for name, r in results.items():
        print(f"{name:42} {r['runs']:>4} {r['median_ms']:>10} {r['p95_ms']:>8} {r['max_ms']:>8}")


if __name__ == "__main__":
    main()
