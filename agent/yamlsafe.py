"""YAML files read defensively: the config and the rule files are operator input, and a
careless or hostile one must cost a clear sentence, never a traceback, a hang or memory.

read_yaml() refuses, before parsing, what is not a regular file, larger than its limit,
holding a NUL byte or not UTF-8; then parses (libyaml's parser under PyYAML's composer
and SafeConstructor) refusing duplicate mapping keys (with both lines), nesting deeper
than MAX_DEPTH, more than MAX_NODES values, more than MAX_ALIASES aliases, integers of
more than MAX_INT_DIGITS digits, and any value PyYAML itself cannot build (a 13th
month). The data is then walked once as its aliases expand: more than MAX_NODES values
("billion laughs" via anchors), a recursive alias, or a number that is not finite (.nan,
.inf, 1.0e+999) anywhere is refused, naming the key. Every refusal is a YamlError whose
message is one printable line.
"""
from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.resolver import Resolver

try:   # libyaml's parser (no recursion, 10x faster) under PyYAML's composer, which we limit
    from yaml._yaml import CParser
    _PARSER: tuple[type, ...] = (CParser,)
except ImportError:       # pragma: no cover - PyYAML without libyaml
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner
    _PARSER = (Parser, Scanner, Reader)

MiB = 1 << 20
MAX_DEPTH = 32          # nested mappings/lists; the config needs 4
MAX_ALIASES = 1000      # alias uses (*name) in one file
MAX_NODES = 100_000     # values in the file, and in the data once aliases are expanded
MAX_INT_DIGITS = 40     # no key takes an integer anywhere near 10**40


