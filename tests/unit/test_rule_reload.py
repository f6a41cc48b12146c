"""Rule sets and their reload, without a kernel: errors name file and line, a set's
version follows its meaning (not its comments), a file changed while being read or an
emptied directory is refused, and agent.rulereload switches everything together or
nothing (a kernel refusal, a bad file), serialises and coalesces reloads, keeps a SIGHUP
of the start-up for later and keeps hits per id@version."""
from __future__ import annotations

import asyncio
import re
import time
from dataclasses import replace
from pathlib import Path

import pytest

from agent.config import Config, Metrics
from agent.daemon import Agent
from agent.detect import ruleset as ruleset_mod
from agent.detect.rules import RuleError
from agent.detect.ruleset import load_ruleset
from agent.enforce.base import DryRunEnforcer
from agent.model import Event
from agent.respond.engine import Responder
from agent.rulereload import ReloadError, RuleReloader
from agent.state.store import Store

RULE = """\
# a comment
rules:
  - id: net.syn_flood
    version: {version}
    class: system_attack
    severity: high
    event: net.source
    thresholds: {{syns_per_s: {syns}}}
    action: challenge
    ttl_s: {ttl}
"""


def rules_file(tmp_path: Path, version: int = 1, syns: int = 5000, ttl: int = 300,
               name: str = "rules.yaml") -> Path:
    p = tmp_path / name
    p.write_text(RULE.format(version=version, syns=syns, ttl=ttl))
    return p


@pytest.mark.parametrize("edit,line,reason", [
    (("ttl_s: 300", "ttl_s: -1"), 10, "rule net.syn_flood: ttl_s must be a number"),
    (("syns_per_s: 5000", "syns_per_s: lots"), 8, "threshold syns_per_s must be a number"),
    (("severity: high", "severity: dire"), 6, "unknown severity 'dire'"),
    (("    action: challenge\n", "    action: challenge\n    colour: red\n"), 10,
     "unknown key 'colour'"),
    (("    version: 1\n", ""), 3, "missing key 'version'"),
    (("class: system_attack", "class: [system_attack"), 6, "not valid YAML"),
])
def test_errors_name_file_and_line(tmp_path: Path, edit, line: int, reason: str) -> None:
    p = rules_file(tmp_path)
    p.write_text(p.read_text().replace(*edit))
    with pytest.raises(RuleError, match=re.escape(reason)) as e:
        load_ruleset(p)
    assert str(e.value).startswith(f"{p}:{line}: "), str(e.value)
    assert (e.value.file, e.value.line) == (str(p), line)


def test_duplicate_ids_across_files_name_both_places(tmp_path: Path) -> None:
    rules_file(tmp_path, name="a.yaml")
    b = rules_file(tmp_path, version=2, name="b.yaml")
    with pytest.raises(RuleError) as e:
        load_ruleset(tmp_path)
    assert str(e.value) == (f"{b}:3: rule net.syn_flood: duplicate id (first at "
                            f"{tmp_path / 'a.yaml'}:3)")


def test_version_follows_meaning_not_comments(tmp_path: Path) -> None:
    p = rules_file(tmp_path)
    first = load_ruleset(p)
    assert re.fullmatch(r"sha256:[0-9a-f]{16}", first.version)
    assert first.names == ["net.syn_flood@1"] and first.files == (str(p),)
    p.write_text("# another comment\n" + p.read_text().replace("{syns_per_s: 5000}",
                                                                "\n      syns_per_s: 5000"))
    assert load_ruleset(p).version == first.version
    rules_file(tmp_path, syns=4999)
    assert load_ruleset(p).version != first.version


def test_empty_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "rules.d").mkdir()
    with pytest.raises(RuleError, match="holds no \\*.yaml file"):
        load_ruleset(tmp_path / "rules.d")


def test_file_changed_while_being_read_is_refused(tmp_path: Path, monkeypatch) -> None:
    # A writer that keeps appending to the file while the set is read, longer than the
    # re-reads wait: the stand-in is only the timing (each write lands between a read
    # and its check), the files are real.
    p = rules_file(tmp_path)
    real = ruleset_mod._load_file

    def read_then_writer_appends(path: Path):
        out = real(path)
        with open(path, "a") as f:
            f.write("# more\n")
        return out

    monkeypatch.setattr(ruleset_mod, "_load_file", read_then_writer_appends)
    with pytest.raises(RuleError, match="changed while being read"):
        load_ruleset(p)


