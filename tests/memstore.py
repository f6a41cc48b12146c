"""An in-memory stand-in for mesh.store.Store (the methods the decider uses, with the
semantics FLEET-SPEC.md and mesh/store.py give them: lists newest first, latest by
issued_at), so the decider's tests run without a database; where mesh.store is present
they run against the real SQLite store as well. Thread-safe (the decider calls the store
through asyncio.to_thread)."""
from __future__ import annotations

import copy
import threading
from typing import Any


class MemStore:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proposals: list[dict[str, Any]] = []
        self._proposal_ids: set[tuple[str, str]] = set()
        self._decisions: list[dict[str, Any]] = []          # insertion order
        self._envelopes: dict[str, bytes] = {}
        self._refusals: list[dict[str, Any]] = []
        self._nodes: dict[str, dict[str, Any]] = {}
        self._revoked: dict[str, float] = {}                 # node -> latest revocation

    def add_proposal(self, p: dict[str, Any]) -> bool:
        with self._lock:
            key = (p["node"], p["proposal_id"])
            if key in self._proposal_ids:
                return False
            self._proposal_ids.add(key)
            self._proposals.append(copy.deepcopy(p))
            self._nodes.setdefault(p["node"], {"node": p["node"], "provider": p.get("provider", "")})
            return True

    def proposals(self, target: str | None = None, since: float = 0, node: str | None = None,
                  limit: int = 1000) -> list[dict[str, Any]]:
        with self._lock:
            out = [copy.deepcopy(p) for p in self._proposals
                   if (target is None or p["target"] == target) and p["received_at"] >= since
                   and (node is None or p["node"] == node)]
        return out[::-1][:limit]

    def votes(self, targets, since: float, now: float, window_s: float) -> list[dict[str, Any]]:
        with self._lock:
            refused = {(r.get("node"), r.get("proposal_id")) for r in self._refusals}
            best: dict[tuple[str, str], dict[str, Any]] = {}
            for p in self._proposals:
                created, ttl = p.get("created_at") or 0, p.get("ttl_s") or 0
                stale = created and (created < p["received_at"] - window_s
                                     or (ttl > 0 and created + ttl <= now))
                revoked = self._revoked.get(p["node"])
                if p["target"] not in targets or p["received_at"] < since or stale \
                        or (p["node"], p["proposal_id"]) in refused \
                        or (revoked is not None and p.get("cert_not_before", 0) <= revoked):
                    continue
                key = (p["node"], p["target"])
                if key not in best or p["received_at"] >= best[key]["received_at"]:
                    best[key] = copy.deepcopy(p)
        return sorted(best.values(), key=lambda p: p["received_at"], reverse=True)

    def count_proposals(self, node: str, since: float) -> int:
        with self._lock:
            return sum(1 for p in self._proposals if p["node"] == node and p["received_at"] >= since)

    def add_decision(self, d: dict[str, Any], envelope: bytes) -> None:
        with self._lock:
            if any(x["id"] == d["id"] for x in self._decisions):
                return
            self._decisions.append({**copy.deepcopy(d), "state": "pending", "seq": 0})
            self._envelopes[d["id"]] = envelope

    def mark_published(self, decision_id: str, seq: int) -> None:
        with self._lock:
            for d in self._decisions:
                if d["id"] == decision_id:
                    d["state"], d["seq"] = "published", seq

    def mark_failed(self, decision_id: str) -> None:
        with self._lock:
            for d in self._decisions:
                if d["id"] == decision_id and d["state"] == "pending":
                    d["state"] = "failed"

    def pending_decisions(self) -> list[tuple[dict[str, Any], bytes]]:
        with self._lock:
            rows = sorted((d for d in self._decisions if d["state"] == "pending"),
                          key=lambda d: (d["issued_at"], d["id"]))
            return [({k: v for k, v in d.items() if k not in ("state", "seq")},
                     self._envelopes[d["id"]]) for d in rows]

    def latest_decision(self, target: str) -> dict[str, Any] | None:
        with self._lock:
            mine = [d for d in self._decisions if d["target"] == target and d["state"] != "failed"]
            return copy.deepcopy(max(mine, key=lambda d: (d["issued_at"], d["id"]))) \
                if mine else None

    def block_expiry(self, target: str) -> float:
        with self._lock:
            return max((d["expires_at"] for d in self._decisions if d["target"] == target
                        and d["action"] == "block" and d["state"] != "failed"), default=0.0)

    def future_decisions(self, after: float) -> list[dict[str, Any]]:
        latest = [self.latest_decision(t) for t in {d["target"] for d in self._decisions}]
        return sorted((d for d in latest if d is not None and d["issued_at"] > after),
                      key=lambda d: (d["issued_at"], d["id"]))

    def retire_future(self, target: str, after: float) -> int:
        with self._lock:
            mine = [d for d in self._decisions if d["target"] == target
                    and d["issued_at"] > after and d["state"] != "failed"]
            for d in mine:
                d["state"] = "failed"
            return len(mine)

    def current_decisions(self, now: float, action: str | None = None,
                          envelopes: bool = False) -> list[dict[str, Any]]:
        latest = [self.latest_decision(t) for t in {d["target"] for d in self._decisions}]
        out = [d for d in latest if d is not None and d["expires_at"] > now
               and (action is None or d["action"] == action)]
        if envelopes:
            out = [{**d, "envelope": self._envelopes[d["id"]]} for d in out]
        return sorted(out, key=lambda d: (d["issued_at"], d["id"]))

    def due_canaries(self, issued_before: float, now: float) -> list[dict[str, Any]]:
        return [d for d in self.current_decisions(now, action="block")
                if d["state"] == "published" and d["issued_at"] <= issued_before
                and (d.get("scope") or {}).get("stage") == "canary"]

    def decisions(self, active_at: float | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        with self._lock:
            out = [copy.deepcopy(d) for d in self._decisions
                   if active_at is None or d["expires_at"] > active_at]
        return sorted(out, key=lambda d: (d["issued_at"], d["id"]), reverse=True)[:limit]

    def add_refusal(self, r: dict[str, Any]) -> None:
        with self._lock:
            self._refusals.append(dict(r))

    def refusals(self, limit: int = 1000, since: float = 0) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._refusals if r["at"] >= since][::-1][:limit]

    def revoke_node(self, node: str, reason: str, operator: str, now: float,
                    unknown_ok: bool = False) -> dict[str, Any] | None:
        with self._lock:
            previous = self._revoked.get(node)
            self._revoked[node] = max(now, previous + 1.0 if previous is not None else 0.0)
            return {"node": node, "revoked_at": self._revoked[node], "previous": previous}

    def node_revoked_at(self, node: str) -> float | None:
        with self._lock:
            return self._revoked.get(node)

    def node_revocations(self, node: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        with self._lock:
            return [{"node": n, "revoked_at": t} for n, t in self._revoked.items()
                    if node is None or n == node][:limit]

    def nodes(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(n) for n in self._nodes.values()]

    def close(self) -> None:
        pass


def _real_store():
    try:
        from mesh.store import open_store
    except ImportError:         # mesh/store.py lives on another branch until the merge
        return None
    return open_store


STORE_KINDS = ["memory"] + (["sqlite"] if _real_store() else [])


def make_store(kind: str, directory) -> Any:
    """A fresh store of `kind` ("memory", or "sqlite": the real mesh.store in `directory`)."""
    if kind == "memory":
        return MemStore()
    return _real_store()(f"sqlite:///{directory}/mesh.db")
