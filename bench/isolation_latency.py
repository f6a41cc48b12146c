"""Time to isolate: from the apply call to traffic actually cut, for node isolation,
service isolation (cgroup cut + freeze) and WireGuard peer removal.

A prober in the attacker namespace sends a numbered UDP datagram every ~0.2 ms to an echo
server in the victim (over the tunnel for the peer case; inside a throw-away cgroup for the
service case). Time to cut = send time of the first datagram never answered, minus the
time apply() was called. Every run is lifted and traffic seen flowing again before the next.
A run is invalid (listed, left out of the percentiles) when the prober was never answered
before the apply, traffic was never cut, or was cut before the apply call (then something
else cut it); more than --max-invalid of a scope's runs invalid: exit 1.

    sudo .venv/bin/python bench/isolation_latency.py [--runs 20 | --quick] [--json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from swarmlab import figures  # noqa: E402
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


def time_to_cut(ns: str, addr: str, apply: Callable[[], None], limit_s: float = 3.0) -> dict:
    """{"cut_s": seconds from apply() to the first unanswered probe, "invalid": why the run
    measured nothing or None}. A sender thread probes all along (~5000 datagrams per second,
    at most limit_s + 0.3 s), so a cut that lands in the middle of apply() is seen there."""
    with CutProber(ns, addr, PORT, interval_s=0.0002, send_limit_s=limit_s + 0.3,
                   clock=time.perf_counter) as probe:
        try:
            probe.wait_answering(limit_s)
        except TimeoutError:
            apply()          # keep the apply/lift pairs even; the run measured nothing
            return {"cut_s": None, "invalid": "the prober was never answered before the apply"}
        t0 = time.perf_counter()
        apply()
        time.sleep(0.3)
    cut = probe.first_unanswered()
    if cut is None:
        return {"cut_s": None, "invalid": "traffic was never cut"}
    if cut < t0:
        return {"cut_s": None, "invalid": f"cut {(t0 - cut) * 1000:.2f} ms before the apply call: "
                                          "not the mitigation's doing"}
    return {"cut_s": cut - t0, "invalid": None}


def mit(kind: MitigationKind, target: str) -> Mitigation:
    now = time.time()
    return Mitigation(kind, target, now, now + 600)


def bench_node(lab: Lab, runs: int) -> list[dict]:
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


def bench_service(lab: Lab, runs: int) -> tuple[list[dict], list[dict]]:
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
                        frozen.append({"cut_s": time.perf_counter() - t0, "invalid": None})
                    cut.append(time_to_cut(lab.attacker, lab.addr("victim"), apply))
                    freezer.lift(m)
                    e.lift(m)
            finally:
                e.remove()
                e.close()
    return cut, frozen


def bench_peer(lab: Lab, runs: int, tmp: Path) -> list[dict]:
    out = []
    with wireguard_pair(lab, tmp, port=WG_PORT) as pair, \
            echo(lab.victim, pair.victim_tunnel), netns(lab.victim):
        wg = WireGuardEnforcer(tmp / "state")
        for _ in range(runs):
            m = mit(MitigationKind.REMOVE_PEER, pair.target)
            out.append(time_to_cut(lab.attacker, pair.victim_tunnel, lambda: wg.apply(m, time.time())))
            wg.lift(m)
    return out


def summary(runs: list[dict]) -> dict:
    """median / p95 / max (ms) over the valid runs; the invalid ones with their reason."""
    valid, invalid = figures.split(runs)
    ms = figures.spread([r["cut_s"] * 1000 for r in valid])
    return {"runs": len(runs), "valid": len(valid), "invalid": invalid,
            **{f"{k}_ms": (None if ms[k] is None else round(ms[k], 2))
               for k in ("median", "p95", "max")}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="5 runs per scope")
    ap.add_argument("--max-invalid", type=float, default=figures.MAX_INVALID_FRACTION,
                    help="fail (exit 1) when more than this fraction of a scope's runs is invalid")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import tempfile

    runs = 5 if args.quick else args.runs
    results = {}
    with Lab() as lab, tempfile.TemporaryDirectory() as tmp:
        results["node (isolate_node)"] = summary(bench_node(lab, runs))
        cut, frozen = bench_service(lab, runs)
        results["service (isolate_service: traffic cut)"] = summary(cut)
        results["service (cgroup.events frozen 1)"] = summary(frozen)
        results["peer (remove_peer, wireguard-go)"] = summary(bench_peer(lab, runs, Path(tmp)))
    failed = [n for n, r in results.items()
              if figures.too_many_invalid(r["runs"], len(r["invalid"]), args.max_invalid)]
    if args.json:
        print(json.dumps({"scopes": results, "failed": failed}, indent=1))
        return 1 if failed else 0
    print(f"{'scope':42} {'valid':>5} {'median ms':>10} {'p95 ms':>8} {'max ms':>8}")
    for name, r in results.items():
        print(f"{name:42} {r['valid']:>2}/{r['runs']:<2} {r['median_ms']!s:>10} "
              f"{r['p95_ms']!s:>8} {r['max_ms']!s:>8}")
    return figures.print_invalid(((n, r["invalid"]) for n, r in results.items()), failed,
                                 args.max_invalid)


if __name__ == "__main__":
    sys.exit(main())
