"""What the activity probe (probes/activity.bpf.c) costs the workloads it watches: a C
client in the lab's attacker namespace (its own cgroup) runs, against a C sink in the
victim namespace over the veth pair,

- connect: N TCP connects, each established then closed (sock:inet_sock_set_state
  three times per connection, a flow.connect and a flow.close each, up to the
  per-cgroup cap: --flow-cap, default the product's 256 per 5 s, 0 for none),
- send: N send()s of --size bytes on one TCP connection (sock:sock_send_length),
- udp: N send()s of --size bytes on a connected UDP socket,
- exec: N fork + exec of /bin/true + wait (sched:sched_process_exec: the cgroup's
  counter, and the first exec of the file in the cgroup),

timed by the client itself (CLOCK_MONOTONIC around the loop: ns per operation), without
the probe and with it, alternating, --reps times each; and each handler's own ns per run
from the kernel's BPF statistics (kernel.bpf_stats_enabled, on for the run and restored).

A run with the probe is invalid when the probe did not see what the client did (its
cgroup's counters or flow.bytes short of the client's count: it measured something
else); one without it when the client failed. Invalid runs are listed with their reason
and left out; the bench exits 1 when more than 20% of a mode's runs are invalid.

    sudo .venv/bin/python -m bench.activity_probe [--quick] [--json] [--ops N] [--reps R]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent.config import Config, Probes
from agent.sources.abi import ActivityProg
from agent.sources.activity import ActivityProbe
from swarmlab.breachlab import throwaway_cgroup
from swarmlab.figures import MAX_INVALID_FRACTION, print_invalid, split, too_many_invalid
from swarmlab.lab import Lab

CLIENT_C = r"""
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
                          return t.tv_sec * 1e9 + t.tv_nsec; }
