"""The capabilities root keeps (packaging/swarm-agent.service, the DaemonSet, the table in
packaging/README.md) are exactly those the code says it uses
(agent.sources.capability.CAPABILITIES), each with its reason next to it."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from agent.sources.capability import CAPABILITIES, missing_capabilities

REPO = Path(__file__).resolve().parents[2]
UNIT = (REPO / "packaging/swarm-agent.service").read_text()


def test_the_units_bounding_set_is_the_table():
    [line] = re.findall(r"^CapabilityBoundingSet=(.*)$", UNIT, re.M)
    assert sorted(line.split()) == sorted(CAPABILITIES)
    assert re.findall(r"^AmbientCapabilities=(.*)$", UNIT, re.M) == [""]


def test_every_capability_is_justified_in_the_units_comments():
    commented = re.findall(r"^#\s+(CAP_[A-Z_]+)\s+\S", UNIT, re.M)
    assert sorted(commented) == sorted(CAPABILITIES)


def test_the_daemonset_adds_the_same_set():
    docs = yaml.safe_load_all((REPO / "packaging/k8s/daemonset.yaml").read_text())
    ds = next(d for d in docs if d and d["kind"] == "DaemonSet")
    [container] = ds["spec"]["template"]["spec"]["containers"]
    caps = container["securityContext"]["capabilities"]
    assert sorted("CAP_" + c for c in caps["add"]) == sorted(CAPABILITIES)
    assert caps["drop"] == ["ALL"]


def test_the_packaging_readme_table_is_the_table():
    readme = (REPO / "packaging/README.md").read_text()
    rows = dict(re.findall(r"^\| `(CAP_[A-Z_]+)` \| (.*) \|$", readme, re.M))
    assert rows == CAPABILITIES


def test_the_units_sandbox_leaves_what_the_code_writes_and_reads():
    from agent.enforce.nft import TCP_LOOSE

    assert f"ReadWritePaths=-{TCP_LOOSE}" in UNIT.splitlines()
    assert "ProtectHome=read-only" in UNIT.splitlines()


def test_missing_capabilities_reads_the_effective_set(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t000000c000001020\n")   # BPF PERFMON NET_ADMIN KILL
    assert missing_capabilities(str(status)) == ["CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH",
                                                 "CAP_SYS_ADMIN"]
    status.write_text("CapEff:\t000000c000281024\n")
    assert missing_capabilities(str(status)) == []
    assert missing_capabilities(str(tmp_path / "none")) == list(CAPABILITIES)
