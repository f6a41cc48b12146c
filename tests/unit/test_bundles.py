"""agent.bundles: a bundle's checks (names, sizes, parts and their validators), its atomic
apply with the real rule loader and reload path of an Agent (no host changes: the agent
is built, not started), the swap back when a step fails, rollback, and the start-up with
a corrupt bundle directory."""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from agent import bundles
from agent.bundles import BundleConflict, BundleError, check
from agent.config import Config
from agent.daemon import Agent

RULE = """rules:
  - id: site.{name}
    version: {version}
    class: policy_violation
    severity: high
    action: report
    description: the site's own rule
    match:
      - event: proc.exec
        where:
          exe_known: true
          exe_path: {{glob: "/opt/{name}/*"}}
"""


def rule(name: str = "x", version: int = 1) -> bytes:
    return RULE.format(name=name, version=version).encode()


@pytest.fixture
def agent(tmp_path):
    return Agent(Config(state_dir=str(tmp_path / "state"), run_dir=str(tmp_path / "run"),
                        rules_extra=None))


def site_rules(agent: Agent) -> list[str]:
    return [n for n in agent.rulebook.ruleset.names if n.startswith("site.")]


def apply(agent: Agent, rules: dict, parts: dict | None = None, label: str = "") -> dict:
    return asyncio.run(agent.apply_bundle(rules, parts or {}, label, "why", "tester"))


@pytest.mark.parametrize("name", ["../x.yaml", "a/b.yaml", "x.yml", ".hidden.yaml", "x",
                                  "", "x\n.yaml", "-x.yaml", "a" * 70 + ".yaml"])
def test_a_rule_file_name_must_be_plain(name):
    with pytest.raises(BundleError, match="plain NAME.yaml"):
        check({name: rule()}, {})


def test_sizes_counts_and_text_are_checked():
    with pytest.raises(BundleError, match="at most 1048576"):
        half = bundles.MAX_BYTES // 2
        check({"a.yaml": b"#" * half, "b.yaml": b"#" * (half + 1)}, {})
    with pytest.raises(BundleError, match="at most 64 files"):
        check({f"r{i}.yaml": rule() for i in range(65)}, {})
    with pytest.raises(BundleError, match="not UTF-8"):
        check({"a.yaml": b"\xff\xfe"}, {})
    with pytest.raises(BundleError, match="NUL"):
        check({"a.yaml": b"rules: []\0"}, {})
    with pytest.raises(BundleError, match="empty bundle"):
        check({}, {})


def test_a_part_without_a_validator_is_refused_and_one_with_is_validated(monkeypatch):
    # an Agent built earlier in this process registered the anomaly one
    monkeypatch.delitem(bundles.VALIDATORS, "anomaly", raising=False)
    with pytest.raises(BundleError, match="'anomaly' has no validator"):
        check({}, {"anomaly": b"threshold: 1"})

    def validate(data):
        if not isinstance(data, dict) or not isinstance(data.get("threshold"), float):
            raise ValueError("threshold must be a number")
        return data

    monkeypatch.setitem(bundles.VALIDATORS, "anomaly", validate)
    assert check({}, {"anomaly": b"threshold: 0.5"}).parts == {"anomaly": {"threshold": 0.5}}
    with pytest.raises(BundleError, match="config part anomaly: threshold must be a number"):
        check({}, {"anomaly": b"threshold: high"})
    with pytest.raises(BundleError, match="config part anomaly:"):
        check({}, {"anomaly": b"a: 1\na: 2\n"})             # duplicate key: yamlsafe
    with pytest.raises(BundleError, match="not a plain name"):
        check({}, {"../anomaly": b"x: 1"})


def test_the_version_is_the_content_not_the_order_or_the_label():
    a = check({"a.yaml": rule("a"), "b.yaml": rule("b")}, {})
    b = check({"b.yaml": rule("b"), "a.yaml": rule("a")}, {})
    c = check({"a.yaml": rule("a"), "b.yaml": rule("b", 2)}, {})
    d = check({"b.yaml": rule("a"), "a.yaml": rule("b")}, {})      # names swapped
    assert a.version == b.version
    assert len({a.version, c.version, d.version}) == 3


def test_apply_rollback_and_the_chain_of_previous(agent):
    first = apply(agent, {"site.yaml": rule("one")}, label="v1")
    assert first["number"] == 1 and first["previous"] == 0 and first["label"] == "v1"
    assert site_rules(agent) == ["site.one@1"]
    second = apply(agent, {"site.yaml": rule("two")})
    assert second["previous"] == 1
    assert site_rules(agent) == ["site.two@1"]       # a bundle replaces the last one whole
    assert agent.rulebook.status()["bundle"]["number"] == 2
    assert asyncio.run(agent.rollback_bundle()) == (2, 1)
    assert site_rules(agent) == ["site.one@1"]
    assert asyncio.run(agent.rollback_bundle()) == (1, 0)
    assert site_rules(agent) == []
    with pytest.raises(BundleConflict, match="nothing to roll back"):
        asyncio.run(agent.rollback_bundle())
    assert [b["number"] for b in agent.bundles.listing()] == [2, 1]


PACKAGED_ID = RULE.format(name="x", version=1).replace("site.x", "net.syn_flood").encode()


