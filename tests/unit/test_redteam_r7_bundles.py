"""Red team r7 (area B): a bundle's rule that takes an anomaly detector's id.

Feedback records, hit counts, false-positive counts and metrics are keyed by rule id
("anomaly.beacon" for the model's beacon detector). A bundle (or rules_extra) may define
a rule with id "anomaly.beacon": it loads. A false-positive verdict on that rule's
incident then makes an "anomaly.beacon" record that keeps the MODEL's beacon findings in
its scope back too (an exception silencing another detector), and the two share counts."""
from __future__ import annotations

import asyncio

import pytest

from agent.bundles import BundleConflict, BundleError
from agent.config import Config
from agent.daemon import Agent

RULE = b"""rules:
  - id: anomaly.beacon
    version: 1
    class: suspicious_activity
    severity: low
    action: investigate
    description: a site rule that happens to take the model's id
    match:
      - event: proc.exec
        where:
          exe_known: true
"""


def test_a_bundle_rule_cannot_take_an_anomaly_detectors_id(tmp_path) -> None:
    agent = Agent(Config(state_dir=str(tmp_path / "state"), run_dir=str(tmp_path / "run"),
                         rules_extra=None))
    try:
        asyncio.run(agent.apply_bundle({"site.yaml": RULE}, {}, "", "why", "tester"))
    except (BundleConflict, BundleError) as e:
        assert "anomaly" in str(e)
        return
    names = list(agent.rulebook.ruleset.names)
    pytest.fail(f"a rule with the anomaly model's id was put in force: "
                f"{[n for n in names if n.startswith('anomaly.')]}")
