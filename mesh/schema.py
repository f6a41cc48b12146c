"""The mesh store's tables, written once and rendered for SQLite and for PostgreSQL.

Column types are abstract (text, real, int, json, bytes, serial) so the two backends
cannot drift: SQLite gets its affinities, PostgreSQL DOUBLE PRECISION, BIGINT, BYTEA.
JSON is kept as text in both (the store parses it), booleans as 0/1 integers.
Records a node sent are keyed by (node, its id): a node can only ever replace its own.

SCHEMA_VERSION is stored in `meta`; a store written by a newer version is refused.
"""
from __future__ import annotations

SCHEMA_VERSION = 4
# 2: refusals indexed by (node, proposal_id) (a refused proposal is no vote); decisions
#    may be in state "failed". Tables and indexes are CREATE ... IF NOT EXISTS, so the
#    service upgrades a version 1 store at start by running them again.
# 3: node_revocations; nodes and proposals record the notBefore of the certificate that
#    sent them (cert_not_before), added to an older store by ADDED_COLUMNS. Rows from
#    before have 0 there: any revocation of their node covers them.
# 4: enrolments (`swarm-mesh enroll` records each certificate's notBefore, so a revocation
#    covers a certificate that never reported, whatever the clock did since).

# Columns added to tables that existed before: (version, table, column). Their type and
# default come from TABLES; the backends add each one a store lacks (ALTER TABLE) before
# the CREATE INDEX statements run.
ADDED_COLUMNS: tuple[tuple[int, str, str], ...] = (
    (3, "nodes", "cert_not_before"),
    (3, "proposals", "cert_not_before"),
)

_TYPES = {
    "sqlite": {"text": "TEXT", "real": "REAL", "int": "INTEGER", "json": "TEXT",
               "bytes": "BLOB", "serial": "INTEGER PRIMARY KEY AUTOINCREMENT"},
    "postgresql": {"text": "TEXT", "real": "DOUBLE PRECISION", "int": "BIGINT", "json": "TEXT",
                   "bytes": "BYTEA", "serial": "BIGSERIAL PRIMARY KEY"},
}

# table -> (columns [(name, type, default)], primary key or None, indexes)
TABLES: dict[str, tuple[list[tuple[str, str, str | None]], str | None, list[str]]] = {
    "meta": ([("key", "text", None), ("value", "text", None)], "key", []),
    # Processed report ids (the idempotency ledger), pruned after report_ids_keep_s:
    # every kind below is also idempotent by its own key, so a report older than that
    # arriving again changes nothing.
    "reports": ([("node", "text", None), ("id", "text", None), ("kind", "text", None),
                 ("ref", "text", "''"), ("claimed", "text", "''"), ("created_at", "real", "0"),
                 ("received_at", "real", None), ("raw", "bytes", "NULL")],
                "node, id", ["received_at"]),
    "nodes": ([("node", "text", None), ("provider", "text", "''"), ("claimed", "text", "''"),
               ("claim_mismatches", "int", "0"), ("first_seen", "real", None),
               ("last_seen", "real", None), ("hb_at", "real", "0"), ("hb_seq", "int", "0"),
               ("version", "text", "''"), ("started_at", "real", "0"), ("ready", "int", "0"),
               ("dry_run", "int", "0"), ("probes", "json", "'{}'"),
               ("active_mitigations", "int", "0"), ("live_incidents", "int", "0"),
               ("ringbuf_losses", "int", "0"), ("outbox_depth", "int", "0"),
               ("outbox_dropped", "int", "0"), ("ruleset_version", "text", "''"),
               ("rules", "json", "'[]'"), ("fleet_seq", "int", "0"),
               ("fleet_active", "int", "0"), ("fleet_refused", "int", "0"),
               ("cert_not_before", "real", "0")],
              "node", []),
    "incidents": ([("node", "text", None), ("incident_id", "text", None),
                   ("event_class", "text", None), ("entity", "text", None),
                   ("severity", "text", None), ("state", "text", None),
                   ("first_seen_at", "real", None), ("detected_at", "real", None),
                   ("mitigated_at", "real", None), ("resolved_at", "real", None),
                   ("rules", "json", None), ("findings", "int", None), ("summary", "text", None),
                   ("deadline", "text", None), ("updated_at", "real", None),
                   ("received_at", "real", None)],
                  "node, incident_id", ["state, event_class"]),
    "mitigations": ([("node", "text", None), ("mitigation_id", "text", None),
                     ("kind", "text", None), ("target", "text", None), ("state", "text", None),
                     ("incident_id", "text", None), ("created_at", "real", None),
                     ("expires_at", "real", None), ("updated_at", "real", None),
                     ("reason", "text", None), ("rule", "text", None), ("params", "json", None),
                     ("received_at", "real", None)],
                    "node, mitigation_id", ["target"]),
    "evidence": ([("node", "text", None), ("evidence_id", "text", None),
                  ("incident_id", "text", None), ("collected_at", "real", None),
                  ("summary", "text", None), ("bundle", "json", None),
                  ("received_at", "real", None)],
                 "node, evidence_id", ["incident_id"]),
    "feedback": ([("node", "text", None), ("feedback_id", "text", None), ("rule", "text", None),
                  ("rule_version", "int", None), ("scope_kind", "text", None),
                  ("scope_value", "text", None), ("action", "text", None),
                  ("created_at", "real", None), ("expires_at", "real", None),
                  ("reason", "text", None), ("given_by", "text", None),
                  ("incident_id", "text", None),
                  ("reverted_at", "real", None), ("reverted_by", "text", None),
                  ("updated_at", "real", None), ("received_at", "real", None)],
                 "node, feedback_id", []),
    # Proposals: the proposing node is the client certificate's CN, its provider the O.
    "proposals": ([("node", "text", None), ("proposal_id", "text", None),
                   ("provider", "text", "''"), ("target", "text", None), ("rule", "text", "''"),
                   ("rule_version", "int", "0"), ("incident_id", "text", "''"),
                   ("operator", "text", "''"), ("evidence", "text", "''"),
                   ("created_at", "real", "0"), ("ttl_s", "real", "0"),
                   ("event_class", "text", "''"), ("received_at", "real", None),
                   ("cert_not_before", "real", "0")],
                  "node, proposal_id", ["target, received_at", "received_at"]),
    # Signed decisions: persisted (pending) before they are published, then published
    # with the stream sequence; "failed" when nats-server refused it for good (never in
    # force: latest_decision and the policy ignore it; the refusal says why).
    "decisions": ([("id", "text", None), ("target", "text", None), ("action", "text", None),
                   ("body", "json", None), ("envelope", "bytes", None),
                   ("issued_at", "real", None), ("expires_at", "real", None),
                   ("state", "text", "'pending'"), ("seq", "int", "0"),
                   ("published_at", "real", "0")],
                  "id", ["target, issued_at", "state", "expires_at"]),
    "refusals": ([("id", "serial", None), ("at", "real", None), ("node", "text", "''"),
                  ("provider", "text", "''"), ("target", "text", "''"),
                  ("reason", "text", None), ("proposal_id", "text", "''"),
                  ("source", "text", "''"), ("detail", "json", "'{}'")],
                 None, ["at", "node, proposal_id"]),
    # Node revocations (swarm-mesh node-revoke): every certificate naming `node` (its CN)
    # whose notBefore is at or before `revoked_at` is refused, and what it sent counts no
    # more (mesh/nodes.py says why by notBefore and not by serial). Never deleted.
    "node_revocations": ([("id", "serial", None), ("node", "text", None),
                          ("revoked_at", "real", None), ("reason", "text", "''"),
                          ("operator", "text", "''"), ("at", "real", None)],
                         None, ["node, revoked_at"]),
    # The newest notBefore `swarm-mesh enroll` gave each node's certificates (and that
    # certificate's serial): a revocation is never dated before it (mesh/revocation.py),
    # even for a certificate that never reported. One row per node, only ever raised.
    "enrolments": ([("node", "text", None), ("not_before", "real", None),
                    ("serial", "text", "''"), ("at", "real", None)],
                   "node", []),
}


