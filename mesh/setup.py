"""`swarm-mesh init`: everything a one-machine mesh needs, in one directory.

    swarm-mesh init --dir /etc/swarm-mesh [--listen 0.0.0.0:7443] [--name mesh.example ...]
                    [--nats-listen 0.0.0.0:4222] [--state-dir /var/lib/swarm-mesh] [--store URL]
                    [--metrics-listen 127.0.0.1:9465] [--group swarm-mesh]

It makes, and never overwrites (a second run keeps what exists, fills what is missing and
says which is which):

    DIR/ca.pem, ca.key           the mesh's CA (key 0600): signs the mesh's and the nodes'
                                 certificates (swarm-mesh enroll)
    DIR/mesh.pem, mesh.key       the mesh's server certificate for the reporting API and
                                 nats-server: SANs the --name values plus loopback
    DIR/decisions.key, .pub      the Ed25519 key that signs fleet decisions
    DIR/nats/nats.conf           nats-server: JetStream in STATE/jetstream, TLS with
    DIR/nats/mesh.password       mesh.pem, a mesh user and one shared read-only node user
    DIR/nats/node.password
    DIR/config.yaml              the service's config: mTLS listen, the SQLite store
                                 STATE/mesh.db, the embedded nats-server, signing, policy

so `swarm-mesh init --dir D && swarm-mesh run --config D/config.yaml` is the whole mesh.
With --group G (the packaged service's group, swarm-mesh) the files `run` and its
nats-server read become readable by G (0640, directories 0750) and stay the owner's to
change; the CA key, the node password and the ledger stay the owner's alone.
The DIR layout is shared with `swarm-mesh enroll` (mesh/enroll.py) through Layout.
"""
from __future__ import annotations

import argparse
import grp
import ipaddress
import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from agent.fleet.decision import generate_key, key_id, load_private_key
from mesh import cli, pki
from mesh.config import MeshConfig, split_listen, store_kind
from mesh.natsconf import ServerSettings, write_fleet
from mesh.policy import defaults as policy_defaults

DEFAULT_LISTEN = "0.0.0.0:7443"
DEFAULT_NATS_LISTEN = "0.0.0.0:4222"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9465"   # loopback: a scraper on the host, or a proxy
DEFAULT_STATE = Path("/var/lib/swarm-mesh")
LOOPBACK = ("localhost", "127.0.0.1", "::1")
NODE_USER = "node"
# What `swarm-mesh run` and its nats-server read (Layout attributes): shared with --group.
SERVICE_READS = ("config", "cert", "key", "ca_cert", "signing_key", "signing_pub",
                 "nats_conf", "mesh_password")
_DNS = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                  r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


@dataclass(frozen=True)
class Layout:
    """Where each file of a mesh directory is."""
    dir: Path

    ca_cert = property(lambda s: s.dir / "ca.pem")
    ca_key = property(lambda s: s.dir / "ca.key")
    cert = property(lambda s: s.dir / "mesh.pem")
    key = property(lambda s: s.dir / "mesh.key")
    signing_key = property(lambda s: s.dir / "decisions.key")
    signing_pub = property(lambda s: s.dir / "decisions.pub")
    nats_dir = property(lambda s: s.dir / "nats")
    nats_conf = property(lambda s: s.dir / "nats" / "nats.conf")
    mesh_password = property(lambda s: s.dir / "nats" / "mesh.password")
    node_password = property(lambda s: s.dir / "nats" / f"{NODE_USER}.password")
    config = property(lambda s: s.dir / "config.yaml")
    ledger = property(lambda s: s.dir / "enrolled.json")


