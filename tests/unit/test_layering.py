"""Data flows sources -> detect -> respond -> enforce, with state and report beside respond
(DESIGN.md). This walks every module's imports and fails when an arrow points backwards,
or when the database or the firewall is touched outside the one package that owns it.

The daemon wires the stages together and the CLI talks to it over the control API; only
the three commands that work without a running agent reach further (run: the daemon;
cleanup: the firewall; check-config: the rules). Nothing in the product imports the lab
(swarmlab/: attack generators), the tests or the benches."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

AGENT = Path(__file__).resolve().parents[2] / "agent"

# Which agent packages each stage may import (besides itself, agent.model, agent.config).
ALLOWED = {
    "sources": set(),
    "detect": set(),
    "enforce": set(),
    "state": set(),
    "respond": {"detect", "enforce", "state"},
    "report": {"state", "proto"},
    "control": {"respond", "enforce", "state", "proto", "detect"},
    # agent/daemon.py: the composition root, everything but the CLI.
    "daemon": {"sources", "detect", "respond", "enforce", "state", "report", "control", "proto"},
    "cli": {"proto", "daemon", "enforce", "detect"},
}
# What the CLI may take from the packages it reaches (the rest goes over the control API).
CLI_REACH = {"agent.daemon", "agent.enforce.nft", "agent.enforce.base", "agent.detect.rules",
             "agent.detect.ruleset"}
# Top-level packages of the checkout that are not the product.
NOT_PRODUCT = {"swarmlab", "tests", "bench"}
# Libraries only one package may use: the database and the firewall.
OWNED = {"sqlite3": "state", "nftables": "enforce"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "agent":      # from agent import daemon -> agent.daemon
                names.update(f"agent.{a.name}" for a in node.names)
    return names


def _modules():
    for stage in ALLOWED:
        paths = [AGENT / f"{stage}.py"] if (AGENT / f"{stage}.py").exists() \
            else sorted((AGENT / stage).glob("*.py"))
        for path in paths:
            yield stage, path


@pytest.mark.parametrize("stage, path", list(_modules()), ids=lambda v: getattr(v, "name", v))
def test_imports_point_downstream(stage, path):
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] == "agent" and len(parts) > 1 and parts[1] in ALLOWED:
            target = parts[1]
            assert target == stage or target in ALLOWED[stage], \
                f"{path.relative_to(AGENT.parent)} imports {name}: {stage} may not depend on {target}"
        owner = OWNED.get(parts[0])
        assert owner is None or owner == stage, \
            f"{path.relative_to(AGENT.parent)} uses {parts[0]}: only agent/{owner} may"


def test_only_enforce_and_state_are_owners_elsewhere():
    # The CLI, daemon and helpers outside the stages must not reach the database or the
    # firewall directly either.
    for path in AGENT.rglob("*.py"):
        rel = path.relative_to(AGENT)
        if rel.parts[0] in ALLOWED or rel.parts[0] == "proto":
            continue
        for name in _imports(path):
            assert name.split(".")[0] not in OWNED, f"agent/{rel} uses {name}"


def test_the_cli_reaches_only_its_own_commands():
    for path in sorted((AGENT / "cli").glob("*.py")):
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "agent" and len(parts) > 1 and parts[1] in ("daemon", "enforce", "detect"):
                assert name in CLI_REACH, \
                    f"agent/cli/{path.name} imports {name}: the CLI goes through the control API"


def test_the_product_never_imports_the_lab():
    for path in AGENT.rglob("*.py"):
        for name in _imports(path):
            assert name.split(".")[0] not in NOT_PRODUCT, \
                f"agent/{path.relative_to(AGENT)} imports {name}: not part of the product"


def test_no_attack_code_inside_the_package():
    # The generators write whole IP packets (forged sources); they belong to the lab only.
    for path in AGENT.rglob("*.py"):
        text = path.read_text()
        assert "IPPROTO_RAW" not in text and "IP_HDRINCL" not in text, \
            f"agent/{path.relative_to(AGENT)} builds raw packets: attack code belongs in swarmlab/"
