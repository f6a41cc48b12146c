"""The fleet store: what every node reported, the proposals, decisions and refusals.

One interface, two backends with the same SQL: SQLite (mesh/store_sqlite.py, the embedded
default) and PostgreSQL (mesh/store_pg.py). Every public method is one transaction and
is synchronous: the gRPC server calls them through asyncio.to_thread, one at a time per
store (a lock serialises them on the one connection). Times are wall seconds; records
come back as plain JSON-able dicts. Driver errors become StoreError (one sentence).

Idempotence: a report is processed once per (node, report id); besides, every record is
keyed by (node, its own id) and a snapshot replaces the stored one only when it is not
older (updated_at), evidence and proposals are kept once, a heartbeat updates the node
only when it is not older than the last one: a report arriving again, even after its id
was pruned from the ledger, changes nothing.
"""
from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

from agent.proto.swarm.mesh.v1 import mesh_pb2
from mesh import records, revocation
from mesh.config import MeshConfigError, store_kind
from mesh.revocation import REVOKED_PROPOSAL, NodeRevocations
from mesh.schema import columns

LIVE_STATES = ("open", "mitigated", "escalated")   # incidents(state="live")
PRUNE_BATCH = 5000        # rows of each table one pruning transaction deletes at most
CLOCK_SKEW_S = 300.0      # a heartbeat time further ahead of the mesh's clock is not trusted
_PROPOSAL_KEYS = ("proposal_id", "node", "provider", "target", "rule", "rule_version",
                  "incident_id", "operator", "evidence", "created_at", "ttl_s",
                  "event_class", "received_at", "cert_not_before")
_REFUSAL_KEYS = ("at", "node", "provider", "target", "reason", "proposal_id", "source")
_SNAPSHOTS = {"incident": ("incidents", "incident_id"),
              "mitigation": ("mitigations", "mitigation_id"),
              "feedback": ("feedback", "feedback_id")}


class StoreError(RuntimeError):
    """The store cannot be opened or a transaction failed; the message is one sentence."""


class StoreAbsent(StoreError):
    """Opened with create=False: there is no store there yet (no file, or no schema)."""


@dataclass
class Recorded:
    """What record_reports did with a batch."""

    accepted: list[str] = field(default_factory=list)     # ids processed now or before
    proposals: list[dict] = field(default_factory=list)   # proposals new in this batch
    duplicates: int = 0       # reports processed before (same node and id)
    mismatched: int = 0       # new reports whose node_id is not the certificate's node
    rejected: int = 0         # kept raw as kind "rejected" (e.g. an incident without its id)
    unknown: int = 0          # bodies this version does not know, kept raw
    skipped: int = 0          # reports without a usable id: neither kept nor acknowledged


class Cursor:
    """The backends' cursor: `?` placeholders in, rowcount or rows (as dicts) out."""

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        raise NotImplementedError

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        raise NotImplementedError

    def one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = self.all(sql, params)
        return rows[0] if rows else None


def _insert(table: str, cols: Sequence[str], conflict: str = "") -> str:
    return (f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
            f"{conflict}")


def _snapshot_sql(table: str, key: str) -> str:
    """Insert a snapshot, or replace the stored one unless that one is newer."""
    cols = columns(table)
    sets = ", ".join(f"{c} = excluded.{c}" for c in cols if c not in ("node", key))
    return _insert(table, cols, f" ON CONFLICT (node, {key}) DO UPDATE SET {sets} "
                                f"WHERE excluded.updated_at >= {table}.updated_at")


