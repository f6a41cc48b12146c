"""An in-memory stand-in for mesh.store.Store (the methods the decider uses, with the
semantics FLEET-SPEC.md gives them), for the decider's tests before the real SQLite and
PostgreSQL stores are merged: the same tests must pass against `open_store(...)`.
Thread-safe (the decider calls the store through asyncio.to_thread)."""
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
        return out[-limit:]

    def count_proposals(self, node: str, since: float) -> int:
        with self._lock:
            return sum(1 for p in self._proposals if p["node"] == node and p["received_at"] >= since)

    def add_decision(self, d: dict[str, Any], envelope: bytes) -> None:
        with self._lock:
            self._decisions.append({**copy.deepcopy(d), "state": "pending", "seq": None})
            self._envelopes[d["id"]] = envelope

    def mark_published(self, decision_id: str, seq: int) -> None:
        with self._lock:
            for d in self._decisions:
                if d["id"] == decision_id:
                    d["state"], d["seq"] = "published", seq

    def pending_decisions(self) -> list[tuple[dict[str, Any], bytes]]:
        with self._lock:
            return [({k: v for k, v in d.items() if k not in ("state", "seq")},
                     self._envelopes[d["id"]]) for d in self._decisions if d["state"] == "pending"]

    def latest_decision(self, target: str) -> dict[str, Any] | None:
        with self._lock:
            mine = [d for d in self._decisions if d["target"] == target]
            return copy.deepcopy(max(mine, key=lambda d: d["issued_at"])) if mine else None

    def decisions(self, active_at: float | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        with self._lock:
            out = [copy.deepcopy(d) for d in self._decisions
                   if active_at is None or d["expires_at"] > active_at]
        return out[-limit:]

    def add_refusal(self, r: dict[str, Any]) -> None:
        with self._lock:
            self._refusals.append(dict(r))

    def refusals(self, limit: int = 1000, since: float = 0) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._refusals if r["at"] >= since][-limit:]

    def nodes(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(n) for n in self._nodes.values()]

    def close(self) -> None:
        pass
