"""A bundle's `anomaly` part (agent.anomalystate.bundle_validator, Agent._use_parts): laid
over the config file's section and checked whole; put in force with the learned state
kept; a rollback to no bundle returns to the config file's section; the host's state_path
cannot be set by a bundle."""
from __future__ import annotations

from pathlib import Path

import pytest

from agent import anomalystate, bundles
from agent.detect.anomaly import AnomalyConfig
from tests.unit.anomaly_stream import benign
from tests.unit.test_anomaly_daemon import agent_on


def test_the_part_is_laid_over_the_config_files_section() -> None:
    base = AnomalyConfig.from_dict({"warmup_s": 600, "detectors": ["mahalanobis", "beacon"]})
    got = anomalystate.bundle_validator(base)({"false_alarm_rate": 1e-6,
                                               "beacon": {"threshold": 0.95}})
    assert got.false_alarm_rate == 1e-6 and got.beacon.threshold == 0.95
    assert got.beacon.max_interval_s == base.beacon.max_interval_s
    assert got.warmup_s == 600 and tuple(got.detectors) == ("mahalanobis", "beacon")


@pytest.mark.parametrize("doc, says", [
    (["beacon"], "must be a mapping"),
    ({"state_path": "/etc/shadow"}, "state_path is the host's"),
    ({"detectors": ["beacon", "magic"]}, "unknown detector 'magic'"),
    ({"no_such_key": 1}, "unknown config key anomaly.no_such_key"),
])
def test_a_bad_part_is_refused_with_one_sentence(doc, says) -> None:
    with pytest.raises(ValueError, match=says):
        anomalystate.bundle_validator(AnomalyConfig())(doc)


def test_a_part_in_force_keeps_what_was_learned_and_rollback_returns(tmp_path: Path) -> None:
    agent = agent_on(tmp_path)
    assert bundles.VALIDATORS["anomaly"] is not None
    for e in benign(1, 0, 600):
        agent.anomaly.observe(e)
    agent.anomaly.tick(600 * 10**9)
    def learned(st):
        return st["workloads"], st["profiles"], st["detectors"]["mahalanobis"]["windows"]
    before = learned(agent.anomaly.status())
    assert before[0] > 0 and before[1] > 0
    stricter = bundles.VALIDATORS["anomaly"]({"false_alarm_rate": 1e-7})
    agent._use_parts({"anomaly": stricter})
    assert agent.anomaly.cfg.false_alarm_rate == 1e-7
    assert learned(agent.anomaly.status()) == before
    agent._use_parts({"anomaly": bundles.VALIDATORS["anomaly"]({"enabled": False})})
    assert agent.anomaly is None and agent.anomaly_status() == {"enabled": False}
    agent._use_parts({})                # rollback to no bundle: the config file's section
    assert agent.anomaly is not None
    assert agent.anomaly.cfg.false_alarm_rate == agent.cfg.anomaly.false_alarm_rate
    assert learned(agent.anomaly.status()) == before
