"""Rules that change without a restart: SIGHUP, the control API's ReloadRules and
`swarm-agent rules reload` all come here.

A reload reads and validates every rule file off the loop (a thread: parsing must not
stall the ring-buffer readers), then switches on the loop thread, between two events of
the consumer, in one synchronous step that cannot be interleaved with a finding: the
kernel thresholds first (one BPF map element, written whole or not at all: the only step
that can fail, and then nothing changed), then the responder's lifetimes, the detector
and the set the status reports. A bad set (file, line and reason) changes nothing.

What a reload does not touch: mitigations in force keep the lifetime they were given
(a rule removed or changed does not lift or shorten them); hit counts are kept per
"id@version" across reloads, so a new version starts at 0 and an old one keeps its
count; the process probe's kernel-side filters come from the config's `breach:` lists,
not from the rules, and stay as they are (a rule naming "@list" is checked against the
config's list names when it is validated).

Reloads are serialised: one that comes while another runs waits for it, then reads the
files afresh. SIGHUPs coalesce: while one is waiting, another adds nothing. A SIGHUP
before the agent is ready is kept and served once it is (the rules read at start-up may
already be stale). A SIGHUP's reload is audited as the control call's is (identity
"signal:SIGHUP").
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from agent.config import Config, ConfigError
from agent.detect.rules import Detector, RuleError
from agent.detect.ruleset import RuleSet, load_ruleset

log = logging.getLogger("swarm_agent")


@dataclass(frozen=True)
class Reloaded:
    """What a successful reload put in use."""

    ruleset: RuleSet
    changed: bool          # its version differs from the set it replaced
    took_s: float          # from the request to the new set in use (lock wait included)


class ReloadError(ConfigError):
    """A reload that changed nothing; the message names file, line and reason."""


class RuleReloader:
    """Holds the rule set in use and switches it. `use(ruleset, detector)` puts a validated
    set in use on the loop thread and raises (OSError) only if nothing was changed."""

    def __init__(self, cfg: Config, ruleset: RuleSet,
                 use: Callable[[RuleSet, Detector], None], clock: Callable[[], float] = time.time):
        self.cfg, self.ruleset, self._use, self._clock = cfg, ruleset, use, clock
        # the rule files and directories a reload reads, in load order: the config's,
        # then the bundle in force (agent.bundles), set by the agent
        self.paths: Callable[[], list[Path]] = lambda: list(cfg.rule_paths)
        self.bundle: Callable[[], dict[str, Any]] = dict      # what status shows of it
        self.loaded_at = clock()
        self.reloads = 0
        self.failures = 0
        self.last_error: str | None = None    # the last failed reload's sentence
        self.last_error_at = 0.0
        self.last_hit_at: dict[str, float] = {}   # "id@version" -> wall time of its last finding
        self._lock: asyncio.Lock | None = None
        self._hup_waiting = False
        self._hup_before_ready = False
        self._tasks: set[asyncio.Task] = set()
        # (result, detail) of a SIGHUP reload -> the audit log; set by the agent.
        self.audit: Callable[[str, str], None] | None = None

    def hit(self, name: str) -> None:
        self.last_hit_at[name] = self._clock()

    async def reload(self, origin: str) -> Reloaded:
        """Read every rule file and put the set in use; raises ReloadError and keeps the
        rules in use on a bad set. `origin` ("sighup", "control:<identity>") is logged."""
        asked = time.monotonic()
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            self._hup_waiting = False   # a SIGHUP from now on needs a read after this one
            try:
                ruleset = await asyncio.to_thread(load_ruleset, self.paths())
                detector = Detector(ruleset.rules, self.cfg)
                self._use(ruleset, detector)    # on the loop thread: between two events
            except (RuleError, OSError) as e:
                return self._failed(e, origin)
            took_s = time.monotonic() - asked
            old, self.ruleset = self.ruleset, ruleset
            self.loaded_at = self._clock()
            self.reloads += 1
        changed = old.version != ruleset.version
        log.info("rules reloaded", extra={
            "origin": origin, "version": ruleset.version, "previous": old.version,
            "changed": changed, "rules": len(ruleset.rules), "took_ms": round(took_s * 1e3, 2),
            "added": sorted(set(ruleset.names) - set(old.names)),
            "removed": sorted(set(old.names) - set(ruleset.names))})
        return Reloaded(ruleset, changed, took_s)

    def _failed(self, e: Exception, origin: str) -> Reloaded:
        if isinstance(e, OSError):
            why = f"the kernel refused the new thresholds: {e.strerror or e}"
        else:
            why = str(e)
        message = f"rules not reloaded, the rules in use stay ({self.ruleset.version}): {why}"
        self.failures += 1
        self.last_error, self.last_error_at = message, self._clock()
        log.error("rules reload rejected", extra={"origin": origin, "reason": why,
                                                  "file": getattr(e, "file", None),
                                                  "line": getattr(e, "line", None),
                                                  "version": self.ruleset.version})
        raise ReloadError(message) from None

    # -- SIGHUP ---------------------------------------------------------------------------

    def on_sighup(self, ready: bool) -> None:
        """The loop's SIGHUP handler: reload in a task (coalesced), or once ready."""
        if not ready:
            self._hup_before_ready = True
            return
        if self._hup_waiting:
            return
        self._hup_waiting = True
        task = asyncio.get_running_loop().create_task(self._reload_quietly("sighup"))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def started(self) -> None:
        """The agent is ready: serve a SIGHUP that came during start-up."""
        if self._hup_before_ready:
            self._hup_before_ready = False
            self.on_sighup(True)

    async def _reload_quietly(self, origin: str) -> None:
        """A signal's reload: no caller to answer, so the audit log gets what a control
        call's would (identity "signal:SIGHUP")."""
        try:
            done = await self.reload(origin)
        except ReloadError as e:
            self._audit("FAILED_PRECONDITION", str(e))   # also logged, counted, in status
            return
        except Exception:   # noqa: BLE001 -- a signal's task has no caller to tell
            log.exception("rules reload failed", extra={"origin": origin})
            return
        self._audit("OK", f"{len(done.ruleset.rules)} rules, {done.ruleset.version}"
                    + ("" if done.changed else " (unchanged)"))

    def _audit(self, result: str, detail: str) -> None:
        if self.audit is None:
            return
        try:
            self.audit(result, detail)
        except Exception:   # noqa: BLE001 -- the reload is done; the log still says it
            log.exception("audit of a SIGHUP reload failed")

    # -- what status, heartbeats and `swarm-agent rules` show -----------------------------

    def status(self) -> dict[str, Any]:
        return {"version": self.ruleset.version, "loaded_at": self.loaded_at,
                "files": list(self.ruleset.files), "reloads": self.reloads,
                "reload_failures": self.failures, "last_error": self.last_error or "",
                "last_error_at": self.last_error_at, "bundle": self.bundle()}

    def listing(self, counters: Counter[str]) -> list[dict[str, Any]]:
        """Every rule in use with its hits (findings of its id@version since start)."""
        return [{"id": r.id, "version": r.version, "class": r.event_class.value,
                 "severity": r.severity.value, "action": r.action, "scope": r.scope or "",
                 "description": r.description, "source": r.source,
                 "hits": counters.get(f"findings.{r.name}", 0),
                 "last_hit_at": self.last_hit_at.get(r.name, 0.0)}
                for r in self.ruleset.rules]

    def retired_hits(self, counters: Counter[str]) -> dict[str, int]:
        """Hits of rules (id@version) no longer in use: their history is kept."""
        names = set(self.ruleset.names)
        return {k.removeprefix("findings."): n for k, n in counters.items()
                if k.startswith("findings.") and k != "findings.failed"
                and k.removeprefix("findings.") not in names}
