"""`swarm-mesh enroll`: one node's credentials and the config lines that join it.

    swarm-mesh enroll gpu-node-17 --provider acme --dir /etc/swarm-mesh --out ./gpu-node-17
        [--install-prefix /etc/swarm-agent/mesh] [--endpoint HOST:PORT] [--nats-url URL]

writes into OUTDIR (made 0700; it must be new or empty):

    node.pem, node.key     the node's client certificate (CN=NODE, O=PROVIDER, clientAuth,
                           two years, signed by DIR's CA) and its key (0600)
    ca.pem                 the mesh's CA: the node checks the mesh's certificates with it
    decisions.pub          the key fleet decisions are signed with
    nats.password          the shared read-only node user's NATS password (0600)
    agent-fleet.yaml       the `mesh:` and `fleet:` sections for /etc/swarm-agent/config.yaml,
                           naming the files where they will be on the node (--install-prefix)

The reporting API knows the node by its certificate's CN and the provider by its O, never
by what a report claims, so a name once given is not given again without --force: DIR's
enrolled.json records each enrolment. The node's key is made here and travels with the
rest; OUTDIR is as secret as the key.
"""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import re
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes

from mesh import cli, pki
from mesh.config import MeshConfigError, load, split_listen
from mesh.setup import LOOPBACK, NODE_USER, Layout, host_port, q

DEFAULT_PREFIX = "/etc/swarm-agent/mesh"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
FILES = ("node.pem", "node.key", "ca.pem", "decisions.pub", "nats.password", "agent-fleet.yaml")


def check_safe(what: str, value: str) -> str:
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value):
        raise cli.UsageError(f"{what} {value!r} is not a safe name: 1-63 letters, digits, "
                             "'.', '_' or '-', starting with a letter or digit")
    return value


def read_ledger(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise cli.UsageError(f"{path} cannot be read ({e}); fix or move it away") from None
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), dict):
        raise cli.UsageError(f"{path} is not an enrolment ledger; fix or move it away")
    return data["nodes"]


def where(lay: Layout, endpoint: str | None, nats_url: str | None) -> tuple[str, str, str]:
    """(endpoint, server_name, nats_url) for nodes: by default the first name of the mesh's
    certificate that is not loopback, with the ports of DIR/config.yaml."""
    try:
        cfg = load(lay.config)
    except MeshConfigError as e:
        raise cli.UsageError(str(e)) from None
    names = pki.names_of(pki.load_cert(lay.cert))
    public = next((n for n in names if n not in LOOPBACK), names[0] if names else "")
    if endpoint is None:
        if not public:
            raise cli.UsageError(f"{lay.cert} names no host; give --endpoint HOST:PORT")
        endpoint = host_port(public, split_listen(cfg.listen)[1])
    host = split_listen(endpoint)[0]
    if nats_url is None:
        mesh_url = str(cfg.nats.get("url") or "nats://127.0.0.1:4222")
        scheme, _, rest = mesh_url.partition("://")
        nats_url = f"{scheme}://{host_port(public or host, split_listen(rest)[1])}"
    if not nats_url.startswith(("nats://", "tls://")):
        raise cli.UsageError(f"--nats-url {nats_url!r} must start with nats:// or tls://")
    return endpoint, host, nats_url


def fleet_yaml(node: str, provider: str, prefix: str, endpoint: str, server_name: str,
               nats_url: str, mesh_addresses: list[str]) -> str:
    p = prefix.rstrip("/") or "/"
    f = {n: os.path.join(p, n) for n in FILES}
    lines = [
        f"# Node {node} of provider {provider}: written by `swarm-mesh enroll` "
        f"({time.strftime('%Y-%m-%d')}).",
        f"# 1. Copy every file of this directory to {p}/ on the node (root, 0700).",
        "# 2. Put these two sections into /etc/swarm-agent/config.yaml in place of its",
        "#    mesh: and fleet: sections (keys not named here keep their defaults).",
        "# 3. systemctl restart swarm-agent; then `swarm-mesh nodes` on the mesh lists it.",
        "mesh:",
        f"  endpoint: {q(endpoint)}",
        f"  server_name: {q(server_name)}",
        f"  tls_cert: {q(f['node.pem'])}",
        f"  tls_key: {q(f['node.key'])}",
        f"  tls_ca: {q(f['ca.pem'])}",
        f"  node_id: {q(node)}",
        "fleet:",
        f"  nats_url: {q(nats_url)}",
        f"  user: {q(NODE_USER)}",
        f"  password_file: {q(f['nats.password'])}",
        f"  tls_ca: {q(f['ca.pem'])}",
        f"  keys: [{q(f['decisions.pub'])}]",
    ]
    if mesh_addresses:
        lines += ["# The agent never blocks mesh.endpoint and the NATS servers above; the mesh's",
                  "# other addresses belong in its allowlist, so that no block ever cuts them:",
                  "# allowlist:",
                  f"#   mesh: [{', '.join(mesh_addresses)}]"]
    return "\n".join(lines) + "\n"