def _column(dialect: str, name: str, kind: str, default: str | None) -> str:
    col = f"{name} {_TYPES[dialect][kind]}"
    if kind != "serial":
        col += f" DEFAULT {default}" if default is not None else " NOT NULL"
    return col


def create_statements(dialect: str) -> list[str]:
    """CREATE TABLE IF NOT EXISTS statements for `dialect` ("sqlite", "postgresql")."""
    out = []
    for table, (columns, key, _) in TABLES.items():
        cols = [_column(dialect, *c) for c in columns]
        if key:
            cols.append(f"PRIMARY KEY ({key})")
        out.append(f"CREATE TABLE IF NOT EXISTS {table} ({', '.join(cols)})")
    return out


def index_statements() -> list[str]:
    """CREATE INDEX IF NOT EXISTS statements (the same SQL for both dialects); they run
    after the added columns are in place."""
    return [f"CREATE INDEX IF NOT EXISTS {table}_{index.replace(', ', '_')} ON {table} ({index})"
            for table, (_, _, indexes) in TABLES.items() for index in indexes]


def add_column_statement(dialect: str, table: str, column: str) -> str:
    """ALTER TABLE ... ADD COLUMN for one of ADDED_COLUMNS (the backend runs it only when
    the column is missing: SQLite has no ADD COLUMN IF NOT EXISTS)."""
    spec = next(c for c in TABLES[table][0] if c[0] == column)
    return f"ALTER TABLE {table} ADD COLUMN {_column(dialect, *spec)}"


def columns(table: str) -> list[str]:
    return [name for name, _, _ in TABLES[table][0]]


def upgrade_statements(dialect: str, columns_of) -> list[str]:
    """Everything that brings a store of any older version (or none) to SCHEMA_VERSION:
    CREATE TABLE IF NOT EXISTS, ADD COLUMN for the ADDED_COLUMNS a table that already
    exists lacks (`columns_of(table)`: its column names, empty when it does not exist),
    then the indexes."""
    alters = []
    for _, table, column in ADDED_COLUMNS:
        have = columns_of(table)
        if have and column not in have:
            alters.append(add_column_statement(dialect, table, column))
    return create_statements(dialect) + alters + index_statements()
