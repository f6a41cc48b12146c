"""`swarm-mesh enroll`: one node's credentials and the config lines that join it.

    swarm-mesh enroll gpu-node-17 --provider acme --dir /etc/swarm-mesh --out ./gpu-node-17
        [--csr node.csr] [--install-prefix /etc/swarm-agent/mesh] [--endpoint HOST:PORT]
        [--nats-url URL] [--force]

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
enrolled.json records each enrolment. Without --csr the node's key is made here and
travels with the rest; OUTDIR is as secret as the key. With --csr (made on the node by
`swarm-agent mesh-csr`) the key never leaves the node: the CSR's public key is certified
once its signature verifies, whatever subject or extensions it asks for (mesh/csr.py),
and OUTDIR gets everything but node.key. A key is certified once: the ledger keeps the id
of every key it certified (earlier ones as 128-bit prefixes) and refuses a CSR for any of
them (after a revocation, the old key may be the thief's).

OUTDIR, if it exists, must be this user's own directory, in a directory no other user can
write (or sticky, like /tmp): whoever could replace OUTDIR or its files before they are
copied to the node would choose the node's CA and decision key. Two enrolments at once
take turns (a lock on DIR), so neither loses the other's ledger record.

A node revoked with `swarm-mesh node-revoke` gets a certificate whose notBefore follows
its latest revocation (read from the store named in DIR/config.yaml), so the new one
works and the revoked ones stay refused (mesh/revocation.py). Each certificate's notBefore
is recorded in that store too (made here if the service never ran), before OUTDIR is
written, so a later revocation covers it even if it never reported.
"""
from __future__ import annotations

import argparse
import datetime
import fcntl
import ipaddress
import json
import os
import re
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cryptography.hazmat.primitives import hashes

from mesh import cli, csr as csrs, pki
from mesh.config import MeshConfigError, load, split_listen
from mesh.revocation import iso
from mesh.setup import LOOPBACK, NODE_USER, Layout, host_port, q
from mesh.store import StoreError, open_store

