"""agent.sources.procfd on real processes (no BPF): executables verified by inode, and
loopback TCP connections followed to the process at the other end, not counted as
network."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from agent.config import Breach, Config
from agent.sources.ident import ListedExes, resolve_exes
from agent.sources.procfd import Snapshot, verified_exe

SLEEPER = "import time; time.sleep(20)"


def kernel_dev(st_dev: int) -> int:
    return (os.major(st_dev) << 20) | os.minor(st_dev)


def test_exe_verified_by_inode_not_by_path(tmp_path: Path):
    exe = tmp_path / "daemon"
    shutil.copy2(Path(sys.executable).resolve(), exe)
    proc = subprocess.Popen([str(exe), "-c", SLEEPER], env={"PYTHONHOME": "/usr"})
    try:
        time.sleep(0.2)
        st = os.stat(exe)
        assert verified_exe(proc.pid) == str(exe)
        assert verified_exe(proc.pid, kernel_dev(st.st_dev), st.st_ino) == str(exe)
        cfg = Config(breach=Breach(remote_access=(str(tmp_path / "dae*"),)))
        resolved = resolve_exes(cfg)
        index = ListedExes(lambda: resolved, "remote_access")
        assert index.of_process(proc.pid) == str(exe)
        assert ListedExes(lambda: resolved, "shells").of_process(proc.pid) is None
        # another file put at the same path: the running process is no longer "daemon"
        shutil.copy2(Path(sys.executable).resolve(), tmp_path / "new")
        os.replace(tmp_path / "new", exe)
        assert verified_exe(proc.pid) is None
        # the probe's next resolution has the new file only: the old one is nothing
        resolved = resolve_exes(cfg)
        assert index.of_process(proc.pid) is None
    finally:
        proc.kill()
        proc.wait()


SERVER = """
import socket, sys, time
s = socket.create_server(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
time.sleep(20)
"""
CLIENT = """
import socket, sys, time
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print("up", flush=True)
time.sleep(20)
"""


def test_loopback_connections_lead_to_their_other_end():
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    client = None
    try:
        port = server.stdout.readline().strip()
        client = subprocess.Popen([sys.executable, "-c", CLIENT, port], stdout=subprocess.PIPE,
                                  text=True)
        assert client.stdout.readline().strip() == "up"
        snap = Snapshot.take()
        assert snap.loopback_peers(client.pid) == {server.pid}
        assert snap.loopback_peers(server.pid) == {client.pid}
        assert snap.connections(client.pid) == [] and snap.connections(server.pid) == []
    finally:
        for p in (server, client):
            if p is not None:
                p.kill()
                p.wait()
