"""`swarm-agent gpu authorize|revoke|list`: the CLI's side of the AuthorizeGpu, RevokeGpu
and ListGpuAuthorizations calls (agent/gpuguard.py). Output and exit codes as in
client.py: bad input (a workload that is no cgroup path or container id, a GPU that is
no uuid or index) exits 2 with one sentence, a revoke of nothing stored exits 4."""
from __future__ import annotations

import argparse
import time
from typing import Callable

from agent.cli.client import EXIT_OK, Client, _print_json, _table, to_dict
from agent.proto.swarm.control.v1 import control_pb2 as pb


def add_parsers(add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    sp = add("gpu", "GPU authorization: which workloads may use which GPUs (a process of "
             "any other workload on a GPU is a policy violation)")
    sp.add_argument("action", choices=("list", "authorize", "revoke"),
                    help="list the authorizations in force; authorize WORKLOAD GPU...; "
                    "revoke WORKLOAD [GPU...] (none: all of its GPUs; its processes still "
                    "on a GPU become violations at once)")
    sp.add_argument("workload", nargs="?", default="",
                    help="a cgroup v2 path (that cgroup and below it) or container:<64-hex id>")
    sp.add_argument("gpus", nargs="*", help="all, GPU uuids (GPU-...) or indexes (0, 1, ...)")
    sp.add_argument("--job", default="", help="authorize: the scheduler's label for the record")


def gpu(c: Client, args: argparse.Namespace) -> int:
    if args.action == "authorize":
        done = c.call("AuthorizeGpu", pb.AuthorizeGpuRequest(
            workload=args.workload, gpus=args.gpus, job=args.job))
        if args.json:
            _print_json(to_dict(done))
        else:
            print(f"authorized {args.workload} on GPU {', '.join(args.gpus)}")
        return EXIT_OK
    if args.action == "revoke":
        done = c.call("RevokeGpu", pb.RevokeGpuRequest(workload=args.workload, gpus=args.gpus))
        if args.json:
            _print_json(to_dict(done))
        else:
            print(f"revoked {done.revoked} authorization(s) of {args.workload}; "
                  f"{done.rechecked} process(es) on the GPUs judged again")
        return EXIT_OK
    found = c.call("ListGpuAuthorizations", pb.ListGpuAuthorizationsRequest())
    if args.json:
        _print_json([to_dict(a) for a in found.authorizations])
    else:
        rows = [[a.workload, a.gpu, a.source, a.job, a.by,
                 time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(a.created_at))
                 if a.created_at else ""] for a in found.authorizations]
        print(_table(["WORKLOAD", "GPU", "FROM", "JOB", "BY", "SINCE (UTC)"], rows)
              if rows else "no GPU authorizations: every workload's GPU process is a violation")
    return EXIT_OK


COMMANDS: dict[str, Callable[[Client, argparse.Namespace], int]] = {"gpu": gpu}
