"""Node revocation: a node's certificates stop working, and what they sent stops counting.

A revocation names a node (the certificate CN) and a time, `revoked_at`. Every certificate
naming that node whose notBefore is at or before `revoked_at` is refused on every call
(mesh/gate.py and Store.record_reports), and every proposal such a certificate sent is
no vote and is never decided in its favour (Store.votes, Policy.evaluate). `swarm-mesh
enroll` issues a node's later certificates with a notBefore after its latest revocation
(mesh/pki.py), so the node name can be enrolled again while the old certificate, or a
stolen copy of it, stays refused for as long as it would have been valid.

Why by notBefore and not by serial or fingerprint: a list of serials covers only the
certificates the mesh knows of. enrolled.json keeps one record per node (a --force
enrolment replaces it), an operator may have made a certificate from the CA by hand, and
a copy of the CA's files elsewhere can sign more: "every certificate for this name up to
now" covers all of them without the mesh having to know them. The price: every
certificate of the name, including a legitimate second one, is revoked together (the node
enrols again), and a certificate with a notBefore after the revocation is not covered,
which only the holder of the CA key can make (and that holder could make any name).

The times are the mesh's wall clock. A revocation is at least its node's newest
certificate's notBefore (as seen by the service, and as `swarm-mesh enroll` recorded it in
the store's enrolments: a certificate that never reported, say stolen from the enrolment's
OUT directory), and at least one second after the previous revocation, so a clock stepped
back still covers every certificate the mesh knows of. Revocations are only ever added,
each in one transaction.

A batch from a node and a revocation of it are serialised: on SQLite by the write lock
both take, on PostgreSQL (READ COMMITTED) by a transaction-scoped advisory lock on the
node's name (Store.lock_node) that the batch takes before its revocation check and
revoke_node before it writes. So a batch either commits before the revocation does, or
its check sees it: none is stored after `swarm-mesh node-revoke` returned.
"""
from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:           # mesh.store mixes NodeRevocations in: no import at run time
    from mesh.store import Cursor

REASON_MAX_CHARS = 500
OPERATOR_MAX_CHARS = 100


class NodeRevoked(Exception):
    """A revoked certificate called; str() is the one sentence the caller is told."""

    def __init__(self, node: str, revoked_at: float):
        self.node, self.revoked_at = node, revoked_at
        super().__init__(refusal(node, revoked_at))


def iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc) \
        .isoformat(timespec="seconds").replace("+00:00", "Z")


def refusal(node: str, revoked_at: float) -> str:
    """What a revoked certificate's caller is told (no reason: that is the operators')."""
    return (f"node {node}'s certificate was revoked on the mesh ({iso(revoked_at)}): "
            "every call with it is refused; the node needs a new certificate "
            "(swarm-mesh enroll --force)")


def covers(revoked_at: float | None, not_before: float) -> bool:
    """Whether a revocation at `revoked_at` (None: none) covers a certificate whose
    notBefore is `not_before` (0: a record from before certificates were recorded)."""
    return revoked_at is not None and not_before <= revoked_at


def latest(cur: "Cursor", node: str) -> float | None:
    """The node's latest revocation time (None when it was never revoked)."""
    row = cur.one("SELECT MAX(revoked_at) AS t FROM node_revocations WHERE node = ?", (node,))
    return None if row is None or row["t"] is None else float(row["t"])


def enrolled(cur: "Cursor", node: str) -> float:
    """The newest notBefore enrol recorded for the node (0 when none)."""
    row = cur.one("SELECT not_before FROM enrolments WHERE node = ?", (node,))
    return float(row["not_before"]) if row else 0.0


def check(cur: "Cursor", node: str, not_before: float) -> None:
    """Raises NodeRevoked when a revocation of `node` covers a certificate with
    `not_before`; inside the caller's transaction, so nothing of a batch is stored
    once the revocation has committed."""
    t = latest(cur, node)
    if covers(t, not_before):
        raise NodeRevoked(node, t)


# Proposals whose certificate a revocation of their node covers (the alias p: proposals).
REVOKED_PROPOSAL = ("EXISTS (SELECT 1 FROM node_revocations x WHERE x.node = p.node "
                    "AND x.revoked_at >= p.cert_not_before)")


class NodeRevocations:
    """The store's part (mixed into mesh.store.Store): methods are one transaction each."""

    def lock_node(self, cur: "Cursor", node: str) -> None:
        """Serialises a node's batches with its revocations (the backend's; SQLite's
        write transactions already are)."""

    def revoke_node(self, node: str, reason: str, operator: str, now: float,
                    unknown_ok: bool = False,
                    not_before: float = 0.0) -> dict[str, Any] | None:
        """Revokes every certificate of `node` issued so far, in one transaction; returns
        the revocation ({node, revoked_at, reason, operator, at, previous, known}), or
        None (nothing written) when the node never reported and not `unknown_ok`.
        `not_before`: a notBefore it must cover besides those the store knows (the
        enrolment ledger's, for enrolments from before the store recorded them)."""
        with self.tx() as cur:
            self.lock_node(cur, node)
            seen = cur.one("SELECT cert_not_before FROM nodes WHERE node = ?", (node,))
            if seen is None and not unknown_ok:
                return None
            previous = latest(cur, node)
            revoked_at = max(now, previous + 1.0 if previous is not None else 0.0,
                             float(seen["cert_not_before"]) if seen else 0.0,
                             enrolled(cur, node), not_before)
            row = {"node": node, "revoked_at": revoked_at,
                   "reason": (reason or "")[:REASON_MAX_CHARS],
                   "operator": (operator or "")[:OPERATOR_MAX_CHARS], "at": now}
            cur.run("INSERT INTO node_revocations (node, revoked_at, reason, operator, at) "
                    "VALUES (?, ?, ?, ?, ?)", list(row.values()))
        return {**row, "previous": previous, "known": seen is not None}

    def record_enrolment(self, node: str, not_before: float, serial: str, at: float) -> None:
        """`swarm-mesh enroll` issued `node` a certificate starting at `not_before`: later
        revocations of the node are never dated before it."""
        with self.tx() as cur:
            cur.run("INSERT INTO enrolments (node, not_before, serial, at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (node) DO UPDATE SET not_before = excluded.not_before, "
                    "serial = excluded.serial, at = excluded.at "
                    "WHERE excluded.not_before > enrolments.not_before",
                    (node, not_before, serial, at))

    def node_revoked_at(self, node: str) -> float | None:
        """The node's latest revocation time, None when it was never revoked."""
        with self.tx(write=False) as cur:
            return latest(cur, node)

    def node_revocations(self, node: str | None = None,
                         limit: int = 1000) -> list[dict[str, Any]]:
        """Revocations, newest first, each with `current`: whether the node's newest
        certificate the service has seen is covered by its latest revocation (False: it
        reported since with a newer certificate; None: it never reported)."""
        where, params = ("WHERE r.node = ? ", [node]) if node is not None else ("", [])
        with self.tx(write=False) as cur:
            rows = cur.all("SELECT r.id, r.node, r.revoked_at, r.reason, r.operator, r.at, "
                           "n.cert_not_before AS seen_not_before, (SELECT MAX(revoked_at) "
                           "FROM node_revocations l WHERE l.node = r.node) AS node_latest "
                           f"FROM node_revocations r LEFT JOIN nodes n ON n.node = r.node "
                           f"{where}ORDER BY r.revoked_at DESC, r.id DESC LIMIT ?",
                           [*params, limit])
        for r in rows:
            seen, last = r.pop("seen_not_before"), r.pop("node_latest")
            r["current"] = None if seen is None else covers(float(last), float(seen))
        return rows
