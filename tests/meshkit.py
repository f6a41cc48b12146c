"""Test helpers for the real mesh service (mesh/): node certificates with a provider, a
config file, and the service as a process (`python -m mesh run`).

    certs = make_certs(tmp / "certs")                        # tests/meshrecv.py: CA, server
    a = node_cert(certs, "node-a", "provider-a")              # {"cert", "key"} signed by the CA
    cfg = write_config(tmp / "mesh.yaml", certs, store_url)   # listen 127.0.0.1:0
    with MeshProcess(cfg) as mesh:                            # started, then stopped
        mesh.port; mesh.kill(); mesh.start()                  # SIGKILL and restart
        mesh.cli("nodes", "--json")                           # -> parsed JSON
"""
from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def node_cert(certs: dict[str, Path], name: str, cn: str | None,
              org: str | None = None) -> dict[str, Path]:
    """A client certificate (EC P-256, a day) for subject [CN=cn][, O=org], signed by the
    CA of make_certs; files <name>.pem and <name>.key beside the CA."""
    out = certs["ca"].parent
    subj = (f"/CN={cn}" if cn else "") + (f"/O={org}" if org else "")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)

    run("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(out / f"{name}.key"), "-out", str(out / f"{name}.csr"), "-subj", subj)
    (out / f"{name}.ext").write_text("extendedKeyUsage=clientAuth\n")
    run("x509", "-req", "-in", str(out / f"{name}.csr"), "-CA", str(certs["ca"]),
        "-CAkey", str(certs["ca"].with_suffix(".key")), "-CAcreateserial", "-days", "1",
        "-out", str(out / f"{name}.pem"), "-extfile", str(out / f"{name}.ext"))
    return {"cert": out / f"{name}.pem", "key": out / f"{name}.key"}


def write_config(path: Path, certs: dict[str, Path], store: str, listen: str = "127.0.0.1:0",
                 extra: str = "") -> Path:
    path.write_text(f"""\
listen: "{listen}"
tls_cert: {certs['server_cert']}
tls_key: {certs['server_key']}
tls_ca: {certs['ca']}
store: "{store}"
log_format: json
metrics_listen: "127.0.0.1:0"
{extra}""")
    return path


class MeshProcess:
    """`python -m mesh run --config CONFIG` as a child process. start() returns once it
    printed its {"listening": ...} line (the port is kept: a restart listens on the same
    one); stop() sends SIGTERM and waits; kill() is SIGKILL. Stderr (the JSON log) is kept
    in a file beside the config."""

    def __init__(self, config: Path, prefix: tuple[str, ...] = ()):
        self.config, self.prefix = config, prefix     # prefix: ("ip", "netns", "exec", ns)
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.log = config.with_suffix(".log")

    def start(self, timeout_s: float = 30.0) -> "MeshProcess":
        cfg = self.config
        if self.port:                     # restart on the port clients already use
            text = cfg.read_text()
            cfg = cfg.with_suffix(".restart.yaml")
            cfg.write_text(text.replace(':0"\n', f':{self.port}"\n', 1))
        with open(self.log, "a") as err:
            self.proc = subprocess.Popen([*self.prefix, sys.executable, "-m", "mesh", "run",
                                          "--config", str(cfg)], cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if '"listening"' not in line:
            self.kill()
            raise RuntimeError(f"mesh service did not start: {self.log.read_text()[-800:]}")
        self.port = int(json.loads(line)["listening"].rpartition(":")[2])
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def cli(self, *args: str, check: bool = True) -> object:
        """`python -m mesh ARGS --config CONFIG`; parsed JSON when --json is in ARGS."""
        out = subprocess.run([sys.executable, "-m", "mesh", *args, "--config", str(self.config)],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
        if check and out.returncode != 0:
            raise RuntimeError(f"swarm-mesh {' '.join(args)}: rc {out.returncode}: {out.stderr}")
        return json.loads(out.stdout) if "--json" in args else out.stdout

    def __enter__(self) -> "MeshProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
