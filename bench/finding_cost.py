"""What one new finding costs the loop: Responder.handle of a block (incident, mitigation,
timeline and outbox rows; the host change by the enforcer's dry-run twin, so only the
store is measured) on a real SQLite file, as the agent runs it (Store.start_syncing:
commits fsync'd on a thread).

    .venv/bin/python bench/finding_cost.py [--findings 300] [--dir /var/tmp] [--fsync-inline] [--json]

--fsync-inline leaves the store fsync'ing every commit on the caller's thread (as before
issue 9), for comparison. Use a --dir on a real disk (not tmpfs: its fsync is free).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.config import Config, MitigationPolicy  # noqa: E402
from agent.enforce.base import DryRunEnforcer  # noqa: E402
from agent.model import EventClass, Finding, Severity  # noqa: E402
from agent.respond.engine import Responder  # noqa: E402
from agent.state.store import Store  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--findings", type=int, default=300)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--fsync-inline", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    state = Path(tempfile.mkdtemp(prefix="swarm-finding-cost-", dir=args.dir))
    cfg = Config(state_dir=str(state),
                 mitigation=MitigationPolicy(max_sources_per_rule=1_000_000))
    store = Store(cfg.db_path)
    if not args.fsync_inline:
        store.start_syncing()
    responder = Responder(cfg, store, DryRunEnforcer())
    times_ms = []
    try:
        for i in range(args.findings):
            now_ns = time.monotonic_ns()
            f = Finding("bench.block", 1, EventClass.SYSTEM_ATTACK, Severity.HIGH,
                        f"ip:198.{18 + i // 65025}.{i // 255 % 255}.{i % 255 + 1}", "block",
                        now_ns - 10**9, now_ns, {"syns": 5000})
            t0 = time.perf_counter()
            responder.handle(f)
            times_ms.append((time.perf_counter() - t0) * 1000)
    finally:
        store.close()
        shutil.rmtree(state, ignore_errors=True)
    times_ms.sort()
    n = len(times_ms)
    out = {"findings": n, "fsync": "inline" if args.fsync_inline else "thread",
           "dir": args.dir, "p50_ms": round(times_ms[n // 2], 3),
           "p99_ms": round(times_ms[min(n - 1, int(n * 0.99))], 3),
           "max_ms": round(times_ms[-1], 3)}
    print(json.dumps(out) if args.json else
          f"handle per new finding ({out['fsync']} fsync, {n}): p50 {out['p50_ms']} ms, "
          f"p99 {out['p99_ms']} ms, max {out['max_ms']} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