@dataclass(frozen=True)
class Step:
    path: Path
    made: bool
    what: str


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_name(name: str) -> str:
    """A --name: an IP address or a DNS name; UsageError otherwise."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not _DNS.fullmatch(name):
        raise cli.UsageError(f"--name {name!r} is neither an IP address nor a DNS name")
    return name.rstrip(".").lower()


def default_names() -> list[str]:
    """This host's fully qualified name and the addresses it resolves to, loopback left
    out (it is always added)."""
    fqdn = socket.getfqdn()
    names = [fqdn]
    try:
        infos = socket.getaddrinfo(fqdn, None, proto=socket.IPPROTO_TCP)
    except OSError:
        infos = []
    for info in infos:
        addr = ipaddress.ip_address(info[4][0].split("%")[0])
        if not addr.is_loopback and str(addr) not in names:
            names.append(str(addr))
    return [check_name(n) for n in names if n]


def server_names(names: list[str], *listens: str) -> list[str]:
    """The SANs of the mesh's certificate: the names given, then loopback (the service
    reaches its own nats-server there), then any specific address it listens on."""
    out: list[str] = []
    extra = [h for h, _ in map(split_listen, listens)
             if h not in ("0.0.0.0", "::", "")]
    for n in [*names, *LOOPBACK, *extra]:
        n = check_name(n)
        if n not in out:
            out.append(n)
    return out


def _ca(lay: Layout) -> tuple[pki.Authority, list[Step]]:
    have = (lay.ca_cert.exists(), lay.ca_key.exists())
    if all(have):
        return pki.load_authority(lay.ca_cert, lay.ca_key), [
            Step(lay.ca_cert, False, "CA certificate"), Step(lay.ca_key, False, "CA key")]
    if any(have):
        present, absent = (lay.ca_cert, lay.ca_key) if have[0] else (lay.ca_key, lay.ca_cert)
        raise cli.UsageError(f"{present} exists without {absent}; restore it, or move both "
                             "away to make a new CA (every node must then be enrolled again)")
    ca = pki.make_ca()
    pki.write_new(lay.ca_key, pki.key_pem(ca.key), 0o600)
    pki.write_new(lay.ca_cert, pki.cert_pem(ca.cert), 0o644)
    return ca, [Step(lay.ca_cert, True, f"CA certificate ({pki.CA_DAYS // 365} years): nodes "
                     "trust the mesh through it"),
                Step(lay.ca_key, True, "CA key (0600): signs node certificates; keep it here")]


def _server(lay: Layout, ca: pki.Authority, names: list[str]) -> list[Step]:
    have = (lay.cert.exists(), lay.key.exists())
    if all(have):
        kept = pki.names_of(pki.load_cert(lay.cert))
        return [Step(lay.cert, False, f"server certificate for {', '.join(kept)}"),
                Step(lay.key, False, "server key")]
    if any(have):
        raise cli.UsageError(f"{lay.cert} and {lay.key} go together; one is missing (move "
                             "the other away to make a new pair)")
    cert, key = pki.server_cert(ca, names)
    pki.write_new(lay.key, pki.key_pem(key), 0o600)
    pki.write_new(lay.cert, pki.cert_pem(cert), 0o644)
    return [Step(lay.cert, True, f"server certificate ({pki.LEAF_DAYS // 365} years) for "
                 f"{', '.join(names)}"), Step(lay.key, True, "server key (0600)")]


def _signing(lay: Layout) -> list[Step]:
    if lay.signing_key.exists():
        steps = [Step(lay.signing_key, False, "decision signing key")]
        if not lay.signing_pub.exists():
            from cryptography.hazmat.primitives import serialization
            pub = load_private_key(lay.signing_key).public_key()
            lay.signing_pub.write_bytes(pub.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
            return steps + [Step(lay.signing_pub, True, "decision public key (from the key)")]
        return steps + [Step(lay.signing_pub, False, "decision public key")]
    kid = generate_key(lay.signing_key, lay.signing_pub)
    return [Step(lay.signing_key, True, f"decision signing key {kid} (0600, Ed25519)"),
            Step(lay.signing_pub, True, "decision public key: every node trusts it")]


def _nats(lay: Layout, nats_listen: str, state: Path) -> list[Step]:
    files = (lay.nats_conf, lay.mesh_password, lay.node_password)
    if lay.nats_conf.exists():
        missing = [p.name for p in files[1:] if not p.exists()]
        if missing:
            raise cli.UsageError(f"{lay.nats_conf} exists but {', '.join(missing)} does not; "
                                 "move nats.conf away to write it again with fresh passwords")
        return [Step(p, False, w) for p, w in zip(files, ("nats-server config", "NATS mesh "
                                                          "password", "NATS node password"))]
    made = [not p.exists() for p in files]
    host, port = split_listen(nats_listen)
    lay.nats_dir.mkdir(mode=0o700, exist_ok=True)
    try:
        settings = ServerSettings(store_dir=str(state / "jetstream"), host=host, port=port,
                                  tls_cert=str(lay.cert), tls_key=str(lay.key))
        write_fleet(lay.nats_dir, settings, (NODE_USER,))
    except ValueError as e:
        raise cli.UsageError(f"nats config: {e}") from None
    return [Step(lay.nats_conf, made[0], f"nats-server config: {host_port(host, port)}, TLS, "
                 f"JetStream in {state / 'jetstream'}"),
            Step(lay.mesh_password, made[1], "NATS password of the mesh user (0600)"),
            Step(lay.node_password, made[2], "NATS password of the read-only node user (0600)")]


def _policy_lines() -> list[str]:
    out = []
    for key, value in policy_defaults().items():
        out.append(f"  # {key}: {json.dumps(value)}")
    return out


def q(value: object) -> str:
    """A YAML double-quoted scalar (JSON's escaping is YAML's)."""
    return json.dumps(str(value))


def config_text(lay: Layout, listen: str, nats_listen: str, store: str, state: Path,
                metrics_listen: str = DEFAULT_METRICS_LISTEN) -> str:
    host, port = split_listen(nats_listen)
    local = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    return "\n".join([
        f"# swarm-mesh service configuration, written by `swarm-mesh init` "
        f"({time.strftime('%Y-%m-%d')}).",
        "# Every key is explained in packaging/mesh.yaml. Run: swarm-mesh run --config "
        f"{lay.config}",
        f"listen: {q(listen)}   # the reporting API (mutual TLS)",
        f"tls_cert: {q(lay.cert)}",
        f"tls_key: {q(lay.key)}",
        f"tls_ca: {q(lay.ca_cert)}   # node certificates must chain to it",
        f"store: {json.dumps(store)}   # or postgresql://user@host/db",
        "log_format: json",
        f"metrics_listen: {q(metrics_listen)}   # Prometheus /metrics; null: off",
        "nats:",
        f"  url: {json.dumps('tls://' + host_port(local, port))}",
        "  user: mesh",
        f"  password_file: {q(lay.mesh_password)}",
        f"  tls_ca: {q(lay.ca_cert)}",
        "  server:                   # embedded: `swarm-mesh run` starts nats-server itself;",
        "                            # remove this block to use a nats-server you run",
        f"    config: {q(lay.nats_conf)}",
        "    binary: nats-server",
        "    log_file: null          # null: its lines go into the service's log",
        "signing:",
        f"  private_key: {q(lay.signing_key)}",
        # In the state directory, not beside the key: the service may write only there.
        f"  lock_file: {q(state / 'decisions.lock')}",
        "policy:                     # the trust policy; defaults shown (mesh/policy.py)",
        *_policy_lines(), ""])


def init_mesh(directory: Path, names: list[str], listen: str, nats_listen: str,
              state: Path, store: str | None = None,
              metrics_listen: str = DEFAULT_METRICS_LISTEN) -> tuple[list[Step], list[str]]:
    """Makes what is missing; returns the steps (made or kept) and the certificate's names.
    `store`: the store URL for the config (default: SQLite in `state`)."""
    if store is not None:
        store_kind(store)
    split_listen(listen)
    split_listen(nats_listen)
    split_listen(metrics_listen, "--metrics-listen")
    sans = server_names(names, listen, nats_listen)
    lay = Layout(directory)
    needs_state = not (lay.config.exists() and lay.nats_conf.exists())
    for d, what in ((directory, "--dir"), (state, "--state-dir"))[:1 + needs_state]:
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise cli.UsageError(f"cannot create {what} {d}: {e.strerror}"
                                 + (" (run as root, or choose --state-dir)"
                                    if what == "--state-dir" else "")) from None
    ca, steps = _ca(lay)
    steps += _server(lay, ca, sans)
    steps += _signing(lay)
    steps += _nats(lay, nats_listen, state)
    if lay.config.exists():
        steps.append(Step(lay.config, False, "service config"))
    else:
        text = config_text(lay, listen, nats_listen, store or f"sqlite:///{state / 'mesh.db'}",
                           state, metrics_listen)
        pki.write_new(lay.config, text.encode(), 0o640)
        steps.append(Step(lay.config, True, "service config"))
    return steps, pki.names_of(pki.load_cert(lay.cert))


def share_with_group(lay: Layout, group: str) -> None:
    """Lets `group` (the service's) read what the service reads: files 0640, directories
    0750, the owner unchanged, so the service can read its keys but not rewrite
    its config. The CA key is made 0600 (the service never signs certificates), the node
    password and the ledger are left as they are (0600)."""
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise cli.UsageError(f"--group {group}: no such group") from None
    try:
        for d in (lay.dir, lay.nats_dir):
            os.chown(d, -1, gid)
            os.chmod(d, 0o750)
        for name in SERVICE_READS:
            path = getattr(lay, name)
            os.chown(path, -1, gid)
            os.chmod(path, 0o640)
        os.chmod(lay.ca_key, 0o600)
    except OSError as e:
        raise cli.UsageError(f"--group {group}: cannot share {e.filename}: {e.strerror}") from None


def _init(args: argparse.Namespace, cfg: MeshConfig) -> int:
    directory = Path(args.dir).absolute()
    state = Path(args.state_dir).absolute() if args.state_dir else DEFAULT_STATE
    names = [check_name(n) for n in args.name] if args.name else default_names()
    try:
        steps, sans = init_mesh(directory, names, args.listen, args.nats_listen, state,
                                args.store, args.metrics_listen)
        if args.group:
            share_with_group(Layout(directory), args.group)
    except pki.PkiError as e:
        raise cli.UsageError(str(e)) from None
    lay = Layout(directory)
    if all(n in LOOPBACK for n in sans):
        print(f"swarm-mesh: warning: the certificate names only {', '.join(sans)}; nodes on "
              "other machines cannot verify it (move mesh.pem and mesh.key away and run init "
              "again with --name)",
              file=sys.stderr)
    run = f"swarm-mesh run --config {lay.config}"
    enroll = f"swarm-mesh enroll NODE --provider PROVIDER --dir {directory} --out ./NODE"
    if args.json:
        print(json.dumps({"dir": str(directory), "config": str(lay.config), "names": sans,
                          "key_id": key_id(load_private_key(lay.signing_key).public_key()),
                          "files": [{"path": str(s.path), "made": s.made, "what": s.what}
                                    for s in steps], "run": run, "enroll": enroll}))
        return cli.EXIT_OK
    width = max(len(str(s.path)) for s in steps)
    for s in steps:
        print(f"{'made' if s.made else 'kept'}  {str(s.path).ljust(width)}  {s.what}")
    print(f"the mesh answers to: {', '.join(sans)}")
    print(f"run it:        {run}")
    print(f"add a node:    {enroll}")
    return cli.EXIT_OK


def _init_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", required=True, help="where the keys, certificates and config go "
                   "(e.g. /etc/swarm-mesh)")
    p.add_argument("--listen", default=DEFAULT_LISTEN,
                   help=f"the reporting API's host:port (default {DEFAULT_LISTEN})")
    p.add_argument("--name", action="append", metavar="DNS_OR_IP",
                   help="a name nodes reach the mesh by (repeat; the first is what enroll "
                        "gives nodes; default: this host's name and addresses)")
    p.add_argument("--nats-listen", default=DEFAULT_NATS_LISTEN,
                   help=f"nats-server's host:port (default {DEFAULT_NATS_LISTEN})")
    p.add_argument("--metrics-listen", default=DEFAULT_METRICS_LISTEN,
                   help=f"Prometheus /metrics host:port (default {DEFAULT_METRICS_LISTEN})")
    p.add_argument("--state-dir", help=f"where the SQLite store and JetStream live "
                   f"(default {DEFAULT_STATE})")
    p.add_argument("--group", help="the service's group: it may read the keys and config "
                   "the service needs (the packaged command passes swarm-mesh when run as root)")
    p.add_argument("--store", metavar="URL", help="the store instead of SQLite in the state "
                   "directory, e.g. postgresql://swarm_mesh@db.example/swarm_mesh")


cli.register("init", "make a mesh in one directory: CA, certificates, signing key, "
             "nats-server config, service config", _init_args, _init, uses_config=False)
