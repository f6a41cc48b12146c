"""What the process probe adds to every syscall of the host: raw_syscalls:sys_exit (the
32-bit syscall handler, probes/compat.bpf.h) runs on each one; the syscalls:* tracepoint
programs run only on their own syscalls. A C loop of N getppid() (built here with gcc),
timed with no probe, with the probe loaded without the compat handler, and with the whole
probe, in turn, the best of `--reps` each;
and the handler's own time from the kernel's BPF statistics (kernel.bpf_stats_enabled,
turned on for the run and restored).

    sudo .venv/bin/python -m bench.syscall_cost [--calls 5000000] [--reps 5]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

from agent.config import Config, Probes
from agent.sources.abi import ProcProg
from agent.sources.proc import ProcProbe

LOOP_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]); struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) syscall(SYS_getppid);
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.2f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
    return 0;
}
"""
STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


class WithoutCompat(ProcProbe):
    """The process probe less its raw_syscalls:sys_exit handler."""

    def _classify(self):
        return {**super()._classify(), ProcProg.COMPAT_EXIT: "left out for the comparison"}


def per_call(binary: Path, calls: int) -> float:
    return float(subprocess.run([str(binary), str(calls)], capture_output=True, text=True,
                                check=True, timeout=300).stdout)


def prog_stats(fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of the program behind fd, from /proc/self/fdinfo."""
    info = dict(line.split(":", 1) for line in
                Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines() if ":" in line)
    return int(info.get("run_time_ns", "0")), int(info.get("run_cnt", "0"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=5_000_000)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        src, binary = Path(d) / "loop.c", Path(d) / "loop"
        src.write_text(LOOP_C)
        subprocess.run(["gcc", "-O2", "-o", str(binary), str(src)], check=True, timeout=120)
        cfg = Config(state_dir=d, probes=Probes(process_owners=str(Path(d) / "owners")))
        without, no_compat, with_probe = [], [], []
        stats_before = STATS.read_text().strip() if STATS.exists() else None
        probe = ProcProbe(cfg)
        try:
            for _ in range(args.reps):
                without.append(per_call(binary, args.calls))
                other = WithoutCompat(cfg)
                other.open()
                try:
                    no_compat.append(per_call(binary, args.calls))
                finally:
                    other.close()
                probe.open()
                try:
                    with_probe.append(per_call(binary, args.calls))
                    if STATS.exists():      # the statistics' clock reads cost too: apart
                        STATS.write_text("1")
                    fd = probe._obj.program(ProcProg.COMPAT_EXIT).fd
                    t0, c0 = prog_stats(fd)
                    per_call(binary, args.calls)
                    t1, c1 = prog_stats(fd)
                finally:
                    if stats_before is not None:
                        STATS.write_text(stats_before)
                    probe.close()
        finally:
            probe.close()
    out = {"calls": args.calls, "reps": args.reps, "cpus": os.cpu_count(),
           "ns_no_probe": min(without), "ns_probe_without_compat": min(no_compat),
           "ns_probe": min(with_probe),
           "compat_added_ns": round(min(with_probe) - min(no_compat), 2),
           "probe_added_ns": round(min(with_probe) - min(without), 2),
           "handler_ns_per_run": round((t1 - t0) / (c1 - c0), 2) if c1 > c0 else None,
           "handler_runs_last_rep": c1 - c0}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
