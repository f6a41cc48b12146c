"""The database schema, as forward migrations (PRAGMA user_version counts how many ran).

Only agent/state uses it: the store (incidents, timelines, mitigations, audit) and the
mesh outbox (agent/state/outbox.py) share one database file.
"""
from __future__ import annotations

# Each entry migrates the schema from version i to i + 1; never edit one, append.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE incidents (
            id TEXT PRIMARY KEY, class TEXT NOT NULL, entity TEXT NOT NULL,
            severity TEXT NOT NULL, state TEXT NOT NULL,
            first_seen_at REAL NOT NULL, detected_at REAL NOT NULL,
            mitigated_at REAL, resolved_at REAL, rules TEXT NOT NULL DEFAULT '[]',
            findings INTEGER NOT NULL DEFAULT 1, deadline_missed INTEGER,
            summary TEXT NOT NULL DEFAULT '')""",
        "CREATE INDEX incidents_by_entity ON incidents (class, entity, state)",
        """CREATE TABLE incident_events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            incident_id TEXT NOT NULL REFERENCES incidents (id),
            at REAL NOT NULL, kind TEXT NOT NULL, text TEXT NOT NULL DEFAULT '',
            data TEXT NOT NULL DEFAULT '{}')""",
        "CREATE INDEX incident_events_by_incident ON incident_events (incident_id, seq)",
        """CREATE TABLE mitigations (
            id TEXT PRIMARY KEY, kind TEXT NOT NULL, target TEXT NOT NULL,
            params TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL, expires_at REAL,
            state TEXT NOT NULL, incident_id TEXT REFERENCES incidents (id),
            reason TEXT NOT NULL DEFAULT '', rule TEXT, updated_at REAL NOT NULL)""",
        "CREATE INDEX mitigations_by_target ON mitigations (target, created_at)",
        "CREATE INDEX mitigations_by_state ON mitigations (state, expires_at)",
        "CREATE INDEX mitigations_by_rule ON mitigations (rule, created_at)",
    ),
    (
        """CREATE TABLE audit (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL,
            identity TEXT NOT NULL, role TEXT NOT NULL, method TEXT NOT NULL,
            arguments TEXT NOT NULL DEFAULT '{}', result TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT '')""",
        "CREATE INDEX audit_by_time ON audit (at)",
    ),
    (
        # The mesh outbox (agent/state/outbox.py): triggers queue a snapshot of every
        # incident and mitigation change in the same transaction as the change, so no
        # crash can lose a report; a newer snapshot replaces one of the same row still
        # queued (its id was never acknowledged, the newer one supersedes it).
        """CREATE TABLE outbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
            kind TEXT NOT NULL, ref TEXT NOT NULL DEFAULT '', payload TEXT NOT NULL,
            created_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0)""",
        "CREATE INDEX outbox_by_ref ON outbox (kind, ref)",
        *(f"""CREATE TRIGGER outbox_{table}_{event} AFTER {event.upper()} ON {table}s BEGIN
            DELETE FROM outbox WHERE kind = '{table}' AND ref = NEW.id;
            INSERT INTO outbox (id, kind, ref, payload, created_at) VALUES
              (lower(hex(randomblob(16))), '{table}', NEW.id, {payload},
               (julianday('now') - 2440587.5) * 86400.0);
          END""" for table, payload in (
            ("incident", "json_object('incident_id', NEW.id, 'event_class', NEW.class, "
                         "'entity', NEW.entity, 'severity', NEW.severity, 'state', NEW.state, "
                         "'first_seen_at', NEW.first_seen_at, 'detected_at', NEW.detected_at, "
                         "'mitigated_at', NEW.mitigated_at, 'resolved_at', NEW.resolved_at, "
                         "'rules', json(NEW.rules), 'findings', NEW.findings, "
                         "'deadline_missed', NEW.deadline_missed, 'summary', NEW.summary)"),
            ("mitigation", "json_object('mitigation_id', NEW.id, 'kind', NEW.kind, "
                           "'target', NEW.target, 'state', NEW.state, "
                           "'incident_id', NEW.incident_id, 'created_at', NEW.created_at, "
                           "'expires_at', NEW.expires_at, 'updated_at', NEW.updated_at, "
                           "'reason', NEW.reason, 'rule', NEW.rule, 'params', json(NEW.params))"),
          ) for event in ("insert", "update")),
    ),
    (
        # GPU authorizations a scheduler made through the control API (agent.gpugrant;
        # those of the config are not stored): one row per workload and GPU.
        """CREATE TABLE gpu_grants (
            workload TEXT NOT NULL, gpu TEXT NOT NULL, job TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL, by TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (workload, gpu))""",
    ),
    (
        # Facts of this node that outlive a restart and are no table's rows:
        # "gpu.enrolled_at", when a scheduler first authorized a GPU workload here.
        """CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
    ),
    (
        # Feedback (agent.state.feedback): an operator's false-positive verdict as a scoped
        # exception to one rule or detector; reverted rows stay (their history is audit).
        """CREATE TABLE feedback (
            id TEXT PRIMARY KEY, rule TEXT NOT NULL, rule_version INTEGER NOT NULL,
            scope_kind TEXT NOT NULL, scope_value TEXT NOT NULL, action TEXT NOT NULL,
            created_at REAL NOT NULL, expires_at REAL NOT NULL,
            reason TEXT NOT NULL DEFAULT '', by TEXT NOT NULL DEFAULT '',
            incident_id TEXT NOT NULL DEFAULT '', reverted_at REAL,
            reverted_by TEXT NOT NULL DEFAULT '', hits INTEGER NOT NULL DEFAULT 0)""",
        "CREATE INDEX feedback_by_rule ON feedback (rule, reverted_at, expires_at)",
        # The mesh hears of every record made or reverted (kind 'feedback' in the outbox),
        # in the same transaction; a hits count going up is no news.
        *(f"""CREATE TRIGGER outbox_feedback_{event} AFTER {event.upper()} ON feedback
            {cond} BEGIN
            DELETE FROM outbox WHERE kind = 'feedback' AND ref = NEW.id;
            INSERT INTO outbox (id, kind, ref, payload, created_at) VALUES
              (lower(hex(randomblob(16))), 'feedback', NEW.id, json_object(
                'feedback_id', NEW.id, 'rule', NEW.rule, 'rule_version', NEW.rule_version,
                'scope_kind', NEW.scope_kind, 'scope_value', NEW.scope_value,
                'action', NEW.action, 'created_at', NEW.created_at,
                'expires_at', NEW.expires_at, 'reason', NEW.reason, 'by', NEW.by,
                'incident_id', NEW.incident_id, 'reverted_at', NEW.reverted_at,
                'reverted_by', NEW.reverted_by),
               (julianday('now') - 2440587.5) * 86400.0);
          END""" for event, cond in (
              ("insert", ""),
              ("update", "WHEN OLD.reverted_at IS NOT NEW.reverted_at"))),
    ),
    (
        # Fleet decisions (agent.state.fleet): the latest applied decision per target (a
        # block in force, or a revoke remembered until the block it lifted would have
        # expired, so a replayed old block cannot undo it), the stream cursor, and a
        # bounded list of refused decisions. No outbox triggers: a 100,000-decision
        # snapshot must not become 100,000 mesh reports (the heartbeat carries counts).
        """CREATE TABLE fleet_decisions (
            target TEXT PRIMARY KEY, id TEXT NOT NULL, action TEXT NOT NULL,
            issued_at REAL NOT NULL, expires_at REAL NOT NULL, seq INTEGER NOT NULL,
            reason TEXT NOT NULL DEFAULT '', provenance TEXT NOT NULL DEFAULT '{}',
            applied_at REAL NOT NULL)""",
        "CREATE INDEX fleet_decisions_by_expiry ON fleet_decisions (expires_at)",
        """CREATE TABLE fleet_cursor (
            id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL,
            stream_created TEXT NOT NULL DEFAULT '', updated_at REAL NOT NULL)""",
        """CREATE TABLE fleet_refusals (
            n INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, seq INTEGER NOT NULL,
            subject TEXT NOT NULL, target TEXT NOT NULL DEFAULT '', reason TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT '')""",
    ),
    (
        # The id of the mesh key that signed each applied fleet decision: after a change of
        # fleet.keys only what a key no longer trusted signed is lifted. Rows from before
        # have '' (agent.fleet.apply.plan says how those are treated).
        "ALTER TABLE fleet_decisions ADD COLUMN key_id TEXT NOT NULL DEFAULT ''",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
