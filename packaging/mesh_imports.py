#!/usr/bin/env python3
"""The `agent` files the mesh service needs, for the swarm-mesh package (packaging/build.sh).

The mesh imports a few of the agent's modules (the decision format, the generated gRPC
code, the health and reflection services, the vendored NATS client, YAML and log helpers).
The swarm-mesh package ships its own copy of exactly those, found here by reading the
import statements of mesh/*.py and following them through agent/, never by running them:
an import inside a function counts as much as one at the top. A vendored package
(agent/_vendor/<name>/) ships whole, with its LICENSE file, since it is one third-party unit.

    python3 packaging/mesh_imports.py [REPO]     # one path a line, relative to REPO, sorted

Only the standard library: it runs on the build host's python3 before any dependency is
installed.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

VENDOR = ("agent", "_vendor")


def module_file(repo: Path, dotted: str) -> Path | None:
    """agent/x/y.py or agent/x/y/__init__.py for "agent.x.y"; None when neither exists."""
    base = repo.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_names(path: Path, dotted: str) -> set[str]:
    """Every module name `path` (module `dotted`) imports, as dotted names; for
    `from X import Y` both X and X.Y (Y may be a submodule). Relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = dotted if path.name == "__init__.py" else dotted.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def parents(dotted: str) -> list[str]:
    """"agent.x.y" -> ["agent", "agent.x"]: packages whose __init__ runs first."""
    parts = dotted.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def vendored_tree(repo: Path, dotted: str) -> list[Path]:
    """A vendored package's every file (and its licence) when `dotted` lies in one."""
    parts = dotted.split(".")
    if tuple(parts[:2]) != VENDOR or len(parts) < 3:
        return []
    root = repo.joinpath(*VENDOR, parts[2])
    files = [p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    licences = [p for p in repo.joinpath(*VENDOR).glob(f"LICENSE.{parts[2]}*") if p.is_file()]
    return files + licences


def agent_files(repo: Path) -> list[str]:
    """The agent files mesh/ reaches through its imports, relative to `repo`, sorted."""
    todo = [f"mesh.{p.stem}" for p in sorted((repo / "mesh").glob("*.py"))]
    seen: set[str] = set()
    files: set[Path] = set()
    while todo:
        dotted = todo.pop()
        if dotted in seen:
            continue
        seen.add(dotted)
        path = module_file(repo, dotted)
        if path is None:
            continue                      # a name imported from a module, or not ours
        if dotted.split(".")[0] == "agent":
            files.add(path)
            files.update(vendored_tree(repo, dotted))
        for name in imported_names(path, dotted):
            if name.split(".")[0] in ("agent", "mesh"):
                todo.extend([*parents(name), name])
    return sorted(str(f.relative_to(repo)) for f in files)


if __name__ == "__main__":
    top = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    print("\n".join(agent_files(top)))
