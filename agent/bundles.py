"""Rule and model-config bundles from outside (the control API's ApplyBundle, ListBundles,
RollbackBundle): a set of rule files and optional named config parts ("anomaly"),
validated whole, applied atomically, versioned, with rollback to the previous version.

On disk, under <state_dir>/bundles/:
  b000007/rules/*.yaml    the bundle's rule files (safe names: no paths)
  b000007/parts/NAME.yaml each config part, validated by VALIDATORS[NAME]
  b000007/meta.json       number, version ("sha256:<16 hex>" of the content), label,
                          applied_at, by, comment, previous (the number before it, 0: none)
  current                 the pointer: a symlink to the bundle in force ("b000007"), swapped
                          with rename(2); absent: no bundle (the packaged rules and
                          rules_extra only)

Applying (BundleManager.apply): the request is checked whole (names, sizes: at most
MAX_BYTES in all, MAX_FILES files; every part parsed and validated; the full rule set --
packaged rules, rules_extra, the bundle's, in that order, a duplicate id an error as in
rules_extra -- loaded and its detector built), staged in a hidden directory and renamed
into place, then the pointer is swapped and the rules reloaded through the reload path
(agent.rulereload); then the parts are handed to the agent (`use_parts`). If anything
fails the pointer is swapped back, the rules reloaded as they were, and the staged
bundle removed: nothing changed. A rollback swaps the pointer to the bundle's `previous`
the same way. Bundle operations are serialised.

At start the agent loads the bundle in force; a bundle that is missing, unreadable or
whose rules do not load is left out (the packaged rules and rules_extra are used), and
`problem` says why (a degraded line in status, a log sentence): never a crash.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from agent.yamlsafe import YamlError, parse, printable

log = logging.getLogger("swarm_agent")

MAX_BYTES = 1 << 20          # a whole bundle: its files' contents together
MAX_FILES = 64
MAX_LABEL = 64
KEEP = 16                    # bundles kept on disk (the one in force and its previous always)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\.yaml")
PART_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+-]{0,63}")
DIR_RE = re.compile(r"b(\d{6})")

# part name -> validator: takes the part's parsed YAML, returns it (normalised) or raises
# ValueError with one sentence. A part without a validator is refused.
VALIDATORS: dict[str, Callable[[Any], Any]] = {}


class BundleError(ValueError):
    """A bundle refused for what it is (names, sizes, a part); nothing changed."""


class BundleTooLarge(BundleError):
    """A bundle over MAX_BYTES or MAX_FILES."""


class BundleConflict(BundleError):
    """A bundle or rollback refused for what the agent has (the full rule set does not
    load with it, nothing to roll back, the disk); nothing changed."""


@dataclass(frozen=True)
class Bundle:
    """A checked bundle: rule files (name -> text) and parts (name -> validated data)."""

    rules: dict[str, str]
    parts: dict[str, Any]
    raw_parts: dict[str, str]
    version: str


def check(rules: dict[str, bytes], parts: dict[str, bytes]) -> Bundle:
    """Names, sizes, text and every part's validator; raises BundleError."""
    if not rules and not parts:
        raise BundleError("an empty bundle: give at least one rule file or config part")
    if len(rules) + len(parts) > MAX_FILES:
        raise BundleTooLarge(f"a bundle holds at most {MAX_FILES} files, not "
                             f"{len(rules) + len(parts)}")
    size = sum(map(len, rules.values())) + sum(map(len, parts.values()))
    if size > MAX_BYTES:
        raise BundleTooLarge(f"the bundle is {size} bytes; at most {MAX_BYTES} (1 MiB)")
    texts: dict[str, str] = {}
    for name, content in rules.items():
        if not NAME_RE.fullmatch(name) or ".." in name:
            raise BundleError(f"rule file name {printable(name)!s} is not a plain NAME.yaml "
                              "(letters, digits, _ . -; no paths)")
        texts[name] = _text(f"rule file {name}", content)
    checked, raw = {}, {}
    for name, content in sorted(parts.items()):
        if not PART_RE.fullmatch(name):
            raise BundleError(f"config part name {printable(name)} is not a plain name "
                              "(lower-case letters, digits, _)")
        validate = VALIDATORS.get(name)
        if validate is None:
            known = ", ".join(sorted(VALIDATORS)) or "none"
            raise BundleError(f"config part {name!r} has no validator in this agent "
                              f"(parts it accepts: {known})")
        raw[name] = _text(f"config part {name}", content)
        try:
            checked[name] = validate(parse(raw[name], f"config part {name}"))
        except (YamlError, ValueError) as e:
            raise BundleError(f"config part {name}: {e}") from None
    digest = hashlib.sha256()
    for kind, files in (("rules", texts), ("parts", raw)):
        for name in sorted(files):
            data = files[name].encode()
            digest.update(f"{kind}/{name}\0{len(data)}\0".encode() + data)
    return Bundle(texts, checked, raw, "sha256:" + digest.hexdigest()[:16])