DEFAULT_PREFIX = "/etc/swarm-agent/mesh"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
FILES = ("node.pem", "node.key", "ca.pem", "decisions.pub", "nats.password", "agent-fleet.yaml")
KEY_PREFIX_HEX = 32             # earlier key ids are kept as 128-bit prefixes: a collision
                                # can only refuse a new key, never certify an old one


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
               nats_url: str, mesh_addresses: list[str], own_key: bool = False) -> str:
    p = prefix.rstrip("/") or "/"
    f = {n: os.path.join(p, n) for n in FILES}
    lines = [
        f"# Node {node} of provider {provider}: written by `swarm-mesh enroll` "
        f"({time.strftime('%Y-%m-%d')}).",
        f"# 1. Copy every file of this directory to {p}/ on the node (root, 0700)"
        + (",\n#    beside node.key, which swarm-agent mesh-csr made there." if own_key else "."),
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


def _own_dir(out: Path, st: os.stat_result) -> None:
    """OUTDIR as it is: this user's directory, not a link to one."""
    if stat.S_ISLNK(st.st_mode):
        raise cli.UsageError(f"--out {out} is a symbolic link; give the directory itself")
    if not stat.S_ISDIR(st.st_mode):
        raise cli.UsageError(f"--out {out} exists and is not a directory")
    if st.st_uid != os.geteuid():
        raise cli.UsageError(f"--out {out} belongs to uid {st.st_uid}, not to this user: its "
                             "owner could replace the node's ca.pem and decisions.pub before "
                             "they are copied; choose a new directory of your own")


def _check_out(out: Path, force: bool) -> None:
    """Refuses an OUTDIR that someone else could replace, or its files (see above)."""
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        st = None
    if st is not None:
        _own_dir(out, st)
        if any(out.iterdir()) and not force:
            raise cli.UsageError(f"--out {out} is not empty; choose a new directory "
                                 "(or --force to replace its files)")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    pst = os.stat(parent)
    if pst.st_uid not in (0, os.geteuid()) or (pst.st_mode & 0o022
                                               and not pst.st_mode & stat.S_ISVTX):
        raise cli.UsageError(f"--out {out} would be in {parent}, which another user can "
                             "write: they could replace it before its files are copied to "
                             "the node; choose a directory only you can write")


def _outdir(out: Path) -> None:
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    _own_dir(out, os.lstat(out))            # made by someone else in between: refused
    os.chmod(out, 0o700)


@contextmanager
def _ledger_lock(lay: Layout) -> Iterator[None]:
    """One enrolment at a time per mesh directory (an flock on DIR itself): two at once
    would each write the ledger they read, and one record would be lost."""
    try:
        fd = os.open(lay.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise cli.UsageError(f"cannot open --dir {lay.dir}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _store_error(node: str, e: StoreError) -> cli.UsageError:
    return cli.UsageError(f"cannot read {node}'s revocations, which its certificate must "
                          f"start after: {e}")


@contextmanager
def enrolment_store(store_url: str, node: str):
    """The mesh's store, made if the service never ran (enroll records the notBefore of
    every certificate it issues there, mesh/revocation.py); a store that cannot be used
    is one sentence."""
    try:
        store = open_store(store_url)
    except StoreError as e:
        raise _store_error(node, e) from None
    try:
        yield store
    except StoreError as e:
        raise _store_error(node, e) from None
    finally:
        store.close()


def certified_keys(ledger: dict[str, dict]) -> dict[str, str]:
    """key id prefix (KEY_PREFIX_HEX) -> the node it was certified for, from every record."""
    out: dict[str, str] = {}
    for name, rec in ledger.items():
        for kid in [rec.get("key_sha256"), *(rec.get("previous_keys") or [])]:
            if isinstance(kid, str) and kid:
                out[kid[:KEY_PREFIX_HEX]] = name
    return out


def load_csr(path: Path, ledger: dict[str, dict]):
    """The node's CSR, checked (mesh/csr.py), its key not certified before."""
    try:
        request = csrs.load(path)
    except csrs.CsrError as e:
        raise cli.UsageError(str(e)) from None
    known = certified_keys(ledger)
    seen = next((known[k[:KEY_PREFIX_HEX]] for k in csrs.key_ids(request.public_key())
                 if k[:KEY_PREFIX_HEX] in known), None)
    if seen is not None:
        raise cli.UsageError(f"the key of the CSR {path} was certified before (node {seen}); "
                             "every certificate needs a new key: on the node, "
                             "swarm-agent mesh-csr --force makes one")
    return request


def enroll(directory: Path, node: str, provider: str, out: Path, prefix: str,
           endpoint: str | None = None, nats_url: str | None = None,
           force: bool = False, csr: Path | None = None) -> dict:
    """Issues the node's certificate (for the key of `csr`, else for a key made here)
    and writes OUTDIR; returns what the ledger records. Every input is checked before
    anything is written (but the store, made if absent)."""
    check_safe("NODE", node)
    check_safe("--provider", provider)
    lay = Layout(directory)
    for p in (lay.ca_cert, lay.ca_key, lay.cert, lay.signing_pub, lay.node_password, lay.config):
        if not p.exists():
            raise cli.UsageError(f"{p} does not exist; run swarm-mesh init --dir {directory} first")
    with _ledger_lock(lay):
        return _enroll_locked(lay, node, provider, out, prefix, endpoint, nats_url, force, csr)


def _enroll_locked(lay: Layout, node: str, provider: str, out: Path, prefix: str,
                   endpoint: str | None, nats_url: str | None, force: bool,
                   csr: Path | None) -> dict:
    ledger = read_ledger(lay.ledger)
    if node in ledger and not force:
        had = ledger[node]
        raise cli.UsageError(f"node {node} was enrolled on {had.get('enrolled', '?')} for "
                             f"provider {had.get('provider', '?')}; --force issues it a new "
                             "certificate (the old one stays valid until it expires, unless "
                             f"swarm-mesh node-revoke {node} revokes it first)")
    try:
        ca = pki.load_authority(lay.ca_cert, lay.ca_key)
        endpoint, server_name, nats_url = where(lay, endpoint, nats_url)
        store_url = load(lay.config).store
    except (pki.PkiError, MeshConfigError) as e:
        raise cli.UsageError(str(e)) from None
    request = load_csr(csr, ledger) if csr is not None else None
    _check_out(out, force)
    with enrolment_store(store_url, node) as store:
        after = store.node_revoked_at(node)
        if after is not None and after > time.time() + pki.BACKDATE_S:
            raise cli.UsageError(f"{node} was revoked on {iso(after)}, in the future of this "
                                 f"machine's clock ({iso(time.time())}): a certificate must "
                                 "start after that and would not work until then; check "
                                 "both clocks")
        if request is not None:
            key = None
            cert = pki.node_cert_for(ca, node, provider, request.public_key(), after)
        else:
            cert, key = pki.node_cert(ca, node, provider, after)
        store.record_enrolment(node, cert.not_valid_before.replace(
            tzinfo=datetime.timezone.utc).timestamp(), format(cert.serial_number, "x"),
            time.time())
    _outdir(out)
    mesh_ips = [str(ipaddress.ip_network(n)) for n in pki.names_of(pki.load_cert(lay.cert))
                if n not in LOOPBACK and _is_ip(n)]
    files = {
        "node.pem": (pki.cert_pem(cert), 0o644),
        **({"node.key": (pki.key_pem(key), 0o600)} if key is not None else {}),
        "ca.pem": (lay.ca_cert.read_bytes(), 0o644),
        "decisions.pub": (lay.signing_pub.read_bytes(), 0o644),
        "nats.password": (lay.node_password.read_bytes(), 0o600),
        "agent-fleet.yaml": (fleet_yaml(node, provider, prefix, endpoint, server_name, nats_url,
                                        mesh_ips, own_key=key is None).encode(), 0o644),
    }
    if key is None:                      # a key of an earlier enrolment into OUT: not this one's
        (out / "node.key").unlink(missing_ok=True)
    for name, (data, mode) in files.items():
        pki.write_replace(out / name, data, mode)
    record = _record(provider, cert, out, ledger.get(node), key is None)
    ledger[node] = record
    pki.write_replace(lay.ledger, (json.dumps({"nodes": ledger}, indent=1, sort_keys=True)
                                   + "\n").encode(), 0o600)
    return {"node": node, **record, "endpoint": endpoint, "server_name": server_name,
            "nats_url": nats_url, "files": [str(out / n) for n in files],
            "revoked_at": after, "csr_ignored": csrs.ignored(request) if request else []}


def _utc(t: datetime.datetime) -> str:
    return t.replace(tzinfo=datetime.timezone.utc).isoformat(timespec="seconds")


def _record(provider: str, cert, out: Path, before: dict | None, own_key: bool) -> dict:
    """The ledger's record of an enrolment; the key ids of the node's earlier
    certificates are carried on, so none of those keys is certified again."""
    previous = []
    if before:
        previous = [k[:KEY_PREFIX_HEX] for k in [*(before.get("previous_keys") or []),
                                                 before.get("key_sha256")]
                    if isinstance(k, str) and k]
    return {"provider": provider, "serial": format(cert.serial_number, "x"),
            "sha256": cert.fingerprint(hashes.SHA256()).hex(),
            "key_sha256": csrs.key_id(cert.public_key()), "key": "node" if own_key else "mesh",
            "previous_keys": previous,
            "enrolled": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "not_before": _utc(cert.not_valid_before), "not_after": _utc(cert.not_valid_after),
            "out": str(out)}


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _enroll(args: argparse.Namespace, cfg) -> int:
    out = Path(args.out).absolute()
    result = enroll(Path(args.dir).absolute(), args.node, args.provider, out,
                    args.install_prefix, args.endpoint, args.nats_url, args.force,
                    Path(args.csr) if args.csr else None)
    if args.json:
        print(json.dumps(result))
        return cli.EXIT_OK
    print(f"enrolled {args.node} (provider {args.provider}): certificate {result['serial']}, "
          f"valid from {result['not_before']} until {result['not_after']}")
    if result["revoked_at"] is not None:
        print(f"  {args.node} was revoked on {iso(result['revoked_at'])}: this certificate "
              "starts after that, the revoked ones stay refused")
    for what in result["csr_ignored"]:
        print(f"  ignored from the CSR: {what} (the mesh sets subject and extensions)")
    for f in result["files"]:
        print(f"  {f}")
    kept = " (node.key stays where swarm-agent mesh-csr made it)" if args.csr else ""
    print(f"on the node: copy {out}/* to {args.install_prefix}/ (root, 0700){kept}, put "
          f"agent-fleet.yaml's sections into /etc/swarm-agent/config.yaml, "
          "systemctl restart swarm-agent")
    return cli.EXIT_OK


def _enroll_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("node", metavar="NODE", help="the node's name (its certificate's CN)")
    p.add_argument("--provider", required=True, help="the node's provider (its certificate's O)")
    p.add_argument("--dir", required=True, help="the mesh directory swarm-mesh init made")
    p.add_argument("--out", required=True, help="where the node's files go (new or empty)")
    p.add_argument("--csr", metavar="FILE", help="certify the key of this CSR (PEM or DER, "
                   "from `swarm-agent mesh-csr` on the node) instead of making one here: the "
                   "key never leaves the node; the CSR's subject and extensions are ignored")
    p.add_argument("--install-prefix", default=DEFAULT_PREFIX,
                   help=f"where the files will be on the node (default {DEFAULT_PREFIX})")
    p.add_argument("--endpoint", help="host:port nodes reach the reporting API at (default: "
                   "the mesh certificate's first name and the configured port)")
    p.add_argument("--nats-url", help="nats-server's URL for nodes (default: tls://, the same "
                   "name and the configured port)")
    p.add_argument("--force", action="store_true",
                   help="enrol a node name again (its earlier certificate stays valid unless "
                   "revoked: swarm-mesh node-revoke), and write into a non-empty --out")


cli.register("enroll", "issue a node's certificate and write what it needs to join",
             _enroll_args, _enroll, uses_config=False)