int main(int argc, char **argv) {
    const char *mode = argv[1]; long n = atol(argv[2]); int size = atoi(argv[5]);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[4]))};
    char *buf = calloc(1, size > 0 ? size : 1); double t0, t1; int s;
    inet_pton(AF_INET, argv[3], &a.sin_addr);
    if (!strcmp(mode, "exec")) {
        t0 = now();
        for (long i = 0; i < n; i++) {
            pid_t p = fork();
            if (p == 0) { execl("/bin/true", "true", (char *)0); _exit(127); }
            waitpid(p, 0, 0);
        }
        t1 = now();
    } else if (!strcmp(mode, "connect")) {
        t0 = now();
        for (long i = 0; i < n; i++) {
            s = socket(AF_INET, SOCK_STREAM, 0);
            /* RST at close: no TIME_WAIT, so runs never exhaust the ephemeral ports */
            setsockopt(s, SOL_SOCKET, SO_LINGER, &(struct linger){1, 0}, sizeof(struct linger));
            if (connect(s, (void *)&a, sizeof(a))) { perror("connect"); return 1; }
            close(s);
        }
        t1 = now();
    } else {
        s = socket(AF_INET, strcmp(mode, "udp") ? SOCK_STREAM : SOCK_DGRAM, 0);
        if (connect(s, (void *)&a, sizeof(a))) { perror("connect"); return 1; }
        t0 = now();
        for (long i = 0; i < n; i++)
            if (send(s, buf, size, 0) != size) { perror("send"); return 1; }
        t1 = now();
        close(s);
    }
    printf("%.1f\n", (t1 - t0) / n);
    return 0;
}
"""

SINK_C = r"""
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>
int main(void) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(5201)};
    int one = 1, l = socket(AF_INET, SOCK_STREAM, 0), u = socket(AF_INET, SOCK_DGRAM, 0);
    static char buf[1 << 16];
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    bind(l, (void *)&a, sizeof(a)); listen(l, 4096);
    bind(u, (void *)&a, sizeof(a));           /* unread: the kernel drops past its buffer */
    for (;;) {
        int c = accept(l, 0, 0);
        while (read(c, buf, sizeof(buf)) > 0) ;
        close(c);
    }
}
"""
PORT = 5201
STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
HANDLERS = {"connect": ActivityProg.SOCK_STATE, "send": ActivityProg.SEND, "udp": ActivityProg.SEND,
            "exec": ActivityProg.EXEC}


def build(d: Path) -> tuple[Path, Path]:
    out = []
    for name, src in (("client", CLIENT_C), ("sink", SINK_C)):
        (d / f"{name}.c").write_text(src)
        subprocess.run(["gcc", "-O2", "-o", str(d / name), str(d / f"{name}.c")], check=True,
                       timeout=120)
        out.append(d / name)
    return out[0], out[1]


def client(binary: Path, lab: Lab, cg: Path, mode: str, ops: int, size: int) -> float | str:
    """ns per operation, or why the client failed."""
    script = f'echo $$ > "{cg}/cgroup.procs" && exec "$@"'
    r = subprocess.run(["sh", "-c", script, "sh", "ip", "netns", "exec", lab.attacker,
                        str(binary), mode, str(ops), lab.addr("victim"), str(PORT), str(size)],
                       capture_output=True, text=True, timeout=600)
    if r.returncode:
        return f"the client failed: {r.stderr.strip()[-200:]}"
    return float(r.stdout)


def prog_stats(fd: int) -> tuple[int, int]:
    info = dict(line.split(":", 1) for line in
                Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines() if ":" in line)
    return int(info.get("run_time_ns", "0")), int(info.get("run_cnt", "0"))


def seen_short(probe: ActivityProbe, cg: Path, mode: str, ops: int, size: int) -> str | None:
    """Why the probe's view does not match the client's run (None when it does)."""
    events = probe.poll_counters(time.monotonic_ns())
    mine = [e for e in events if e.fields.get("cgroup") == "/" + cg.name]
    if mode in ("connect", "exec"):
        what = "connects" if mode == "connect" else "execs"
        want = ops + 2 if mode == "exec" else ops        # + the execs of ip and the client
        got = sum(e.fields[what] for e in mine if e.kind == "activity.counts")
        return None if got == want else f"the probe counted {got} of {want} {what}"
    proto = "udp" if mode == "udp" else "tcp"
    got = sum(e.fields["bytes_out"] for e in mine if e.kind == "flow.bytes"
              and e.fields["proto"] == proto and e.fields["dport"] == PORT)
    return None if got == ops * size else f"the probe counted {got} of {ops * size} bytes"


def run_mode(binary: Path, lab: Lab, cfg: Config, mode: str, args) -> dict:
    without, with_probe, handler = [], [], []
    ops = args.exec_ops if mode == "exec" else args.ops
    for _ in range(args.reps):
        with throwaway_cgroup("swa-bench") as cg:
            r = client(binary, lab, cg, mode, ops, args.size)
            without.append({"ns": r if isinstance(r, float) else None,
                            "invalid": None if isinstance(r, float) else r})
        probe = ActivityProbe(cfg, flow_cap=args.flow_cap)
        probe.open()
        try:
            fd = probe._obj.program(HANDLERS[mode]).fd
            with throwaway_cgroup("swa-bench") as cg:
                t0, c0 = prog_stats(fd)
                r = client(binary, lab, cg, mode, ops, args.size)
                t1, c1 = prog_stats(fd)
                probe.poll()                    # the ring buffer's events, decoded as live
                bad = r if isinstance(r, str) else seen_short(probe, cg, mode, ops, args.size)
            with_probe.append({"ns": r if isinstance(r, float) else None, "invalid": bad,
                               "losses": probe.losses()})
            if c1 > c0 and t1 > 0:
                handler.append((t1 - t0) / (c1 - c0))
        finally:
            probe.close()
    ok_without, bad_without = split(without)
    ok_with, bad_with = split(with_probe)
    med = lambda runs: round(statistics.median(r["ns"] for r in runs), 1) if runs else None
    a, b = med(ok_without), med(ok_with)
    return {"ops": ops, "size": args.size if mode != "connect" else None,
            "ns_per_op_without": a, "ns_per_op_with": b,
            "added_ns": round(b - a, 1) if a is not None and b is not None else None,
            "added_pct": round(100 * (b - a) / a, 1) if a and b is not None else None,
            "runs_without": [r["ns"] for r in without], "runs_with": [r["ns"] for r in with_probe],
            "handler_ns_per_run": round(statistics.median(handler), 1) if handler else None,
            "ringbuf_losses": max((r["losses"] for r in with_probe), default=0),
            "invalid": [{**b, "run": f"{b['run']} without the probe"} for b in bad_without]
            + [{**b, "run": f"{b['run']} with the probe"} for b in bad_with],
            "failed": too_many_invalid(len(without) + len(with_probe),
                                       len(bad_without) + len(bad_with))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", type=int, default=20000, help="operations per run")
    ap.add_argument("--reps", type=int, default=5, help="runs with and without the probe")
    ap.add_argument("--size", type=int, default=1024, help="bytes per send")
    ap.add_argument("--flow-cap", type=int, default=256, help="flow events per cgroup per 5 s")
    ap.add_argument("--modes", default="connect,send,udp,exec")
    ap.add_argument("--quick", action="store_true", help="2000 ops, 3 reps")
    ap.add_argument("--json", action="store_true", help="one JSON object, nothing else")
    args = ap.parse_args()
    if args.quick:
        args.ops, args.reps = 2000, 3
    if "exec" in args.modes.split(","):
        args.exec_ops = max(1, args.ops // 10)      # a fork + exec costs ~100x a send
    stats_before = STATS.read_text().strip() if STATS.exists() else None
    results: dict = {}
    with tempfile.TemporaryDirectory() as d, Lab() as lab:
        binary, sink_bin = build(Path(d))
        cfg = Config(state_dir=d, probes=Probes(process_owners=str(Path(d) / "owners")))
        sink = subprocess.Popen(["ip", "netns", "exec", lab.victim, str(sink_bin)])
        try:
            time.sleep(0.3)
            if STATS.exists():
                STATS.write_text("1")
            for mode in args.modes.split(","):
                results[mode] = run_mode(binary, lab, cfg, mode, args)
        finally:
            if stats_before is not None:
                STATS.write_text(stats_before)
            sink.kill()
            sink.wait()
    out = {"bench": "activity_probe", "cpus": os.cpu_count(), "reps": args.reps,
           "flow_cap": args.flow_cap, "clock": "client's CLOCK_MONOTONIC around its loop",
           "modes": results}
    if args.json:
        print(json.dumps(out))
    else:
        print(json.dumps(out, indent=1))
    failed = [m for m, r in results.items() if r["failed"]]
    return print_invalid(((m, r["invalid"]) for m, r in results.items()), failed,
                         MAX_INVALID_FRACTION) if not args.json else (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
