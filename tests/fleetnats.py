"""A real nats-server with JetStream for the fleet tests, and a publisher of signed
decisions (H3's minimal fixture; tests/natsserver.py is the shared one to reconcile with).

NatsServer starts /usr/sbin/nats-server -js with its store in a temp dir on a free port
(inside network namespace `ns` when given, listening on `host`), waits until it answers,
and kills it on stop() (also on errors). Publishing goes through the vendored client,
from inside `ns` when given (the calling thread enters it for the connection only).
"""
from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterable, Iterator

from agent._vendor import nats
from agent._vendor.nats.js.api import StreamConfig
from agent.fleet.decision import STREAM, SUBJECT_PREFIX, Decision, Signer

NATS_SERVER = "/usr/sbin/nats-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsServer:
    def __init__(self, store_dir: Path, host: str = "127.0.0.1", ns: str | None = None,
                 port: int | None = None):
        if shutil.which(NATS_SERVER) is None:
            raise FileNotFoundError(NATS_SERVER)
        self.store_dir, self.host, self.ns = store_dir, host, ns
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> "NatsServer":
        self.store_dir.mkdir(parents=True, exist_ok=True)
        cmd = [NATS_SERVER, "-js", "-sd", str(self.store_dir), "-a", self.host, "-p", str(self.port)]
        if self.ns:
            cmd = ["ip", "netns", "exec", self.ns, *cmd]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {self.proc.stderr.read()[-500:]!r}")
            try:
                run(self._ping(), self.ns)
                return self
            except Exception:   # noqa: BLE001 -- not listening yet
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("nats-server did not start")

    async def _ping(self) -> None:
        nc = await nats.connect(self.url, connect_timeout=1, allow_reconnect=False,
                                error_cb=_quiet)
        await nc.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> "NatsServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _quiet(*_: object) -> None:
    return None


def run(coro, ns: str | None = None):
    """Run `coro` to completion, its sockets opened inside network namespace `ns`."""
    if ns is None:
        return asyncio.run(coro)
    from swarmlab.lab import netns
    with netns(ns):
        return asyncio.run(coro)


async def _with_js(url: str, fn):
    nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False, error_cb=_quiet)
    try:
        return await fn(nc.jetstream())
    finally:
        await nc.close()


def create_stream(url: str, ns: str | None = None) -> None:
    """The decision stream as the mesh makes it: one message per subject."""
    async def fn(js):
        await js.add_stream(StreamConfig(name=STREAM, subjects=[f"{SUBJECT_PREFIX}.>"],
                                         max_msgs_per_subject=1))
    run(_with_js(url, fn), ns)


def delete_stream(url: str, ns: str | None = None) -> None:
    async def fn(js):
        await js.delete_stream(STREAM)
    run(_with_js(url, fn), ns)


def publish(url: str, items: Iterable[tuple[str, bytes]], ns: str | None = None) -> list[int]:
    """Publish (subject, body) pairs; their stream sequences."""
    async def fn(js):
        out = []
        for subject, body in items:
            ack = await js.publish(subject, body)
            out.append(ack.seq)
        return out
    return run(_with_js(url, fn), ns)


def signed(signer: Signer, *decisions: Decision) -> list[tuple[str, bytes]]:
    return [(d.subject, signer.envelope(d)) for d in decisions]


@contextlib.contextmanager
def server(tmp: Path, **kw) -> Iterator[NatsServer]:
    s = NatsServer(tmp / "nats", **kw)
    with s:
        yield s


def fleet_in_force(ns: str) -> set[str]:
    """Addresses and networks in the fleet sets of namespace `ns`, read from its kernel
    (table inet swarm_agent_fleet); nothing when the table is not there."""
    import json
    from swarmlab.lab import sh
    out: set[str] = set()
    for name in ("fleet_v4", "fleet_v6", "fleet_net_v4", "fleet_net_v6"):
        r = sh("nft", "-j", "list", "set", "inet", "swarm_agent_fleet", name, ns=ns, check=False)
        if r.returncode != 0:
            continue
        for item in json.loads(r.stdout)["nftables"]:
            for e in item.get("set", {}).get("elem", []):
                v = e["elem"]["val"] if isinstance(e, dict) and "elem" in e else e
                if isinstance(v, dict) and "prefix" in v:
                    v = f"{v['prefix']['addr']}/{v['prefix']['len']}"
                out.add(str(v))
    return out
