"""A real nats-server for tests: JetStream in a temp dir, the fleet's generated configuration
(mesh.natsconf: a mesh user and node users), 127.0.0.1 on a free port.

    with NatsServer(tmp_path) as srv:       # skips (fails in CI) when nats-server is missing
        srv.url                             # "nats://127.0.0.1:<port>"
        srv.creds("mesh")                   # {"user": "mesh", "password": ...} for nats.connect
        srv.creds("node-1")                 # a node user (nodes=("node-1", ...) names them)
        srv.stop(); srv.start()             # a restart: same port, same store dir
        srv.kill()                          # SIGKILL (a crash)

`start()` returns once the server accepts TCP connections and logged "Server is ready";
the process is always killed on exit, and its log is in `srv.log_path` (shown when it fails
to start). Same arguments to `NatsServer` from another test give an independent server.
"""
from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from mesh import natsconf
from tests.conftest import skip_unsupported

BINARY = "/usr/sbin/nats-server"


def nats_binary() -> str:
    path = shutil.which("nats-server") or (BINARY if Path(BINARY).exists() else None)
    if path is None:
        skip_unsupported("needs nats-server (apt-get install nats-server; install.sh --test)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsServer:
    """One nats-server process with its config, store and log under `workdir`."""

    def __init__(self, workdir: Path, nodes: tuple[str, ...] = ("node-1", "node-2"),
                 port: int | None = None, host: str = "127.0.0.1", ns: str | None = None,
                 **settings):
        self.binary = nats_binary()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host, self.ns = host, ns           # ns: run it inside that network namespace
        self.store_dir = self.workdir / "jetstream"
        self.config_path = self.workdir / "nats.conf"
        self.log_path = self.workdir / "nats.log"
        self.users = {"mesh": natsconf.User("mesh", natsconf.new_password(), "mesh")}
        for n in nodes:
            self.users[n] = natsconf.User(n, natsconf.new_password(), "node")
        self.settings = natsconf.ServerSettings(store_dir=str(self.store_dir), host=host,
                                                port=self.port, **settings)
        natsconf.write(self.config_path, self.settings, list(self.users.values()))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        scheme = "tls" if self.settings.tls_cert else "nats"
        return f"{scheme}://{self.host}:{self.port}"

    def creds(self, name: str) -> dict[str, str]:
        u = self.users[name]
        return {"user": u.name, "password": u.password}

    def start(self, timeout_s: float = 15.0) -> "NatsServer":
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        prefix = ["ip", "netns", "exec", self.ns] if self.ns else []
        self.proc = subprocess.Popen([*prefix, self.binary, "-c", str(self.config_path)],
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}:\n"
                                   f"{self.log_path.read_text()[-3000:]}")
            ready = b"Server is ready" in self.log_path.read_bytes()[offset:]
            if ready and self._accepts():
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"nats-server not ready in {timeout_s} s:\n"
                           f"{self.log_path.read_text()[-3000:]}")

    def _accepts(self) -> bool:
        ctx = contextlib.nullcontext()
        if self.ns:
            from swarmlab.lab import netns
            ctx = netns(self.ns)
        try:
            with ctx, socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """A clean shutdown (SIGTERM), killed if it takes longer than timeout_s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(5)
            self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> "NatsServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()
