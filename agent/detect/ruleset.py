"""The rule files as one versioned set: every file read, validated and checked whole, or
a RuleError naming file, line and reason (nothing of a bad set is ever used).

A set's version is "sha256:" + the first 16 hex digits of the SHA-256 of its parsed
content (every file's rules, in load order, as canonical JSON): a comment or formatting
edit keeps the version, any change a rule's meaning could see changes it. With the
"id@version" list it is what `status`, the mesh heartbeats and `swarm-agent rules` show.

A file being rewritten in place (a non-atomic copy, an editor saving) can be read half
written. Most such files fail validation (a rule cut mid-way lacks keys, YAML breaks),
but one cut between two rules is valid YAML with fewer rules: so every file's identity,
size and modification time are taken before reading and compared after the whole set is
validated, and a file that changed in between makes the set be read again (a few times,
about a second in all), then rejected ("changed while being read"). A file that fails
validation and changed under the read is treated the same way (it was likely cut by the
write). Writing rule files atomically (write a temporary file, then rename it) avoids
both.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from agent.config import DEFAULT_RULES
from agent.detect.rules import RULES_MAX_BYTES, Rule, RuleError, parse_rules
from agent.yamlsafe import Lines, YamlError, printable, read_yaml


@dataclass(frozen=True)
class RuleSet:
    """Validated rules and what identifies them."""

    rules: tuple[Rule, ...]
    version: str                 # "sha256:<16 hex>" of the parsed content
    files: tuple[str, ...]       # the files read, in load order

    @property
    def names(self) -> list[str]:
        """"id@version" of every rule, in load order."""
        return [r.name for r in self.rules]


def rule_files(path: str | Path | Sequence[str | Path] | None) -> list[Path]:
    """The files a rules path names: a file, every *.yaml of a directory (sorted), or a
    list of either; None: the packaged defaults. A directory without one is an error
    (an emptied or half-copied directory must not load as "no rules")."""
    paths = [path] if isinstance(path, (str, Path)) else list(path or [DEFAULT_RULES])
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.yaml"))
            if not found:
                raise RuleError(f"rules directory {printable(str(p))} holds no *.yaml file",
                                str(p), None)
            files.extend(found)
        else:
            files.append(p)
    return files


def load_ruleset(path: str | Path | Sequence[str | Path] | None = None,
                 attempts: int = 4) -> RuleSet:
    """Read and validate every rule file of `path` (see rule_files); ids must be unique
    across all files. Raises RuleError (file, line and reason) and then nothing was loaded.

    A set that changed while it was read (a copy or a swap in progress) is read again, up
    to `attempts` times over about a second: a write that completes meanwhile loads, one
    still going after that is refused ("changed while being read")."""
    for attempt in range(1, attempts):
        try:
            return _load_once(path)
        except _Changing:
            time.sleep(0.1 * attempt)
    return _load_once(path)      # a set still changing: its _Changing is a RuleError


class _Changing(RuleError):
    """The files moved under the read: reading again may succeed."""


def _load_once(path: str | Path | Sequence[str | Path] | None) -> RuleSet:
    files = rule_files(path)
    before = {p: _identity(p) for p in files}

    def changed() -> None:
        for p in files:
            if _identity(p) != before[p]:
                raise _Changing(f"rules file {printable(str(p))} changed while being read "
                                "(a write in progress?); nothing was loaded: reload once it "
                                "is complete, and write rule files atomically (rename)",
                                str(p), None)
        if rule_files(path) != files:
            # The directory's listing changed under the read (a symlinked directory
            # swapped, as a ConfigMap update does): the files read may be of neither version.
            raise _Changing("the rules directory changed while being read (a swap in "
                            "progress?); nothing was loaded: reload once it is complete",
                            str(path), None)

    rules: list[Rule] = []
    content: list[Any] = []
    where: dict[str, str] = {}
    try:
        for p in files:
            data, found = _load_file(p)
            content.append(data)
            for rule in found:
                if rule.id in where:
                    raise RuleError(f"{rule.source}: rule {rule.id}: duplicate id (first "
                                    f"at {where[rule.id]})", str(p), _line_of(rule.source))
                where[rule.id] = rule.source
            rules.extend(found)
    except RuleError:
        changed()      # a file cut mid-write is invalid: say so, it may be whole next read
        raise
    changed()
    blob = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
    version = "sha256:" + hashlib.sha256(blob.encode()).hexdigest()[:16]
    return RuleSet(tuple(rules), version, tuple(str(p) for p in files))


def _identity(p: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(p)
    except OSError:
        return None      # reading it says why
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _load_file(p: Path) -> tuple[Any, list[Rule]]:
    lines: dict[int, Lines] = {}
    try:   # not a regular file, over 1 MiB, not text, duplicate keys, nan, alias bombs
        data = read_yaml(p, "rules file", RULES_MAX_BYTES, lines)
    except YamlError as e:
        if e.line is None:
            raise RuleError(str(e), str(p), None) from None
        # "FILE:LINE: reason", as every other rule error
        reason = str(e).removeprefix(f"rules file {printable(str(p))} is ")
        raise RuleError(f"{printable(str(p))}:{e.line}: {reason}", str(p), e.line) from None
    return data, parse_rules(data, origin=printable(str(p)), lines=lines)


def _line_of(source: str) -> int | None:
    _, _, line = source.rpartition(":")
    return int(line) if line.isdigit() else None
