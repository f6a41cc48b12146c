"""The mesh store's tables, written once and rendered for SQLite and for PostgreSQL.

Column types are abstract (text, real, int, json, bytes, serial) so the two backends
cannot drift: SQLite gets its affinities, PostgreSQL DOUBLE PRECISION, BIGINT, BYTEA.
JSON is kept as text in both (the store parses it), booleans as 0/1 integers.
Records a node sent are keyed by (node, its id): a node can only ever replace its own.

SCHEMA_VERSION is stored in `meta`; a store written by a newer version is refused.
"""
from __future__ import annotations

SCHEMA_VERSION = 2
# 2: refusals indexed by (node, proposal_id) (a refused proposal is no vote); decisions
#    may be in state "failed". Tables and indexes are CREATE ... IF NOT EXISTS, so the
#    service upgrades a version 1 store at start by running them again.

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
               ("fleet_active", "int", "0"), ("fleet_refused", "int", "0")],
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
                   ("event_class", "text", "''"), ("received_at", "real", None)],
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
}


def create_statements(dialect: str) -> list[str]:
    """CREATE TABLE/INDEX IF NOT EXISTS statements for `dialect` ("sqlite", "postgresql")."""
    types = _TYPES[dialect]
    out = []
    for table, (columns, key, indexes) in TABLES.items():
        cols = []
        for name, kind, default in columns:
            col = f"{name} {types[kind]}"
            if kind != "serial":
                col += f" DEFAULT {default}" if default is not None else " NOT NULL"
            cols.append(col)
        if key:
            cols.append(f"PRIMARY KEY ({key})")
        out.append(f"CREATE TABLE IF NOT EXISTS {table} ({', '.join(cols)})")
        for index in indexes:
            name = f"{table}_{index.replace(', ', '_')}"
            out.append(f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({index})")
    return out


def columns(table: str) -> list[str]:
    return [name for name, _, _ in TABLES[table][0]]