@pytest.mark.parametrize("bad, why", [
    ({"bad.yaml": b"rules: [1]"}, "rule #1 must be a mapping"),
    ({"a.yaml": rule("one"), "b.yaml": rule("one")}, "duplicate id"),
    ({"a.yaml": PACKAGED_ID}, "net.syn_flood: duplicate id"),     # as in rules_extra
    ({"a.yaml": b"rules:\n  - id: site.y\n    version: 1\n"}, "site.y"),
])
def test_a_bundle_that_does_not_load_changes_nothing(agent, bad, why):
    apply(agent, {"site.yaml": rule("one")})
    before = (agent.rulebook.ruleset.version, os.readlink(agent.bundles.store.pointer),
              agent.bundles.store.numbers(), agent.rulebook.reloads)
    with pytest.raises(BundleConflict, match=why):
        apply(agent, bad)
    assert (agent.rulebook.ruleset.version, os.readlink(agent.bundles.store.pointer),
            agent.bundles.store.numbers(), agent.rulebook.reloads) == before
    assert site_rules(agent) == ["site.one@1"]


def test_a_failure_after_the_swap_swaps_back(agent, monkeypatch):
    """The reload path itself refuses (a kernel map write, say) or the parts cannot be
    used: the pointer, the rules and the status are as they were."""
    apply(agent, {"site.yaml": rule("one")})
    before = agent.rulebook.ruleset.version

    def refuse(parts):
        raise ValueError("the model refused its config")

    agent.bundles.use_parts = refuse
    with pytest.raises(BundleConflict, match="not applied, nothing changed: the model "
                                             "refused its config"):
        apply(agent, {"site.yaml": rule("two")})
    assert agent.bundles.store.current() == 1 and agent.bundles.in_force == 1
    assert agent.rulebook.ruleset.version == before and site_rules(agent) == ["site.one@1"]
    assert agent.bundles.store.numbers() == [1]          # the refused one is not kept


def test_a_restart_keeps_the_bundle(tmp_path):
    cfg = Config(state_dir=str(tmp_path / "s"), run_dir=str(tmp_path / "r"), rules_extra=None)
    apply(Agent(cfg), {"site.yaml": rule("kept")})
    again = Agent(cfg)
    assert site_rules(again) == ["site.kept@1"]
    assert again.rulebook.status()["bundle"]["number"] == 1
    # and a reload (SIGHUP) reads it too
    asyncio.run(again.reload_rules())
    assert site_rules(again) == ["site.kept@1"]


@pytest.mark.parametrize("corrupt", ["pointer_dangles", "meta_garbage", "rules_broken",
                                     "pointer_foreign"])
def test_a_corrupt_bundle_at_start_is_left_out_with_a_sentence(tmp_path, corrupt):
    cfg = Config(state_dir=str(tmp_path / "s"), run_dir=str(tmp_path / "r"), rules_extra=None)
    apply(Agent(cfg), {"site.yaml": rule("kept")})
    b = Path(cfg.state_dir) / "bundles"
    if corrupt == "pointer_dangles":
        os.rename(b / "b000001", b / "gone")
    elif corrupt == "meta_garbage":
        (b / "b000001" / "meta.json").write_text("{")
    elif corrupt == "rules_broken":
        (b / "b000001" / "rules" / "site.yaml").write_text("rules: [1]\n")
    else:
        os.unlink(b / "current")
        os.symlink("/etc", b / "current")
    agent = Agent(cfg)                                   # no crash
    assert site_rules(agent) == [] and agent.rulebook.ruleset.rules
    st = agent.rulebook.status()["bundle"]
    assert st["number"] == 0 and st["problem"].startswith("bundle not in force")
    assert "\n" not in st["problem"]


def test_the_stored_record(agent):
    meta = apply(agent, {"site.yaml": rule("one")}, label="2026-11-30.a")
    on_disk = json.loads((agent.bundles.store.path(1) / "meta.json").read_text())
    assert on_disk == meta
    assert set(meta) >= {"number", "version", "label", "applied_at", "by", "comment",
                         "previous", "files", "parts"}
    assert meta["by"] == "tester" and meta["files"] == ["site.yaml"]
    with pytest.raises(BundleError, match="label"):
        apply(agent, {"site.yaml": rule("one")}, label="../x")


def test_only_so_many_are_kept(agent, monkeypatch):
    monkeypatch.setattr(bundles, "KEEP", 3)
    for i in range(5):
        apply(agent, {"site.yaml": rule(f"r{i}")})
    assert agent.bundles.store.numbers() == [3, 4, 5]


def test_rollback_of_a_bundle_left_out_at_start_clears_it(tmp_path):
    cfg = Config(state_dir=str(tmp_path / "s"), run_dir=str(tmp_path / "r"), rules_extra=None)
    apply(Agent(cfg), {"site.yaml": rule("kept")})
    (Path(cfg.state_dir) / "bundles" / "b000001" / "meta.json").write_text("[]")
    agent = Agent(cfg)
    assert agent.bundles.problem
    assert asyncio.run(agent.rollback_bundle()) == (1, 0)
    assert not agent.bundles.problem and not Agent(cfg).bundles.problem
    with pytest.raises(BundleConflict, match="nothing to roll back"):
        asyncio.run(agent.rollback_bundle())


def test_a_refused_reload_swaps_back_without_a_second_reload(agent):
    """The reload path refuses the set after the swap (the kernel refused a map write):
    the pointer goes back, and the rules were never switched."""
    apply(agent, {"site.yaml": rule("one")})
    reloads, version = agent.rulebook.reloads, agent.rulebook.ruleset.version

    def refuse(ruleset, detector):
        raise OSError(1, "Operation not permitted")

    agent.rulebook._use = refuse
    with pytest.raises(BundleConflict, match="the kernel refused the new thresholds"):
        apply(agent, {"site.yaml": rule("two")})
    assert agent.bundles.store.current() == 1 and agent.bundles.in_force == 1
    assert (agent.rulebook.reloads, agent.rulebook.ruleset.version) == (reloads, version)
    assert agent.rulebook.failures == 1
