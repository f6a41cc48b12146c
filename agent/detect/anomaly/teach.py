"""Feedback's "learn as normal", and its undoing.

`learn(eng, evidence, tag)` makes what one finding's evidence names normal: its
executables, destinations, ports and listeners become known to the workload's profile and
the node, its window vector is kept as a learned normal, a beacon pair becomes benign, a
drift's reference is frozen anew. With a tag (the feedback record's id) the engine
remembers exactly what this learning changed, that is, only what was not known before, so
that `unlearn(eng, tag)` (the record reverted) takes back that and nothing else: what the
node knew on its own stays known, what the verdict taught is news again. A drift
reference frozen anew is not unfrozen (the old one is gone); that is said in the count.

The memory is bounded: TAGS records of at most ITEMS changes each (the oldest record's
memory goes first; a record forgotten that way can no longer be undone, counted as
`unlearn_lost`). It is part of the engine's snapshot, so a restart keeps it."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

from agent.detect.anomaly.beacon import beacon_key
from agent.detect.anomaly.features import DIM, port_key, prefix, profile_of
from agent.detect.anomaly.profile import LEARNED_MAX

TAGS = 256
ITEMS = 512
SETS = ("exes", "dsts", "ports", "listens")


class Taught:
    """What each tagged learning changed: tag -> [[kind, *where], ...]."""

    def __init__(self, d: dict[str, Any] | None = None):
        d = d or {}
        self.tags: OrderedDict[str, list[list]] = OrderedDict(
            (str(k), [list(c) for c in v][:ITEMS]) for k, v in d.get("tags", {}).items())
        self.lost = int(d.get("lost", 0))
        while len(self.tags) > TAGS:
            self.tags.popitem(last=False)
            self.lost += 1

    def add(self, tag: str, change: list) -> None:
        changes = self.tags.setdefault(tag, [])
        self.tags.move_to_end(tag)
        if len(changes) < ITEMS:
            changes.append(change)
        while len(self.tags) > TAGS:
            self.tags.popitem(last=False)
            self.lost += 1

    def dump(self) -> dict[str, Any]:
        return {"tags": dict(self.tags), "lost": self.lost}


def learn(eng, evidence: dict[str, Any], tag: str = "") -> None:
    if not isinstance(evidence, dict):
        return
    note = (lambda change: eng.taught.add(tag, change)) if tag else (lambda change: None)
    sc = evidence.get("scope") or {}
    new = evidence.get("new") or {}
    wkey = sc.get("container") or sc.get("cgroup") or "node"
    w = eng.node if wkey == "node" else eng.workloads.get(wkey)
    pkey = w.profile if w is not None else profile_of(sc.get("cgroup") or wkey)
    items = {
        "exes": [f"sha256:{s}" for s in sc.get("exe_sha256", ())]
        + [f"id:{i}" for i in sc.get("exe_id", ())] + list(new.get("exes", ())),
        "dsts": [prefix(str(d)) for d in [*sc.get("dst", ()), *new.get("dsts", ())]],
        "ports": [port_key(int(p)) for p in sc.get("dport", ())]
        + [str(p) for p in new.get("ports", ())],
        "listens": [str(x) for x in new.get("listens", ())],
    }
    for key in (pkey, "node"):
        known = eng._profile(key).known
        for name in SETS:
            for item in map(str, items[name]):
                if item not in getattr(known, name):
                    getattr(known, name).add(item)
                    note(["known", key, name, item])
    vec = evidence.get("vector")
    if isinstance(vec, list) and len(vec) == DIM and \
            all(isinstance(v, (int, float)) for v in vec):
        key = str(evidence.get("profile") or pkey)
        p = eng._profile(key)
        p.learned = (p.learned + [[float(v) for v in vec]])[-LEARNED_MAX:]
        note(["vector", key, [float(v) for v in vec]])
    det = evidence.get("detector")
    if det == "beacon":
        bkey = "node" if wkey == "node" else \
            beacon_key(str(sc.get("container") or ""), str(sc.get("cgroup") or "")) or wkey
        for d in sc.get("dst", ()):
            for port in sc.get("dport", ()) or [None]:
                for pair in eng.beacon.learn(bkey, str(d), None if port is None else int(port)):
                    note(["beacon", *pair])
    elif det == "drift":
        eng._profile(pkey).freeze()
        note(["frozen", pkey])
    eng.counters["learned"] += 1


def unlearn(eng, tag: str) -> dict[str, int]:
    """Take back what the learning tagged `tag` changed; how many changes of each kind
    (`unknown`: nothing remembered under that tag)."""
    changes = eng.taught.tags.pop(tag, None)
    if changes is None:
        return {"unknown": 1}
    done: dict[str, int] = {}
    for c in changes:
        kind = c[0]
        if kind == "known":
            _, key, name, item = c
            p = eng.profiles.get(key)
            if p is not None and name in SETS:
                getattr(p.known, name).discard(item)
        elif kind == "vector":
            p = eng.profiles.get(c[1])
            if p is not None and c[2] in p.learned:
                p.learned.remove(c[2])
        elif kind == "beacon":
            eng.beacon.unlearn(c[1], c[2], int(c[3]))
        done[kind] = done.get(kind, 0) + 1
    eng.counters["unlearned"] += 1
    return done