def test_write_that_completes_during_the_read_is_read_again(tmp_path: Path,
                                                          monkeypatch) -> None:
    # The first read sees the file cut mid-rule (invalid) while the writer finishes it:
    # the set is read again and the whole file loads (a start-up must not fail on it).
    p = rules_file(tmp_path)
    whole = p.read_text()
    p.write_text(whole[: len(whole) // 2])
    real = ruleset_mod._load_file
    reads: list[Path] = []

    def writer_finishes_during_first_read(path: Path):
        reads.append(path)
        try:
            return real(path)
        finally:
            if len(reads) == 1:
                p.write_text(whole)

    monkeypatch.setattr(ruleset_mod, "_load_file", writer_finishes_during_first_read)
    loaded = load_ruleset(p)
    assert len(reads) == 2
    assert loaded.version == load_ruleset(p, attempts=1).version


def test_invalid_file_that_did_not_change_is_refused_at_once(tmp_path: Path) -> None:
    p = tmp_path / "rules.yaml"
    p.write_text("rules:\n  - id: net.cut\n")
    started = time.monotonic()
    with pytest.raises(RuleError) as e:
        load_ruleset(p)
    assert "changed while being read" not in str(e.value)
    assert time.monotonic() - started < 0.1


# -- the reloader ------------------------------------------------------------------------

def agent_on(tmp_path: Path, rules: Path) -> Agent:
    cfg = Config(state_dir=str(tmp_path / "state"), metrics=Metrics(listen=None),
                 rules_file=str(rules))
    agent = Agent(cfg)
    agent.store = Store(cfg.db_path)
    agent.responder = Responder(cfg, agent.store, DryRunEnforcer())
    return agent


def syn_event(syns: int) -> Event:
    now = 10**12
    return Event("net.source", "198.51.100.7", now, now - 10**9,
                 {"syns": syns, "packets": syns, "window_ns": 10**9})


class RefusingProbe:
    """The network probe's contract for a reload (set_thresholds) with a kernel that
    refuses the write, as a full or removed map would."""

    def __init__(self):
        self.calls = 0

    def set_thresholds(self, thresholds):
        self.calls += 1
        raise OSError(1, "Operation not permitted")


def test_reload_switches_detector_and_lifetimes_together(tmp_path: Path) -> None:
    p = rules_file(tmp_path, syns=5000, ttl=300)
    agent = agent_on(tmp_path, p)
    assert agent.detector.evaluate(syn_event(1000), 10**12) == []
    rules_file(tmp_path, version=2, syns=200, ttl=60)
    done = asyncio.run(agent.reload_rules("test"))
    assert done.changed and done.ruleset.names == ["net.syn_flood@2"] and done.took_s >= 0
    [finding] = agent.detector.evaluate(syn_event(1000), 10**12)
    assert finding.rule == "net.syn_flood@2"
    assert agent.responder._ttl_by_rule == {"net.syn_flood@2": 60.0}
    st = agent.status()
    assert st["rules"] == ["net.syn_flood@2"] and st["ruleset"]["version"] == done.ruleset.version
    assert st["ruleset"]["reloads"] == 1


def test_kernel_refusal_or_bad_file_changes_nothing(tmp_path: Path) -> None:
    p = rules_file(tmp_path, syns=5000)
    agent = agent_on(tmp_path, p)
    before = (agent.rulebook.ruleset, agent.detector, agent.rules, agent.responder._ttl_by_rule)
    agent.probe = RefusingProbe()
    rules_file(tmp_path, version=2, syns=200)
    with pytest.raises(ReloadError, match="the kernel refused the new thresholds"):
        asyncio.run(agent.reload_rules("test"))
    assert agent.probe.calls == 1
    agent.probe = None
    p.write_text(p.read_text() + "    colour: red\n")
    with pytest.raises(ReloadError, match=re.escape(f"{p}:11: rule net.syn_flood: unknown key")):
        asyncio.run(agent.reload_rules("test"))
    after = (agent.rulebook.ruleset, agent.detector, agent.rules, agent.responder._ttl_by_rule)
    assert after == before
    assert agent.detector.evaluate(syn_event(1000), 10**12) == []
    rs = agent.status()["ruleset"]
    assert (rs["reloads"], rs["reload_failures"]) == (0, 2) and "unknown key" in rs["last_error"]


def test_reloads_serialise_and_sighups_coalesce(tmp_path: Path) -> None:
    p = rules_file(tmp_path)
    used: list[str] = []
    book = RuleReloader(replace(Config(), rules_file=str(p)), load_ruleset(p),
                        lambda rs, det: used.append(rs.version))

    async def run() -> None:
        await asyncio.gather(book.reload("a"), book.reload("b"), book.reload("c"))
        assert book.reloads == 3
        for _ in range(5):           # a burst of SIGHUPs: one reload
            book.on_sighup(True)
        await asyncio.gather(*book._tasks)
        assert book.reloads == 4
        book.on_sighup(False)        # during start-up: kept, not served
        await asyncio.sleep(0.05)
        assert book.reloads == 4
        book.started()
        await asyncio.gather(*book._tasks)
        assert book.reloads == 5

    asyncio.run(run())
    assert len(used) == 5


def test_hits_are_kept_per_id_and_version(tmp_path: Path) -> None:
    p = rules_file(tmp_path, syns=200)
    agent = agent_on(tmp_path, p)
    agent.reporting = type("R", (), {"observe_event": staticmethod(lambda e, f: None)})()
    agent.on_event(syn_event(1000))
    agent.on_event(syn_event(1000))
    listing = agent.rule_listing()
    [rule] = listing["rules"]
    assert (rule["id"], rule["version"], rule["hits"]) == ("net.syn_flood", 1, 2)
    assert rule["last_hit_at"] > 0 and rule["source"] == f"{p}:3"
    rules_file(tmp_path, version=2, syns=200)
    asyncio.run(agent.reload_rules("test"))
    agent.on_event(syn_event(1000))
    listing = agent.rule_listing()
    assert [(r["version"], r["hits"]) for r in listing["rules"]] == [(2, 1)]
    assert listing["retired_hits"] == {"net.syn_flood@1": 2}