def _outdir(out: Path, force: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise cli.UsageError(f"--out {out} exists and is not a directory")
        if any(out.iterdir()) and not force:
            raise cli.UsageError(f"--out {out} is not empty; choose a new directory "
                                 "(or --force to replace its files)")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(out, 0o700)


def enroll(directory: Path, node: str, provider: str, out: Path, prefix: str,
           endpoint: str | None = None, nats_url: str | None = None,
           force: bool = False) -> dict:
    """Issues the node's certificate and writes OUTDIR; returns what the ledger records."""
    check_safe("NODE", node)
    check_safe("--provider", provider)
    lay = Layout(directory)
    for p in (lay.ca_cert, lay.ca_key, lay.cert, lay.signing_pub, lay.node_password, lay.config):
        if not p.exists():
            raise cli.UsageError(f"{p} does not exist; run swarm-mesh init --dir {directory} first")
    ledger = read_ledger(lay.ledger)
    if node in ledger and not force:
        had = ledger[node]
        raise cli.UsageError(f"node {node} was enrolled on {had.get('enrolled', '?')} for "
                             f"provider {had.get('provider', '?')}; --force issues it a new "
                             "certificate (the old one stays valid until it expires)")
    try:
        ca = pki.load_authority(lay.ca_cert, lay.ca_key)
        endpoint, server_name, nats_url = where(lay, endpoint, nats_url)
    except (pki.PkiError, MeshConfigError) as e:
        raise cli.UsageError(str(e)) from None
    _outdir(out, force)
    cert, key = pki.node_cert(ca, node, provider)
    mesh_ips = [str(ipaddress.ip_network(n)) for n in pki.names_of(pki.load_cert(lay.cert))
                if n not in LOOPBACK and _is_ip(n)]
    files = {
        "node.pem": (pki.cert_pem(cert), 0o644),
        "node.key": (pki.key_pem(key), 0o600),
        "ca.pem": (lay.ca_cert.read_bytes(), 0o644),
        "decisions.pub": (lay.signing_pub.read_bytes(), 0o644),
        "nats.password": (lay.node_password.read_bytes(), 0o600),
        "agent-fleet.yaml": (fleet_yaml(node, provider, prefix, endpoint, server_name, nats_url,
                                        mesh_ips).encode(), 0o644),
    }
    for name, (data, mode) in files.items():
        pki.write_replace(out / name, data, mode)
    record = {"provider": provider, "serial": format(cert.serial_number, "x"),
              "sha256": cert.fingerprint(hashes.SHA256()).hex(),
              "enrolled": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "not_after": cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)
              .isoformat(timespec="seconds"), "out": str(out)}
    ledger[node] = record
    pki.write_replace(lay.ledger, (json.dumps({"nodes": ledger}, indent=1, sort_keys=True)
                                   + "\n").encode(), 0o600)
    return {"node": node, **record, "endpoint": endpoint, "server_name": server_name,
            "nats_url": nats_url, "files": [str(out / n) for n in files]}


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _enroll(args: argparse.Namespace, cfg) -> int:
    out = Path(args.out).absolute()
    result = enroll(Path(args.dir).absolute(), args.node, args.provider, out,
                    args.install_prefix, args.endpoint, args.nats_url, args.force)
    if args.json:
        print(json.dumps(result))
        return cli.EXIT_OK
    print(f"enrolled {args.node} (provider {args.provider}): certificate {result['serial']}, "
          f"valid until {result['not_after']}")
    for f in result["files"]:
        print(f"  {f}")
    print(f"on the node: copy {out}/* to {args.install_prefix}/ (root, 0700), put "
          f"agent-fleet.yaml's sections into /etc/swarm-agent/config.yaml, "
          "systemctl restart swarm-agent")
    return cli.EXIT_OK


def _enroll_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("node", metavar="NODE", help="the node's name (its certificate's CN)")
    p.add_argument("--provider", required=True, help="the node's provider (its certificate's O)")
    p.add_argument("--dir", required=True, help="the mesh directory swarm-mesh init made")
    p.add_argument("--out", required=True, help="where the node's files go (new or empty)")
    p.add_argument("--install-prefix", default=DEFAULT_PREFIX,
                   help=f"where the files will be on the node (default {DEFAULT_PREFIX})")
    p.add_argument("--endpoint", help="host:port nodes reach the reporting API at (default: "
                   "the mesh certificate's first name and the configured port)")
    p.add_argument("--nats-url", help="nats-server's URL for nodes (default: tls://, the same "
                   "name and the configured port)")
    p.add_argument("--force", action="store_true",
                   help="enrol a node name again, and write into a non-empty --out")


cli.register("enroll", "issue a node's certificate and write what it needs to join",
             _enroll_args, _enroll, uses_config=False)