def _text(what: str, content: bytes) -> str:
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise BundleError(f"{what} is not UTF-8 text") from None
    if "\0" in text:
        raise BundleError(f"{what} holds a NUL byte")
    return text


def check_label(label: str) -> str:
    if label and not LABEL_RE.fullmatch(label):
        raise BundleError(f"label {printable(label)} is not a plain name (letters, digits, "
                          f"_ . : + -; at most {MAX_LABEL})")
    return label


class BundleStore:
    """The bundles on disk (module docstring) and the pointer to the one in force."""

    def __init__(self, state_dir: str | Path):
        self.dir = Path(state_dir) / "bundles"
        self.pointer = self.dir / "current"

    def current(self) -> int:
        """The number the pointer names (0: none). Raises OSError/ValueError if corrupt."""
        try:
            target = os.readlink(self.pointer)
        except FileNotFoundError:
            return 0
        m = DIR_RE.fullmatch(target)
        if m is None:
            raise ValueError(f"the bundle pointer names {printable(target)!s}, not a bundle")
        return int(m.group(1))

    def path(self, number: int) -> Path:
        return self.dir / f"b{number:06d}"

    def rules_dir(self, number: int) -> Path:
        return self.path(number) / "rules"

    def meta(self, number: int) -> dict[str, Any]:
        """The bundle's record; raises OSError or ValueError when it is unreadable."""
        meta = json.loads((self.path(number) / "meta.json").read_text())
        if not isinstance(meta, dict) or meta.get("number") != number:
            raise ValueError(f"bundle {number}: its meta.json does not describe it")
        return meta

    def parts(self, number: int) -> dict[str, str]:
        d = self.path(number) / "parts"
        return {p.stem: p.read_text() for p in sorted(d.glob("*.yaml"))} if d.is_dir() else {}

    def numbers(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir()
                      if (m := DIR_RE.fullmatch(p.name)) and p.is_dir())

    def stage(self, bundle: Bundle, meta: dict[str, Any]) -> int:
        """Write the bundle under a hidden name, fsync it, rename it into place as the
        next number; returns that number. The pointer is not touched."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        number = max(self.numbers(), default=0) + 1
        tmp = self.dir / f".stage-{secrets.token_hex(4)}"
        try:
            (tmp / "rules").mkdir(parents=True, mode=0o700)
            (tmp / "parts").mkdir(mode=0o700)
            for sub, files in (("rules", bundle.rules), ("parts", bundle.raw_parts)):
                for name, text in files.items():
                    _write(tmp / sub / (name if sub == "rules" else f"{name}.yaml"), text)
            _write(tmp / "meta.json", json.dumps({**meta, "number": number}, indent=1,
                                                 sort_keys=True))
            os.rename(tmp, self.path(number))
            _fsync_dir(self.dir)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return number

    def point(self, number: int) -> None:
        """Swap the pointer to `number` (0: no bundle) in one rename."""
        if number == 0:
            try:
                os.unlink(self.pointer)
            except FileNotFoundError:
                pass
        else:
            tmp = self.dir / f".current-{secrets.token_hex(4)}"
            os.symlink(f"b{number:06d}", tmp)
            try:
                os.rename(tmp, self.pointer)
            except OSError:
                os.unlink(tmp)
                raise
        _fsync_dir(self.dir)

    def discard(self, number: int) -> None:
        shutil.rmtree(self.path(number), ignore_errors=True)

    def prune(self, keep: set[int]) -> None:
        """Remove the oldest bundles beyond KEEP, never one in `keep`; and stale stages."""
        for p in self.dir.glob(".stage-*"):
            shutil.rmtree(p, ignore_errors=True)
        old = [n for n in self.numbers() if n not in keep]
        for n in old[:max(0, len(old) - (KEEP - len(keep)))]:
            self.discard(n)


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


Reload = Callable[[str], Awaitable[Any]]            # RuleReloader.reload(origin)
Validate = Callable[[list[Path]], Any]              # load the full set and build its detector


class BundleManager:
    """The bundle in force for one agent: what the rule paths add (`rule_dirs`), what
    status shows (`status`), apply / rollback (serialised), the listing."""

    def __init__(self, state_dir: str | Path, clock: Callable[[], float] = time.time):
        self.store = BundleStore(state_dir)
        self.clock = clock
        self.in_force = 0             # the bundle whose rules are loaded (0: none)
        self.problem = ""             # why the pointer's bundle is not in force, if it is not
        self.use_parts: Callable[[dict[str, Any]], None] | None = None
        self._lock: asyncio.Lock | None = None

    def rule_dirs(self) -> list[Path]:
        """The bundle's rule directory, after the packaged rules and rules_extra."""
        d = self.store.rules_dir(self.in_force) if self.in_force else None
        return [d] if d is not None and any(d.glob("*.yaml")) else []

    def start(self, validate: Validate, base: list[Path]) -> Any:
        """At start: the pointer's bundle if its rules load with `base` (returns what
        validate returned for the set in use); else none in force and `problem` set."""
        try:
            number = self.store.current()
            if number:
                self.store.meta(number)
                self.in_force = number
                result = validate(base + self.rule_dirs())
                self.parts_now()
                return result
        except (OSError, ValueError) as e:
            why = getattr(e, "strerror", None) or str(e)
            self.problem = (f"bundle not in force, the packaged rules and rules_extra are: "
                            f"{printable(why)}")
            self.in_force = 0
            log.error("bundle not in force at start", extra={"reason": why})
        return validate(base)

    def parts_now(self) -> dict[str, Any]:
        """The config parts of the bundle in force, validated (ValueError if not): what
        the agent uses at start (an "anomaly" part: the model's config)."""
        return self.parts_of(self.in_force)

    async def apply(self, rules: dict[str, bytes], parts: dict[str, bytes], label: str,
                    comment: str, by: str, base: list[Path], validate: Validate,
                    reload: Reload) -> dict[str, Any]:
        """Check, stage, swap, reload (module docstring); returns the new bundle's record.
        Raises BundleError (refused) or OSError (the disk); nothing changed then."""
        bundle = check(rules, parts)
        check_label(label)
        async with self._serial():
            previous = self.in_force
            try:
                number = self.store.stage(bundle, {
                    "version": bundle.version, "label": label, "applied_at": self.clock(),
                    "by": by, "comment": comment, "previous": previous,
                    "files": sorted(bundle.rules), "parts": sorted(bundle.parts)})
            except OSError as e:
                raise BundleConflict(f"the bundle could not be stored: {e.strerror}") from None
            try:
                extra = [self.store.rules_dir(number)] if bundle.rules else []
                await asyncio.to_thread(validate, base + extra)
            except ValueError as e:
                self.store.discard(number)
                raise BundleConflict(f"the rule set with this bundle does not load: {e}") from None
            try:
                await self._switch(number, bundle.parts, reload, f"bundle {number}")
            except BundleError:
                self.store.discard(number)
                raise
            self.store.prune({number, previous})
            return self.store.meta(number)

    async def rollback(self, reload: Reload) -> tuple[int, int]:
        """Back to the previous bundle of the one in force (or to none); returns (from, to).
        Raises BundleError when there is nothing to roll back or the switch fails."""
        async with self._serial():
            now = self.in_force
            if now == 0 and self.problem:
                # the stored bundle was left out at start: rolling back drops the pointer
                # to it, so the next start is clean too (the rules in use do not change)
                broken = self._current_or_none()
                try:
                    self.store.point(0)
                except OSError as e:
                    raise BundleConflict(f"the bundle pointer could not be removed: "
                                         f"{e.strerror}") from None
                self.problem = ""
                return broken, 0
            if now == 0:
                raise BundleConflict("no bundle is in force: nothing to roll back")
            to = 0
            try:
                to = int(self.store.meta(now).get("previous") or 0)
                if to:
                    self.store.meta(to)
                parts = self.parts_of(to)
            except (OSError, ValueError) as e:
                raise BundleConflict(f"the previous bundle ({to}) is unreadable: "
                                  f"{getattr(e, 'strerror', None) or e}") from None
            await self._switch(to, parts, reload, f"rollback of bundle {now}")
            return now, to

    def parts_of(self, number: int) -> dict[str, Any]:
        raw = self.store.parts(number) if number else {}
        return check({}, {k: v.encode() for k, v in raw.items()}).parts if raw else {}

    async def _switch(self, number: int, parts: dict[str, Any], reload: Reload,
                      origin: str) -> None:
        """Pointer to `number`, reload, parts; on any failure everything back."""
        old_pointer, old_in_force = self._current_or_none(), self.in_force
        old_problem = self.problem
        try:
            self.store.point(number)
        except OSError as e:
            raise BundleConflict(f"the bundle pointer could not be swapped: {e.strerror}") from None
        self.in_force, self.problem = number, ""
        reloaded = False
        try:
            await reload(origin)
            reloaded = True
            if self.use_parts is not None:
                self.use_parts(parts)
        except Exception as e:     # noqa: BLE001 -- whatever failed, everything goes back
            try:
                self.store.point(old_pointer)
            except OSError:
                log.exception("bundle pointer not swapped back")
            self.in_force, self.problem = old_in_force, old_problem
            if reloaded:            # a refused reload changed nothing: nothing to undo
                try:
                    await reload(f"{origin} undone")
                except (ValueError, OSError):
                    log.exception("rules not restored after a refused bundle")
            if not isinstance(e, (ValueError, OSError)):
                raise
            raise BundleConflict(f"{origin} not applied, nothing changed: {e}") from None

    def _current_or_none(self) -> int:
        try:
            return self.store.current()
        except (OSError, ValueError):
            return 0

    def _serial(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def listing(self) -> list[dict[str, Any]]:
        """Every bundle kept, newest first, with `in_force` marked; unreadable ones say so."""
        out = []
        for n in reversed(self.store.numbers()):
            try:
                meta = self.store.meta(n)
            except (OSError, ValueError) as e:
                meta = {"number": n, "problem": f"unreadable: {getattr(e, 'strerror', None) or e}"}
            out.append({**meta, "in_force": n == self.in_force})
        return out

    def status(self) -> dict[str, Any]:
        """The bundle in force (number, version, label, applied_at, by) and any problem."""
        if not self.in_force:
            return {"number": 0, "problem": self.problem}
        try:
            meta = self.store.meta(self.in_force)
        except (OSError, ValueError):
            meta = {}
        return {"number": self.in_force, "version": meta.get("version", ""),
                "label": meta.get("label", ""), "applied_at": meta.get("applied_at", 0.0),
                "by": meta.get("by", ""), "problem": self.problem}
