"""The DaemonSet runs the same agent with the same privileges as the systemd unit: its
capability list is the unit's bounding set, and its mounts are where the config says."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from agent import config as agent_config

REPO = Path(__file__).resolve().parents[2]


def test_daemonset_matches_the_unit(tmp_path):
    docs = list(yaml.safe_load_all((REPO / "packaging/k8s/daemonset.yaml").read_text()))
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    (container,) = pod["containers"]
    sc = container["securityContext"]
    unit = (REPO / "packaging/swarm-agent.service").read_text()
    bounding = re.search(r"^CapabilityBoundingSet=(.*)$", unit, re.M).group(1).split()
    assert sorted("CAP_" + c for c in sc["capabilities"]["add"]) == sorted(bounding)
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True

    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config = mounts["/etc/swarm-agent/config.yaml"]
    assert "configMap" in volumes[config["name"]] and config["subPath"] == "config.yaml"
    assert volumes[mounts["/var/lib/swarm-agent"]["name"]]["hostPath"]["path"] == "/var/lib/swarm-agent"
    assert "/run/swarm-agent" in mounts
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")
    path = tmp_path / "config.yaml"
    path.write_text(configmap["data"]["config.yaml"])
    cfg = agent_config.load(path)   # the agent accepts it (unknown keys would be an error)
    assert (cfg.state_dir, cfg.run_dir) == ("/var/lib/swarm-agent", "/run/swarm-agent")
