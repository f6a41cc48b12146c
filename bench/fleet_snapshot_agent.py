"""A real agent loads a snapshot of N fleet decisions (default 100,000) from a real
nats-server: the decisions are signed and published to stream SWARM_DECISIONS first, then
`swarm-agent run` starts in a network namespace with an empty database (cursor 0: it
loads the whole stream). Measured: the agent's RSS when it is ready (before the load) and
once every decision is in its kernel set (after), and the time from ready to the last
element in nftables (verification, plan, one SQLite and one nft transaction per batch).

    sudo .venv/bin/python -m bench.fleet_snapshot_agent [--n 100000] [--json]

Root: it makes a lab (two namespaces) and runs nats-server in the attacker one.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent._vendor import nats
from agent.fleet.decision import Decision, Signer, generate_key, load_private_key
from mesh.publish import stream_config
from swarmlab.lab import Lab, netns, sh
from swarmlab.scenario import AgentProcess
from tests.natsserver import NatsServer

PUBLISH_WINDOW = 2000      # publishes in flight at once


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0     # utime + stime, clock ticks


async def publish_all(url: str, creds: dict, signer: Signer, n: int) -> float:
    nc = await nats.connect(url, **creds, inbox_prefix="_INBOX_MESH")
    js = nc.jetstream(timeout=30)
    await js.add_stream(stream_config(86400.0))
    now = time.time()
    base = int(ipaddress.IPv4Address("20.0.0.0"))
    t = time.monotonic()
    pending: list = []
    for i in range(n):
        d = Decision("block", f"{ipaddress.IPv4Address(base + 2 * i)}/32", now, now + 7200,
                     reason="bench", provenance={"kind": "corroborated", "nodes": ["a", "b", "c"]})
        pending.append(js.publish(d.subject, signer.envelope(d), headers={"Nats-Msg-Id": d.id}))
        if len(pending) >= PUBLISH_WINDOW:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    took = time.monotonic() - t
    await nc.close()
    return took


def in_kernel(ns: str) -> int:
    r = sh("nft", "-j", "list", "set", "inet", "swarm_agent_fleet", "fleet_v4", ns=ns,
           check=False, timeout=60)
    if r.returncode:
        return 0
    for item in json.loads(r.stdout)["nftables"]:
        if "set" in item:
            return len(item["set"].get("elem", []))
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fleet-snap-agent-"))
    generate_key(tmp / "k.pem", tmp / "k.pub")
    signer = Signer(load_private_key(tmp / "k.pem"))
    out: dict = {"n": args.n}
    with Lab() as lab:
        nats_ip = f"10.{lab.subnet}.0.3"
        sh("ip", "addr", "add", f"{nats_ip}/24", "dev", "a0", ns=lab.attacker)
        server = NatsServer(tmp / "nats", nodes=("node",), host=nats_ip, ns=lab.attacker,
                            max_memory_store="4G")
        with server:
            with netns(lab.attacker):
                out["publish_s"] = round(asyncio.run(publish_all(
                    server.url, server.creds("mesh"), signer, args.n)), 2)
            (tmp / "node.password").write_text(server.creds("node")["password"] + "\n")
            (tmp / "agent").mkdir()
            agent = AgentProcess(lab.victim, tmp / "agent", f"""\
allowlist:
  mesh: [{nats_ip}/32]
mesh:
  node_id: victim
fleet:
  nats_url: {server.url}
  user: node
  password_file: {tmp / 'node.password'}
  keys: [{tmp / 'k.pub'}]
metrics:
  listen: null
""")
            agent.start()
            try:
                t0 = time.monotonic()
                out["rss_ready_mib"] = round(rss_mib(agent.pid), 1)
                cpu0 = cpu_s(agent.pid)
                deadline = t0 + 600
                count = 0
                while time.monotonic() < deadline:
                    # the kernel is listed once the agent says it loaded the snapshot: a
                    # listing of a set that fills by chunks costs up to a second of CPU,
                    # which the agent shares on a small machine
                    if not any("fleet snapshot loaded" in ln for ln in agent.log_lines):
                        time.sleep(0.05)
                        continue
                    count = in_kernel(lab.victim)
                    if count >= args.n:
                        break
                    time.sleep(0.2)
                out["ready_to_all_in_kernel_s"] = round(time.monotonic() - t0, 2)
                out["in_kernel"] = count
                out["agent_cpu_s"] = round(cpu_s(agent.pid) - cpu0, 2)
                out["rss_after_mib"] = round(rss_mib(agent.pid), 1)
                time.sleep(5)
                out["rss_after_5s_mib"] = round(rss_mib(agent.pid), 1)
                st = subprocess.run([str(Path(sys.executable).with_name("swarm-agent")),
                                     "fleet", "--json", "--limit", "1", "--config",
                                     str(agent.config_path)],
                                    capture_output=True, text=True, timeout=60)
                fleet = json.loads(st.stdout) if st.returncode == 0 else {}
                out["agent_fleet"] = {k: fleet.get(k) for k in ("seq", "in_force", "lag")}
            finally:
                agent.stop()
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
