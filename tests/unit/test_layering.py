"""Data flows sources -> detect -> respond -> enforce, with state and report beside respond
(DESIGN.md). This walks every module's imports and fails when an arrow points backwards,
or when the database or the firewall is touched outside the one package that owns it."""
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
}
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
    return names


def _modules():
    for stage in ALLOWED:
        for path in sorted((AGENT / stage).glob("*.py")):
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