class Store(NodeRevocations):
    """Backends implement _transaction (yielding a Cursor), _close and create_schema.
    Node revocations: mesh/revocation.py."""

    dialect = ""
    url = ""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    # ---- the backend's part
    @contextmanager
    def _transaction(self, write: bool) -> Iterator[Cursor]:
        raise NotImplementedError
        yield  # pragma: no cover

    def _close(self) -> None:
        raise NotImplementedError

    @contextmanager
    def tx(self, write: bool = True) -> Iterator[Cursor]:
        """One transaction (committed when the block ends, rolled back on an error);
        write=False: it only reads (SQLite then does not take the write lock)."""
        with self._lock, self._transaction(write) as cur:
            yield cur

    def close(self) -> None:
        with self._lock:
            self._close()

    # ---- reports from nodes
    def record_reports(self, node: str, provider: str, reports: Iterable[mesh_pb2.Report],
                       received_at: float, not_before: float = 0.0) -> Recorded:
        """Store a batch from `node` (its certificate's CN) of `provider` (its O), whose
        certificate's notBefore is `not_before`, in one transaction. Report.node_id is
        kept as "claimed" only. Raises revocation.NodeRevoked, storing nothing, when a
        revocation of the node covers that certificate (checked in this transaction: a
        revocation committed before it is never missed)."""
        out = Recorded()
        with self.tx() as cur:
            cur.run(_insert("nodes", ("node", "provider", "first_seen", "last_seen",
                                      "cert_not_before"),
                            " ON CONFLICT (node) DO UPDATE SET provider = excluded.provider, "
                            "last_seen = CASE WHEN excluded.last_seen > nodes.last_seen "
                            "THEN excluded.last_seen ELSE nodes.last_seen END, "
                            "cert_not_before = CASE WHEN excluded.cert_not_before > "
                            "nodes.cert_not_before THEN excluded.cert_not_before "
                            "ELSE nodes.cert_not_before END"),
                    (node, provider, received_at, received_at, not_before))
            # After the row lock above, not before: revoke_node takes lock_node and never
            # that row, so a revocation waits for a batch that passed its check, and a
            # batch that waited sees the revocation in its check (a new snapshot).
            self.lock_node(cur, node)
            revocation.check(cur, node, not_before)
            for r in reports:
                self._record_one(cur, node, provider, r, received_at, out, not_before)
            if out.mismatched:
                cur.run("UPDATE nodes SET claim_mismatches = claim_mismatches + ? "
                        "WHERE node = ?", (out.mismatched, node))
        return out

    def _record_one(self, cur: Cursor, node: str, provider: str, r: mesh_pb2.Report,
                    received_at: float, out: Recorded, not_before: float) -> None:
        if not records.usable_id(r):
            out.skipped += 1
            return
        row = records.convert(r)
        why = records.problem(r)
        kind, ref = ("rejected", why) if why else (row.kind, row.ref)
        raw = r.SerializeToString() if kind in ("rejected", "unknown") else None
        new = cur.run(_insert("reports", ("node", "id", "kind", "ref", "claimed", "created_at",
                                          "received_at", "raw"), " ON CONFLICT DO NOTHING"),
                      (node, r.id, kind, ref, r.node_id, r.created_at, received_at, raw))
        out.accepted.append(r.id)
        if not new:
            out.duplicates += 1
            return
        if r.node_id and r.node_id != node:
            out.mismatched += 1
            cur.run("UPDATE nodes SET claimed = ? WHERE node = ?", (r.node_id, node))
        if kind in ("rejected", "unknown"):
            setattr(out, kind, getattr(out, kind) + 1)
        elif kind in _SNAPSHOTS:
            table, key = _SNAPSHOTS[kind]
            values = {"node": node, **row.values, "received_at": received_at}
            cur.run(_snapshot_sql(table, key), [values[c] for c in columns(table)])
        elif kind == "evidence":
            values = {"node": node, **row.values, "received_at": received_at}
            cur.run(_insert("evidence", columns("evidence"), " ON CONFLICT DO NOTHING"),
                    [values[c] for c in columns("evidence")])
        elif kind == "proposal":
            p = records.bounded_proposal({**row.values, "node": node, "provider": provider,
                                          "received_at": received_at,
                                          "cert_not_before": not_before})
            if self._add_proposal(cur, p):
                out.proposals.append(p)
        elif kind == "heartbeat":
            # Not older than the last one (a late duplicate changes nothing), unless the
            # last one claimed a time well past ours: that node's clock was wrong then.
            values = row.values
            sets = ", ".join(f"{c} = ?" for c in values)
            cur.run(f"UPDATE nodes SET {sets} WHERE node = ? AND (hb_at <= ? OR hb_at > ?)",
                    [*values.values(), node, values["hb_at"], received_at + CLOCK_SKEW_S])

    def prune_reports(self, before: float, proposals_before: float | None = None,
                      refusals_before: float | None = None, limit: int = PRUNE_BATCH) -> int:
        """Forget processed report ids received before `before` (raw rejected/unknown
        reports are kept), proposals received before `proposals_before` and refusals
        made before `refusals_before` (None: `before`); at most `limit` rows of each table
        in one short transaction (the caller repeats while it returns `limit` or more).
        Returns how many rows went. A refusal must outlive its proposal (a proposal whose
        refusal is gone would count as a vote): refusals_before is never after
        proposals_before."""
        p_before = before if proposals_before is None else proposals_before
        r_before = min(before if refusals_before is None else refusals_before, p_before)
        with self.tx() as cur:
            n = cur.run("DELETE FROM reports WHERE (node, id) IN (SELECT node, id FROM "
                        "reports WHERE received_at < ? AND kind NOT IN ('rejected', "
                        "'unknown') LIMIT ?)", (before, limit))
            n += cur.run("DELETE FROM proposals WHERE (node, proposal_id) IN (SELECT node, "
                         "proposal_id FROM proposals WHERE received_at < ? LIMIT ?)",
                         (p_before, limit))
            n += cur.run("DELETE FROM refusals WHERE id IN (SELECT id FROM refusals "
                         "WHERE at < ? LIMIT ?)", (r_before, limit))
        return n

    # ---- proposals
    def add_proposal(self, p: dict[str, Any]) -> bool:
        """Keep a proposal (keys: _PROPOSAL_KEYS; node, proposal_id, target and
        received_at required; free text cut as records.bounded_proposal does, an over-long
        identifier a ValueError); False when that node's proposal_id was already stored."""
        with self.tx() as cur:
            return self._add_proposal(cur, records.bounded_proposal(p))

    def _add_proposal(self, cur: Cursor, p: dict[str, Any]) -> bool:
        unknown = set(p) - set(_PROPOSAL_KEYS)
        if unknown:
            raise ValueError(f"unknown proposal keys {sorted(unknown)}")
        why = records.proposal_problem(p)
        if why:
            raise ValueError(why)
        cols = [k for k in _PROPOSAL_KEYS if k in p]
        return cur.run(_insert("proposals", cols, " ON CONFLICT DO NOTHING"),
                       [p[k] for k in cols]) == 1

    def proposals(self, target: str | None = None, since: float = 0, node: str | None = None,
                  limit: int = 1000) -> list[dict[str, Any]]:
        """Proposals received at or after `since`, newest first."""
        where, params = ["received_at >= ?"], [since]
        if target is not None:
            where.append("target = ?")
            params.append(target)
        if node is not None:
            where.append("node = ?")
            params.append(node)
        with self.tx(write=False) as cur:
            return cur.all(f"SELECT * FROM proposals WHERE {' AND '.join(where)} "
                           "ORDER BY received_at DESC, proposal_id LIMIT ?", [*params, limit])

    def votes(self, targets: Sequence[str], since: float, now: float,
              window_s: float) -> list[dict[str, Any]]:
        """The votes for a target (the policy's corroboration): for each node and each of
        `targets`, its newest proposal received at or after `since` that was not refused
        and is not stale (created more than `window_s` before it was received, or its own
        ttl_s over at `now`: the test Policy._stale makes), nor sent with a certificate
        a revocation of its node covers. One row per node and target, however many a node
        sent, so a flood from one node crowds out nobody."""
        if not targets:
            return []
        marks = ", ".join("?" * len(targets))
        sql = ("SELECT * FROM (SELECT p.*, ROW_NUMBER() OVER (PARTITION BY p.node, p.target "
               "ORDER BY p.received_at DESC, p.proposal_id) AS rn FROM proposals p "
               f"WHERE p.target IN ({marks}) AND p.received_at >= ? "
               "AND (p.created_at = 0 OR (p.created_at >= p.received_at - ? "
               "AND (p.ttl_s <= 0 OR p.created_at + p.ttl_s > ?))) "
               "AND NOT EXISTS (SELECT 1 FROM refusals r WHERE r.node = p.node "
               f"AND r.proposal_id = p.proposal_id) AND NOT {REVOKED_PROPOSAL}) AS v "
               "WHERE rn = 1 "
               "ORDER BY received_at DESC, node")
        with self.tx(write=False) as cur:
            rows = cur.all(sql, [*targets, since, window_s, now])
        for row in rows:
            row.pop("rn", None)
        return rows

    def count_proposals(self, node: str, since: float) -> int:
        """Proposals from `node` received at or after `since` (the mesh's clock)."""
        with self.tx(write=False) as cur:
            row = cur.one("SELECT COUNT(*) AS n FROM proposals WHERE node = ? "
                          "AND received_at >= ?", (node, since))
        return int(row["n"]) if row else 0

    # ---- decisions
    def add_decision(self, d: dict[str, Any], envelope: bytes) -> None:
        """Keep a decision (Decision.to_dict()) and its signed envelope, state "pending";
        nothing happens when its id is already stored."""
        with self.tx() as cur:
            cur.run(_insert("decisions", ("id", "target", "action", "body", "envelope",
                                          "issued_at", "expires_at", "state"),
                            " ON CONFLICT DO NOTHING"),
                    (d["id"], d["target"], d["action"], json.dumps(d, sort_keys=True),
                     bytes(envelope), d["issued_at"], d["expires_at"], "pending"))

    def mark_published(self, decision_id: str, seq: int, at: float | None = None) -> None:
        with self.tx() as cur:
            cur.run("UPDATE decisions SET state = 'published', seq = ?, published_at = ? "
                    "WHERE id = ?", (seq, time.time() if at is None else at, decision_id))

    def mark_failed(self, decision_id: str) -> None:
        """nats-server refused the decision for good: it was never in force."""
        with self.tx() as cur:
            cur.run("UPDATE decisions SET state = 'failed' WHERE id = ? AND state = 'pending'",
                    (decision_id,))

    def pending_decisions(self) -> list[tuple[dict[str, Any], bytes]]:
        """Decisions stored but not yet published, oldest first, with their envelopes."""
        with self.tx(write=False) as cur:
            rows = cur.all("SELECT body, envelope FROM decisions WHERE state = 'pending' "
                           "ORDER BY issued_at, id")
        return [(json.loads(r["body"]), bytes(r["envelope"])) for r in rows]

    def latest_decision(self, target: str) -> dict[str, Any] | None:
        """The newest decision (by issued_at) for `target`, with state, seq, published_at;
        failed ones (never in force) do not count."""
        with self.tx(write=False) as cur:
            row = cur.one("SELECT body, state, seq, published_at FROM decisions "
                          "WHERE target = ? AND state != 'failed' "
                          "ORDER BY issued_at DESC, id DESC LIMIT 1", (target,))
        return _decision(row) if row else None

    def block_expiry(self, target: str) -> float:
        """The latest expiry of any block ever issued for `target` (failed ones aside;
        0 when none): a revoke must outlive them all, or a relay replaying an older,
        longer block after the revoke ran out on the agents would block it again."""
        with self.tx(write=False) as cur:
            row = cur.one("SELECT MAX(expires_at) AS t FROM decisions WHERE target = ? "
                          "AND action = 'block' AND state != 'failed'", (target,))
        return float(row["t"]) if row and row["t"] is not None else 0.0

    def future_decisions(self, after: float) -> list[dict[str, Any]]:
        """Targets' latest decisions (failed ones aside) issued after `after`: issued while
        the mesh's clock was ahead, refused by every agent as dated in the future."""
        with self.tx(write=False) as cur:
            rows = cur.all("SELECT d.body, d.state, d.seq, d.published_at FROM decisions d "
                           f"WHERE d.issued_at > ? AND {LATEST} ORDER BY d.issued_at, d.id",
                           (after,))
        return [_decision(r) for r in rows]

    def retire_future(self, target: str, after: float) -> int:
        """Mark every decision for `target` issued after `after` "failed": never in force
        (every agent refused it as dated in the future), so none is its target's latest."""
        with self.tx() as cur:
            return cur.run("UPDATE decisions SET state = 'failed' WHERE target = ? "
                           "AND issued_at > ? AND state != 'failed'", (target, after))

    def current_decisions(self, now: float, action: str | None = None,
                          envelopes: bool = False) -> list[dict[str, Any]]:
        """Every target's latest decision (failed ones aside) not expired at `now`, oldest
        first; `action`: only blocks or only revokes; `envelopes`: with "envelope" (bytes).
        No row limit: what the stream should hold, and the standing revocations."""
        where, params = [LATEST, "d.expires_at > ?"], [now]
        if action is not None:
            where.append("d.action = ?")
            params.append(action)
        with self.tx(write=False) as cur:
            rows = cur.all("SELECT d.body, d.state, d.seq, d.published_at, d.envelope "
                           f"FROM decisions d WHERE {' AND '.join(where)} "
                           "ORDER BY d.issued_at, d.id", params)
        return [{**_decision(r), **({"envelope": bytes(r["envelope"])} if envelopes else {})}
                for r in rows]

    def due_canaries(self, issued_before: float, now: float) -> list[dict[str, Any]]:
        """Published canary decisions issued at or before `issued_before`, unexpired at
        `now` and still their target's latest: those due for promotion. No row limit."""
        with self.tx(write=False) as cur:
            # The LIKE only narrows the rows (the body is json.dumps: '"stage": "canary"'
            # cannot come from inside a string, whose quotes are escaped); the body decides.
            rows = cur.all("SELECT d.body, d.state, d.seq, d.published_at FROM decisions d "
                           f"WHERE {LATEST} AND d.state = 'published' AND d.action = 'block' "
                           "AND d.issued_at <= ? AND d.expires_at > ? "
                           "AND d.body LIKE ? ORDER BY d.issued_at, d.id",
                           (issued_before, now, '%"stage": "canary"%'))
        out = [_decision(r) for r in rows]
        return [d for d in out if (d.get("scope") or {}).get("stage") == "canary"]

    def decisions(self, active_at: float | None = None, limit: int = 1000,
                  target: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
        """Decisions newest first; `active_at`: only those not expired at that time."""
        where, params = ["1 = 1"], []
        for cond, value in (("expires_at > ?", active_at), ("target = ?", target),
                            ("state = ?", state)):
            if value is not None:
                where.append(cond)
                params.append(value)
        with self.tx(write=False) as cur:
            rows = cur.all("SELECT body, state, seq, published_at FROM decisions WHERE "
                           f"{' AND '.join(where)} ORDER BY issued_at DESC, id DESC LIMIT ?",
                           [*params, limit])
        return [_decision(r) for r in rows]

    # ---- refusals
    def add_refusal(self, r: dict[str, Any]) -> None:
        """Record a refusal (keys: _REFUSAL_KEYS, `at` and `reason` required); any other
        keys are kept in its `detail`."""
        detail = {k: v for k, v in r.items() if k not in _REFUSAL_KEYS}
        with self.tx() as cur:
            cur.run(_insert("refusals", (*_REFUSAL_KEYS, "detail")),
                    (r["at"], *(r.get(k) or "" for k in _REFUSAL_KEYS[1:4]), r["reason"],
                     r.get("proposal_id") or "", r.get("source") or "",
                     json.dumps(detail, sort_keys=True, default=str)))

    def refusals(self, limit: int = 1000, since: float = 0,
                 node: str | None = None) -> list[dict[str, Any]]:
        """Refusals at or after `since`, newest first."""
        where, params = "at >= ?", [since]
        if node is not None:
            where, params = where + " AND node = ?", [since, node]
        with self.tx(write=False) as cur:
            rows = cur.all(f"SELECT * FROM refusals WHERE {where} ORDER BY at DESC, id DESC "
                           "LIMIT ?", [*params, limit])
        for row in rows:
            row["detail"] = json.loads(row["detail"] or "{}")
        return rows

    # ---- the fleet view
    def nodes(self) -> list[dict[str, Any]]:
        """Every node that ever reported, by name, with its last heartbeat's figures,
        `open_incidents` ({class: number of its live incidents}), `revoked_at` (its latest
        revocation, None if none) and `revoked` (whether that covers the newest certificate
        it reported with)."""
        with self.tx(write=False) as cur:
            rows = cur.all("SELECT n.*, (SELECT MAX(r.revoked_at) FROM node_revocations r "
                           "WHERE r.node = n.node) AS revoked_at FROM nodes n ORDER BY n.node")
            counts = cur.all("SELECT node, event_class, COUNT(*) AS n FROM incidents WHERE state "
                             f"IN ({', '.join('?' * len(LIVE_STATES))}) "
                             "GROUP BY node, event_class", LIVE_STATES)
        by_node: dict[str, dict[str, int]] = {}
        for c in counts:
            by_node.setdefault(c["node"], {})[c["event_class"]] = int(c["n"])
        for row in rows:
            row["probes"] = json.loads(row["probes"] or "{}")
            row["rules"] = json.loads(row["rules"] or "[]")
            row["ready"], row["dry_run"] = bool(row["ready"]), bool(row["dry_run"])
            row["open_incidents"] = by_node.get(row["node"], {})
            row["revoked"] = revocation.covers(row["revoked_at"], float(row["cert_not_before"]))
        return rows

    def incidents(self, event_class: str | None = None, state: str | Sequence[str] | None = None,
                  node: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """The latest snapshot of each incident, most recently updated first. `state`: one
        state, several, or "live" (open, mitigated, escalated)."""
        where, params = ["1 = 1"], []
        states = LIVE_STATES if state == "live" else (state,) if isinstance(state, str) else state
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            params.extend(states)
        for cond, value in (("event_class = ?", event_class), ("node = ?", node)):
            if value is not None:
                where.append(cond)
                params.append(value)
        with self.tx(write=False) as cur:
            rows = cur.all(f"SELECT * FROM incidents WHERE {' AND '.join(where)} "
                           "ORDER BY updated_at DESC, node, incident_id LIMIT ?", [*params, limit])
        for row in rows:
            row["rules"] = json.loads(row["rules"] or "[]")
        return rows

    def count(self, table: str, node: str | None = None) -> int:
        """Rows in one of the store's tables (for tests and the CLI's summaries)."""
        if table not in ("reports", "nodes", "incidents", "mitigations", "evidence", "feedback",
                         "proposals", "decisions", "refusals", "node_revocations",
                         "enrolments"):
            raise ValueError(f"no table {table!r}")
        sql = f"SELECT COUNT(*) AS n FROM {table}" + (" WHERE node = ?" if node else "")
        with self.tx(write=False) as cur:
            row = cur.one(sql, (node,) if node else ())
        return int(row["n"]) if row else 0

    def mitigations(self, node: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """The latest snapshot of each mitigation, most recently updated first."""
        where, params = ("WHERE node = ? ", [node]) if node else ("", [])
        with self.tx(write=False) as cur:
            rows = cur.all(f"SELECT * FROM mitigations {where}ORDER BY updated_at DESC, node, "
                           "mitigation_id LIMIT ?", [*params, limit])
        for row in rows:
            row["params"] = json.loads(row["params"] or "{}")
        return rows


# d is its target's latest decision: no newer one for the target that did not fail.
# A decision `d` that is its target's latest (failed ones aside): SQL for a WHERE clause.
LATEST = ("d.state != 'failed' AND NOT EXISTS (SELECT 1 FROM decisions n WHERE "
           "n.target = d.target AND n.state != 'failed' AND (n.issued_at > d.issued_at "
           "OR (n.issued_at = d.issued_at AND n.id > d.id)))")


def _decision(row: dict[str, Any]) -> dict[str, Any]:
    return {**json.loads(row["body"]), "state": row["state"], "seq": int(row["seq"]),
            "published_at": row["published_at"]}


def open_store(url: str, create: bool = True) -> Store:
    """The store at `url`: "sqlite:///path", a plain path, or "postgresql://...". With
    create=False an absent store (file or schema) is a StoreError instead of being made."""
    try:
        kind = store_kind(url)
    except MeshConfigError as e:
        raise StoreError(str(e)) from None
    if kind == "postgresql":
        from mesh.store_pg import PgStore
        return PgStore(url, create)
    from mesh.store_sqlite import SqliteStore
    path = url[len("sqlite://"):] if url.startswith("sqlite:///") else url
    return SqliteStore(path, create)
