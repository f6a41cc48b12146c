"""`swarm-mesh` commands on node identities: node-revoke and node-revocations.

    swarm-mesh node-revoke gpu-node-17 [--reason "stolen"] [--operator NAME] [--force]
    swarm-mesh node-revocations [--node NAME] [--limit N]

node-revoke refuses, from the moment it returns, every certificate naming the node that
was issued until then (mesh/revocation.py): the service cuts its open channels at their
next call, and its proposals stop counting, as votes and as proposals still waiting for
corroboration. Decisions already made stay in force: an operator lifts a block with
`swarm-mesh revoke`. `swarm-mesh enroll NODE --force` gives the node a new certificate
that works (its notBefore follows the revocation); the old one stays refused.
It writes the store only (one transaction), so it works while the service is down too;
the store must exist (the service, or the first `enroll`, makes it). The revocation is
dated no earlier than any notBefore `enroll` gave the node: the store records those
(mesh/revocation.py), and the ledger beside --config (DIR/enrolled.json) is read as well
for enrolments older than that record, when this user can read it (root's 0600: the
packaged command runs node-revoke as the service user, who cannot, and then relies on the
store alone; a node enrolled before the store recorded enrolments and never reported is
then covered only while the clock has not stepped back).
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

from mesh import cli, config as mesh_config, views
from mesh.fleetcmd import operator_of
from mesh.identity import MAX_NAME
from mesh.revocation import OPERATOR_MAX_CHARS, REASON_MAX_CHARS, iso
from mesh.store import open_store


def node_name(text: str) -> str:
    """A name as a certificate's CN carries it: printable, 1 to MAX_NAME characters."""
    if not text or not text.strip() or len(text) > MAX_NAME or not text.isprintable():
        raise argparse.ArgumentTypeError(f"{text!r} is not a node name (1-{MAX_NAME} "
                                         "printable characters, as in the certificate's CN)")
    return text


def bounded(limit: int):
    def check(text: str) -> str:
        if len(text) > limit or not text.isprintable():
            raise argparse.ArgumentTypeError(f"at most {limit} printable characters")
        return text
    return check


def ledger_not_before(config: str | None, node: str) -> float:
    """The notBefore the enrolment ledger beside the config records for `node` (0 when
    the ledger is absent, unreadable for this user, or has no such record)."""
    path = Path(config or mesh_config.SYSTEM_CONFIG).parent / "enrolled.json"
    try:
        rec = json.loads(path.read_text())["nodes"][node]
        return datetime.datetime.fromisoformat(rec["not_before"]).timestamp()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0.0


def _revoke(args: argparse.Namespace, cfg) -> int:
    operator = operator_of(args)
    # create=False: a wrong --config must not make an empty store and revoke into it
    store = open_store(cfg.store, create=False)
    try:
        done = store.revoke_node(args.node, args.reason or f"revoked by operator {operator}",
                                 operator, time.time(), unknown_ok=args.force,
                                 not_before=ledger_not_before(args.config, args.node))
    finally:
        store.close()
    if done is None:
        raise cli.UsageError(f"node {args.node} has never reported to this mesh (swarm-mesh "
                             "nodes lists those that have); check the name, or give --force "
                             "to revoke it anyway (a node enrolled but never started)")
    if args.json:
        print(json.dumps(done, sort_keys=True))
        return cli.EXIT_OK
    print(f"revoked {args.node}: every certificate of it issued until "
          f"{iso(done['revoked_at'])} is refused from now on (open channels at their next "
          "call); its proposals and votes no longer count")
    if done["previous"] is not None:
        print(f"  it had been revoked before ({iso(done['previous'])}): certificates issued "
              "since then (a new enrolment) are revoked too")
    print("  decisions already made stay in force (swarm-mesh decisions; lift a block with "
          "swarm-mesh revoke TARGET); a new certificate: swarm-mesh enroll "
          f"{args.node} --force ...")
    print("  it can still read fleet decisions over NATS until the shared node password is "
          "rotated")
    return cli.EXIT_OK


def _revocations(args: argparse.Namespace, cfg) -> int:
    return cli.query(args, cfg, lambda s: s.node_revocations(node=args.node, limit=args.limit),
                     views.revocations_lines)


def _revoke_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("node", metavar="NODE", type=node_name,
                   help="the node's name (its certificates' CN)")
    p.add_argument("--reason", type=bounded(REASON_MAX_CHARS), help="why (recorded)")
    p.add_argument("--operator", type=bounded(OPERATOR_MAX_CHARS),
                   help="who revokes (default: the login name)")
    p.add_argument("--force", action="store_true",
                   help="revoke a name that never reported to this mesh")


def _revocations_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--node", type=node_name, help="only this node's")
    cli.add_limit(p)


EPILOG = ("From now on the reporting API refuses every call with those certificates "
          "(PERMISSION_DENIED; open channels at their next call), and the node's proposals "
          "count neither as votes nor as proposals waiting for corroboration. Decisions "
          "already made stay in force: lift a block with `swarm-mesh revoke TARGET`. "
          "`swarm-mesh enroll NODE --force` issues the node a new certificate that works; "
          "the old ones stay refused. Not covered: NATS, where every node shares one "
          "read-only user, so a revoked node can still read fleet decisions (the same for "
          "every node) until that password is rotated.")

cli.register("node-revoke", "refuse every certificate a node was issued so far; its "
             "proposals and votes stop counting (decisions already made stay: swarm-mesh "
             "revoke lifts them)", _revoke_args, _revoke, epilog=EPILOG)
cli.register("node-revocations", "node revocations, newest first, and whether the node "
             "has reported since with a new certificate", _revocations_args, _revocations)
