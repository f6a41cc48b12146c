"""`swarm-agent mesh-csr [--out DIR] [--node NAME] [--force] [--json]`: the node's key for
the mesh, made on the node, and a certificate signing request (CSR) for it.

    DIR/node.key   EC P-256 private key (PKCS#8 PEM), 0600, made here and never sent
    DIR/node.csr   the CSR (PEM): the public key, signed with the key (proof of possession)

The operator copies node.csr to the mesh and runs `swarm-mesh enroll NODE --provider P
--csr node.csr ...`, which certifies the key under the name and provider the mesh decides
(the CSR's CN is only a hint for the operator); its output goes into DIR beside node.key.
The private key never leaves this machine. An existing node.key is never overwritten
without --force: it is the key of the node's current certificate, which stops working
when it is replaced (what a re-enrolment after a revocation wants). Local only: needs no
running agent.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.cli.text import clean

DEFAULT_DIR = Path("/etc/swarm-agent/mesh")
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def add_parser(sub) -> None:
    sp = sub.add_parser("mesh-csr", help="make this node's key for the mesh (0600, kept here) "
                        "and a CSR for `swarm-mesh enroll --csr`; needs no agent",
                        description="Makes DIR/node.key (EC P-256, 0600) and DIR/node.csr. "
                        "Copy node.csr to the mesh and run `swarm-mesh enroll NODE --provider P "
                        "--csr node.csr --out OUT ...` there; OUT holds everything the node "
                        "needs but the key, which never leaves this machine. The mesh decides "
                        "the certificate's name, provider and extensions, not the CSR.")
    sp.add_argument("--out", default=str(DEFAULT_DIR),
                    help=f"where node.key and node.csr go (default {DEFAULT_DIR})")
    sp.add_argument("--node", help="the name to suggest in the CSR's CN (default: this "
                    "host's name; the mesh decides the certificate's name)")
    sp.add_argument("--force", action="store_true",
                    help="replace an existing node.key (the current certificate stops working "
                    "with it)")
    sp.add_argument("--json", action="store_true", help="machine-readable output")


def make(out: Path, node: str, force: bool = False) -> dict[str, str]:
    """Writes out/node.key (0600) and out/node.csr; returns their paths and the key's id.
    Raises ValueError (one sentence) when out/node.key exists and not `force`."""
    key_path, csr_path = out / "node.key", out / "node.csr"
    if key_path.exists() and not force:
        raise ValueError(f"{key_path} exists (the key of this node's current certificate?); a "
                         "key is never overwritten: give --force to replace it, or another --out")
    if not node or len(node) > 64 or not node.isprintable():
        raise ValueError(f"--node {node!r} is not a name for a CSR (1-64 printable characters)")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
           .sign(key, hashes.SHA256()))
    _write(key_path, key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()), 0o600)
    _write(csr_path, csr.public_bytes(serialization.Encoding.PEM), 0o644)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(key.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo))
    return {"key": str(key_path), "csr": str(csr_path), "key_sha256": digest.finalize().hex()}


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomically, with `mode` from the first byte (no moment when a key is readable by
    others); an existing file is replaced only by the rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def cmd(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        made = make(out, args.node or socket.gethostname(), args.force)
    except ValueError as e:
        print(f"swarm-agent: {clean(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"swarm-agent: cannot write into {clean(str(out))}: {e.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(made))
        return EXIT_OK
    print(f"key {made['key']} (0600: it stays on this node) and CSR {made['csr']}\n"
          f"next: copy {made['csr']} to the mesh and run there\n"
          f"  swarm-mesh enroll NODE --provider PROVIDER --dir /etc/swarm-mesh --csr node.csr "
          f"--out ./NODE --install-prefix {out.absolute()}\n"
          f"then copy ./NODE/* back into {out}/ (beside node.key) and restart swarm-agent")
    return EXIT_OK