class YamlError(ValueError):
    """A file that cannot be taken as YAML data; the message is one line for the operator.
    `line`: the (1-based) line the parser stopped at, when it says."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


@dataclass(frozen=True)
class Lines:
    """Where a mapping starts in its file, and the line of each of its (scalar) keys."""

    line: int
    keys: dict[Any, int]


def read_yaml(path: str | Path, what: str, limit_bytes: int = MiB,
              lines: dict[int, Lines] | None = None) -> Any:
    """The data of the YAML file at `path` ("config x.yaml ..." with what="config");
    raises YamlError with one sentence. With `lines`, it is filled with where each mapping
    of the data starts (see parse)."""
    p = Path(path)
    label = f"{what} {printable(str(p))}"
    try:   # O_NONBLOCK: a FIFO without a writer must not hang the open
        with os.fdopen(os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise YamlError(f"{label} is not a regular file")
            if st.st_size > limit_bytes:
                raise YamlError(f"{label} is {st.st_size} bytes; at most {_size(limit_bytes)} "
                                "is read")
            raw = f.read(limit_bytes + 1)
    except OSError as e:
        raise YamlError(f"cannot read {label}: {e.strerror}") from None
    if len(raw) > limit_bytes:
        raise YamlError(f"{label} is larger than {_size(limit_bytes)}, the most that is read")
    nul = raw.find(b"\0")
    if nul >= 0:
        raise YamlError(f"{label} is not text (a NUL byte at offset {nul})")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise YamlError(f"{label} is not UTF-8 text (invalid byte at offset {e.start})") from None
    return parse(text, label, lines)


def parse(text: str, label: str, lines: dict[int, Lines] | None = None) -> Any:
    """YAML text to data, with the limits above; `label` starts every message. With
    `lines`: id() of every mapping in the data -> Lines (its first line and each scalar
    key's line), valid while the data lives (rule files name the line of an error)."""
    loader = _Loader(text)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise YamlError(f"{label} is not valid YAML: {_marked(e)}",
                        mark.line + 1 if mark else None) from None
    except yaml.YAMLError as e:
        raise YamlError(f"{label} is not valid YAML: {_one_line(str(e))}") from None
    except RecursionError:
        raise YamlError(f"{label} is nested too deeply") from None
    finally:
        loader.dispose()
    _walk(data, label)
    if lines is not None:
        lines.update(loader.lines)
    return data


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n % MiB == 0 else f"{n} bytes"


def _one_line(text: str) -> str:
    return printable(" ".join(text.split()))


def printable(text: str) -> str:
    """`text` with every character that is not printable written as its escape."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _marked(e: yaml.MarkedYAMLError) -> str:
    problem = _one_line(e.problem or e.context or "error")
    mark = e.problem_mark or e.context_mark
    if mark is None:
        return problem
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"


class _Loader(Composer, SafeConstructor, Resolver, *_PARSER):  # type: ignore[misc]
    """A SafeLoader with duplicate keys, depth, size, long integers and alias counts refused."""

    def __init__(self, stream: str):
        if len(_PARSER) == 1:
            _PARSER[0].__init__(self, stream)
        else:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self._depth = 0
        self._aliases = 0
        self._nodes = 0
        self.lines: dict[int, Lines] = {}

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise ConstructorError(None, None, f"more than {MAX_ALIASES} aliases",
                                       self.peek_event().start_mark)
            return super().compose_node(parent, index)
        self._depth += 1
        self._nodes += 1
        try:
            if self._nodes > MAX_NODES:
                raise ConstructorError(None, None, f"more than {MAX_NODES} values",
                                       self.peek_event().start_mark)
            if self._depth > MAX_DEPTH:
                raise ConstructorError(None, None, f"nested more than {MAX_DEPTH} levels deep",
                                       self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            data = super().construct_object(node, deep)
        except (ValueError, OverflowError) as e:   # a 13th month, an out-of-range date
            raise ConstructorError(None, None, f"cannot read {node.value!r:.40}: {e}",
                                   node.start_mark) from None
        if isinstance(node, yaml.MappingNode) and isinstance(data, dict):
            self.lines[id(data)] = Lines(node.start_mark.line + 1, {
                k.value: k.start_mark.line + 1 for k, _ in node.value
                if isinstance(k, yaml.ScalarNode)})
        return data

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue        # "<<: *base": keys given here override the merged ones
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:
                    continue        # unhashable: SafeConstructor reports it
                if first is not None:
                    raise ConstructorError(None, None, f"key {_show(key)} given twice "
                                           f"(first at line {first})", key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        digits = len(str(node.value).lstrip("+-").replace("_", ""))
        if digits > MAX_INT_DIGITS:
            raise ConstructorError(None, None, f"an integer of {digits} digits (at most "
                                   f"{MAX_INT_DIGITS})", node.start_mark)
        return super().construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def _show(key: Any) -> str:
    return _cut(f"'{key}'" if isinstance(key, str) and key.isprintable() else ascii(key))


def _cut(key: str) -> str:
    key = printable(key)
    return key if len(key) <= 80 else key[:77] + "..."


def _walk(data: Any, label: str) -> None:
    """Visit every value as the aliases expand it, within MAX_NODES and MAX_DEPTH."""
    budget = MAX_NODES
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, key, depth = stack.pop()
        budget -= 1
        if budget < 0:
            raise YamlError(f"{label} holds more than {MAX_NODES} values once its aliases "
                            "are expanded")
        if depth > MAX_DEPTH:
            raise YamlError(f"{label}: {_cut(key) or 'the top level'} is nested more than "
                            f"{MAX_DEPTH} levels deep (a recursive alias?)")
        if isinstance(value, float) and not math.isfinite(value):
            raise YamlError(f"{label}: {_cut(key) or 'the value'} must be a finite number "
                            f"(got {value})")
        if isinstance(value, dict):
            for k, v in value.items():
                stack.append((k, key, depth + 1))
                stack.append((v, f"{key}.{k}" if key else str(k), depth + 1))
        elif isinstance(value, (list, tuple, set)):
            for i, v in enumerate(value):
                stack.append((v, f"{key}[{i}]", depth + 1))
